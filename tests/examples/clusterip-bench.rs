//! East-west `ClusterIP` scale benchmark (`cargo xtask bench-clusterip`): TCP connections per
//! second and first-packet latency from a client pod to a `ClusterIP` on the same node, with
//! 100, 1,000, 10,000 and 30,000 Services present, through each datapath:
//!
//! - `direct`: no Service at all, the client connects to the backends' pod addresses
//!   (round-robin); the node only routes;
//! - `iptables`, `nftables`: kube-proxy's `ClusterIP` rules for every Service
//!   (`rproxy_tests::kube_proxy::cluster_ip_iptables_rules` / `cluster_ip_nftables_rules`) in the
//!   node, loaded in one `iptables-restore` / `nft -f` transaction, as kube-proxy's full sync does;
//! - `rproxy`: the release agent in the node as users run it, on a manifests directory holding
//!   every Service and `EndpointSlice`: the client pod's TCP `connect()` is sent to a backend by
//!   the socket hooks (`--pod-sockets`, here the lab's glob of the node's pod namespaces), and
//!   its packets pass the pod's device untranslated;
//! - `rproxy-tc`: the same agent with `--pod-sockets none`: every packet is translated on the
//!   pod's device, with conntrack (the path of pods' UDP, and of TCP under a service mesh).
//!
//! The scenario (`rproxy_tests::clusterip`): three backend pods, a client pod with
//! `--client-addresses` addresses, the measured Service (cluster IP 10.96.0.10, every backend)
//! and filler Services (one endpoint each) up to the count; the measured Service's rule is last
//! in `KUBE-SERVICES` unless `--position` says otherwise.
//!
//! For each Service count, every mode gets a fresh lab of its own (its own node, pods, rules or
//! agent: nothing is shared, and deleting the node's namespace deletes its rules); the labs of
//! one count live side by side while it is measured and go before the next count:
//! 1. each lab is set up in turn: the rules loaded (timed), or the agent started and waited for
//!    until its `synced` line counts every frontend (timed); then a request through the
//!    `ClusterIP` must succeed;
//! 2. warm-up: `--workers` threads for 0.3 s in each lab;
//! 3. first-packet latency: one thread makes `--latency-samples` connections per mode (connect,
//!    send a line, read the backend's name, close), one after the other, timing each `connect()`
//!    (SYN out, SYN-ACK back, through the `ClusterIP`), in `--slices` slices with the modes taking
//!    turns (the order rotating slice by slice), so that a change in the machine's load meets
//!    every mode alike; p50 and p99. Without competing workers the times are the datapath's, not
//!    the scheduler's; run before the rate, while the conntrack tables hold little more than the
//!    warm-up's flows, they leave out the agent's GC passes over a full table;
//! 4. rate: `--workers` threads make such connections for `--duration` per mode, in slices taking
//!    turns the same way. The report gives rproxy's conn/s over each peer's both ways: all
//!    slices together, and the median of the per-slice ratios, by which the goals are judged
//!    (a burst of load meets one mode in one slice: it moves the totals, hardly the median).
//!
//! Every connection comes from a source address and port never used before in its lab
//! (`rproxy_tests::clusterip::FreshTuples`), so each one is a new flow for every conntrack on the
//! way.
//!
//! Run as root: `cargo xtask bench-clusterip [-- --help]`. A mode that fails is reported and the
//! others still run.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddrV4,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rproxy_tests::{
    Lab, agent_bin,
    clusterip::{
        self, BACKENDS, CLIENT, CLUSTER_IP, CONFIG, ConnRun, FreshTuples, Limit, MAX_CLIENT_ADDRESSES, NODE_NAME, PORT,
        Position, Scenario, TARGET_PORT,
    },
    cmd::ip,
    kube_proxy::{self, Baseline, Frontend, Installed},
    load::{self, CpuTicks, LoadServer},
};

