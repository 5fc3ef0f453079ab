//! The soak test (`rproxy_tests::soak`) for two minutes: traffic of every kind in the two-node
//! lab while the endpoints change every second, both agents restart ten times and the programs
//! go from the previous release's object (`tests/fixtures/`) to this build's, back and forth
//! again. Every request must succeed (but for at most a few during the first upgrade's program
//! swap, a documented window: docs/maps.md), every stream survive, and once the traffic stops every
//! conntrack entry, orphaned backend and socket reverse-NAT entry must go; the last agent's RSS
//! must stay flat. `cargo xtask soak --minutes N` runs it longer and prints the same report.
use std::time::Duration;

use rproxy_tests::{
    agent_bin, previous_ebpf_object, serial_or_skip,
    soak::{self, Options},
};

#[test]
fn soak_two_minutes_of_churn_restarts_and_upgrades_loses_nothing() {
    let Some(_guard) = serial_or_skip("soak_two_minutes_of_churn_restarts_and_upgrades_loses_nothing") else {
        return;
    };
    let opts = Options {
        agent_bin: agent_bin().expect("agent binary"),
        duration: Duration::from_mins(2),
        restarts: 10,
        previous_object: Some(previous_ebpf_object()),
        churn_every: Duration::from_secs(1),
        seed: 0x50a6_2026_1203,
        log_dir: None,
        verbose: true,
    };
    let report = soak::run(&opts).expect("the soak lab");
    println!("{report}");
    let problems = report.problems();
    assert!(problems.is_empty(), "goals missed:\n{}\n\n{report}", problems.join("\n"));
    assert_eq!(report.restarts.len(), 20, "ten restarts of each agent");
    assert!(report.churn_steps >= 100, "{} endpoint changes", report.churn_steps);
    // The swap's window is milliseconds wide: a request or two of the 29 workers may fall in it,
    // never a stream (established before the upgrade, its flow is copied to the new maps).
    let in_swap: u64 = report.workers.iter().map(|w| report.failed_in_migration(w)).sum();
    assert!(report.migration.is_some() && in_swap <= 3, "{in_swap} failures in the migration\n{report}");
    for w in report.workers.iter().filter(|w| w.load == "TCP stream") {
        assert_eq!(w.failed, 0, "{} stream to {} broke\n{report}", w.origin, w.target);
    }
}
