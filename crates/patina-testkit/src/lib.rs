//! patina-testkit: real `patina` processes for integration tests and benchmarks.
//!
//! One harness, shared by `crates/patina/tests` and `xtask`: start `patina region` (or any
//! subcommand) as a child process on a loopback address, read the address it announces,
//! talk gRPC to it, read its memory, and stop it with SIGTERM or SIGKILL.

#![forbid(unsafe_code)]

pub mod secure;
pub mod watchers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use patina_proto::v1::admin_client::AdminClient;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, Health, ListInstancesRequest, Machine,
    MachineState, MembersRequest,
};
use tonic::transport::Channel;

/// The line an agent prints on stdout once it serves, followed by its URL.
pub const ANNOUNCE: &str = "region API: ";
/// The same for `patina global` and `patina bridge`.
pub const GLOBAL_ANNOUNCE: &str = "global API: ";
pub const BRIDGE_ANNOUNCE: &str = "bridge API: ";

/// How long an agent may take to announce itself (a debug build opening a large store).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Every line a child prints on stdout, as it prints them.
pub fn stdout_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A `patina region` child process, killed when dropped.
pub struct Agent {
    pub child: Child,
    /// `http://ip:port` of its API.
    pub url: String,
    /// Its directory: the config file and `data/`.
    pub dir: PathBuf,
    /// Its stdout, after the announcement.
    pub stdout: mpsc::Receiver<String>,
    /// How [`Agent::channel`] reaches it: TLS with a client certificate for an agent that
    /// runs with TLS (see [`secure::Secure`]), else plaintext.
    pub dial: Option<patina_trust::Dial>,
}

impl Agent {
    /// Start `bin region` on a free port of `ip`, its config and data in `dir`, with `extra`
    /// appended to the generated config (TOML after the top-level keys, e.g. a `[limits]`
    /// table).
    pub fn start(bin: &Path, dir: &Path, ip: &str, extra: &str) -> std::io::Result<Agent> {
        Agent::start_host(bin, dir, ip, "worker-1", extra)
    }

    /// [`Agent::start`] on worker host `host` (agents of one cluster run on distinct hosts).
    pub fn start_host(
        bin: &Path,
        dir: &Path,
        ip: &str,
        host: &str,
        extra: &str,
    ) -> std::io::Result<Agent> {
        Agent::start_wrapped(&[], bin, dir, ip, host, extra)
    }

    /// [`Agent::start_host`] run through `wrapper` (e.g. `ip netns exec NS`), which must exec
    /// the agent in its place so that signals reach it.
    pub fn start_wrapped(
        wrapper: &[&str],
        bin: &Path,
        dir: &Path,
        ip: &str,
        host: &str,
        extra: &str,
    ) -> std::io::Result<Agent> {
        let config = format!(
            "region = \"test\"\nhost = \"{host}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{extra}"
        );
        Agent::spawn(wrapper, bin, "region", dir, &config)
    }

    /// Start `bin ROLE --config` (`region`, `global` or `bridge`) with `config` (TOML; the
    /// data directory is added, under `dir`), and wait for its announcement.
    pub fn start_role(bin: &Path, role: &str, dir: &Path, config: &str) -> std::io::Result<Agent> {
        Agent::spawn(&[], bin, role, dir, config)
    }

    /// [`Agent::start_role`] with `env` added to the agent's environment.
    pub fn start_role_env(
        bin: &Path,
        role: &str,
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> std::io::Result<Agent> {
        Agent::spawn_env(&[], bin, role, dir, config, env)
    }

    fn spawn(
        wrapper: &[&str],
        bin: &Path,
        role: &str,
        dir: &Path,
        config: &str,
    ) -> std::io::Result<Agent> {
        Agent::spawn_env(wrapper, bin, role, dir, config, &[])
    }

    fn spawn_env(
        wrapper: &[&str],
        bin: &Path,
        role: &str,
        dir: &Path,
        config: &str,
        env: &[(&str, &str)],
    ) -> std::io::Result<Agent> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("patina.toml");
        // Plaintext unless the test gives TLS settings of its own.
        let gives_tls = config.lines().any(|l| {
            l.trim() == "[tls]"
                || l.trim_start().starts_with("tls ")
                || l.trim_start().starts_with("tls=")
        });
        let tls = if gives_tls { "" } else { "tls = \"off\"\n" };
        std::fs::write(
            &path,
            format!(
                "data_dir = \"{}\"\n{tls}{config}",
                dir.join("data").display()
            ),
        )?;
        let mut command = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .args([role, "--config"])
            .arg(&path)
            .env_remove("RUST_LOG")
            // Debug builds of many agents on a loaded 2-core machine can pause a loop for
            // seconds: the watchdog ends an agent only after 30 s here (it still catches a
            // deadlock). Its own tests pass the defaults back in `env`.
            // Machines in tests serve on loopback: their checks may probe it.
            .env("PATINA_CHECKS__ALLOW_LOOPBACK", "true")
            .env("PATINA_WATCHDOG__BUDGET_MS", "5000")
            .env("PATINA_WATCHDOG__FATAL_MS", "30000")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = stdout_lines(child.stdout.take().expect("piped"));
        let announce = match role {
            "global" => GLOBAL_ANNOUNCE,
            "bridge" => BRIDGE_ANNOUNCE,
            _ => ANNOUNCE,
        };
        let url = wait_for_line(&stdout, announce, START_TIMEOUT).ok_or_else(|| {
            let _ = child.kill();
            std::io::Error::other("the agent did not announce its address")
        })?;
        Ok(Agent {
            child,
            url,
            dir: dir.to_path_buf(),
            stdout,
            dial: None,
        })
    }

