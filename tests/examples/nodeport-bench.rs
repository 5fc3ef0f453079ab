//! `NodePort` benchmark: north-south traffic from a client outside the cluster to
//! `node1_eth0:nodePort` in the two-node lab (`rproxy_tests::cluster`), with backends on both
//! nodes, through each datapath in turn:
//!
//! - `direct`: no Service translation at all, a routing reference. The client gets a route to
//!   the pod CIDRs via node 1 and sends to the backends' own addresses (round-robin); node 1 only
//!   forwards. Replies from node 2's pods go straight back to the client.
//! - `iptables`, `nftables`: the kube-proxy-shaped rules of `rproxy_tests::kube_proxy` in node 1.
//! - `xdp`, `tc`: the rproxy agent in each node (`--devices eth0 --xdp-mode generic|tc --cgroup
//!   none`; native `XDP_TX` on the lab's veths has no NAPI receiver, see `rproxy_tests::cluster`)
//!   on a manifests directory holding the Service (`type: NodePort`) and its `EndpointSlice`. The
//!   socket hooks stay off: attached to the host's cgroup root they would also run for every
//!   `sendmsg` of the load generator, which is not the datapath under test.
//!
//! Each mode gets a fresh lab (so no conntrack or `TIME_WAIT` state carries over), then:
//! - TCP connection rate: N workers connect, send one line, read the backend's name, close, for
//!   the duration; successes and failures counted;
//! - UDP packet rate: senders blast small datagrams over many connected sockets (one flow per
//!   source port, spread over the backends); counters in the backend pods count what arrives.
//!   pps = received / duration; sent and loss are reported too.
//!
//! Run as root: `cargo xtask bench-nodeport [-- --help]`. A mode that fails (the agent does not
//! start, rejects its flags, or the node port never answers) is reported as failed, and the
//! others still run.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddrV4,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    cmd::ip,
    kube_proxy::{self, Baseline, Installed},
    load::{self, LoadServer, TcpRate, UdpBlast},
    netns::sysctl,
    nodeport::{self, Backend, NODE_PORT, TARGET_PORT},
};

/// How long a mode may take to answer on the node port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of each connect, read and write of the TCP workers: longer than the first SYN
/// retransmission (1 s), so that a lost or refused SYN shows as a retransmit, not a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Unmeasured TCP traffic before the measurement (caches, neighbour entries, conntrack).
const WARM_UP: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Iptables,
    Nftables,
    Xdp,
    Tc,
}

impl Mode {
    const ALL: [Self; 5] = [Self::Direct, Self::Iptables, Self::Nftables, Self::Xdp, Self::Tc];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Xdp => "xdp",
            Self::Tc => "tc",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode {s:?} (known: {})", Self::ALL.map(Self::name).join(",")))
    }
}

struct Args {
    modes: Vec<Mode>,
    duration: Duration,
    rounds: usize,
    backends_per_node: u8,
    tcp_workers: usize,
    udp_senders: usize,
    udp_sockets: usize,
    udp_size: usize,
    agent: Option<PathBuf>,
}

