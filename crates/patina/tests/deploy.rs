//! The deploy recipes (`deploy/`), checked by the tools that read them: `systemd-analyze`
//! verifies the units and scores their hardening; kubernetes-validate checks the manifests
//! against the Kubernetes API's schemas, and each ConfigMap's configuration starts a real
//! agent; the Dockerfile is parsed; Prometheus's rules pass `promtool` (and its rule unit
//! tests), every metric the alerts and the Grafana dashboard name is served by a real agent,
//! and a real Prometheus scrapes a small world with the rules loaded.
//!
//! The tools come from Debian and PyPI: `cargo xtask test` installs them (never skipped).

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{eventually, python, start_bridge, start_global, start_region_agent};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// Run `cmd`; its output, or a failure naming the tool and what it said.
fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (cargo xtask test installs the tools)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(deploy().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

#[test]
fn systemd_units_verify_and_score_as_hardened() {
    let units = files("systemd", "service");
    assert_eq!(units.len(), 3, "region, global and bridge units");
    let tmp = tempfile::tempdir().unwrap();
    for unit in &units {
        let text = std::fs::read_to_string(unit).unwrap();
        let role = unit
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_start_matches("patina-");
        assert!(
            text.contains(&format!(
                "ExecStart=/usr/local/bin/patina {role} --config /etc/patina/{role}.toml"
            )),
            "{role}"
        );
        for key in [
            "Type=notify",
            "WatchdogSec=",
            "DynamicUser=yes",
            "StateDirectory=",
            "LimitNOFILE=65536",
        ] {
            assert!(text.contains(key), "{}: {key} missing", unit.display());
        }
        // The built binary where the unit expects it (verify checks that it runs).
        let local = tmp.path().join(unit.file_name().unwrap());
        std::fs::write(
            &local,
            text.replace("/usr/local/bin/patina", env!("CARGO_BIN_EXE_patina")),
        )
        .unwrap();
        let said = run(Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&local));
        assert_eq!(said.trim(), "", "{}: {said}", unit.display());
        // systemd's own exposure score: "OK" is below 2.0 (20 on its scale of 100).
        let said = run(Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager", "--threshold=20"])
            .arg(&local));
        assert!(said.contains("Overall exposure level"), "{said}");
        // The command line takes the role and the flag.
        run(Command::new(env!("CARGO_BIN_EXE_patina")).args([role, "--help"]));
    }
}

