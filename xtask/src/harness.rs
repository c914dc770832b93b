//! Shared pieces of the benchmarks: building and starting the real `patina` binary,
//! resident memory, percentiles.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
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

/// A `patina region` process, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
}

impl Server {
    pub fn start(bin: &Path, dir: &Path) -> anyhow::Result<Server> {
        std::fs::create_dir_all(dir)?;
        let config = dir.join("bench.toml");
        std::fs::write(
            &config,
            format!(
                "region = \"bench\"\nhost = \"worker-1\"\nlisten = \"127.0.0.1:0\"\nlog = \"warn\"\ndata_dir = \"{}\"\n",
                dir.join("data").display()
            ),
        )?;
        let mut child = Command::new(bin)
            .args(["region", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting patina")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("region API: ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(120))
            .context("patina did not print its address")?;
        Ok(Server { child, url })
    }

    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        rss_of(&format!("/proc/{}/status", self.child.id()))
    }

    /// SIGTERM and wait: a clean stop that closes the store.
    pub fn stop(mut self) -> anyhow::Result<()> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_of(status_path: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_path)?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// The p-th percentile (0..=100) of sorted nanoseconds, in microseconds.
pub fn percentile_us(sorted_ns: &[u64], p: f64) -> f64 {
    if sorted_ns.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted_ns.len() - 1) as f64).round() as usize;
    sorted_ns[rank.min(sorted_ns.len() - 1)] as f64 / 1000.0
}
