//! A global agent's xDS resources: per app, one locality per region with healthy instances
//! and ingress addresses, nearest first from the client's region (its xDS node's locality,
//! else the agent's own) by priority, weighted by healthy count.
//!
//! [`follow`] publishes the table's [`patina_edge::table::Changes`] to the [`Hub`] at most
//! once per debounce period.

use std::sync::Arc;
use std::time::Duration;

use patina_edge::Table;
use patina_edge::table::Hit;

use crate::hub::{Change, Hub};
use crate::protocol::Client;
use crate::resources::{Addr, Host, Locality};
use crate::service::Source;

pub struct GlobalSource {
    table: Arc<Table>,
    region: Arc<str>,
}

impl GlobalSource {
    /// `region`: where this agent is (the order for clients that do not say theirs).
    pub fn new(table: Arc<Table>, region: &str) -> Arc<GlobalSource> {
        Arc::new(GlobalSource {
            table,
            region: region.into(),
        })
    }
}

impl Source for GlobalSource {
    fn apps(&self) -> Vec<Arc<str>> {
        self.table.app_names()
    }

    fn exists(&self, app: &str) -> bool {
        self.table.app_exists(app)
    }

    fn localities(&self, app: &str, client: &Client, out: &mut Vec<Locality>) {
        let from = client.region.as_deref().unwrap_or(&self.region);
        let mut hits: Vec<Hit> = Vec::new();
        self.table.lookup_into(app, from, false, &mut hits);
        let regions = self.table.region_table();
        for h in hits {
            let Some(name) = self.table.region_name(h.region) else {
                continue;
            };
            let mut hosts: Vec<Host> = regions
                .ingress(&name)
                .iter()
                .filter_map(|a| Addr::parse(a))
                .map(|addr| Host {
                    addr,
                    more: Vec::new(),
                })
                .collect();
            if hosts.is_empty() {
                continue;
            }
            hosts.dedup();
            out.push(Locality {
                region: name.to_string(),
                priority: out.len() as u32,
                weight: h.healthy,
                hosts,
            });
        }
    }
}

/// Publish the table's changes to `hub`, at most once per `debounce`, for ever.
pub async fn follow(table: Arc<Table>, hub: Arc<Hub>, debounce: Duration) {
    let changes = table.track_changes();
    loop {
        changes.changed().await;
        tokio::time::sleep(debounce).await;
        let taken = changes.take();
        let mut out: Vec<(Option<Arc<str>>, Change)> = Vec::with_capacity(taken.apps.len() + 1);
        for (app, existed) in taken.apps {
            let now = table.app_exists(&app);
            let change = match (existed, now) {
                (false, false) => continue,
                (false, true) => Change::Added,
                (true, false) => Change::Removed,
                (true, true) => Change::Endpoints,
            };
            out.push((Some(Arc::from(app)), change));
        }
        if taken.everything {
            out.push((None, Change::Endpoints));
        }
        hub.publish(out);
    }
}