/// Each ConfigMap's files, as `(manifest, key, contents)`.
fn config_maps() -> Vec<(String, String, String)> {
    let script = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap":
            for key, text in doc["data"].items():
                out.append([path, key, text])
print(json.dumps(out))
"#;
    let manifests = files("kubernetes", "yaml");
    let out = run(Command::new(python())
        .arg("-c")
        .arg(script)
        .args(&manifests));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn kubernetes_manifests_validate_and_their_configs_start_agents() {
    let manifests = files("kubernetes", "yaml");
    assert!(manifests.len() >= 4, "{manifests:?}");
    let said = run(Command::new(python())
        .args(["-m", "kubernetes_validate", "--strict", "-k", "1.30.0"])
        .args(&manifests));
    for kind in [
        "daemonset/patina-region",
        "daemonset/patina-global-ord",
        "deployment/patina-bridge-ord",
        "poddisruptionbudget/patina-bridge-ord",
    ] {
        assert!(
            said.contains(&format!("passed for resource {kind}")),
            "{kind}:\n{said}"
        );
    }
    assert!(
        !said.contains("ERROR") && !said.contains("failed"),
        "{said}"
    );
    // Probes and roles as documented.
    let all: String = manifests
        .iter()
        .map(|m| std::fs::read_to_string(m).unwrap())
        .collect();
    assert!(all.contains("replicas: 2"), "bridges: 2 replicas");
    // Each workload: its probes, host networking, non-root, a writable /tmp.
    for m in manifests.iter().filter(|m| !m.ends_with("namespace.yaml")) {
        let text = std::fs::read_to_string(m).unwrap();
        for wired in [
            "httpGet: {path: /livez",
            "httpGet: {path: /readyz",
            "hostNetwork: true",
            "runAsNonRoot: true",
            "mountPath: /tmp",
        ] {
            assert!(text.contains(wired), "{}: {wired}", m.display());
        }
    }
    // Every ConfigMap's configuration starts its agent (with what the pod's environment
    // gives it, on loopback, TLS off: the test holds no certificates).
    let maps = config_maps();
    assert_eq!(maps.len(), 3, "{maps:?}");
    let tmp = tempfile::tempdir().unwrap();
    for (i, (manifest, key, text)) in maps.iter().enumerate() {
        let role = key.trim_end_matches(".toml");
        let file = tmp.path().join(key);
        std::fs::write(&file, text).unwrap();
        let ip = format!("127.0.0.{}", 231 + i);
        let mut child = Command::new(env!("CARGO_BIN_EXE_patina"))
            .args([role, "--config"])
            .arg(&file)
            .env("PATINA_TLS", "off")
            .env("PATINA_DATA_DIR", tmp.path().join(role))
            .env("PATINA_HOST", format!("node-{i}"))
            .env("PATINA_LISTEN", format!("{ip}:0"))
            .env("PATINA_GOSSIP__LISTEN", format!("{ip}:0"))
            .env("PATINA_METRICS__LISTEN", format!("{ip}:0"))
            .env("PATINA_WATCHDOG__BUDGET_MS", "5000")
            .env("PATINA_WATCHDOG__FATAL_MS", "30000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = patina_testkit::stdout_lines(child.stdout.take().unwrap());
        let announced = lines
            .recv_timeout(Duration::from_secs(30))
            .is_ok_and(|l| l.contains("http://"));
        let _ = child.kill();
        let _ = child.wait();
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(announced, "{manifest} {key} did not start an agent:\n{err}");
    }
}

#[test]
fn the_dockerfile_builds_a_non_root_image_of_the_binary() {
    let script = r#"
import json, sys
from dockerfile_parse import DockerfileParser
p = DockerfileParser(path=sys.argv[1])
print(json.dumps({"structure": p.structure, "baseimage": p.baseimage}))
"#;
    let path = deploy().join("docker/Dockerfile");
    let out = run(Command::new(python()).arg("-c").arg(script).arg(&path));
    let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let steps: Vec<(String, String)> = parsed["structure"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["instruction"].as_str().unwrap().to_owned(),
                s["value"].as_str().unwrap().to_owned(),
            )
        })
        .filter(|(i, _)| i != "COMMENT")
        .collect();
    let froms: Vec<usize> = (0..steps.len()).filter(|&i| steps[i].0 == "FROM").collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {steps:?}"
    );
    let (build, runtime) = (&steps[..froms[1]], &steps[froms[1]..]);
    assert!(build[0].1.ends_with(" AS build"), "{:?}", build[0]);
    assert!(
        build
            .iter()
            .any(|(i, v)| i == "RUN" && v.contains("cargo build --release --locked -p patina")),
        "{build:?}"
    );
    let last = |what: &str| {
        runtime
            .iter()
            .rev()
            .find(|(i, _)| i == what)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {what} in the runtime stage"))
    };
    let user = last("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric user");
    assert!(uid != 0, "runs as root");
    assert!(
        last("COPY").starts_with("--from=build ")
            && last("COPY").ends_with("/usr/local/bin/patina")
    );
    assert_eq!(last("ENTRYPOINT"), "[\"/usr/local/bin/patina\"]");
    assert!(last("CMD").starts_with("[\"region\""), "{}", last("CMD"));
    // What it builds is this workspace's binary package.
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"patina\""));
    assert!(deploy().join("docker/Dockerfile.dockerignore").exists());
}

