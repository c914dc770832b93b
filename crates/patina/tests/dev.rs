//! `patina dev`, the README's first command: serves on embedded defaults, prints where, and
//! stops cleanly on Ctrl-C even with a watch open, removing its temporary data.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{
    Health, LookupAppRequest, Machine, MachineState, UpsertMachineRequest, WatchRequest,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_serves_and_stops_cleanly_on_ctrl_c() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["dev", "--listen", "127.0.0.1:0"])
        .env_remove("RUST_LOG")
        // The dev world's steps at info: a start that hangs shows where.
        .env("PATINA_LOG", "warn,patina::dev=info")
        // A debug build of the whole world on a loaded 2-core machine can pause a loop for
        // seconds: the watchdog ends it only after 30 s here, as in the harness.
        .env("PATINA_WATCHDOG__BUDGET_MS", "5000")
        .env("PATINA_WATCHDOG__FATAL_MS", "30000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let rx = patina_testkit::stdout_lines(child.stdout.take().unwrap());
    // A failed assertion must not leave the world running (it holds the test's stdout).
    struct KillOnDrop(u32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = Command::new("kill")
                .args(["-KILL", &self.0.to_string()])
                .status();
        }
    }
    let _guard = KillOnDrop(child.id());
    let mut url = None;
    let mut data = None;
    let mut global = None;
    let mut tls_dir = None;
    let mut pages = Vec::new();
    while url.is_none()
        || data.is_none()
        || global.is_none()
        || tls_dir.is_none()
        || pages.len() < 2
    {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("dev banner");
        if let Some(u) = line.strip_prefix(patina_testkit::ANNOUNCE) {
            url = Some(u.to_owned());
        }
        if let Some((_, d)) = line.split_once("data in ") {
            data = Some(PathBuf::from(d.trim()));
        }
        if let Some(d) = line.trim().strip_prefix("export PATINA_TLS_DIR=") {
            tls_dir = Some(PathBuf::from(d));
        }
        if let Some((_, page)) = line.trim().split_once("status page of ") {
            let (what, at) = page.split_once(": ").expect("status page line");
            pages.push((what.to_owned(), at.to_owned()));
        }
        if let Some(list) = line.trim().strip_prefix("global agents: ") {
            global = list.split(", ").next().map(|a| format!("http://{a}"));
        }
    }
    let (url, data, global) = (url.unwrap(), data.unwrap(), global.unwrap());
    assert!(data.exists(), "dev keeps its data in {}", data.display());
    // The world runs with mTLS: the banner names the operator's certificate.
    let tls_dir = tls_dir.unwrap();
    let material = patina_trust::Material::load(&patina_trust::Paths::in_dir(&tls_dir))
        .expect("the operator's certificate");
    let dial = patina_trust::Dial::tls_any(patina_trust::Trust::fixed(material));
    let connect = async |url: &str| {
        dial.connect(tonic::transport::Endpoint::from_shared(url.to_owned()).unwrap())
            .await
            .unwrap()
    };
    // Without it, nothing is served.
    assert!(
        RegionClient::connect(url.clone()).await.is_err()
            || RegionClient::connect(url.clone())
                .await
                .unwrap()
                .upsert_machine(UpsertMachineRequest::default())
                .await
                .is_err()
    );

    let mut client = RegionClient::new(connect(&url).await);
    let machine = Machine {
        id: "web-1".into(),
        app: "web".into(),
        addresses: vec!["127.0.0.1:8080".into()],
        state: MachineState::Started as i32,
        health: Health::Passing as i32,
        ..Machine::default()
    };
    let stored = client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine),
        })
        .await
        .unwrap()
        .into_inner()
        .machine
        .unwrap();
    assert_eq!(stored.region, "ord", "the first region of the dev world");
    // The whole world answers: the demo app "web" runs in every region, nearest first.
    let mut lookups = GlobalClient::new(connect(&global).await);
    let deadline = Instant::now() + Duration::from_secs(30);
    let regions = loop {
        let answer = lookups
            .lookup_app(LookupAppRequest {
                app: "web".into(),
                from_region: "syd".into(),
                include_empty: false,
            })
            .await
            .unwrap()
            .into_inner();
        let regions: Vec<String> = answer.regions.into_iter().map(|r| r.region).collect();
        if regions.len() == 3 || Instant::now() > deadline {
            break regions;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(regions, ["syd", "ord", "fra"], "nearest to Sydney first");
    let mut watch = client
        .watch(WatchRequest {
            app: "web".into(),
            resume_token: String::new(),
            heartbeat_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().unwrap().reset);
    // Gossip is sealed in every cluster: the operator's certificate lists each keyring.
    for server in [&url, &global] {
        let out = Command::new(env!("CARGO_BIN_EXE_patina"))
            .args(["keyring", "list", "--server"])
            .arg(server.trim_start_matches("http://"))
            .env("PATINA_TLS_DIR", &tls_dir)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            text.matches("(in use); plaintext refused").count(),
            text.matches(" ok ").count(),
            "{text}"
        );
        assert!(text.contains("in use on"), "{text}");
    }

    // The status pages, rendered by a real browser: the region agent lists its region's 3
    // agents; the global agent its cluster's 3 global agents and 6 bridges, and 3 fresh
    // regions.
    for (what, at) in &pages {
        let (members, regions) = if what.starts_with("region") {
            (3, 0)
        } else {
            (9, 3)
        };
        let rendered = rendered_until(at, |dom| {
            text_of(dom, "member-count") == Some(members.to_string())
                && text_of(dom, "alive-count") == Some(members.to_string())
                && dom.matches(">fresh</td>").count() == regions
        });
        assert!(
            rendered.is_ok(),
            "{what} at {at}: {}",
            rendered.unwrap_err()
        );
    }

    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "patina dev did not stop within 10 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    // The open watch was told, rather than left hanging or ended as if complete.
    let mut ended = None;
    for _ in 0..100 {
        match watch.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => {
                panic!("the watch ended without a status: a client would think it complete")
            }
            Err(status) => {
                ended = Some(status);
                break;
            }
        }
    }
    let status = ended.expect("the watch ended within 100 messages");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(status.message().contains("shutting down"), "{status}");
    assert!(!data.exists(), "the temporary data directory was removed");
}

/// The text of the element with `id` in a dumped DOM (`<span id="x">text</span>`).
fn text_of(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let open = start + dom[start..].find('>')? + 1;
    let close = open + dom[open..].find('<')?;
    Some(dom[open..close].to_owned())
}

/// Load `url` in headless Chromium (Debian `chromium`, which `cargo xtask test` installs)
/// until its script rendered a DOM for which `done` holds; bounded: 12 loads. Returns the
/// last DOM as the error otherwise.
fn rendered_until(url: &str, done: impl Fn(&str) -> bool) -> Result<(), String> {
    let profile = tempfile::tempdir().unwrap();
    let mut last = String::new();
    for _ in 0..12 {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                // Time for the page's first fetch of /v1/status to land and render.
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .output()
            .expect("chromium (cargo xtask test installs it)");
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if done(&last) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(last)
}
