//! Conntrack GC benchmark: what one GC pass costs the node, old walk against new, in one run.
//! Run with `cargo xtask bench-gc` (root).
//!
//! An LRU hash shaped as `RPX_CT4` (its key and value types) is filled with `--flows` translated
//! flows (two entries each, none expired), then each round reads the whole table both ways, one
//! right after the other: key by key with aya's iterator (`get_next_key` and `lookup`, two system
//! calls per entry: the GC before batching) and in chunks with `BPF_MAP_LOOKUP_BATCH`
//! (`rproxy_agent::bpf::batch`). The report gives the median round's CPU time of this thread
//! (the CPU a pass takes from the node's connections) and wall time for each, and their ratios.
//! Then one whole GC pass as the agent's GC thread runs it (`run_pass_deferred` with its pacer):
//! its wall time and the share of one CPU it held while it ran.
use std::{
    collections::HashSet,
    os::fd::AsFd as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap, Map, MapData};
use aya_obj::generated::bpf_map_type;
use clap::Parser;
use rproxy_agent::bpf::{batch, gc};
use rproxy_common::{CT_DIR_SERVICE, CtKey4, CtValue4};

#[derive(Parser)]
#[command(about = "One conntrack GC pass: aya's key-by-key walk against batch reads, in one run (root)")]
struct Args {
    /// Flows in the table (two entries each).
    #[arg(long, default_value_t = 220_000)]
    flows: u32,
    /// Rounds; the report gives the median.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
}

/// CPU time of this thread so far.
fn thread_cpu() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, |ts| {
        Duration::new(u64::try_from(ts.tv_sec()).unwrap_or(0), u32::try_from(ts.tv_nsec()).unwrap_or(0))
    })
}

/// CPU and wall time of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (cpu, wall) = (thread_cpu(), Instant::now());
    let out = f();
    (out, thread_cpu().saturating_sub(cpu), wall.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.flows > 0 && args.rounds > 0, "--flows and --rounds must be positive");
    let entries = 2 * args.flows;
    // Room to spare: an LRU hash evicts before it is full.
    let capacity = entries.checked_mul(2).context("--flows too large")?;
    let obj = aya_obj::Map::new_from_params(
        bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32,
        u32::try_from(size_of::<CtKey4>())?,
        u32::try_from(size_of::<CtValue4>())?,
        capacity,
        0,
    );
    let data = MapData::create(obj, "rpx_gc_bench", None).context("creating the table (root needed)")?;
    let fd = data.fd().as_fd().try_clone_to_owned()?;
    let mut ct = HashMap::<_, CtKey4, CtValue4>::try_from(Map::LruHashMap(data))?;
    let far = gc::monotonic_ns() + 3_600_000_000_000;
    for i in 0..args.flows {
        let client = 0x0a00_0000 | (i >> 12);
        let sport = u16::try_from(1024 + (i & 0xfff)).unwrap_or(1024);
        let key =
            CtKey4 { saddr: client, daddr: 0x0a60_0001, sport, dport: 80, proto: 6, dir: CT_DIR_SERVICE, _pad: [0; 2] };
        let value = CtValue4 {
            expires_ns: far,
            backend_id: 1 + i % 10,
            rev_nat_id: 1,
            flags: 0x23,
            state: 2,
            pair_addr: 0x0af4_0000 | (i % 10),
            nat_addr: client,
            pair_port: 8080,
            nat_port: sport,
            ..CtValue4::default()
        };
        let reply = key.pair(&value);
        let reply_value = CtValue4 { pair_addr: key.daddr, pair_port: key.dport, ..value };
        ct.insert(key, value, 0)?;
        ct.insert(reply, reply_value, 0)?;
    }
    let present = ct.iter().count();
    println!("table: {present} entries ({} flows), capacity {capacity}", args.flows);
    let (mut walk_cpu, mut walk_wall, mut batch_cpu, mut batch_wall) = (vec![], vec![], vec![], vec![]);
    for round in 1..=args.rounds {
        let (n1, c1, w1) = timed(|| ct.iter().filter_map(Result::ok).count());
        let (n2, c2, w2) =
            timed(|| batch::lookup_all::<CtKey4, CtValue4>(fd.as_fd(), || {}).map(|v| v.map(|v| v.len())));
        let n2 = n2?.context("this kernel has no BPF_MAP_LOOKUP_BATCH for LRU hashes")?;
        ensure!(n1 == present && n2 == present, "round {round}: read {n1} and {n2} of {present} entries");
        println!(
            "round {round}: key by key {:.1} ms CPU / {:.1} ms wall; batch {:.1} / {:.1}",
            ms(c1),
            ms(w1),
            ms(c2),
            ms(w2)
        );
        walk_cpu.push(c1);
        walk_wall.push(w1);
        batch_cpu.push(c2);
        batch_wall.push(w2);
    }
    let (wc, ww, bc, bw) = (median(walk_cpu), median(walk_wall), median(batch_cpu), median(batch_wall));
    println!("\nreading {present} entries, median of {} rounds:", args.rounds);
    println!("| walk | CPU ms | wall ms |\n|---|---|---|");
    println!("| key by key (aya iterator) | {:.1} | {:.1} |", ms(wc), ms(ww));
    println!("| batch (BPF_MAP_LOOKUP_BATCH) | {:.1} | {:.1} |", ms(bc), ms(bw));
    println!(
        "batch / key by key: CPU {:.3}, wall {:.3}",
        bc.as_secs_f64() / wc.as_secs_f64(),
        bw.as_secs_f64() / ww.as_secs_f64()
    );
    let known: HashSet<u32> = (1..=10).collect();
    let ((pass, gone), cpu, wall) =
        timed(|| gc::run_pass_deferred(&mut ct, Some(fd.as_fd()), &known, &mut gc::Pacer::pausing()));
    ensure!(pass.scanned == present && gone.is_empty(), "the pass saw {} of {present} entries", pass.scanned);
    println!(
        "\none GC pass as the GC thread runs it (batch reads, paced, plan, nothing to delete): {:.1} ms wall, \
         {:.1} ms CPU: {:.0} % of one CPU while it ran",
        ms(wall),
        ms(cpu),
        100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
    );
    Ok(())
}
