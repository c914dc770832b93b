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
    // A region's only agent (its view stands alone, so it is ready).
    let mut agent = common::start_with(
        &fs.0.join("agent"),
        "127.0.0.1",
        "[gossip]\nstandalone = true\n",
    );
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

/// Fill the filesystem at `dir` with a ballast file until it refuses more; the ballast is
/// removed to give the space back.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("ballast-fill");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    // Bounded: a 16 MiB filesystem holds at most 256 chunks.
    for _ in 0..1024 {
        if f.write_all(&chunk).and_then(|_| f.sync_data()).is_err() {
            break;
        }
    }
    path
}

/// Changes from a peer that arrive while this agent's disk is full are dropped, not refused:
/// once space returns, the agent catches up without a restart. (A store that took nothing is
/// told so, and takes the copies again; the simulation test
/// `a_store_that_took_nothing_for_a_while_catches_up_when_space_returns` is the one that fails
/// when such versions are remembered as refused: here the periodic round still repairs them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_arrive_while_the_disk_is_full_arrive_once_space_returns() {
    if !common::is_root() {
        eprintln!("SKIPPED: mounting a small filesystem needs root (CI runs as root)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mount a tmpfs");
    let fs = SmallFs(small);
    let a = common::start_member(&fs.0, 0, "127.0.0.71", &[]);
    let b = common::start_member(dir.path(), 1, "127.0.0.72", &["127.0.0.71".into()]);
    let mut at_a = a.client().await;
    let mut at_b = b.client().await;
    at_b.upsert_machines(UpsertMachinesRequest {
        machines: vec![big(0, 1)],
    })
    .await
    .expect("a first write at b");
    let joined = common::eventually(std::time::Duration::from_secs(20), || {
        let mut c = at_a.clone();
        async move { count_instances(&mut c).await == 1 }
    })
    .await;
    assert!(joined.is_some(), "a and b replicate");

    // a's disk fills up; b takes writes (each machine about 3.5 KiB, 1.4 MiB in all).
    let ballast = fill(&fs.0);
    let total = 400;
    for start in (1..total).step_by(BATCH) {
        let machines: Vec<Machine> = (start..(start + BATCH).min(total))
            .map(|i| big(i, 1))
            .collect();
        at_b.upsert_machines(UpsertMachinesRequest { machines })
            .await
            .expect("b has room");
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let during = count_instances(&mut at_a).await;
    assert!(
        during < total,
        "a full disk took everything ({during}): the fault did not happen"
    );

    // Space returns: a catches up, without a restart.
    std::fs::remove_file(&ballast).unwrap();
    let caught_up = common::eventually(std::time::Duration::from_secs(30), || {
        let mut c = at_a.clone();
        async move { count_instances(&mut c).await == total }
    })
    .await;
    assert!(
        caught_up.is_some(),
        "a holds {} of {total} machines 30 s after space returned",
        count_instances(&mut at_a).await
    );
    eprintln!("a had {during} of {total} while full; caught up {caught_up:?} after space returned");
    drop((a, b));
}
