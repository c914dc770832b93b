//! The command-line client against a real agent: the documented forms work, `--json` parses,
//! and errors exit non-zero with the gRPC code. Also: health and reflection are served.

mod common;

use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_commands_work_and_json_parses() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let server = agent.url.trim_start_matches("http://").to_owned();
    let s = server.as_str();

    common::cli_ok(&[
        "machine",
        "put",
        "--server",
        s,
        "--app",
        "web",
        "--id",
        "web-1",
        "--addr",
        "127.0.0.1:8080",
    ]);
    common::cli_ok(&[
        "machine",
        "put",
        "--server",
        s,
        "--app",
        "web",
        "--id",
        "web-2",
        "--addr",
        "127.0.0.1:8081",
        "--addr",
        "[::1]:8081",
        "--state",
        "started",
        "--health",
        "critical",
        "--meta",
        "zone=a",
    ]);

    let healthy: serde_json::Value = serde_json::from_str(&common::cli_ok(&[
        "instances",
        "--server",
        s,
        "web",
        "--json",
    ]))
    .unwrap();
    let ids: Vec<&str> = healthy["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["web-1"]);
    assert_eq!(healthy["machines"][0]["region"], "test");
    assert_eq!(healthy["machines"][0]["host"], "worker-1");

    let all: serde_json::Value = serde_json::from_str(&common::cli_ok(&[
        "instances",
        "--server",
        s,
        "web",
        "--all",
        "--json",
    ]))
    .unwrap();
    assert_eq!(all["machines"].as_array().unwrap().len(), 2);

    let one: serde_json::Value = serde_json::from_str(&common::cli_ok(&[
        "machine", "get", "--server", s, "web-2", "--json",
    ]))
    .unwrap();
    assert_eq!(one["health"], "critical");
    assert_eq!(one["addresses"][1], "[::1]:8081");
    assert_eq!(one["metadata"]["zone"], "a");
    assert!(one["version"]["seq"].as_u64().unwrap() >= 2);

    common::cli_ok(&["machine", "rm", "--server", s, "web-1"]);
    let out = common::cli(&["machine", "get", "--server", s, "web-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));

    let out = common::cli(&[
        "machine",
        "put",
        "--server",
        s,
        "--app",
        "Bad_App",
        "--id",
        "x",
        "--addr",
        "1.2.3.4:5",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("app"),
        "{err}"
    );
    let out = common::cli(&[
        "machine", "put", "--server", s, "--app", "web", "--id", "x", "--state", "sleeping",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown state"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let dir = tempfile::tempdir().unwrap();
    // A region's only agent: ready once its first readiness check ran.
    let agent = common::start_with(dir.path(), "127.0.0.1", "[gossip]\nstandalone = true\n");
    let channel = tonic::transport::Channel::from_shared(agent.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let serving = common::eventually(std::time::Duration::from_secs(10), || {
        let channel = channel.clone();
        async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: "patina.v1.Region".into(),
                })
                .await
                .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32)
        }
    })
    .await;
    assert!(serving.is_some(), "the agent never became SERVING");

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("expected a service list, got {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"patina.v1.Region".to_owned()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_control_characters_never_reach_the_terminal_raw() {
    use patina_proto::v1::UpsertMachineRequest;

    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let s = agent.host_port();
    // Red text, CSI "clear screen" in its one-character C1 form, a bell, DEL, a newline.
    let hostile = "a\x1b[31mb\u{9b}2Jc\x07d\x7fe\nf";
    let mut m = common::machine("web-1", "web", 8080);
    m.metadata.insert("note".into(), hostile.into());
    agent
        .client()
        .await
        .upsert_machine(UpsertMachineRequest { machine: Some(m) })
        .await
        .unwrap();

    let raw_control = |text: &str| -> Vec<char> {
        text.chars()
            .filter(|c| c.is_control() && *c != '\n')
            .collect()
    };
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "machine get",
            vec!["machine", "get", "--server", s, "web-1"],
        ),
        (
            "machine get --json",
            vec!["machine", "get", "--server", s, "web-1", "--json"],
        ),
        (
            "instances --json",
            vec!["instances", "--server", s, "web", "--json"],
        ),
    ];
    for (name, args) in cases {
        let out = common::cli_ok(&args);
        assert_eq!(raw_control(&out), Vec::<char>::new(), "{name}: {out:?}");
        if name == "machine get" {
            assert!(
                out.contains(r"note=a\u{1b}[31mb\u{9b}2Jc\u{7}d\u{7f}e\u{a}f"),
                "{out}"
            );
            assert_eq!(
                out.lines().filter(|l| l.starts_with("metadata:")).count(),
                1
            );
        }
    }
    let one: serde_json::Value = serde_json::from_str(&common::cli_ok(&[
        "machine", "get", "--server", s, "web-1", "--json",
    ]))
    .unwrap();
    assert_eq!(one["metadata"]["note"], hostile, "JSON keeps the value");
    let all: serde_json::Value = serde_json::from_str(&common::cli_ok(&[
        "instances",
        "--server",
        s,
        "web",
        "--json",
    ]))
    .unwrap();
    assert_eq!(all["machines"][0]["metadata"]["note"], hostile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_origin_moves_a_stopped_agents_store_to_a_fresh_identity_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    let put = |id: &str| patina_proto::v1::UpsertMachineRequest {
        machine: Some(common::machine(id, "web", 8080)),
    };
    let before = client.upsert_machine(put("m1")).await.unwrap().into_inner();
    let old = before.machine.unwrap().version.unwrap().origin;
    assert!(agent.stop().unwrap(), "a clean stop");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["new-origin", "--config"])
        .arg(dir.path().join("patina.toml"))
        .env("PATINA_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("now writes as origin"));
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    let after = client.upsert_machine(put("m2")).await.unwrap().into_inner();
    let v = after.machine.unwrap().version.unwrap();
    assert_ne!(v.origin, old, "a fresh origin");
    assert_eq!(v.seq, 1, "numbered from 1 again");
    // Its records are kept.
    client
        .get_machine(patina_proto::v1::GetMachineRequest { id: "m1".into() })
        .await
        .unwrap();
}

/// Pushes arrive on UDP at the API's port number: when that UDP port is taken, an agent
/// told to serve on that port refuses to start and says why.
#[test]
fn a_taken_udp_port_at_the_api_port_is_a_clear_start_error() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port();
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        return; // the TCP port is taken too: nothing to learn here
    }
    let config = dir.path().join("patina.toml");
    std::fs::write(
        &config,
        format!(
            "region = \"test\"\nhost = \"w1\"\ntls = \"off\"\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nlog = \"warn\"\n[gossip]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["region", "--config"])
        .arg(&config)
        .output()
        .expect("run patina");
    assert!(!out.status.success(), "it started on a taken push port");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("push socket") && err.contains(&port.to_string()),
        "unclear error: {err}"
    );
    drop(udp);
}