/// How long a mode may take to answer through the `ClusterIP` once programmed.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent may take to program every Service.
const PROGRAM_TIMEOUT: Duration = Duration::from_mins(5);
/// Timeout of each connect, read and write: longer than the first SYN retransmission (1 s), so
/// that a lost SYN shows as a retransmit, not a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Unmeasured connections before the measurement (caches, neighbour entries).
const WARM_UP: Duration = Duration::from_millis(300);
/// The most time one latency slice may take.
const LATENCY_SLICE_LIMIT: Duration = Duration::from_secs(10);
/// The client's source ports, bound explicitly.
const SOURCE_PORTS: RangeInclusive<u16> = 1024..=60999;
/// The goals' Service count for the rate ratios.
const GOAL_SERVICES: usize = 10_000;
/// The goals' reference count for the p99 ratio.
const BASE_SERVICES: usize = 100;
/// The most labs one process makes (`rproxy_tests::Lab`'s names).
const MAX_LABS: usize = 99;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Mode {
    Direct,
    Iptables,
    Nftables,
    Rproxy,
    RproxyTc,
}

impl Mode {
    const ALL: [Self; 5] = [Self::Direct, Self::Iptables, Self::Nftables, Self::Rproxy, Self::RproxyTc];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Rproxy => "rproxy",
            Self::RproxyTc => "rproxy-tc",
        }
    }

    /// Whether the mode runs the agent.
    fn is_rproxy(self) -> bool {
        matches!(self, Self::Rproxy | Self::RproxyTc)
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode {s:?} (known: {})", Self::ALL.map(Self::name).join(",")))
    }

    fn baseline(self) -> Option<Baseline> {
        match self {
            Self::Iptables => Some(Baseline::Iptables),
            Self::Nftables => Some(Baseline::Nftables),
            Self::Direct | Self::Rproxy | Self::RproxyTc => None,
        }
    }
}

struct Args {
    services: Vec<usize>,
    modes: Vec<Mode>,
    duration: Duration,
    slices: u32,
    latency_samples: u64,
    workers: usize,
    client_addresses: u8,
    position: Position,
    agent: Option<PathBuf>,
}

const USAGE: &str = "clusterip-bench [--services 100,1000,10000,30000] [--modes direct,iptables,nftables,rproxy,rproxy-tc] \
[--duration SECS per mode (5)] [--slices N (20)] [--latency-samples N per mode (20000)] [--workers N (4)] \
[--client-addresses N (16)] [--position first|middle|last (last)] [--agent PATH ($RPROXY_AGENT_BIN)]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        services: vec![100, 1000, 10_000, 30_000],
        modes: Mode::ALL.to_vec(),
        duration: Duration::from_secs(5),
        slices: 20,
        latency_samples: 20_000,
        workers: 4,
        client_addresses: 16,
        position: Position::Last,
        agent: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--services" => {
                args.services = value()?
                    .split(',')
                    .map(|n| n.replace('_', "").parse().with_context(|| format!("--services: {n:?}")))
                    .collect::<Result<_>>()?;
            }
            "--modes" => args.modes = value()?.split(',').map(Mode::parse).collect::<Result<_>>()?,
            "--duration" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--slices" => args.slices = value()?.parse()?,
            "--latency-samples" => args.latency_samples = value()?.parse()?,
            "--workers" => args.workers = value()?.parse()?,
            "--client-addresses" => args.client_addresses = value()?.parse()?,
            "--position" => args.position = Position::parse(&value()?)?,
            "--agent" => args.agent = Some(value()?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    ensure!(!args.services.is_empty() && !args.modes.is_empty(), "no Service counts or no modes");
    for &n in &args.services {
        Scenario::new(n, args.position)?;
    }
    args.modes.sort_unstable();
    args.modes.dedup();
    ensure!(
        (Duration::from_millis(100)..=Duration::from_mins(10)).contains(&args.duration),
        "--duration must be 0.1..=600 seconds"
    );
    ensure!((1..=100).contains(&args.slices), "--slices must be 1..=100");
    ensure!((1..=1_000_000).contains(&args.latency_samples), "--latency-samples must be 1..=1000000");
    ensure!((1..=64).contains(&args.workers), "--workers must be 1..=64");
    ensure!(
        (1..=MAX_CLIENT_ADDRESSES).contains(&args.client_addresses),
        "--client-addresses must be 1..={MAX_CLIENT_ADDRESSES}"
    );
    let labs = args.services.len() * args.modes.len();
    ensure!(labs <= MAX_LABS, "{labs} labs (counts × modes): at most {MAX_LABS} in one run");
    Ok(args)
}

/// One mode's lab, ready to measure. Dropping it stops the servers, then the agent, and deletes
/// the namespaces (and the rules in the node's).
struct Setup {
    mode: Mode,
    // Drop order: the servers, then the lab.
    _servers: Vec<LoadServer>,
    lab: Lab,
    client_ns: String,
    tuples: FreshTuples,
    targets: Vec<SocketAddrV4>,
    /// Loading the rules, or the agent's start to its `synced` line with every frontend.
    load: Option<Duration>,
}

