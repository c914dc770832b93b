//! This crate's integration tests run the `patina` binary cargo built for them through the
//! shared harness, `patina-testkit`.

#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use patina_testkit::{Agent, machine};

/// Start `patina region` on a fresh port of `ip` with its data in `dir`.
pub fn start(dir: &Path, ip: &str) -> Agent {
    start_with(dir, ip, "")
}

/// [`start`], with `extra` appended to the config file (e.g. a `[limits]` table).
pub fn start_with(dir: &Path, ip: &str, extra: &str) -> Agent {
    Agent::start(Path::new(env!("CARGO_BIN_EXE_patina")), dir, ip, extra).expect("start patina")
}

/// Whether the tests run as root (CI does): mounts and network namespaces need it.
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
