//! `patina keyring`: the gossip keyring of a whole cluster, through one agent's
//! `Admin.Keyring` (docs/security.md has the runbooks).

use clap::Subcommand;
use patina_proto::v1::{KeyringOp, KeyringRequest, KeyringResponse};

use crate::DEFAULT_SERVER;
use crate::client::{connect_admin, status_error, term};

#[derive(Subcommand, Debug)]
pub enum KeyringCommand {
    /// Print a new random key (32 bytes, base64) for `gossip.encrypt` or `install`.
    Generate,
    /// Every agent's keys (fingerprints) and whether it takes plaintext.
    List(Target),
    /// Add a key on every agent (each then opens datagrams sealed with it).
    Install {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Seal with this (installed) key on every agent.
    Use {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Remove a key from every agent (not the one in use).
    Remove {
        key: String,
        #[command(flatten)]
        target: Target,
    },
    /// Take (`accept`) or drop (`refuse`) plaintext datagrams on every agent.
    Plaintext {
        choice: Plaintext,
        #[command(flatten)]
        target: Target,
    },
    /// Send plaintext again on every agent (plaintext must be accepted first).
    StopSealing(Target),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Plaintext {
    Accept,
    Refuse,
}

#[derive(clap::Args, Debug)]
pub struct Target {
    /// Any agent of the cluster: it applies the change, then asks every active member to.
    #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// That agent only.
    #[arg(long)]
    local_only: bool,
}

pub async fn run(command: KeyringCommand) -> anyhow::Result<()> {
    let (op, key, target) = match command {
        KeyringCommand::Generate => {
            println!("{}", patina_gossip::GossipKey::generate().encode());
            return Ok(());
        }
        KeyringCommand::List(t) => (KeyringOp::KeyringList, String::new(), t),
        KeyringCommand::Install { key, target } => (KeyringOp::KeyringInstall, key, target),
        KeyringCommand::Use { key, target } => (KeyringOp::KeyringUse, key, target),
        KeyringCommand::Remove { key, target } => (KeyringOp::KeyringRemove, key, target),
        KeyringCommand::Plaintext { choice, target } => (
            match choice {
                Plaintext::Accept => KeyringOp::KeyringAcceptPlaintext,
                Plaintext::Refuse => KeyringOp::KeyringRefusePlaintext,
            },
            String::new(),
            target,
        ),
        KeyringCommand::StopSealing(t) => (KeyringOp::KeyringStopSealing, String::new(), t),
    };
    if !key.is_empty() {
        // Refused here, the key never leaves this machine.
        patina_gossip::GossipKey::parse(&key)?;
    }
    let mut admin = connect_admin(&target.server).await?;
    let r = admin
        .keyring(KeyringRequest {
            op: op as i32,
            key,
            local_only: target.local_only,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    print!("{}", report(&r));
    let failed = r.agents.iter().filter(|a| !a.ok).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} agents did not apply it: run the command again once they are up",
        r.agents.len()
    );
    Ok(())
}

/// One line per agent, then how many agents hold each key.
fn report(r: &KeyringResponse) -> String {
    let mut out = String::new();
    let mut held: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for a in &r.agents {
        let line = match (&a.keyring, a.ok) {
            (Some(k), true) => {
                let keys: Vec<String> = k
                    .keys
                    .iter()
                    .map(|i| {
                        let e = held.entry(i.fingerprint.as_str()).or_default();
                        e.0 += 1;
                        if i.in_use {
                            e.1 += 1;
                            format!("{} (in use)", i.fingerprint)
                        } else {
                            i.fingerprint.clone()
                        }
                    })
                    .collect();
                format!(
                    "ok      keys: {}; plaintext {}",
                    if keys.is_empty() {
                        "none".to_owned()
                    } else {
                        keys.join(", ")
                    },
                    if k.accepts_plaintext {
                        "accepted"
                    } else {
                        "refused"
                    }
                )
            }
            _ => format!("FAILED  {}", term(&a.error)),
        };
        out.push_str(&format!("{:<22} {line}\n", a.api_address));
    }
    let ok = r.agents.iter().filter(|a| a.ok).count();
    out.push_str(&format!("{ok} of {} agents answered\n", r.agents.len()));
    for (fingerprint, (n, in_use)) in held {
        out.push_str(&format!(
            "key {fingerprint}: installed on {n}, in use on {in_use}\n"
        ));
    }
    out
}
