//! Memory per watcher is bounded whatever the region's size: whole-region watchers that stop
//! reading while every machine is updated twice cost the agent at most 1.3 × its memory
//! without watchers plus 32 MiB, and every one of them converges once it reads again.
//!
//! CI runs it at a size a debug build handles in seconds (`PATINA_TEST_MACHINES`,
//! `PATINA_TEST_WATCHERS` raise it); `cargo xtask bench watchers` runs it at 200,000
//! machines and 64 watchers against the release binary.

mod common;

use patina_testkit::watchers::{Spec, run};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_watchers_cost_bounded_memory_and_all_converge() {
    let spec = Spec {
        machines: env_or("PATINA_TEST_MACHINES", 40_000),
        watchers: env_or("PATINA_TEST_WATCHERS", 64),
        per_app: 20,
    };
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let report = run(&agent, spec).await.unwrap();
    eprintln!("{spec:?}: {report:?}");
    assert_eq!(report.converged, spec.watchers, "every watcher converges");
    assert!(
        report.rss_stalled_peak <= report.bound(),
        "agent RSS {} MiB with stalled watchers, above 1.3 × {} MiB + 32 MiB",
        report.rss_stalled_peak >> 20,
        report.rss_loaded >> 20
    );
}
