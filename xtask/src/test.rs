//! `cargo xtask test [ARGS]`: install what the tests need and this machine lacks, then run
//! `cargo test --workspace ARGS`. Tests that drive stock tools (promtool, Prometheus's
//! linter, and Prometheus itself; headless Chromium for the status page; systemd-analyze and
//! Python's kubernetes-validate and dockerfile-parse for the deploy recipes; Python's grpcio
//! for the xDS client, `dig` for the DNS front end) fail, never skip,
//! when the tool is missing: this is what puts it there.

use std::process::Command;

use anyhow::{Context, bail};

/// Tools the tests run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("chromium", "chromium"),
    ("systemd-analyze", "systemd"),
    ("python3", "python3"),
    ("dig", "bind9-dnsutils"),
];

/// Python packages the deploy tests run (`crates/patina/tests/deploy.rs`), pinned, installed
/// from PyPI into a virtual environment of their own.
const PYTHON_PACKAGES: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "dockerfile-parse==2.0.1",
    "grpcio==1.76.0",
];

/// Where that environment lives: `PATINA_TOOLS_VENV`, else beside the build cache. The
/// tests read the same variable (set for them here).
pub fn venv_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("PATINA_TOOLS_VENV") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    std::path::Path::new(&home).join(".cache/patina/venv")
}

/// The virtual environment with [`PYTHON_PACKAGES`], made when missing (with Debian's
/// python3-venv when this Python cannot make one).
fn install_python_packages() -> anyhow::Result<()> {
    let dir = venv_dir();
    let python = dir.join("bin/python");
    let installed = Command::new(&python)
        .args(["-m", "pip", "show", "-q"])
        .args(
            PYTHON_PACKAGES
                .iter()
                .map(|p| p.split("==").next().unwrap_or(p)),
        )
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    eprintln!(
        "xtask test: installing {PYTHON_PACKAGES:?} into {}",
        dir.display()
    );
    let make = || {
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !make() {
        as_root(&["apt-get", "update", "-qq"])?;
        as_root(&[
            "apt-get",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "python3-venv",
        ])?;
        if !make() {
            bail!("python3 -m venv {} failed", dir.display());
        }
    }
    let status = Command::new(&python)
        .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
        .args(PYTHON_PACKAGES)
        .status()
        .context("running pip")?;
    if !status.success() {
        bail!("pip install {PYTHON_PACKAGES:?} failed ({status})");
    }
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn as_root(args: &[&str]) -> anyhow::Result<()> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    let mut cmd = if root {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    } else {
        let mut c = Command::new("sudo");
        c.args(args);
        c
    };
    let status = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {args:?}"))?;
    if !status.success() {
        bail!("{args:?} failed ({status})");
    }
    Ok(())
}

/// Install the Debian packages of the tools missing here.
pub fn install_tools() -> anyhow::Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask test: installing {missing:?} (Debian packages the tests use)");
    as_root(&["apt-get", "update", "-qq"])?;
    let mut install = vec!["apt-get", "install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    as_root(&install)?;
    for (tool, package) in TOOLS {
        if !have(tool) {
            bail!("{tool} is still missing after installing {package}");
        }
    }
    Ok(())
}

pub fn run(args: &[&str]) -> anyhow::Result<()> {
    install_tools()?;
    install_python_packages()?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .env("PATINA_TOOLS_VENV", venv_dir())
        .args(["test", "--workspace"])
        .args(args)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}
