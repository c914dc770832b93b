//! A full disk refuses writes with a clear status and nothing else: reads go on, writes
//! resume once space is freed, and after kill -9 and a restart every acknowledged write is
//! there. The data directory is on a small tmpfs this test mounts (root only).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use patina_proto::v1::{GetMachineRequest, Machine, UpsertMachinesRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Size of the filesystem: room for the store's files and about a thousand big machines.
const FS_SIZE: &str = "6m";
/// Freed once the disk is full, so writes can resume.
const BALLAST_BYTES: usize = 1 << 20;
/// Machines per batch while filling the disk, and the bound on batches (the loop must end).
const BATCH: usize = 50;
const MAX_BATCHES: usize = 400;

/// A mounted tmpfs, unmounted when dropped.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(at: &Path) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={FS_SIZE}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A machine of about 3.5 KiB: three large metadata values.
fn big(n: usize, generation: u32) -> Machine {
    let mut m = common::machine(&format!("m{n:05}"), "web", 8080);
    for k in ["a", "b", "c"] {
        m.metadata
            .insert(k.into(), format!("{generation}-{}", "x".repeat(1000)));
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_reads_go_on_and_writes_resume_when_space_returns() {
    if !common::is_root() {
        eprintln!("SKIPPED: mounting a small filesystem needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fs = SmallFs::mount(&dir.path().join("small")).expect("mount a tmpfs");
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; BALLAST_BYTES]).unwrap();
    let mut agent = common::start(&fs.0.join("agent"), "127.0.0.1");
    let mut client = agent.client().await;
    let mut health = HealthClient::new(agent.channel().await);

    // Fill the disk. Every acknowledged machine is remembered with its version.
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut n = 0;
    let refusal = loop {
        assert!(n < BATCH * MAX_BATCHES, "the disk never filled up");
        let machines: Vec<Machine> = (n..n + BATCH).map(|i| big(i, 1)).collect();
        match client
            .upsert_machines(UpsertMachinesRequest { machines })
            .await
        {
            Ok(r) => {
                for (i, v) in r.into_inner().versions.iter().enumerate() {
                    acked.insert(format!("m{:05}", n + i), v.seq);
                }
                n += BATCH;
            }
            Err(status) => break status,
        }
    };
    assert_eq!(
        refusal.code(),
        tonic::Code::ResourceExhausted,
        "{refusal:?}"
    );
    assert!(
        refusal.message().contains("disk is full"),
        "{}",
        refusal.message()
    );
    assert!(acked.len() >= 100, "only {} machines fit", acked.len());

    // Nothing of the refused batch is visible; reads go on; the agent stays SERVING.
    let missing = format!("m{n:05}");
    let err = client
        .get_machine(GetMachineRequest { id: missing })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let listed = count_instances(&mut client).await;
    assert_eq!(listed, acked.len());
    let h = health
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, ServingStatus::Serving as i32);

    // Space returns: writes resume.
    std::fs::remove_file(&ballast).unwrap();
    let machines: Vec<Machine> = (n..n + BATCH).map(|i| big(i, 1)).collect();
    let versions = client
        .upsert_machines(UpsertMachinesRequest { machines })
        .await
        .expect("writes resume once space is freed")
        .into_inner()
        .versions;
    for (i, v) in versions.iter().enumerate() {
        acked.insert(format!("m{:05}", n + i), v.seq);
    }

    // kill -9 and restart: every acknowledged write is there, at its version.
    agent.kill9();
    let agent = common::start(&fs.0.join("agent"), "127.0.0.1");
    let mut client = agent.client().await;
    for (id, seq) in &acked {
        let m = client
            .get_machine(GetMachineRequest { id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("{id} lost: {e:?}"))
            .into_inner()
            .machine
            .unwrap();
        assert_eq!(m.version.unwrap().seq, *seq, "{id}");
    }
    assert_eq!(count_instances(&mut client).await, acked.len());
    drop(agent);
}

async fn count_instances(
    client: &mut patina_proto::v1::region_client::RegionClient<tonic::transport::Channel>,
) -> usize {
    patina_testkit::list_pages(client, "web", true, 1000)
        .await
        .iter()
        .map(Vec::len)
        .sum()
}
