//! `cargo xtask soak`: the soak test of `rproxy_tests::soak` (traffic of every kind in the two-node
//! lab while endpoints churn, the agents restart and the programs are upgraded from the previous
//! release and back), with its report. As root:
//! `cargo run --release -p rproxy-tests --example soak -- [--minutes N] [--restarts N] [--seed S]
//! [--no-upgrade] [--logs DIR]`. Exits non-zero when a goal is missed (a failure, a leak, RSS
//! growth).
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use rproxy_tests::{
    agent_bin, previous_ebpf_object,
    soak::{self, Options},
};

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        agent_bin: agent_bin()?,
        duration: Duration::from_mins(30),
        restarts: 10,
        previous_object: Some(previous_ebpf_object()),
        churn_every: Duration::from_secs(1),
        seed: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_secs()),
        log_dir: None,
        verbose: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--minutes" => {
                opts.duration = Duration::from_secs_f64(60.0 * value()?.parse::<f64>().context("--minutes")?);
            }
            "--restarts" => opts.restarts = value()?.parse().context("--restarts")?,
            "--seed" => opts.seed = value()?.parse().context("--seed")?,
            "--no-upgrade" => opts.previous_object = None,
            "--logs" => opts.log_dir = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!(
                    "cargo xtask soak [-- --minutes N] [--restarts N] [--seed S] [--no-upgrade] [--logs DIR]\n\n\
                     The two-node lab under continuous traffic (short TCP connections, UDP flows and\n\
                     long-lived TCP streams from pods, the external client and the host, over IPv4 and\n\
                     IPv6, to the ClusterIP and both NodePorts) for N minutes (default 30), while the\n\
                     endpoints change every second and both agents restart --restarts times (default 10)\n\
                     in the first 70 %; the programs start as the previous release's\n\
                     (tests/fixtures/rproxy-ebpf-c871198.o), are upgraded at the 3rd restart, downgraded\n\
                     at the 6th and upgraded again at the 8th (--no-upgrade: this build's throughout).\n\
                     Then the traffic stops and the conntrack tables must empty. Reports failed\n\
                     connections, broken streams, lost UDP replies, entries left, the agents' RSS.\n\
                     --logs keeps every agent instance's log in DIR. Exit status 1 if a goal is missed."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    Ok(opts)
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    eprintln!(
        "soak: {:.1} min, {} restarts, churn seed {}, agent {}",
        opts.duration.as_secs_f64() / 60.0,
        opts.restarts,
        opts.seed,
        opts.agent_bin.display()
    );
    let report = soak::run(&opts)?;
    println!("{report}");
    let problems = report.problems();
    if problems.is_empty() {
        let in_swap: u64 = report.workers.iter().map(|w| report.failed_in_migration(w)).sum();
        if in_swap == 0 {
            println!("every goal met: no failure, no leak, flat RSS");
        } else {
            println!(
                "every goal met: no failure outside the migration's program swap ({in_swap} in it, see above), no \
                 leak, flat RSS"
            );
        }
        Ok(())
    } else {
        for p in &problems {
            println!("MISSED: {p}");
        }
        std::process::exit(1)
    }
}