const USAGE: &str = "nodeport-bench [--modes direct,iptables,nftables,xdp,tc] [--duration SECS (3)] [--rounds N (1)] \
[--backends-per-node N (2)] [--tcp-workers N (4)] [--udp-senders N (2)] [--udp-sockets PER_SENDER (16)] \
[--udp-size BYTES (18)] [--agent PATH ($RPROXY_AGENT_BIN)]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        modes: Mode::ALL.to_vec(),
        duration: Duration::from_secs(3),
        rounds: 1,
        backends_per_node: 2,
        tcp_workers: 4,
        udp_senders: 2,
        udp_sockets: 16,
        udp_size: 18,
        agent: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--modes" => args.modes = value()?.split(',').map(Mode::parse).collect::<Result<_>>()?,
            "--duration" => args.duration = Duration::from_secs_f64(value()?.parse()?),
            "--rounds" => args.rounds = value()?.parse()?,
            "--backends-per-node" => args.backends_per_node = value()?.parse()?,
            "--tcp-workers" => args.tcp_workers = value()?.parse()?,
            "--udp-senders" => args.udp_senders = value()?.parse()?,
            "--udp-sockets" => args.udp_sockets = value()?.parse()?,
            "--udp-size" => args.udp_size = value()?.parse()?,
            "--agent" => args.agent = Some(value()?.into()),
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    if args.duration < Duration::from_millis(100) || args.duration > Duration::from_mins(10) {
        bail!("--duration must be 0.1..=600 seconds");
    }
    if !(1..=50).contains(&args.rounds) {
        bail!("--rounds must be 1..=50");
    }
    if !(1..=50).contains(&args.backends_per_node)
        || !(1..=64).contains(&args.tcp_workers)
        || !(1..=16).contains(&args.udp_senders)
        || !(1..=1024).contains(&args.udp_sockets)
        || !(1..=1400).contains(&args.udp_size)
    {
        bail!(
            "out of range: --backends-per-node 1..=50, --tcp-workers 1..=64, --udp-senders 1..=16, --udp-sockets 1..=1024, --udp-size 1..=1400"
        );
    }
    Ok(args)
}

/// What one mode measured.
struct Measured {
    tcp: TcpRate,
    udp: UdpBlast,
    /// Datagrams counted per backend.
    received: BTreeMap<String, u64>,
    /// Datagrams dropped at the backends' full socket buffers during the UDP run.
    socket_drops: u64,
    /// SYNs the client sent again during the TCP run (each costs its connection a second).
    syn_retransmits: u64,
    /// Notes for the report (e.g. the agent exited during the run).
    notes: Vec<String>,
}

impl Measured {
    fn received_total(&self) -> u64 {
        self.received.values().sum()
    }

    fn pps(&self) -> f64 {
        load::rate(self.received_total(), self.udp.elapsed)
    }

    fn sent_per_second(&self) -> f64 {
        load::rate(self.udp.sent, self.udp.elapsed)
    }

    fn loss_percent(&self) -> f64 {
        if self.udp.sent == 0 {
            0.0
        } else {
            percent(self.udp.sent.saturating_sub(self.received_total()), self.udp.sent)
        }
    }
}

/// The kind of datapath under test.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Datapath {
    Direct,
    Rules,
    Agents,
}

fn main() -> Result<()> {
    let args = parse_args()?;
    if !rproxy_tests::is_root() {
        bail!("the NodePort benchmark needs root (network namespaces, iptables, BPF)");
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "NodePort benchmark: client {} → {}:{NODE_PORT}, {} backends on each of 2 nodes, {:.1} s per measurement",
        rproxy_tests::cluster::CLIENT_IP,
        NodeId::One.ip(),
        args.backends_per_node,
        args.duration.as_secs_f64()
    );
    println!(
        "TCP: {} workers (connect, {} B request, name back, close); UDP: {} senders × {} sockets, {} B datagrams",
        args.tcp_workers,
        load::REQUEST.len(),
        args.udp_senders,
        args.udp_sockets,
        args.udp_size
    );
    println!("kernel {}; {}\n", kernel.trim(), kube_proxy::versions().unwrap_or_else(|e| format!("{e:#}")));

    let mut runs: Vec<(Mode, Vec<Result<Measured>>)> = args.modes.iter().map(|&m| (m, Vec::new())).collect();
    for round in 1..=args.rounds {
        for (mode, results) in &mut runs {
            eprintln!("== {} (round {round}/{}) ==", mode.name(), args.rounds);
            let result = run_mode(*mode, &args);
            match &result {
                Ok(m) => eprintln!(
                    "   {:.0} conn/s ({} failed), {:.0} pps received of {:.0} sent/s",
                    m.tcp.per_second(),
                    m.tcp.failed,
                    m.pps(),
                    m.sent_per_second()
                ),
                Err(e) => eprintln!("   failed: {}", first_line(e)),
            }
            results.push(result);
        }
    }
    print!("{}", report(&runs));
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_owned()
}

