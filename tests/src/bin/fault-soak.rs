//! The fault soak (issue 25): rounds of random work with faults injected at random moments, against the real API
//! server, the lab's KubeVirt and a QEMU guest, with invariants checked after every round (see
//! `wukong_e2e::soak`). Prints its seed first; `--seed` replays a run's choices. Exits non-zero on a violation.

use anyhow::{Result, ensure};
use clap::Parser;
use wukong_e2e::soak::{Config, fresh_seed, run};

#[derive(Parser)]
struct Args {
    /// Rounds to run.
    #[arg(long, default_value_t = 200)]
    rounds: u32,
    /// The seed of every random choice (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(fresh_seed);
    println!("fault soak: seed {seed} (replay: fault-soak --seed {seed} --rounds {})", args.rounds);
    let report = run(Config { seed, rounds: args.rounds }).await?;
    println!("{}", report.summary());
    ensure!(report.violations.is_empty(), "{} violations; replay with --seed {seed}", report.violations.len());
    Ok(())
}