/// Every `patina_*` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("patina_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_and_the_dashboard_name_served_metrics_and_prometheus_scrapes_them() {
    let prom = deploy().join("prometheus");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(prom.join("patina-alerts.yml")));
    let said = run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(prom.join("patina-alerts.test.yml")));
    assert!(said.contains("SUCCESS"), "{said}");
    run(Command::new("promtool")
        .args(["check", "config"])
        .arg(prom.join("prometheus.yml")));
    // The dashboard's queries parse as PromQL: as recording rules, promtool checks them.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(deploy().join("grafana/patina-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap().replace("$instance", ".*"))
        .collect();
    assert!(exprs.len() >= 20, "{}", exprs.len());
    let tmp = tempfile::tempdir().unwrap();
    let rules: String = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!("      - record: dashboard:query{i}\n        expr: {e:?}\n"))
        .collect();
    let rules_file = tmp.path().join("dashboard-rules.yml");
    std::fs::write(
        &rules_file,
        format!("groups:\n  - name: dashboard\n    rules:\n{rules}"),
    )
    .unwrap();
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules_file));

    // A small world: a region agent (with a machine whose check runs), a bridge, a global
    // agent. Every metric the alerts and the dashboard name is served by one of them.
    let root = tmp.path();
    let region = start_region_agent(root, "ord1", "127.0.0.234", "ord", &[]);
    let global = start_global(root, "g1", "127.0.0.235", "ord", &[], None);
    let bridge = start_bridge(
        root,
        "b1",
        "127.0.0.236",
        "ord",
        &[&region],
        &["127.0.0.235".to_owned()],
    );
    let mut m = patina_testkit::machine("web-1", "web", 7600);
    m.addresses = vec![region.host_port().to_owned()];
    m.health = patina_proto::v1::Health::Unspecified as i32;
    m.checks = vec![patina_proto::v1::Check {
        target: Some(patina_proto::v1::check::Target::Tcp(
            patina_proto::v1::TcpCheck { port: 0 },
        )),
        interval_ms: 500,
        ..Default::default()
    }];
    region
        .client()
        .await
        .upsert_machine(patina_proto::v1::UpsertMachineRequest { machine: Some(m) })
        .await
        .unwrap();
    let targets: Vec<String> = [&region, &global, &bridge]
        .iter()
        .map(|a| a.metrics_url().trim_start_matches("http://").to_owned())
        .collect();
    // Bridged: the global agent knows the region, and the bridge published.
    let scrape = |t: &str| {
        patina_testkit::http_get(&format!("http://{t}/metrics"))
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let published = eventually(Duration::from_secs(30), || async {
        scrape(&targets[2]).contains("patina_bridge_published_total 1")
            || scrape(&targets[2]).lines().any(|l| {
                l.starts_with("patina_bridge_publish_delay_seconds_count") && !l.ends_with(" 0")
            })
    })
    .await;
    assert!(
        published.is_some(),
        "the bridge published:\n{}",
        scrape(&targets[2])
    );
    let mut wanted =
        metric_names(&std::fs::read_to_string(prom.join("patina-alerts.yml")).unwrap());
    wanted.extend(exprs.iter().flat_map(|e| metric_names(e)));
    // Present only with TLS on (these agents run without it).
    wanted.remove("patina_certificate_expiry_seconds");
    // Per-peer series appear after a first anti-entropy session: wait for them.
    let missing = || {
        let served: String = targets.iter().map(|t| scrape(t)).collect();
        let served = metric_names(&served);
        wanted
            .iter()
            .filter(|n| !served.contains(*n))
            .cloned()
            .collect::<Vec<_>>()
    };
    let all_served = eventually(Duration::from_secs(30), || async { missing().is_empty() }).await;
    assert!(
        all_served.is_some(),
        "named but not served: {:?}",
        missing()
    );

    // A real Prometheus scrapes the three agents with the alerts loaded.
    let config = tmp.path().join("prometheus.yml");
    std::fs::copy(
        prom.join("patina-alerts.yml"),
        tmp.path().join("patina-alerts.yml"),
    )
    .unwrap();
    let listed: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [patina-alerts.yml]\nscrape_configs:\n  - job_name: patina\n    static_configs:\n      - targets: [{}]\n",
            listed.join(", ")
        ),
    )
    .unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    const PROMETHEUS: &str = "127.0.0.237:19090";
    let _prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (cargo xtask test installs it)"),
    );
    let query = |q: &str| {
        let url = format!("http://{PROMETHEUS}/api/v1/query?query={q}");
        patina_testkit::http_get(&url)
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let start = Instant::now();
    let scraped = eventually(Duration::from_secs(60), || async {
        let up = query("sum(up)");
        let ready = query("count(patina_ready)");
        up.contains("\"3\"") && ready.contains("\"3\"")
    })
    .await;
    assert!(
        scraped.is_some(),
        "Prometheus scraped the three agents: {} / {}",
        query("up"),
        query("patina_ready")
    );
    let rules = patina_testkit::http_get(&format!("http://{PROMETHEUS}/api/v1/rules"))
        .unwrap()
        .1;
    let alerts = std::fs::read_to_string(prom.join("patina-alerts.yml"))
        .unwrap()
        .matches("- alert: ")
        .count();
    assert_eq!(
        rules.matches("\"health\":\"ok\"").count(),
        alerts,
        "{rules}"
    );
    println!(
        "Prometheus scraped 3 agents with {alerts} alert rules loaded, {} ms after it started",
        start.elapsed().as_millis()
    );
}