/// What one mode measured.
#[derive(Default)]
struct Measured {
    load: Option<Duration>,
    /// The rate slices together (`--workers` threads).
    rate: ConnRun,
    /// Each rate slice's connections per second.
    slice_rates: Vec<f64>,
    /// The latency slices together (one thread).
    latency: ConnRun,
    /// SYNs the client sent again during both.
    syn_retransmits: u64,
    /// Source tuples used, and how many there were.
    tuples: (u64, u64),
    notes: Vec<String>,
}

impl Measured {
    fn p50(&self) -> f64 {
        micros(self.latency.connect_percentile(50.0))
    }

    fn p99(&self) -> f64 {
        micros(self.latency.connect_percentile(99.0))
    }
}

/// One Service count's results: per mode, its measurement or why it failed, and the share of
/// CPU time stolen by the hypervisor during the rate slices.
struct CountResult {
    services: usize,
    modes: Vec<(Mode, Result<Measured>)>,
    steal: f64,
}

/// A duration in µs (NaN for none).
fn micros(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e6)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !rproxy_tests::is_root() {
        bail!("the ClusterIP benchmark needs root (network namespaces, iptables, nftables, BPF)");
    }
    let started = Instant::now();
    let command: Vec<String> = std::env::args().skip(1).collect();
    println!("ClusterIP benchmark: cargo xtask bench-clusterip -- {}", command.join(" "));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    println!("kernel {}, {cpus} CPUs; {}", kernel.trim(), kube_proxy::versions().unwrap_or_else(|e| format!("{e:#}")));
    println!(
        "client pod ({} addresses) → {CLUSTER_IP}:{PORT} ({} backends; direct: their pod addresses). rate: {} workers \
         × {:.1} s per mode of connect, {} B request, name back, close; first packet: {} connect() times per mode, one \
         at a time (SYN → SYN-ACK through the ClusterIP); both in {} slices, the modes taking turns; every connection \
         from a fresh source address and port. The measured Service's rule is {} in KUBE-SERVICES.",
        args.client_addresses,
        BACKENDS.len(),
        args.workers,
        args.duration.as_secs_f64(),
        load::REQUEST.len(),
        args.latency_samples,
        args.slices,
        args.position.name(),
    );

    let mut results = Vec::new();
    for &services in &args.services {
        let result = measure_count(services, &args)?;
        results.push(result);
    }
    print!("{}", report(&results, &args));
    println!("\nwall time {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_owned()
}

