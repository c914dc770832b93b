//! `cargo xtask bench watchers [--machines N] [--watchers N]`: the agent's memory with
//! whole-region watchers that stop reading while every machine is updated twice, and whether
//! they all converge once they read again (`patina_testkit::watchers`), against the release
//! binary on loopback. Baselines in the same run: the agent's RSS once loaded, without
//! watchers, and a control agent that takes the same load and updates with no watcher.

use anyhow::{Context, bail};
use patina_testkit::Agent;
use patina_testkit::watchers::{Spec, run};

use crate::harness::build_patina;

pub struct Options {
    machines: usize,
    watchers: usize,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            machines: 200_000,
            watchers: 64,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v: usize = it.next().context("missing value")?.parse()?;
            match *a {
                "--machines" => o.machines = v,
                "--watchers" => o.watchers = v,
                other => bail!("unknown option {other}"),
            }
        }
        Ok(o)
    }
}

pub fn run_bench(o: Options) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let dir = crate::bench_store::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let spec = Spec {
        machines: o.machines,
        watchers: o.watchers,
        per_app: 20,
    };
    // A control in the same run: the same load and updates, no watcher.
    let control = Agent::start(&bin, &dir.join("control"), "127.0.0.1", "")?;
    let unwatched = rt
        .block_on(run(
            &control,
            Spec {
                watchers: 0,
                ..spec
            },
        ))
        .map_err(anyhow::Error::msg)?;
    drop(control);
    let agent = Agent::start(&bin, &dir.join("watchers"), "127.0.0.1", "")?;
    let report = rt.block_on(run(&agent, spec)).map_err(anyhow::Error::msg)?;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    let mib = |b: u64| b as f64 / 1048576.0;
    let ratio = report.rss_stalled_peak as f64 / report.rss_loaded as f64;
    println!(
        "\npatina stalled-watchers benchmark ({} machines, {} whole-region watchers)",
        o.machines, o.watchers
    );
    let rows = [
        (
            "agent RSS loaded, no watchers (baseline)",
            format!("{:.1} MiB", mib(report.rss_loaded)),
        ),
        (
            "agent RSS peak, watchers stalled, 2 updates/machine",
            format!("{:.1} MiB", mib(report.rss_stalled_peak)),
        ),
        (
            "agent RSS at the end of the stall",
            format!("{:.1} MiB", mib(report.rss_stalled_end)),
        ),
        (
            "control: peak with the same updates, no watcher",
            format!("{:.1} MiB", mib(unwatched.rss_stalled_peak)),
        ),
        (
            "per stalled watcher, above the control",
            format!(
                "{:.0} KiB",
                report
                    .rss_stalled_peak
                    .saturating_sub(unwatched.rss_stalled_peak) as f64
                    / 1024.0
                    / o.watchers.max(1) as f64
            ),
        ),
        (
            "bound: 1.3 × baseline + 32 MiB",
            format!("{:.1} MiB", mib(report.bound())),
        ),
        ("peak / baseline", format!("{ratio:.2}")),
        (
            "watchers converged",
            format!("{} / {}", report.converged, o.watchers),
        ),
        (
            "load / update / converge",
            format!(
                "{:.1} / {:.1} / {:.1} s",
                report.load_secs, report.update_secs, report.converge_secs
            ),
        ),
    ];
    for (k, v) in rows {
        println!("  {k:<52} {v:>16}");
    }
    println!(
        "{}",
        serde_json::json!({
            "machines": o.machines,
            "watchers": o.watchers,
            "rss_loaded_mib": (mib(report.rss_loaded) * 10.0).round() / 10.0,
            "rss_stalled_peak_mib": (mib(report.rss_stalled_peak) * 10.0).round() / 10.0,
            "rss_control_peak_mib": (mib(unwatched.rss_stalled_peak) * 10.0).round() / 10.0,
            "rss_bound_mib": (mib(report.bound()) * 10.0).round() / 10.0,
            "watchers_converged": report.converged,
        })
    );
    if report.converged != o.watchers {
        bail!(
            "{} of {} watchers did not converge",
            o.watchers - report.converged,
            o.watchers
        );
    }
    Ok(())
}
