//! What operators read off a running agent, on a plain HTTP listener of its own
//! (`metrics.listen`, off the gRPC port, as etcd's `--listen-metrics-urls`):
//!
//! - `GET /metrics`: Prometheus metrics (OpenMetrics when asked for, else the classic text
//!   format), `patina_` prefixed, in base units;
//!   label values are bounded by the cluster (member states, peers, reasons), never apps or
//!   machines ([`metrics`]);
//! - `GET /livez`: whether the agent's loops turn; `GET /readyz`: whether it should be sent
//!   traffic (store open, gossip joined, view standing and caught up, write queue not
//!   saturated, clock within bound, certificates not expired); `?verbose` lists each check,
//!   as etcd and Kubernetes do ([`ready`]);
//! - `GET /v1/health?gaps=N&lag=S`: for load balancers that need thresholds: at most N
//!   versions lacking from any origin, and a good anti-entropy session within S seconds.
//!
//! Everything here is read-only and reads snapshots: no lock is held across an await, and a
//! scrape never waits on the store's writer. At most [`listener::MAX_CONNECTIONS`]
//! connections are open at once, each for at most [`listener::MAX_CONNECTION_AGE`].

pub mod listener;
pub mod metrics;
pub mod ready;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use patina_edge::Table;
use patina_gossip::shell::Gossip;
use patina_store::Store;

/// What the listener reads.
pub struct Sources {
    /// `region`, `global` or `bridge`.
    pub role: &'static str,
    pub store: Store,
    pub gossip: Gossip,
    /// The global tier's table (global agents and bridges).
    pub table: Option<Arc<Table>>,
    /// Whether the agent was given seeds: then it is ready only once it has joined others.
    pub expects_peers: bool,
    /// The watchdog over the agent's loops, and the silence past which a loop is late.
    pub watchdog: Option<(patina_watchdog::Watchdog, Duration)>,
    /// What the region agent's check runner did (`None` for other roles).
    pub checks: Option<Arc<patina_region::checks::CheckStats>>,
    /// What clients hold open on the gRPC listener: connections and Watch streams.
    pub occupancy: patina_region::limits::Occupancy,
    /// What a bridge published (`None` for other roles).
    pub bridge: Option<Arc<patina_global::bridge::BridgeStats>>,
    /// When the agent started (`patina_start_time_seconds`: restarts show as its changes).
    pub started: std::time::SystemTime,
    /// What the xDS server did (`None`: off).
    pub xds: Option<Arc<patina_xds::Stats>>,
    /// What the DNS front end did (`None`: off).
    pub dns: Option<Arc<patina_dns::Stats>>,
    /// Set by the readiness judge the first time the agent has joined and caught up with its
    /// peers (a region agent's xDS/DNS view waits for it: see `patina_xds::region::follow`).
    pub caught_up_once: tokio::sync::watch::Sender<bool>,
    /// The region agent's xDS/DNS view (`None`: no such view): whether it holds its first
    /// state, and its sizes.
    pub view: Option<Arc<patina_xds::region::RegionSource>>,
}

/// How long a check may wait for the gossip loop to answer before it counts as stuck.
pub const LOOP_ANSWER: Duration = Duration::from_secs(2);

/// Serve the operator's endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Arc<Sources>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/v1/health", get(health))
        .route("/", get(status_page))
        .route("/v1/status", get(status_json))
        .with_state(sources);
    axum::serve(listener::Limited::new(listener), app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// OpenMetrics to a scraper that asks for it (Prometheus does), else the classic text
/// format (promtool, curl, older scrapers).
async fn metrics_page(State(s): State<Arc<Sources>>, headers: HeaderMap) -> Response {
    let body = metrics::scrape(&s).await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            metrics::classic_text(&body),
        )
            .into_response()
    }
}

/// The status page: static HTML that renders `/v1/status` every 2 s.
async fn status_page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        status::PAGE,
    )
        .into_response()
}

async fn status_json(State(s): State<Arc<Sources>>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        status::status(&s).await.to_string(),
    )
        .into_response()
}

/// Whether the query string names `key` (as `key`, `key=` or `key=value`).
fn has_param(uri: &Uri, key: &str) -> bool {
    param(uri, key).is_some()
}

fn param<'a>(uri: &'a Uri, key: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == key).then_some(v)
    })
}

fn checks_response(checks: &[ready::Check], verbose: bool, what: &str) -> Response {
    let ok = checks.iter().all(|c| c.ok);
    let mut body = String::new();
    if verbose || !ok {
        for c in checks {
            if c.ok {
                body.push_str(&format!("[+]{} ok\n", c.name));
            } else {
                body.push_str(&format!("[-]{} failed: {}\n", c.name, c.detail));
            }
        }
    }
    body.push_str(&format!("{what} {}\n", if ok { "ok" } else { "failed" }));
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn livez(State(s): State<Arc<Sources>>, uri: Uri) -> Response {
    let checks = ready::live(&s).await;
    checks_response(&checks, has_param(&uri, "verbose"), "livez check")
}

async fn readyz(State(s): State<Arc<Sources>>, uri: Uri) -> Response {
    let checks = ready::ready(&s).await;
    checks_response(&checks, has_param(&uri, "verbose"), "readyz check")
}

async fn health(State(s): State<Arc<Sources>>, uri: Uri) -> Response {
    let bad = |why: String| {
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            why,
        )
            .into_response()
    };
    let gaps = match param(&uri, "gaps").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return bad(format!("gaps={v}: not a count of versions\n")),
        },
    };
    let lag = match param(&uri, "lag").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => match v.parse::<f64>() {
            Ok(n) if n.is_finite() && n >= 0.0 => Some(n),
            _ => return bad(format!("lag={v}: not a number of seconds\n")),
        },
    };
    let answer = ready::thresholds(&s, gaps, lag).await;
    let status = if answer.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "ok": answer.ok,
        "gaps": answer.gaps,
        "lag_secs": answer.lag_secs,
        "checks": answer.failed,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}
