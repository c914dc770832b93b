//! Test harness: runs the real `patina` binary as a child process on loopback and talks
//! gRPC to it.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{Health, Machine, MachineState};
use tonic::transport::Channel;

pub struct Agent {
    pub child: Child,
    pub addr: String,
    pub dir: PathBuf,
}

impl Agent {
    /// Start `patina region` on a fresh port of `ip` with its data in `dir`.
    pub fn start(dir: &Path, ip: &str) -> Agent {
        Agent::start_with(dir, ip, "")
    }

    /// [`Agent::start`], with `extra` appended to the config file (TOML after the top-level
    /// keys, e.g. a `[limits]` table).
    pub fn start_with(dir: &Path, ip: &str, extra: &str) -> Agent {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("patina.toml");
        std::fs::write(
            &config,
            format!(
                "region = \"test\"\nhost = \"worker-1\"\nlisten = \"{ip}:0\"\ndata_dir = \"{}\"\nlog = \"warn\"\n{extra}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_patina"))
            .args(["region", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn patina");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("region API: ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the agent printed its address");
        Agent {
            child,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    pub async fn client(&self) -> RegionClient<Channel> {
        let channel = Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("connect to the agent");
        RegionClient::new(channel)
    }

    /// `host:port` of the agent, for raw sockets and the CLI's `--server`.
    pub fn host_port(&self) -> &str {
        self.addr.trim_start_matches("http://")
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