/// Sets up every mode's lab for `services` Services and measures them, interleaved.
fn measure_count(services: usize, args: &Args) -> Result<CountResult> {
    let scenario = Scenario::new(services, args.position)?;
    let generated = Instant::now();
    let frontends = if args.modes.iter().any(|m| m.baseline().is_some()) { scenario.frontends()? } else { Vec::new() };
    let manifests = if args.modes.iter().any(|m| m.is_rproxy()) {
        let dir = tempfile::Builder::new().prefix("rpx-clusterip-bench-").tempdir()?;
        scenario.write_manifests(dir.path())?;
        Some(dir)
    } else {
        None
    };
    eprintln!("== {services} Services (rules and manifests generated in {:.2?}) ==", generated.elapsed());
    let mut setups: Vec<(Mode, Result<Setup>)> = Vec::new();
    for &mode in &args.modes {
        let setup = set_up(mode, scenario, &frontends, manifests.as_ref().map(tempfile::TempDir::path), args);
        match &setup {
            Ok(s) => eprintln!(
                "   {}: ready{}",
                mode.name(),
                s.load.map_or_else(String::new, |l| format!(", loaded in {:.2} s", l.as_secs_f64()))
            ),
            Err(e) => eprintln!("   {}: set-up failed: {}", mode.name(), first_line(e)),
        }
        setups.push((mode, setup));
    }
    let mut measured: BTreeMap<Mode, Result<Measured>> = setups
        .iter()
        .map(|(mode, s)| {
            let m = match s {
                Ok(s) => Ok(Measured { load: s.load, ..Measured::default() }),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            (*mode, m)
        })
        .collect();
    let ready: Vec<&Setup> = setups.iter().filter_map(|(_, s)| s.as_ref().ok()).collect();
    let run = |setup: &Setup, workers, limit| {
        clusterip::run_connections(&setup.client_ns, &setup.tuples, &setup.targets, workers, limit, IO_TIMEOUT)
    };
    let mut syn_before = BTreeMap::new();
    for setup in &ready {
        run(setup, args.workers, Limit { duration: WARM_UP, per_worker: None })?;
        syn_before.insert(setup.mode, load::tcp_syn_retransmits(&setup.client_ns)?);
    }
    let slices = args.slices;
    // First packets first, while every conntrack table holds little more than the warm-up's
    // flows: the agent's GC passes over a full table (see the benchmark doc) stay out of them.
    let per_slice = args.latency_samples.div_ceil(u64::from(slices));
    for slice in 0..slices {
        for setup in rotated(&ready, slice) {
            let result = run(setup, 1, Limit { duration: LATENCY_SLICE_LIMIT, per_worker: Some(per_slice) });
            record(&mut measured, setup.mode, result, |m, r| m.latency.absorb(r));
        }
    }
    let ticks = CpuTicks::read()?;
    for slice in 0..slices {
        for setup in rotated(&ready, slice) {
            let limit = Limit { duration: args.duration / slices, per_worker: None };
            let result = run(setup, args.workers, limit);
            record(&mut measured, setup.mode, result, |m, r| {
                m.slice_rates.push(r.per_second());
                m.rate.absorb(r);
            });
        }
    }
    let steal = CpuTicks::read()?.steal_percent_since(ticks);
    for (mode, setup) in &mut setups {
        let (Ok(setup), Some(Ok(m))) = (setup, measured.get_mut(mode)) else { continue };
        let syn = syn_before.get(mode).copied().unwrap_or_default();
        finish(setup, m, syn, per_slice * u64::from(slices))?;
    }
    for (mode, m) in &measured {
        match m {
            Ok(m) => eprintln!(
                "   {}: {:.0} conn/s ({} failed); first packet p50 {:.1} µs, p99 {:.1} µs",
                mode.name(),
                m.rate.per_second(),
                m.rate.failed + m.latency.failed,
                m.p50(),
                m.p99()
            ),
            Err(e) => eprintln!("   {}: failed: {}", mode.name(), first_line(e)),
        }
    }
    drop(setups);
    Ok(CountResult { services, modes: measured.into_iter().collect(), steal })
}

/// Completes `m`, measured in `setup`: SYN retransmits since `syn_before`, tuples used, and
/// notes (the agent exited, tuples ran out, fewer latency samples than `expected`).
fn finish(setup: &mut Setup, m: &mut Measured, syn_before: u64, expected: u64) -> Result<()> {
    m.syn_retransmits = load::tcp_syn_retransmits(&setup.client_ns)?.saturating_sub(syn_before);
    m.tuples = (setup.tuples.used(), setup.tuples.capacity());
    if setup.mode.is_rproxy()
        && let Err(e) = setup.lab.ensure_agent_running()
    {
        m.notes.push(format!("the agent exited during the run: {}", first_line(&e)));
    }
    if m.rate.exhausted || m.latency.exhausted {
        m.notes.push(format!(
            "the {} source tuples ran out: more --client-addresses or a shorter --duration",
            setup.tuples.capacity()
        ));
    }
    let samples = m.latency.ok + m.latency.failed;
    if samples < expected && !m.latency.exhausted {
        m.notes.push(format!("only {samples} latency samples: a slice reached its {LATENCY_SLICE_LIMIT:?} limit"));
    }
    Ok(())
}

/// `ready` starting at `slice % len`, so that each mode in turn goes first.
fn rotated<'a>(ready: &[&'a Setup], slice: u32) -> Vec<&'a Setup> {
    let start = usize::try_from(slice).unwrap_or(0) % ready.len().max(1);
    ready[start..].iter().chain(&ready[..start]).copied().collect()
}

/// Adds a slice's `result` to `mode`'s measurement with `add`, or turns it into its failure.
fn record(
    measured: &mut BTreeMap<Mode, Result<Measured>>,
    mode: Mode,
    result: Result<ConnRun>,
    add: impl FnOnce(&mut Measured, ConnRun),
) {
    let Some(entry) = measured.get_mut(&mode) else { return };
    match (entry.as_mut(), result) {
        (Ok(m), Ok(r)) => add(m, r),
        (Ok(_), Err(e)) => *entry = Err(e.context("measuring")),
        (Err(_), _) => {}
    }
}

