//! The short fault soak of every test run (issue 25): a few seeded rounds of work with faults at random moments
//! (see `wukong_e2e::soak`); `scripts/bench.sh` runs the long one. `WUKONG_SOAK_SEED` and `WUKONG_SOAK_ROUNDS`
//! replay or lengthen it.

use anyhow::Result;
use wukong_e2e::soak::{Config, run};

/// The seed of the short soak: fixed, so that every test run takes the same steps (a failure names its seed).
const SEED: u64 = 25;
const ROUNDS: u32 = 6;

fn from_env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread")]
async fn faults_at_random_moments_never_unplug_a_used_disk_and_everything_converges() -> Result<()> {
    let config = Config { seed: from_env("WUKONG_SOAK_SEED", SEED), rounds: from_env("WUKONG_SOAK_ROUNDS", ROUNDS) };
    let report = run(config).await?;
    println!("{}", report.summary());
    assert_eq!(report.rounds, config.rounds, "every round ran");
    assert!(report.violations.is_empty(), "seed {}: {:#?}", config.seed, report.violations);
    assert!(report.faults.values().sum::<u32>() > 0, "faults were injected: {:?}", report.faults);
    assert!(report.checked_unplugs > 0, "the oracle checked the unplugs");
    Ok(())
}
