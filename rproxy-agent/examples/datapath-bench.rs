//! Datapath benchmark: ns/packet of the `ClusterIP` paths through `BPF_PROG_TEST_RUN`, against an
//! empty TC program in the same run. Run with `cargo xtask bench` (root).
//!
//! Every measurement is one `BPF_PROG_TEST_RUN` call per packet (`repeat = 1`), so each packet
//! starts from a fresh copy of its frame: with `repeat > 1` the kernel reuses one buffer, and a
//! DNAT-ed packet would no longer be addressed to the service on the second iteration. The kernel
//! reports the time spent in the program (plus a constant timer overhead, which the empty program
//! measures). Each round measures the empty program right before the path, on the same frames,
//! so that drift of the machine (a VM's steal time, frequency) hits both; the report gives the
//! median round's raw numbers, cost net of the empty program, and ratio.
//!
//! Paths: `established` (client → VIP of a flow with conntrack state), `new flow` (a new
//! 5-tuple per packet: service lookup, random backend, two conntrack inserts), `reply` (backend →
//! client reverse NAT), `not a service` (pod traffic that is not for a service).
use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use clap::Parser;
use etherparse::PacketBuilder;
use rproxy_agent::{
    datapath::{Datapath, stat_total},
    model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry},
    writer::Writer,
};
use rproxy_common::{SVC_F_CLUSTER_IP, Stat, prog_names};

#[derive(Parser)]
struct Args {
    /// Packets per round.
    #[arg(long, default_value_t = 5_000)]
    packets: usize,
    /// Rounds per measurement (each pairs the path with the empty program); the median round is
    /// reported. Many short rounds absorb a VM's drift better than a few long ones.
    #[arg(long, default_value_t = 15)]
    rounds: usize,
    /// Service counts to load.
    #[arg(long, value_delimiter = ',', default_values_t = [100usize, 10_000])]
    services: Vec<usize>,
    /// Backends per service.
    #[arg(long, default_value_t = 3)]
    backends: usize,
}

fn vip(i: usize) -> Ipv4Addr {
    let i = u32::try_from(i).expect("service index fits u32");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i + 1)
}

fn backend(i: usize, j: usize) -> Ipv4Addr {
    let n = u32::try_from(i * 16 + j).expect("fits u32");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + n + 1)
}

fn desired(services: usize, backends: usize) -> Desired {
    let mut d = Desired::default();
    for i in 0..services {
        let fe = Frontend { addr: vip(i), port: 80, proto: Protocol::Tcp };
        let slots = (0..backends)
            .map(|j| Backend {
                addr: BackendAddr { addr: backend(i, j), port: 8080, proto: Protocol::Tcp },
                state: BackendState::Active,
                local: true,
            })
            .collect();
        let service = ObjectRef { namespace: "bench".into(), name: format!("svc-{i}") };
        d.services.insert(
            fe,
            ServiceEntry {
                service,
                port_name: String::new(),
                flags: SVC_F_CLUSTER_IP,
                affinity_timeout: 0,
                slots,
                local_slots: Vec::new(),
                draining: Vec::new(),
            },
        );
    }
    d
}

fn tcp(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), syn: bool, ack: bool) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1, 64240);
    if syn {
        b = b.syn();
    }
    if ack {
        b = b.ack(1);
    }
    let mut out = Vec::new();
    b.write(&mut out, &[0u8; 64]).expect("frame");
    out
}

/// Runs every frame once; returns the mean in-kernel ns/packet.
fn mean_ns(dp: &mut Datapath, prog: &'static str, frames: &[Vec<u8>]) -> f64 {
    let p = dp.program(prog).expect("program");
    let mut out = vec![0u8; 512];
    let mut total: u128 = 0;
    for f in frames {
        let r = p
            .test_run(TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ..TestRunOptions::default() })
            .expect("BPF_PROG_TEST_RUN");
        total += r.duration.as_nanos();
    }
    #[expect(clippy::cast_precision_loss, reason = "nanosecond sums far below 2^52")]
    let mean = total as f64 / frames.len() as f64;
    mean
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Row {
    path: &'static str,
    services: usize,
    /// Median over rounds of the path's mean ns/packet.
    ns: f64,
    /// Median over rounds of the empty program's mean, measured interleaved with the path.
    noop: f64,
    /// Median over rounds of (path − empty program).
    net: f64,
    /// Median over rounds of path / empty program.
    ratio: f64,
}

