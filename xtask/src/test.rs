//! `cargo xtask test [ARGS]`: install what the tests need and this machine lacks, then run
//! `cargo test --workspace ARGS`. Tests that drive stock tools (promtool, Prometheus's
//! linter; headless Chromium for the status page) fail, never skip, when the tool is missing:
//! this is what puts it there.

use std::process::Command;

use anyhow::{Context, bail};

/// Tools the tests run, and the Debian package of each.
const TOOLS: &[(&str, &str)] = &[("promtool", "prometheus"), ("chromium", "chromium")];

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
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["test", "--workspace"])
        .args(args)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    Ok(())
}
