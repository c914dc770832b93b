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
        let regions = self.table.region_table();
        // The client's region when the table lists it (a name it does not know, such as a
        // cloud's "us-east-1", has no round trips: it would order by name), else the agent's.
        let from = client
            .region
            .as_deref()
            .filter(|r| regions.contains(r))
            .unwrap_or(&self.region);
        let mut hits: Vec<Hit> = Vec::new();
        self.table.lookup_into(app, from, false, &mut hits);
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

#[cfg(test)]
mod tests {
    use super::*;
    use patina_edge::regions::{RegionSpec, RegionTable};
    use patina_edge::table::SummaryUpdate;

    #[test]
    fn a_client_of_a_region_the_table_does_not_list_gets_the_agents_order() {
        let spec = |name: &str, rtt: &[(&str, u32)]| RegionSpec {
            name: name.into(),
            rtt_ms: rtt.iter().map(|(r, ms)| (r.to_string(), *ms)).collect(),
            ingress: vec![format!(
                "192.0.2.{}:443",
                name.len() + name.as_bytes()[0] as usize % 50
            )],
            ..RegionSpec::default()
        };
        let regions = RegionTable::new(vec![
            spec("aaa", &[]),
            spec("ord", &[("zzz", 10), ("aaa", 200)]),
            spec("zzz", &[("aaa", 150)]),
        ])
        .unwrap();
        let table = Arc::new(Table::new(regions, None));
        for region in ["aaa", "ord", "zzz"] {
            table
                .apply_summary(SummaryUpdate {
                    app: "web",
                    region,
                    healthy: 1,
                    total: 1,
                    bridge: 0,
                })
                .unwrap();
        }
        let source = GlobalSource::new(table, "ord");
        let order = |region: Option<&str>| {
            let client = Client {
                region: region.map(Arc::from),
                id: None,
            };
            let mut out = Vec::new();
            source.localities("web", &client, &mut out);
            out.iter().map(|l| l.region.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            order(Some("zzz")),
            ["zzz", "ord", "aaa"],
            "the client's own"
        );
        assert_eq!(order(None), ["ord", "zzz", "aaa"], "no region: the agent's");
        assert_eq!(
            order(Some("us-east-1")),
            ["ord", "zzz", "aaa"],
            "a region the table does not list: the agent's, not by name"
        );
    }
}
