//! Project automation, run as `cargo xtask <task>` (an alias in `.cargo/config.toml`).
//!
//! - `cargo xtask bench store [--secs N] [--records N] [--samples N] [--only PHASES]
//!   [--patina BIN]`: the store benchmark (see `docs/benchmarks.md`); prints a table and,
//!   last, one JSON line.
//! - `cargo xtask bench watchers [--machines N] [--watchers N]`: memory with stalled
//!   whole-region watchers, and their convergence.
//! - `cargo xtask bench propagation [--nodes N] [--writes N] [--kills N] [--idle-secs S]
//!   [--skip-sim | --sim-only | --wan-only]`: write-to-everywhere and crash-to-excluded latency, false downs, gossip
//!   bandwidth on a region of real agents; the simulation's spread at 100 and 1,000 nodes;
//!   the simulated WAN world, tree dissemination beside plain gossip.
//! - `cargo xtask bench sim-scale [--nodes N] [--edges E] [--crashes K] [--only region|global]`:
//!   the deterministic simulation run directly at 10,000 region agents and 5,000 edges.
//! - `cargo xtask bench global [--regions R] [--edges E] [--events N] [--lookup-secs S]
//!   [--summaries N]`: region-to-edge latency, LookupApp over gRPC, the edge library's
//!   lookup and memory per summary.
//! - `cargo xtask bench watchdog [--trials N]`: a stuck loop (gossip thread, store writer)
//!   to out of the cluster at every peer, beside a SIGKILL's.
//! - `cargo xtask bench frontends [--trials N] [--streams N] [--dns-secs S]`: xDS views
//!   after an instance goes down, many ADS streams on one agent, DNS queries per second.
//! - `cargo xtask bench checks [--trials N]`: an instance killed to no global agent routing
//!   to it, by the agent's health checks alone, beside an orchestrator's write.
//! - `cargo xtask cluster [--nodes N]`: a local region of N agents until Ctrl-C;
//!   `--regions R [--bridges B] [--globals G]`: the global world as real processes.
//! - `cargo xtask test [ARGS]`: installs the tools the tests drive (promtool) when missing,
//!   then runs `cargo test --workspace ARGS`: the README's test command.
//! - tidy checks run as tests of this crate (`tidy.rs`).

mod bench_catchup;
mod bench_checks;
mod bench_frontends;
mod bench_global;
mod bench_propagation;
mod bench_sim_scale;
mod bench_store;
mod bench_watchdog;
mod bench_watchers;
mod cluster;
mod harness;
mod sim_figures;
mod test;
mod tidy;
mod world;

use anyhow::bail;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["bench", "store", rest @ ..] => bench_store::run(bench_store::Options::parse(rest)?),
        ["bench", "watchers", rest @ ..] => {
            bench_watchers::run_bench(bench_watchers::Options::parse(rest)?)
        }
        ["bench", "propagation", rest @ ..] => {
            bench_propagation::run(bench_propagation::Options::parse(rest)?)
        }
        ["bench", "global", rest @ ..] => bench_global::run(bench_global::Options::parse(rest)?),
        ["bench", "watchdog", rest @ ..] => {
            bench_watchdog::run(bench_watchdog::Options::parse(rest)?)
        }
        ["bench", "sim-scale", rest @ ..] => {
            bench_sim_scale::run(bench_sim_scale::Options::parse(rest)?)
        }
        ["bench", "catchup", rest @ ..] => bench_catchup::run(bench_catchup::Options::parse(rest)?),
        ["bench", "checks", rest @ ..] => bench_checks::run(bench_checks::Options::parse(rest)?),
        ["bench", "frontends", rest @ ..] => {
            bench_frontends::run(bench_frontends::Options::parse(rest)?)
        }
        ["udp-echo", addr] => bench_frontends::udp_echo(addr),
        ["cluster", rest @ ..] => cluster::run(cluster::Options::parse(rest)?),
        ["test", rest @ ..] => test::run(rest),
        _ => bail!(
            "usage: cargo xtask bench store [--secs N] [--records N] [--samples N] \
             [--only latency,upserts,loaded] [--patina BIN]\n\
                    cargo xtask bench watchers [--machines N] [--watchers N]\n\
                    cargo xtask bench propagation [--nodes N] [--writes N] [--kills N] \
             [--idle-secs S] [--skip-sim | --sim-only | --wan-only]\n\
                    cargo xtask bench global [--regions R] [--edges E] [--events N] \
             [--lookup-secs S] [--summaries N]\n\
                    cargo xtask cluster [--nodes N] | --regions R [--nodes N] [--bridges B] \
             [--globals G]\n\
                    cargo xtask bench watchdog [--trials N]\n\
                    cargo xtask bench frontends [--trials N] [--streams N] [--dns-secs S]\n\
                    cargo xtask bench checks [--trials N]\n\
                    cargo xtask bench catchup [--machines N] [--writes-per-s W] [--summaries N]\n\
                    cargo xtask bench sim-scale [--nodes N] [--edges E] [--crashes K] \
             [--only region|global]\n\
                    cargo xtask test [cargo test args]\n\
             (see docs/benchmarks.md)"
        ),
    }
}