fn run_mode(mode: Mode, args: &Args) -> Result<Measured> {
    let backends = nodeport::backends(args.backends_per_node);
    let mut cluster = nodeport::build_cluster(&backends)?;
    let servers = backends
        .iter()
        .map(|b| LoadServer::start(cluster.pod(&b.name).ns(), &b.name, TARGET_PORT))
        .collect::<Result<Vec<_>>>()?;
    // Room for every connection of a long run without reusing a port in the client.
    sysctl(cluster.client_ns(), "net/ipv4/ip_local_port_range", "1024 65535")?;

    let node_port = vec![SocketAddrV4::new(NodeId::One.ip(), NODE_PORT)];
    // The rules stay installed while they are measured, and are removed when dropped.
    let mut rules = None;
    let (datapath, targets) = match mode {
        Mode::Direct => {
            ip(Some(cluster.client_ns()), &["route", "add", "10.244.0.0/16", "via", &NodeId::One.ip().to_string()])?;
            let pods = backends.iter().map(|b| SocketAddrV4::new(b.ip, TARGET_PORT)).collect();
            (Datapath::Direct, pods)
        }
        Mode::Iptables | Mode::Nftables => {
            let baseline = if mode == Mode::Iptables { Baseline::Iptables } else { Baseline::Nftables };
            let ns = cluster.node(NodeId::One).ns().to_owned();
            rules = Some(Installed::new(baseline, &ns, &nodeport::frontends(&backends)?, &[NodeId::One.ip()])?);
            (Datapath::Rules, node_port)
        }
        Mode::Xdp | Mode::Tc => {
            start_agents(&mut cluster, &backends, mode, args)?;
            (Datapath::Agents, node_port)
        }
    };

    wait_ready(&mut cluster, datapath, targets[0])?;
    let client = cluster.client_ns().to_owned();
    load::tcp_connection_rate(&client, &targets, args.tcp_workers, WARM_UP, IO_TIMEOUT)?;
    let syn_before = load::tcp_syn_retransmits(&client)?;
    let tcp = load::tcp_connection_rate(&client, &targets, args.tcp_workers, args.duration, IO_TIMEOUT)?;
    let syn_retransmits = load::tcp_syn_retransmits(&client)?.saturating_sub(syn_before);
    let before: u64 = servers.iter().map(LoadServer::udp_received).sum();
    let pod_ns: Vec<String> = backends.iter().map(|b| cluster.pod(&b.name).ns().to_owned()).collect();
    let socket_drops = || pod_ns.iter().map(|ns| load::udp_rcvbuf_errors(ns)).sum::<Result<u64>>();
    let sockets_before = socket_drops()?;
    let udp = load::udp_blast(&client, &targets, args.udp_senders, args.udp_sockets, args.udp_size, args.duration)?;
    settle(&servers);
    let socket_drops = socket_drops()?.saturating_sub(sockets_before);
    let mut received = BTreeMap::new();
    for (b, s) in backends.iter().zip(&servers) {
        received.insert(b.name.clone(), s.udp_received());
    }
    let mut notes = Vec::new();
    if before != 0 {
        notes.push(format!("{before} datagrams arrived before the UDP run"));
    }
    if datapath == Datapath::Agents
        && let Err(e) = cluster.ensure_agents_running()
    {
        notes.push(format!("an agent exited during the run: {}", first_line(&e)));
    }
    drop(servers);
    if let Some(rules) = rules {
        rules.remove()?;
    }
    Ok(Measured { tcp, udp, received, socket_drops, syn_retransmits, notes })
}