/// A fresh lab for `mode`: backends serving, the client's addresses, the rules or the agent, and
/// a request through the `ClusterIP` answered.
fn set_up(
    mode: Mode,
    scenario: Scenario,
    frontends: &[Frontend],
    manifests: Option<&Path>,
    args: &Args,
) -> Result<Setup> {
    let mut lab = Lab::new(NODE_NAME)?;
    for (name, ip) in BACKENDS {
        lab.add_pod(name, ip)?;
    }
    let (client_ns, client_dev) = {
        let client = lab.add_pod(CLIENT.0, CLIENT.1)?;
        (client.ns().to_owned(), client.host_dev().to_owned())
    };
    let node_ns = lab.node_ns().to_owned();
    let addresses = clusterip::client_addresses(args.client_addresses);
    for extra in &addresses[1..] {
        let cidr = format!("{extra}/32");
        ip(Some(&client_ns), &["addr", "add", &cidr, "dev", "eth0"])?;
        ip(Some(&node_ns), &["route", "add", &cidr, "dev", &client_dev])?;
    }
    let servers = BACKENDS
        .iter()
        .map(|&(name, _)| LoadServer::start(lab.pod(name).ns(), name, TARGET_PORT))
        .collect::<Result<Vec<_>>>()?;
    let tuples = FreshTuples::new(addresses, SOURCE_PORTS)?;
    let service = SocketAddrV4::new(CLUSTER_IP, PORT);

    let (targets, load) = match mode {
        Mode::Direct => (BACKENDS.iter().map(|&(_, ip)| SocketAddrV4::new(ip, TARGET_PORT)).collect(), None),
        Mode::Iptables | Mode::Nftables => {
            let baseline = mode.baseline().context("a baseline mode")?;
            let installed = Installed::cluster_ip(baseline, &node_ns, frontends, CONFIG)?;
            let load = installed.load_time();
            // The lab's namespace goes after the count, and its rules with it.
            installed.leave_to_namespace();
            (vec![service], Some(load))
        }
        Mode::Rproxy | Mode::RproxyTc => {
            let manifests = manifests.context("no manifests directory")?;
            let bin = match &args.agent {
                Some(bin) => bin.clone(),
                None => agent_bin()?,
            };
            let spawned = Instant::now();
            let extra: &[&str] = if mode == Mode::RproxyTc { &["--pod-sockets", "none"] } else { &[] };
            lab.start_agent_with(&bin, manifests, extra).with_context(|| format!("starting {}", bin.display()))?;
            wait_programmed(&mut lab, scenario.services())?;
            (vec![service], Some(spawned.elapsed()))
        }
    };
    wait_ready(&mut lab, mode, &client_ns, &tuples, targets[0])?;
    Ok(Setup { mode, _servers: servers, lab, client_ns, tuples, targets, load })
}

