//! Shared pieces of the benchmarks: building the real `patina` binary, percentiles. Starting
//! agents and reading their memory is `patina-testkit`'s, shared with the integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::bail;

/// The workspace root (xtask lives one level below it). Read at run time (cargo sets it for
/// `cargo run` and `cargo test`): a binary built in one checkout is reused from a shared target
/// directory by another, and the compile-time path would point at the first.
pub fn root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    Path::new(&manifest_dir)
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Build `patina` in release mode and return its path.
pub fn build_patina() -> anyhow::Result<PathBuf> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--release", "-p", "patina"])
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("cargo build --release -p patina failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    Ok(target.join("release").join("patina"))
}

/// The p-th percentile (0..=100) of sorted values (NaN when there are none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The p-th percentile (0..=100) of sorted nanoseconds, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted_ns.len() - 1) as f64).round() as usize;
    sorted_ns[rank.min(sorted_ns.len() - 1)] as f64 / 1000.0
}

/// A scraper, as Prometheus would be: every `every`, a GET of each URL's `/metrics`, on a
/// thread of its own (not the benchmark's runtime). Stops when dropped; `scrapes()` says how
/// many answered.
pub struct Scraper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Scraper {
    pub fn start(metrics_urls: Vec<String>, every: std::time::Duration) -> Scraper {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let round = std::time::Instant::now();
                    for u in &metrics_urls {
                        if patina_testkit::http_get(&format!("{u}/metrics"))
                            .is_ok_and(|(code, _)| code == 200)
                        {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    std::thread::sleep(every.saturating_sub(round.elapsed()));
                }
            })
        };
        Scraper {
            stop,
            answered,
            thread: Some(thread),
        }
    }

    pub fn scrapes(&self) -> u64 {
        self.answered.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A progress bar on standard error when it is a terminal, hidden otherwise (CI logs, pipes).
pub fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

/// A line for the reader: above the bar on a terminal, else on standard output as is.
pub fn note(bar: &indicatif::ProgressBar, line: &str) {
    if bar.is_hidden() {
        println!("{line}");
    } else {
        bar.println(line);
    }
}

/// `--trials N` (at least 1; `default` without it), the only option of the trial benchmarks.
pub fn parse_trials(args: &[&str], default: usize) -> anyhow::Result<usize> {
    use anyhow::Context;
    let mut trials = default;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v: usize = it.next().context("missing value")?.parse()?;
        match *a {
            "--trials" => trials = v,
            other => bail!("unknown option {other}"),
        }
    }
    if trials < 1 {
        bail!("--trials at least 1");
    }
    Ok(trials)
}
