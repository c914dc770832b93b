//! A stock xDS client against Patina: Python grpcio's own xDS resolver and balancer
//! (`GRPC_XDS_BOOTSTRAP` naming a Patina agent, target `xds:///APP`) calling real gRPC
//! servers registered as machines (`tests/xds_client.py`; no Patina code on the client side).
//!
//! - At a region agent: the instance whose server dies (its TCP check fails) and the
//!   instance whose agent is killed leave the client's rotation; no call fails once the
//!   update has landed.
//! - At a global agent: the client reaches its nearest region's ingress, and moves to the
//!   next region when its region has no healthy instance left.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{
    Agent, GOSSIP_PORT, bin, gossip_table, machine, python, start_bridge, start_region_agent,
};
use patina_proto::v1::{Check, Health, TcpCheck, check};

/// One call's outcome as the client printed it.
#[derive(Clone, Debug, PartialEq)]
enum Call {
    Ok(String),
    Fail(String),
}

struct PyClient {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    /// Server name -> "ip:port".
    servers: HashMap<String, String>,
    /// Every call so far, with when it was read.
    calls: Vec<(Instant, Call)>,
}

impl PyClient {
    /// Start the client of `xds:///APP` with its servers (`name=ip`), its bootstrap naming
    /// `agent` and its node in `region`.
    fn start(dir: &Path, agent: &str, region: &str, app: &str, servers: &[&str]) -> PyClient {
        let bootstrap = dir.join("bootstrap.json");
        std::fs::write(
            &bootstrap,
            format!(
                r#"{{"xds_servers": [{{"server_uri": "{agent}", "channel_creds": [{{"type": "insecure"}}], "server_features": ["xds_v3"]}}],
"node": {{"id": "py-{region}", "locality": {{"region": "{region}"}}}}}}"#
            ),
        )
        .unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xds_client.py");
        let mut cmd = Command::new(python());
        cmd.arg(script)
            .arg("--target")
            .arg(format!("xds:///{app}"))
            .args(["--secs", "150"])
            .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
            .env("GRPC_VERBOSITY", "ERROR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for s in servers {
            cmd.arg("--server").arg(s);
        }
        let mut child = cmd.spawn().expect("start the Python xDS client");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut c = PyClient {
            child,
            stdin,
            lines,
            servers: HashMap::new(),
            calls: Vec::new(),
        };
        while c.servers.len() < servers.len() {
            let line = c
                .lines
                .recv_timeout(Duration::from_secs(30))
                .expect("the client's servers start");
            if let Some(rest) = line.strip_prefix("server ") {
                let (name, addr) = rest.split_once(' ').unwrap();
                c.servers.insert(name.into(), addr.into());
            }
        }
        c
    }

    /// Read what the client printed until now.
    fn pump(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["call", _, "ok", name] => self
                    .calls
                    .push((Instant::now(), Call::Ok(name.to_string()))),
                ["call", _, "fail", code] => self
                    .calls
                    .push((Instant::now(), Call::Fail(code.to_string()))),
                _ => {}
            }
        }
    }

    /// Wait (up to `within`) until the last `n` calls all reached `name`; returns the index
    /// of the first of them.
    fn until_only(&mut self, name: &str, n: usize, within: Duration) -> usize {
        self.until_only_any(&[name], n, within)
    }

    /// [`PyClient::until_only`] for calls that reach any of `names`.
    fn until_only_any(&mut self, names: &[&str], n: usize, within: Duration) -> usize {
        let start = Instant::now();
        loop {
            self.pump();
            let len = self.calls.len();
            if len >= n
                && self.calls[len - n..]
                    .iter()
                    .all(|(_, c)| matches!(c, Call::Ok(s) if names.contains(&s.as_str())))
            {
                return len - n;
            }
            assert!(
                start.elapsed() < within,
                "the calls never settled on {names:?}; last ones: {:?}",
                self.calls
                    .iter()
                    .rev()
                    .take(10)
                    .map(|(_, c)| c)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait until every one of `names` answered at least once since call `from`.
    fn until_all(&mut self, names: &[&str], from: usize, within: Duration) {
        let start = Instant::now();
        loop {
            self.pump();
            let seen = |n: &str| {
                self.calls[from.min(self.calls.len())..]
                    .iter()
                    .any(|(_, c)| *c == Call::Ok(n.into()))
            };
            if names.iter().all(|n| seen(n)) {
                return;
            }
            assert!(
                start.elapsed() < within,
                "not every one of {names:?} answered; last calls: {:?}",
                self.calls
                    .iter()
                    .rev()
                    .take(10)
                    .map(|(_, c)| c)
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn command(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// Calls from `from` on: (failed ones, the last failed one's index).
    fn failures_since(&self, from: usize) -> (usize, Option<usize>) {
        let mut n = 0;
        let mut last = None;
        for (i, (_, c)) in self.calls.iter().enumerate().skip(from) {
            if matches!(c, Call::Fail(_)) {
                n += 1;
                last = Some(i);
            }
        }
        (n, last)
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn put(agent: &Agent, id: &str, app: &str, addr: &str, tcp_check: bool, health: Health) {
    let mut m = machine(id, app, 0);
    m.addresses = vec![addr.to_owned()];
    m.health = health as i32;
    if tcp_check {
        m.checks = vec![Check {
            target: Some(check::Target::Tcp(TcpCheck { port: 0 })),
            interval_ms: 200,
            timeout_ms: 100,
            failures_before_critical: 1,
            ..Check::default()
        }];
    }
    common::upsert(agent, m).await;
}

/// A region agent of region "test" that runs loopback checks.
fn region_member(root: &Path, i: usize, ip: &str, seeds: &[String]) -> Agent {
    let config = format!(
        "region = \"test\"\nhost = \"worker-{i}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n[checks]\nallow_loopback = true\n{}",
        gossip_table(ip, seeds)
    );
    Agent::start_role(bin(), "region", &root.join(format!("agent{i}")), &config)
        .expect("start patina")
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_xds_client_leaves_dead_instances_and_dead_agents_behind() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let a1 = region_member(root, 1, "127.0.0.131", &["127.0.0.132".into()]);
    let mut a2 = region_member(root, 2, "127.0.0.132", &["127.0.0.131".into()]);
    common::eventually(Duration::from_secs(20), || async {
        a1.alive_members().await == 1 && a2.alive_members().await == 1
    })
    .await
    .expect("the two agents see each other");
    let _ = GOSSIP_PORT;

    let mut py = PyClient::start(
        root,
        a1.host_port(),
        "test",
        "echo",
        &["a=127.0.0.133", "b=127.0.0.134", "c=127.0.0.135"],
    );
    let servers = py.servers.clone();
    let addr = |n: &str| servers[n].clone();
    // a on agent 1's host, checked by TCP; c there too, unchecked; b on agent 2's host.
    put(&a1, "echo-a", "echo", &addr("a"), true, Health::Passing).await;
    put(&a1, "echo-c", "echo", &addr("c"), false, Health::Passing).await;
    put(&a2, "echo-b", "echo", &addr("b"), false, Health::Passing).await;
    py.until_all(&["a", "b", "c"], 0, Duration::from_secs(30));

    // Agent 2 is killed: b (its machine) leaves every rotation once the agents' membership
    // declares it down, though b's server still answers: only the xDS update moves it.
    a2.kill9();
    let killed = Instant::now();
    let from = py.until_only_any(&["a", "c"], 50, Duration::from_secs(20));
    eprintln!(
        "agent killed -> its instance out of the client's rotation within {:?}",
        py.calls[from].0 - killed
    );
    // c is marked critical (its server still answers): only the update moves the client.
    put(&a1, "echo-c", "echo", &addr("c"), false, Health::Critical).await;
    let marked = Instant::now();
    let settled = py.until_only("a", 50, Duration::from_secs(20));
    eprintln!(
        "instance marked critical -> out of the client's rotation within {:?}",
        py.calls[settled].0 - marked
    );
    // c passing again: back in the rotation.
    put(&a1, "echo-c", "echo", &addr("c"), false, Health::Passing).await;
    let back = py.calls.len();
    py.until_all(&["a", "c"], back, Duration::from_secs(20));

    // a's server dies: its TCP check fails and it turns critical; the client moves to c
    // (gRPC's balancer also drops a connection that closes). Once only c is listed, no call
    // fails.
    let before_stop = py.calls.len();
    py.command("stop a");
    let settled = py.until_only("c", 50, Duration::from_secs(20));
    let critical = common::eventually(Duration::from_secs(10), || async {
        let m = a1
            .client()
            .await
            .get_machine(patina_proto::v1::GetMachineRequest {
                id: "echo-a".into(),
            })
            .await
            .map(|r| r.into_inner().machine.unwrap_or_default().health);
        m.is_ok_and(|h| h == Health::Critical as i32)
    })
    .await;
    assert!(critical.is_some(), "a's TCP check marks it critical");
    py.pump();
    let after_update = py.calls.len();
    std::thread::sleep(Duration::from_secs(2));
    py.pump();
    let (failed, _) = py.failures_since(before_stop);
    let (after, _) = py.failures_since(after_update);
    eprintln!("server stopped: {failed} calls failed before its check marked it critical");
    assert_eq!(after, 0, "a call failed after the update landed");
    assert!(
        py.calls[settled..]
            .iter()
            .all(|(_, c)| *c == Call::Ok("c".into())),
        "every call after the move reached c"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_xds_client_at_a_global_agent_reaches_the_nearest_regions_ingress_then_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.141", "ord", &[]);
    let fra = start_region_agent(root, "fra", "127.0.0.142", "fra", &[]);
    // The client starts first: its servers stand for each region's ingress, and the region
    // table names their ports.
    let mut py = {
        // The global agent's API address is not known yet: a fixed port on its own IP.
        PyClient::start(
            root,
            "127.0.0.143:7700",
            "ord",
            "shop",
            &["ord-ingress=127.0.0.146", "fra-ingress=127.0.0.147"],
        )
    };
    let table = format!(
        "[global]\nstale_after_secs = 30\n\
         [[global.regions]]\nname = \"ord\"\nlat = 41.98\nlon = -87.90\ningress = [\"{}\"]\n\
         [[global.regions]]\nname = \"fra\"\nlat = 50.03\nlon = 8.57\ningress = [\"{}\"]\n",
        py.servers["ord-ingress"], py.servers["fra-ingress"]
    );
    let config = format!(
        "region = \"fra\"\nhost = \"g\"\nlisten = \"127.0.0.143:7700\"\nlog = \"warn\"\n{}{table}",
        gossip_table("127.0.0.143", &[])
    );
    let g = Agent::start_role(bin(), "global", &root.join("g"), &config).expect("global agent");
    let seeds = vec!["127.0.0.143".to_owned()];
    let _b_ord = start_bridge(root, "b-ord", "127.0.0.144", "ord", &[&ord], &seeds);
    let _b_fra = start_bridge(root, "b-fra", "127.0.0.145", "fra", &[&fra], &seeds);
    put(
        &ord,
        "shop-1",
        "shop",
        "10.0.0.1:80",
        false,
        Health::Passing,
    )
    .await;
    put(
        &fra,
        "shop-2",
        "shop",
        "10.0.0.2:80",
        false,
        Health::Passing,
    )
    .await;

    // The client is in ord: ord's ingress first (priority 0), fra's never while ord has a
    // healthy instance.
    let first = py.until_only("ord-ingress", 50, Duration::from_secs(60));
    assert!(
        !py.calls[first..]
            .iter()
            .any(|(_, c)| *c == Call::Ok("fra-ingress".into())),
        "nearest first"
    );
    // ord's last instance turns critical: its summary says no healthy instance, and the
    // client moves to fra's ingress.
    let before = py.calls.len();
    put(
        &ord,
        "shop-1",
        "shop",
        "10.0.0.1:80",
        false,
        Health::Critical,
    )
    .await;
    let changed = Instant::now();
    let settled = py.until_only("fra-ingress", 50, Duration::from_secs(30));
    eprintln!(
        "ord's last instance critical -> the client at fra's ingress within {:?}",
        py.calls[settled].0 - changed
    );
    let (failed, _) = py.failures_since(before);
    assert_eq!(
        failed, 0,
        "both ingresses answer: no call may fail in the move"
    );
    drop(g);
}