/// Waits (at most [`PROGRAM_TIMEOUT`]) until the agent's last `synced` line counts `frontends`
/// frontends; fails at once, with the log, if the agent exits.
fn wait_programmed(lab: &mut Lab, frontends: usize) -> Result<()> {
    let started = Instant::now();
    loop {
        lab.ensure_agent_running()?;
        let log = lab.agent_log();
        if last_frontends(&log) >= frontends {
            return Ok(());
        }
        if started.elapsed() > PROGRAM_TIMEOUT {
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            bail!(
                "the agent has not programmed {frontends} frontends within {PROGRAM_TIMEOUT:?}; its last lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `frontends=` of the agent's last `synced` line (0 before one).
fn last_frontends(log: &str) -> usize {
    log.lines()
        .rev()
        .find(|l| l.contains(" synced "))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("frontends=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits (at most [`READY_TIMEOUT`]) until `target` answers the client; with the agent, fails at
/// once (with its log) if it exits.
fn wait_ready(
    lab: &mut Lab,
    mode: Mode,
    client_ns: &str,
    tuples: &FreshTuples,
    target: std::net::SocketAddrV4,
) -> Result<()> {
    let started = Instant::now();
    loop {
        if mode.is_rproxy() {
            lab.ensure_agent_running()?;
        }
        let limit = Limit { duration: Duration::from_secs(1), per_worker: Some(1) };
        let probe = clusterip::run_connections(client_ns, tuples, &[target], 1, limit, Duration::from_millis(300))?;
        if probe.ok == 1 {
            return Ok(());
        }
        if started.elapsed() >= READY_TIMEOUT {
            bail!(
                "{target} did not answer within {READY_TIMEOUT:?}: {}",
                probe.first_error.unwrap_or_else(|| "no error recorded".to_owned())
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `a / b` as `1.23x`, or `-` when either is missing.
fn ratio(a: Option<f64>, b: Option<f64>) -> (String, Option<f64>) {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() && b.is_finite() => (format!("{:.2}x", a / b), Some(a / b)),
        _ => ("-".to_owned(), None),
    }
}

/// The median over the rate slices of `a`'s conn/s over `b`'s in the same slice (both modes ran
/// in each slice, one after the other): a burst of load on this machine slows the mode it
/// meets, in one slice, and moves the median little, where it moves the ratio of the totals.
/// `None` unless both have every slice.
fn slice_median_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.is_empty() || a.len() != b.len() || b.iter().any(|&r| r <= 0.0) {
        return None;
    }
    let mut ratios: Vec<f64> = a.iter().zip(b).map(|(a, b)| a / b).collect();
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    Some(if ratios.len().is_multiple_of(2) { f64::midpoint(ratios[mid - 1], ratios[mid]) } else { ratios[mid] })
}

fn verdict(value: Option<f64>, ok: impl Fn(f64) -> bool) -> &'static str {
    match value {
        Some(v) if ok(v) => "met",
        Some(_) => "NOT met",
        None => "not measured",
    }
}

/// `n` with thousands separators (`30,000`).
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Share of each backend in `counts`, in percent (`33/33/34`, in [`BACKENDS`] order).
fn spread(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return "-".to_owned();
    }
    BACKENDS
        .iter()
        .map(|(name, _)| format!("{:.0}", count(counts.get(*name).copied().unwrap_or(0)) * 100.0 / count(total)))
        .collect::<Vec<_>>()
        .join("/")
}

/// A count as `f64`.
#[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
fn count(n: u64) -> f64 {
    n as f64
}

fn report(results: &[CountResult], args: &Args) -> String {
    let mut out = String::from(
        "\nconn/s: the rate slices together; fail: failed connections (rate and latency); p50, p99: first packet, \
         connect() one at a time; loaded p50/p99: connect() during the rate slices; slices conn/s: the slowest and \
         fastest slice; SYN rtx: SYNs the client retransmitted; backends: each backend's share (a/b/c); load: \
         iptables-restore or nft -f of every Service's rules, or the agent's start to its synced line with every \
         frontend\n",
    );
    // rproxy's conn/s ratios and p99 per count, for the goals.
    let mut goal_ratios: BTreeMap<(usize, Mode), Option<f64>> = BTreeMap::new();
    let mut rproxy_p99: BTreeMap<usize, Option<f64>> = BTreeMap::new();
    for result in results {
        let services = result.services;
        let of = |mode: Mode| result.modes.iter().find(|(m, _)| *m == mode).and_then(|(_, r)| r.as_ref().ok());
        let place = Scenario::new(services, args.position).map_or(0, |s| s.measured_index() + 1);
        let _ = writeln!(
            out,
            "\n{} Services (the measured Service's rule is {} of {} in KUBE-SERVICES; CPU time stolen during the rate \
             slices: {:.1}%)",
            thousands(services),
            thousands(place),
            thousands(services),
            result.steal
        );
        let _ = writeln!(
            out,
            "{:<9} {:>9} {:>5} {:>8} {:>8}  {:>17} {:>13} {:>7}  {:<9} load (s)",
            "mode", "conn/s", "fail", "p50 µs", "p99 µs", "loaded p50/p99 µs", "slices conn/s", "SYN rtx", "backends",
        );
        for (mode, m) in &result.modes {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    let _ = writeln!(out, "{:<9} FAILED: {}", mode.name(), first_line(e));
                    continue;
                }
            };
            let load = match (mode, m.load) {
                (_, None) => "-".to_owned(),
                (Mode::Iptables, Some(l)) => format!("{:.2} (iptables-restore)", l.as_secs_f64()),
                (Mode::Nftables, Some(l)) => format!("{:.2} (nft -f)", l.as_secs_f64()),
                (_, Some(l)) => format!("{:.2} (agent start → synced)", l.as_secs_f64()),
            };
            let lowest = m.slice_rates.iter().copied().fold(f64::INFINITY, f64::min);
            let highest = m.slice_rates.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "{:<9} {:>9.0} {:>5} {:>8.1} {:>8.1}  {:>8.1}/{:<8.1} {:>13} {:>7}  {:<9} {load}",
                mode.name(),
                m.rate.per_second(),
                m.rate.failed + m.latency.failed,
                m.p50(),
                m.p99(),
                micros(m.rate.connect_percentile(50.0)),
                micros(m.rate.connect_percentile(99.0)),
                format!("{:.1}k-{:.1}k", lowest / 1000.0, highest / 1000.0),
                m.syn_retransmits,
                spread(&m.rate.by_server),
            );
        }
        for subject in [Mode::Rproxy, Mode::RproxyTc] {
            let Some(measured) = of(subject) else { continue };
            let mut line = format!(
                "{} conn/s ratios (all slices together, and the median of the slices' ratios):",
                subject.name()
            );
            for peer in [Mode::Direct, Mode::Nftables, Mode::Iptables] {
                let (text, _) = ratio(Some(measured.rate.per_second()), of(peer).map(|m| m.rate.per_second()));
                let paired = of(peer).and_then(|p| slice_median_ratio(&measured.slice_rates, &p.slice_rates));
                let paired_text = paired.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x"));
                let _ = write!(line, " /{} {text} (slices {paired_text})", peer.name());
                if subject == Mode::Rproxy {
                    goal_ratios.insert((services, peer), paired);
                }
            }
            let _ = writeln!(out, "{line}");
        }
        let rproxy = of(Mode::Rproxy);
        rproxy_p99.insert(services, rproxy.map(Measured::p99));
        details(&mut out, &result.modes);
    }
    goals(&mut out, &goal_ratios, &rproxy_p99);
    out
}

/// Per mode: notes, first failures, failures of set-up, tuples used.
fn details(out: &mut String, modes: &[(Mode, Result<Measured>)]) {
    let mut used = Vec::new();
    let mut capacity = 0;
    for (mode, m) in modes {
        match m {
            Ok(m) => {
                if let Some(e) = m.rate.first_error.as_ref().or(m.latency.first_error.as_ref()) {
                    let _ = writeln!(out, "  {}: first failure: {e}", mode.name());
                }
                for note in &m.notes {
                    let _ = writeln!(out, "  {}: {note}", mode.name());
                }
                used.push(format!("{} {}", mode.name(), m.tuples.0));
                capacity = m.tuples.1;
            }
            Err(e) => {
                let _ = writeln!(out, "  {} failed:\n{e:#}", mode.name());
            }
        }
    }
    if !used.is_empty() {
        let _ = writeln!(out, "  source tuples used (of {capacity} per lab): {}", used.join(", "));
    }
}

/// The goals, each from this run's numbers.
fn goals(out: &mut String, ratios: &BTreeMap<(usize, Mode), Option<f64>>, p99: &BTreeMap<usize, Option<f64>>) {
    let at = thousands(GOAL_SERVICES);
    let _ = writeln!(out, "\ngoals (ratios within this run; conn/s: the median of the slices' ratios):");
    for (peer, goal) in [(Mode::Direct, 0.97), (Mode::Nftables, 1.25), (Mode::Iptables, 3.0)] {
        let value = ratios.get(&(GOAL_SERVICES, peer)).copied().flatten();
        let _ = writeln!(
            out,
            "  rproxy conn/s ≥ {goal:.2}× {} at {at} Services: {} {}",
            peer.name(),
            value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}x")),
            verdict(value, |v| v >= goal)
        );
    }
    let base = p99.get(&BASE_SERVICES).copied().flatten();
    let mut worst = None::<f64>;
    let mut parts = Vec::new();
    let mut missing = base.is_none();
    for (&services, &value) in p99 {
        if services == BASE_SERVICES {
            continue;
        }
        let (text, r) = ratio(value, base);
        parts.push(format!("{}: {text}", thousands(services)));
        missing |= r.is_none();
        if let Some(r) = r {
            worst = Some(worst.map_or(r, |w: f64| w.max(r)));
        }
    }
    let _ = writeln!(
        out,
        "  rproxy first-packet p99 at most 1.10× its p99 at {} Services, at every count: {} {}",
        thousands(BASE_SERVICES),
        if parts.is_empty() { "-".to_owned() } else { parts.join(", ") },
        verdict(worst.filter(|_| !missing), |w| w <= 1.10)
    );
}