fn start_agents(cluster: &mut Cluster, backends: &[Backend], mode: Mode, args: &Args) -> Result<()> {
    let bin = match &args.agent {
        Some(bin) => bin.clone(),
        None => agent_bin()?,
    };
    let manifests = cluster.work_dir().join("manifests");
    std::fs::create_dir(&manifests)?;
    nodeport::write_manifests(&manifests, backends)?;
    let xdp_mode = if mode == Mode::Xdp { "generic" } else { "tc" };
    let extra = ["--devices", rproxy_tests::cluster::EXTERNAL_DEV, "--xdp-mode", xdp_mode, "--cgroup", "none"];
    cluster
        .start_agents(&bin, &manifests, &extra)
        .with_context(|| format!("starting {} {}", bin.display(), extra.join(" ")))
}

/// Waits until `target` answers a TCP request (at most [`READY_TIMEOUT`]); with agents, fails at
/// once (with the log) if one exits.
fn wait_ready(cluster: &mut Cluster, datapath: Datapath, target: SocketAddrV4) -> Result<()> {
    let started = Instant::now();
    loop {
        if datapath == Datapath::Agents {
            cluster.ensure_agents_running()?;
        }
        let tried = cluster.in_client(|| load::tcp_exchange(target, Duration::from_millis(300)))?;
        match tried {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() >= READY_TIMEOUT => {
                let mut msg = format!("{target} did not answer within {READY_TIMEOUT:?}: {e:#}");
                if datapath == Datapath::Agents {
                    for id in NodeId::ALL {
                        let log = cluster.node(id).agent_log();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        let _ = write!(msg, "\n--- agent log on {} (last lines) ---", id.k8s_name());
                        for line in tail.iter().rev() {
                            let _ = write!(msg, "\n{line}");
                        }
                    }
                }
                bail!(msg);
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Waits (at most 1 s) until the UDP counters stop moving: the datagrams in flight and in the
/// socket buffers when the senders stopped are counted too.
fn settle(servers: &[LoadServer]) {
    let total = || servers.iter().map(LoadServer::udp_received).sum::<u64>();
    let mut last = total();
    for _ in 0..20 {
        thread::sleep(Duration::from_millis(50));
        let now = total();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Share of `counts` on node 1 and node 2, in percent (backend names are `backend-<node>-<i>`).
fn spread(counts: &BTreeMap<String, u64>) -> String {
    let total: u64 = counts.values().sum();
    if total == 0 {
        return "-".to_owned();
    }
    let on = |node: u8| counts.iter().filter(|(n, _)| n.starts_with(&format!("backend-{node}-"))).map(|(_, c)| c).sum();
    format!("{:.0}/{:.0}", percent(on(1), total), percent(on(2), total))
}

/// `part` as a percentage of `whole` (> 0).
fn percent(part: u64, whole: u64) -> f64 {
    count(part) * 100.0 / count(whole)
}

fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 => format!("{:.2}x", value / b),
        _ => "-".to_owned(),
    }
}

/// The median of `values` (the mean of the middle two for an even count; 0 for none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// Medians over a mode's successful rounds.
struct Summary<'a> {
    ok: Vec<&'a Measured>,
    conn: f64,
    pps: f64,
}

impl<'a> Summary<'a> {
    fn of(results: &'a [Result<Measured>]) -> Self {
        let ok: Vec<&Measured> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        let conn = median(ok.iter().map(|m| m.tcp.per_second()).collect());
        let pps = median(ok.iter().map(|m| m.pps()).collect());
        Self { ok, conn, pps }
    }

    fn median_of(&self, f: impl Fn(&Measured) -> f64) -> f64 {
        median(self.ok.iter().map(|m| f(m)).collect())
    }

    fn sum_of(&self, f: impl Fn(&Measured) -> u64) -> u64 {
        self.ok.iter().map(|m| f(m)).sum()
    }

    /// Counts per backend summed over the rounds.
    fn counts(&self, f: impl Fn(&Measured) -> &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
        let mut all = BTreeMap::new();
        for m in &self.ok {
            for (name, n) in f(m) {
                *all.entry(name.clone()).or_default() += n;
            }
        }
        all
    }
}

fn report(runs: &[(Mode, Vec<Result<Measured>>)]) -> String {
    let summaries: Vec<(Mode, Summary<'_>, &[Result<Measured>])> =
        runs.iter().map(|(m, r)| (*m, Summary::of(r), r.as_slice())).collect();
    let base = summaries.iter().find(|(m, s, _)| *m == Mode::Iptables && !s.ok.is_empty()).map(|(_, s, _)| s);
    let (base_conn, base_pps) = (base.map(|b| b.conn), base.map(|b| b.pps));
    let rounds = runs.first().map_or(0, |(_, r)| r.len());
    let mut out = String::new();
    if rounds > 1 {
        let _ = writeln!(out, "\nmedians over {rounds} rounds (modes interleaved round by round)");
    }
    let _ = writeln!(
        out,
        "{:<9} {:>9} {:>6} {:>7} {:>10} {:>10} {:>6} {:>7}  {:>9} {:>9}",
        "mode", "conn/s", "fail", "vs ipt", "pps", "sent/s", "loss", "vs ipt", "tcp n1/n2", "udp n1/n2"
    );
    for (mode, s, results) in &summaries {
        if s.ok.is_empty() {
            let first = results.iter().find_map(|r| r.as_ref().err()).map(first_line).unwrap_or_default();
            let _ = writeln!(out, "{:<9} FAILED: {first}", mode.name());
            continue;
        }
        let failed_rounds = results.len() - s.ok.len();
        let _ = writeln!(
            out,
            "{:<9} {:>9.0} {:>6} {:>7} {:>10.0} {:>10.0} {:>5.1}% {:>7}  {:>9} {:>9}{}",
            mode.name(),
            s.conn,
            s.sum_of(|m| m.tcp.failed),
            ratio(s.conn, base_conn),
            s.pps,
            s.median_of(Measured::sent_per_second),
            s.median_of(Measured::loss_percent),
            ratio(s.pps, base_pps),
            spread(&s.counts(|m| &m.tcp.by_server)),
            spread(&s.counts(|m| &m.received)),
            if failed_rounds > 0 { format!("  ({failed_rounds} rounds failed)") } else { String::new() },
        );
    }
    let _ = writeln!(
        out,
        "\nmedians: UDP datagrams lost at the backends' full receive buffers and on the way; TCP SYNs the client \
         retransmitted (a lost SYN, or one refused by a backend's TIME_WAIT socket for a reused SNAT tuple)"
    );
    for (mode, s, _) in &summaries {
        if s.ok.is_empty() {
            continue;
        }
        let lost = s.median_of(|m| count(m.udp.sent.saturating_sub(m.received_total())));
        let _ = write!(
            out,
            "{:<9} UDP lost {lost:.0}: receive buffers {:.0}, on the way {:.0}; TCP SYN retransmits {:.0}",
            mode.name(),
            s.median_of(|m| count(m.socket_drops)),
            s.median_of(|m| count(m.udp.sent.saturating_sub(m.received_total() + m.socket_drops))),
            s.median_of(|m| count(m.syn_retransmits)),
        );
        if rounds > 1 {
            let per_round = |f: &dyn Fn(&Measured) -> f64| {
                s.ok.iter().map(|m| format!("{:.0}", f(m))).collect::<Vec<_>>().join(" ")
            };
            let _ = write!(
                out,
                "; rounds: conn/s {}; pps {}",
                per_round(&|m| m.tcp.per_second()),
                per_round(&Measured::pps)
            );
        }
        out.push('\n');
    }
    for (mode, s, results) in &summaries {
        for m in &s.ok {
            if let Some(e) = &m.tcp.first_error {
                let _ = writeln!(out, "{}: first TCP failure: {e}", mode.name());
            }
            if m.udp.errors > 0 {
                let _ = writeln!(out, "{}: {} UDP send errors", mode.name(), m.udp.errors);
            }
            for note in &m.notes {
                let _ = writeln!(out, "{}: {note}", mode.name());
            }
        }
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            let _ = writeln!(out, "\n{} failed:\n{e:#}", mode.name());
        }
    }
    out
}

/// A count as `f64`, for medians and rates.
#[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
fn count(n: u64) -> f64 {
    n as f64
}