    /// This agent, reached through `dial` from now on.
    pub fn with_dial(mut self, dial: patina_trust::Dial) -> Agent {
        self.dial = Some(dial);
        self
    }

    /// Start it again after a stop or a kill: same directory and config, a new port.
    pub fn restart(&mut self, bin: &Path, role: &str) -> std::io::Result<()> {
        let config = std::fs::read_to_string(self.dir.join("patina.toml"))?;
        let config: String = config
            .lines()
            .filter(|l| !l.starts_with("data_dir ="))
            .map(|l| format!("{l}\n"))
            .collect();
        let dial = self.dial.take();
        *self = Agent::spawn(&[], bin, role, &self.dir.clone(), &config)?;
        self.dial = dial;
        Ok(())
    }

    /// A gRPC client of its region API.
    pub async fn client(&self) -> RegionClient<Channel> {
        RegionClient::new(self.channel().await)
    }

    pub async fn channel(&self) -> Channel {
        let endpoint = Channel::from_shared(self.url.clone()).expect("a valid URL");
        match &self.dial {
            Some(dial) => dial.connect(endpoint).await,
            None => endpoint.connect().await,
        }
        .expect("connect to the agent")
    }

    /// A gRPC client of its admin service.
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel().await)
    }

    /// The URL of its operator's listener (`metrics: http://...`, printed after its
    /// announcement): reads its stdout up to that line (the lines before it are gone).
    pub fn metrics_url(&self) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    if let Some(url) = line.strip_prefix("metrics: ") {
                        return url.trim().to_owned();
                    }
                }
                Err(e) => panic!("{}: no metrics line: {e}", self.url),
            }
        }
    }

    /// Its `Admin.ClusterStatus` (panics when it does not answer: call it on a running agent).
    pub async fn cluster_status(&self) -> ClusterStatusResponse {
        self.admin()
            .await
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap_or_else(|e| panic!("{}: ClusterStatus: {e}", self.url))
            .into_inner()
    }

    /// How many other members the agent sees alive (0 when its admin service does not
    /// answer).
    pub async fn alive_members(&self) -> usize {
        let Ok(r) = self.admin().await.members(MembersRequest {}).await else {
            return 0;
        };
        r.into_inner()
            .members
            .iter()
            .filter(|m| m.state == "alive")
            .count()
    }

    /// `host:port` of the agent, for raw sockets and the CLI's `--server`.
    pub fn host_port(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Resident memory of the agent, in bytes.
    pub fn rss_bytes(&self) -> std::io::Result<u64> {
        rss_of(self.child.id())
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and wait: a clean stop. Returns whether it exited successfully.
    pub fn stop(&mut self) -> std::io::Result<bool> {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        Ok(self.child.wait()?.success())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait for a line starting with `prefix`; returns the rest of it.
pub fn wait_for_line(
    lines: &mpsc::Receiver<String>,
    prefix: &str,
    timeout: Duration,
) -> Option<String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(std::time::Instant::now())?;
        let line = lines.recv_timeout(left).ok()?;
        if let Some(rest) = line.strip_prefix(prefix) {
            return Some(rest.to_owned());
        }
    }
}

/// VmRSS of a process, in bytes.
pub fn rss_of(pid: u32) -> std::io::Result<u64> {
    proc_status_bytes(Some(pid), "VmRSS")
}

/// A field of `/proc/<pid>/status` given in kB (`VmRSS`, `VmHWM`, ...), in bytes; `pid`
/// `None`: this process.
pub fn proc_status_bytes(pid: Option<u32>, field: &str) -> std::io::Result<u64> {
    let path = pid.map_or_else(
        || "/proc/self/status".to_owned(),
        |p| format!("/proc/{p}/status"),
    );
    let status = std::fs::read_to_string(path)?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no {field}")))?;
    Ok(kb * 1024)
}

/// A started, passing machine with one address.
pub fn machine(id: &str, app: &str, port: u16) -> Machine {
    Machine {
        id: id.into(),
        app: app.into(),
        addresses: vec![format!("10.1.0.1:{port}")],
        state: MachineState::Started as i32,
        health: Health::Passing as i32,
        ..Machine::default()
    }
}

/// Most pages [`list_pages`] follows before it gives up: no listing in a test is longer.
const MAX_PAGES: usize = 100_000;

/// Every page of an app's ListInstances, following `next_page_token` to the end.
pub async fn list_pages(
    client: &mut RegionClient<Channel>,
    app: &str,
    include_all: bool,
    page_size: i32,
) -> Vec<Vec<Machine>> {
    let mut pages = Vec::new();
    let mut page_token = String::new();
    for _ in 0..MAX_PAGES {
        let page = client
            .list_instances(ListInstancesRequest {
                app: app.into(),
                include_all,
                page_size,
                page_token,
            })
            .await
            .expect("ListInstances")
            .into_inner();
        pages.push(page.machines);
        if page.next_page_token.is_empty() {
            return pages;
        }
        page_token = page.next_page_token;
    }
    panic!("paging {app} with size {page_size} never ended");
}

/// `GET url` over plain HTTP/1.0 (the operator's listener): its status code and body.
pub fn http_get(url: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| std::io::Error::other(format!("not an http URL: {url}")))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let mut conn = std::net::TcpStream::connect(host)?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
    let mut raw = String::new();
    conn.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_owned()))
}