fn bench_services(args: &Args, services: usize, rows: &mut Vec<Row>) {
    let mut dp = Datapath::load(None).expect("load datapath (root needed)");
    let mut maps = dp.take_maps().expect("maps");
    let started = std::time::Instant::now();
    let report = Writer::new().sync(&desired(services, args.backends), &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    eprintln!("programmed {services} services ({} map writes) in {:?}", report.ops, started.elapsed());
    let target = vip(services / 2);
    let client = (Ipv4Addr::new(10, 244, 0, 1), 40_000);

    // Establish one flow: SYN out, SYN-ACK back (from whichever backend was chosen).
    let syn = tcp(client, (target, 80), true, false);
    mean_ns(&mut dp, prog_names::FROM_POD, std::slice::from_ref(&syn));
    let chosen = (0..args.backends)
        .map(|j| backend(services / 2, j))
        .find(|b| {
            let k = rproxy_common::CtKey4 {
                saddr: u32::from(*b).to_be(),
                daddr: u32::from(client.0).to_be(),
                sport: 8080u16.to_be(),
                dport: client.1.to_be(),
                proto: rproxy_common::proto::TCP,
                dir: rproxy_common::CT_DIR_REPLY,
                _pad: [0; 2],
            };
            maps.conntrack.get(&k, 0).is_ok()
        })
        .expect("flow created");
    let synack = tcp((chosen, 8080), client, true, true);
    mean_ns(&mut dp, prog_names::TO_POD, std::slice::from_ref(&synack));

    let established = vec![tcp(client, (target, 80), false, true); args.packets];
    let reply = vec![tcp((chosen, 8080), client, false, true); args.packets];
    let other = vec![tcp(client, (Ipv4Addr::new(10, 244, 9, 9), 80), false, true); args.packets];
    let mut flow = 0u32;
    let mut new_flows = || -> Vec<Vec<u8>> {
        (0..args.packets)
            .map(|_| {
                flow += 1;
                let c = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + (flow >> 14));
                tcp((c, 1024 + u16::try_from(flow & 0x3fff).expect("14 bits")), (target, 80), true, false)
            })
            .collect()
    };
    // Each path must do its work on every packet: the datapath's own counter for it has to grow
    // by exactly the number of packets (a flow evicted from conntrack, say, would otherwise be
    // measured as a cheap miss).
    let mut measure =
        |path: &'static str, prog: &'static str, expect: Option<Stat>, frames: &mut dyn FnMut() -> Vec<Vec<u8>>| {
            let rounds: Vec<(f64, f64)> = (0..args.rounds)
                .map(|_| {
                    let f = frames();
                    let noop = mean_ns(&mut dp, prog_names::NOOP, &f);
                    let before: Vec<u64> = Stat::ALL.iter().map(|s| stat_total(&maps.stats, *s)).collect();
                    let ns = mean_ns(&mut dp, prog, &f);
                    for (s, b) in Stat::ALL.iter().zip(before) {
                        let grew = stat_total(&maps.stats, *s) - b;
                        let want = if Some(*s) == expect { f.len() as u64 } else { 0 };
                        assert_eq!(grew, want, "{path}: counter {} grew by {grew}, expected {want}", s.name());
                    }
                    (ns, noop)
                })
                .collect();
            rows.push(Row {
                path,
                services,
                ns: median(rounds.iter().map(|r| r.0).collect()),
                noop: median(rounds.iter().map(|r| r.1).collect()),
                net: median(rounds.iter().map(|r| r.0 - r.1).collect()),
                ratio: median(rounds.iter().map(|r| r.0 / r.1).collect()),
            });
        };
    measure("established", prog_names::FROM_POD, Some(Stat::Established), &mut || established.clone());
    measure("reply (rev-NAT)", prog_names::TO_POD, Some(Stat::RevNat), &mut || reply.clone());
    measure("not a service", prog_names::FROM_POD, None, &mut || other.clone());
    // Last: it fills conntrack, and an LRU may then evict the flow measured above.
    measure("new flow", prog_names::FROM_POD, Some(Stat::NewFlow), &mut new_flows);
}

fn main() {
    let args = Args::parse();
    let mut rows = Vec::new();
    for &n in &args.services {
        bench_services(&args, n, &mut rows);
    }
    let row = |path: &str, n: usize| rows.iter().find(|r| r.path == path && r.services == n).expect("row");
    println!(
        "\n{:<17} {:>9} {:>10} {:>10} {:>12} {:>8}",
        "path", "services", "ns/packet", "empty prog", "net of empty", "× empty"
    );
    for r in &rows {
        println!("{:<17} {:>9} {:>10.1} {:>10.1} {:>12.1} {:>8.2}", r.path, r.services, r.ns, r.noop, r.net, r.ratio);
    }
    println!(
        "\n({} packets × {} rounds per row, median round; one BPF_PROG_TEST_RUN per packet)",
        args.packets, args.rounds
    );
    if let (Some(&small), Some(&large)) = (args.services.iter().min(), args.services.iter().max()) {
        let est = row("established", large);
        let new = row("new flow", large);
        let growth = |path: &str| row(path, large).net / row(path, small).net - 1.0;
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        println!("targets ({large} services; \"net\" = cost beyond the empty program):");
        println!(
            "  established ≤ 80 ns/packet: {:.1} ns raw, {:.1} ns net — raw {}, net {}",
            est.ns,
            est.net,
            verdict(est.ns <= 80.0),
            verdict(est.net <= 80.0)
        );
        println!(
            "  new flow ≤ 2× established: {:.2}× raw, {:.2}× net — {}",
            new.ns / est.ns,
            new.net / est.net,
            verdict(new.ns <= 2.0 * est.ns)
        );
        println!(
            "  growth {small} → {large} services ≤ 10 % (net): established {:+.1} %, new flow {:+.1} % — {}",
            growth("established") * 100.0,
            growth("new flow") * 100.0,
            verdict(growth("established") <= 0.10 && growth("new flow") <= 0.10)
        );
    }
}
