//! `NodePort` benchmark: north-south traffic from a client outside the cluster to
//! `node1_eth0:nodePort` in the two-node lab (`rproxy_tests::cluster`), with backends on both
//! nodes, through each datapath in turn:
//!
//! - `direct`: no Service translation at all, a routing reference. The client gets a route to
//!   the pod CIDRs via node 1 and sends to the backends' own addresses (round-robin); node 1 only
//!   forwards. Replies from node 2's pods go straight back to the client.
//! - `iptables`, `nftables`: the kube-proxy-shaped rules of `rproxy_tests::kube_proxy` in node 1.
//! - `xdp`, `xdp-native`, `tc`: the rproxy agent in each node (`--devices eth0 --xdp-mode
//!   generic|native|tc --cgroup none`) on a manifests directory holding the Service (`type:
//!   NodePort`) and its `EndpointSlice`. Native XDP works on the lab's veths because the bridge
//!   side of every external veth runs an `XDP_PASS` program, in every mode (see
//!   `rproxy_tests::cluster`). The socket hooks stay off: attached to the host's cgroup root they
//!   would also run for the TCP workers' `connect`, which is not the datapath under test.
//!
//! Each mode gets a fresh lab (so no conntrack or `TIME_WAIT` state carries over), then:
//! - TCP connection rate: N workers connect, send one line, read the backend's name, close, for
//!   the duration; successes and failures counted;
//! - UDP packet rate: complete Ethernet/IPv4/UDP frames from the client (one per flow: source
//!   ports 20000.., destinations the node port, or the pods round-robin in `direct`) are injected
//!   at the client's switch port by `BPF_PROG_TEST_RUN` in live-frames mode
//!   (`rproxy_tests::pktgen`): one generator thread per CPU, one call of `--batch` frames per flow
//!   in turn, for the duration. The frames enter the bridge as if the client had sent them; no
//!   socket, `sendmsg` or client veth is involved. The backend pods' readers pause during the
//!   run, and the backends' own UDP statistics count what arrives (datagrams read, plus those
//!   dropped at a full socket buffer: the datapath delivered them). pps = delivered / duration;
//!   offered (frames injected) and loss (offered − delivered) are reported too;
//! - node 1 forwarding rate: what node 1 alone sustains, without the bridge, node 2 and the
//!   pods, which every mode pays alike and which dilute the difference in the two measurements
//!   above. The lab has a second Service, `nodeport-remote` on node port 30081, whose backends
//!   are all on node 2 (`rproxy_tests::nodeport`), so that every packet for it is translated
//!   (destination and source) and sent back out of node 1's `eth0`. Frames from the client to it (in `direct`: to node 2's
//!   pods) are injected as if node 1's `eth0` had received them: the generator runs rproxy's own
//!   XDP program in `xdp-native` (the agent's, with its maps: `rproxy_tests::xdp::attached_program`),
//!   the `XDP_PASS` program otherwise, after which generic XDP, TC or the stack take them as
//!   frames from the wire. Where they leave node 1, on its switch port, the wire sink
//!   (`rproxy_tests::wire`) counts and drops the frames to node 2's MAC; node 1 has a permanent
//!   neighbour entry for node 2, since the sink also drops its ARP. `--fwd-batch` frames per call
//!   (256: fewer page-pool setups per frame). Reported: forwarded pps, CPU time per forwarded
//!   packet, and that net of the generator's own cost, measured each round as frames that node
//!   1's XDP drops at once; and a floor, a program that only writes node 2's MAC and returns
//!   `XDP_TX` — the cheapest XDP forwarding there is on these veths.
//!
//! **Is the generator fast enough?** It runs the datapath inline: a thread's call returns after
//! the softirqs its frames raised (bridge, nodes, pods) have run on its CPU, so offered tracks
//! what the datapath sustains, and loss shows only where a queue overflows. The generator's own
//! cost is measured each round on a sink: frames to the client's own MAC, which the bridge drops
//! at once (the generator plus the switch's first hop, which every mode pays too). The report
//! gives that ceiling and, per mode, `gen%`: the generator's share of each delivered packet's CPU
//! time. The lower, the more the mode's pps is the datapath's own.
//!
//! **CPU time per packet.** The machine's cores are shared (other processes, and a hypervisor
//! that steals time), so pps moves from round to round. The report also gives each mode's
//! measured CPU time per delivered packet: the generator threads' CPU time (the softirqs their
//! frames raise run in their context) plus `ksoftirqd`'s, over the packets delivered. Steal time
//! and other processes are not in it, which makes it the steadier comparison. It is given net of
//! the generator's own (per frame on the sink), with iptables' net over the mode's. The share of
//! CPU time stolen during each UDP run is reported too.
//!
//! Run as root: `cargo xtask bench-nodeport [-- --help]`. A mode that fails (the agent does not
//! start, rejects its flags, or the node port never answers) is reported as failed, and the
//! others still run.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    cluster::{CLIENT_IP, EXTERNAL_DEV},
    cmd::ip,
    kube_proxy::{self, Baseline, Installed},
    load::{self, CpuTicks, LoadServer, TcpRate, UdpCounters},
    netns::{mac_address, sysctl},
    nodeport::{self, Backend, NODE_PORT, REMOTE_NODE_PORT, TARGET_PORT},
    pktgen::{self, Injected, LiveFrames, UdpFlow},
    wire::{self, WireSink},
    xdp,
};

/// How long a mode may take to answer on the node port.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Timeout of each connect, read and write of the TCP workers: longer than the first SYN
/// retransmission (1 s), so that a lost or refused SYN shows as a retransmit, not a failure.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
/// Unmeasured TCP traffic before the measurement (caches, neighbour entries, conntrack).
const WARM_UP: Duration = Duration::from_millis(300);
/// The source port of the first UDP flow; flow `i` uses `FIRST_SOURCE_PORT + i`.
const FIRST_SOURCE_PORT: u16 = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Direct,
    Iptables,
    Nftables,
    Xdp,
    XdpNative,
    Tc,
}

impl Mode {
    const ALL: [Self; 6] = [Self::Direct, Self::Iptables, Self::Nftables, Self::Xdp, Self::XdpNative, Self::Tc];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
            Self::Xdp => "xdp",
            Self::XdpNative => "xdp-native",
            Self::Tc => "tc",
        }
    }

    fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("unknown mode {s:?} (known: {})", Self::ALL.map(Self::name).join(",")))
    }

    /// The agent's `--xdp-mode`, for the agent modes.
    fn xdp_mode(self) -> Option<&'static str> {
        match self {
            Self::Xdp => Some("generic"),
            Self::XdpNative => Some("native"),
            Self::Tc => Some("tc"),
            Self::Direct | Self::Iptables | Self::Nftables => None,
        }
    }
}

struct Args {
    modes: Vec<Mode>,
    duration: Duration,
    rounds: usize,
    backends_per_node: u8,
    tcp_workers: usize,
    udp_flows: u16,
    udp_size: usize,
    batch: u32,
    fwd_batch: u32,
    agent: Option<PathBuf>,
}

const USAGE: &str = "nodeport-bench [--modes direct,iptables,nftables,xdp,xdp-native,tc] [--duration SECS (3)] \
[--rounds N (1)] [--backends-per-node N (2)] [--tcp-workers N (4)] [--udp-flows N (64)] [--udp-size BYTES (18)] \
[--batch FRAMES_PER_CALL (64)] [--fwd-batch FRAMES_PER_CALL (256)] [--agent PATH ($RPROXY_AGENT_BIN)]";

fn parse_args() -> Result<Args> {
    let mut args = Args {
        modes: Mode::ALL.to_vec(),
        duration: Duration::from_secs(3),
        rounds: 1,
        backends_per_node: 2,
        tcp_workers: 4,
        udp_flows: 64,
        udp_size: 18,
        batch: 64,
        fwd_batch: pktgen::MAX_BATCH,
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
            "--udp-flows" => args.udp_flows = value()?.parse()?,
            "--udp-size" => args.udp_size = value()?.parse()?,
            "--batch" => args.batch = value()?.parse()?,
            "--fwd-batch" => args.fwd_batch = value()?.parse()?,
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
        || !(1..=1024).contains(&args.udp_flows)
        || !(1..=1400).contains(&args.udp_size)
        || !(1..=pktgen::MAX_BATCH).contains(&args.batch)
        || !(1..=pktgen::MAX_BATCH).contains(&args.fwd_batch)
    {
        bail!(
            "out of range: --backends-per-node 1..=50, --tcp-workers 1..=64, --udp-flows 1..=1024, --udp-size 1..=1400, \
             --batch and --fwd-batch 1..={}",
            pktgen::MAX_BATCH
        );
    }
    Ok(args)
}

/// What one mode measured.
struct Measured {
    tcp: TcpRate,
    udp: Injected,
    /// Datagrams delivered per backend (see [`UdpCounters::delivered`]).
    delivered: BTreeMap<String, u64>,
    /// The part of `delivered` dropped at the backends' full socket buffers.
    socket_drops: u64,
    /// Datagrams that reached a backend's UDP layer but no socket (no port, bad checksum).
    refused: u64,
    /// The share of the machine's CPU time the hypervisor stole during the UDP run, percent.
    steal: f64,
    /// SYNs the client sent again during the TCP run (each costs its connection a second).
    syn_retransmits: u64,
    /// The forwarding measurement.
    fwd: Forwarded,
    /// Notes for the report (e.g. the agent exited during the run).
    notes: Vec<String>,
}

impl Measured {
    fn delivered_total(&self) -> u64 {
        self.delivered.values().sum()
    }

    fn pps(&self) -> f64 {
        load::rate(self.delivered_total(), self.udp.elapsed)
    }

    fn offered_per_second(&self) -> f64 {
        load::rate(self.udp.frames, self.udp.elapsed)
    }

    fn lost(&self) -> u64 {
        self.udp.frames.saturating_sub(self.delivered_total())
    }

    fn loss_percent(&self) -> f64 {
        if self.udp.frames == 0 { 0.0 } else { percent(self.lost(), self.udp.frames) }
    }
}

/// What the forwarding measurement counted (see the module doc).
struct Forwarded {
    /// The generator's run at node 1's `eth0`.
    run: Injected,
    /// Frames node 1 sent to node 2's MAC: dropped and counted by the wire sink.
    packets: u64,
    /// Other frames node 1 sent out of `eth0` meanwhile (ICMP errors, ARP): passed on by the sink.
    other: u64,
    /// The share of the machine's CPU time the hypervisor stole during the run, percent.
    steal: f64,
}

impl Forwarded {
    fn pps(&self) -> f64 {
        load::rate(self.packets, self.run.elapsed)
    }

    fn offered_per_second(&self) -> f64 {
        load::rate(self.run.frames, self.run.elapsed)
    }

    fn cpu_ns(&self) -> f64 {
        cpu_ns(&self.run, self.packets)
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
        "NodePort benchmark: client {CLIENT_IP} → {}:{NODE_PORT}, {} backends on each of 2 nodes, {:.1} s per measurement",
        NodeId::ONE.ip(),
        args.backends_per_node,
        args.duration.as_secs_f64()
    );
    println!(
        "TCP: {} workers (connect, {} B request, name back, close); UDP: {} flows of {} B datagrams injected at the \
         client's switch port (BPF_PROG_TEST_RUN live frames, one thread per CPU, {} frames per call), counted by \
         the backends' UDP statistics",
        args.tcp_workers,
        load::REQUEST.len(),
        args.udp_flows,
        args.udp_size,
        args.batch
    );
    println!("kernel {}; {}\n", kernel.trim(), kube_proxy::versions().unwrap_or_else(|e| format!("{e:#}")));

    let mut ceilings = Vec::new();
    let mut runs: Vec<(Mode, Vec<Result<Measured>>)> = args.modes.iter().map(|&m| (m, Vec::new())).collect();
    for round in 1..=args.rounds {
        eprintln!("== generator ceilings and XDP floor (round {round}/{}) ==", args.rounds);
        match generator_ceilings(&args) {
            Ok(c) => {
                eprintln!(
                    "   {:.0} frames/s injected and dropped by the switch; {:.0} frames/s injected at node 1 and \
                     dropped by its XDP; {:.0} pps forwarded by the XDP floor",
                    load::rate(c.switch.frames, c.switch.elapsed),
                    load::rate(c.node_drop.frames, c.node_drop.elapsed),
                    c.floor.pps()
                );
                ceilings.push(c);
            }
            Err(e) => eprintln!("   failed: {}", first_line(&e)),
        }
        for (mode, results) in &mut runs {
            eprintln!("== {} (round {round}/{}) ==", mode.name(), args.rounds);
            let result = run_mode(*mode, &args);
            match &result {
                Ok(m) => eprintln!(
                    "   {:.0} conn/s ({} failed), {:.0} pps delivered of {:.0} offered/s; node 1 forwarded {:.0} pps \
                     of {:.0} offered/s",
                    m.tcp.per_second(),
                    m.tcp.failed,
                    m.pps(),
                    m.offered_per_second(),
                    m.fwd.pps(),
                    m.fwd.offered_per_second()
                ),
                Err(e) => eprintln!("   failed: {}", first_line(e)),
            }
            results.push(result);
        }
    }
    print!("{}", report(&runs, &ceilings));
    Ok(())
}

fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or_default().to_owned()
}

/// What the generator alone costs, and the cheapest XDP forwarding, measured in a fresh lab
/// each round.
struct Ceilings {
    /// Frames from the client to the client's own MAC, which the bridge drops at once (the
    /// destination is on the port they came in on).
    switch: Injected,
    /// Frames for the remote-only node port injected at node 1's `eth0` with a program that
    /// drops them (the wire sink, for node 1's MAC): the forwarding measurement's generator and
    /// nothing else.
    node_drop: Injected,
    /// The same frames injected with the wire forwarder (node 2's MAC, `XDP_TX`) and counted by
    /// the wire sink: node 1 forwarding with no work at all, the floor of any XDP datapath here.
    floor: Forwarded,
}

fn generator_ceilings(args: &Args) -> Result<Ceilings> {
    let mut cluster = Cluster::new()?;
    let client_mac = mac_address(cluster.client_ns(), EXTERNAL_DEV)?;
    let target = SocketAddrV4::new(NodeId::ONE.ip(), NODE_PORT);
    let frames = udp_frames(client_mac, client_mac, &[target], args)?;
    let switch = inject(&mut cluster, frames, args)?;

    let node1 = cluster.node(NodeId::ONE).ns().to_owned();
    let node1_mac = mac_address(&node1, EXTERNAL_DEV)?;
    let node2_mac = mac_address(cluster.node(NodeId::TWO).ns(), EXTERNAL_DEV)?;
    let frames = udp_frames(client_mac, node1_mac, &[SocketAddrV4::new(NodeId::ONE.ip(), REMOTE_NODE_PORT)], args)?;
    let mut drop = WireSink::load(node1_mac)?;
    let node_drop = {
        // Attached, the program stays in the kernel's XDP dispatcher (see
        // `rproxy_tests::pktgen`). Nothing else is sent to node 1 meanwhile.
        let _attached = drop.attach_native(&node1, EXTERNAL_DEV)?;
        LiveFrames::new(drop.program()?, &node1, EXTERNAL_DEV, frames.clone(), args.fwd_batch)?.run(args.duration)?
    };

    cluster.sink_switch_port(NodeId::ONE, node2_mac)?;
    let mut forwarder = WireSink::forwarder(node2_mac)?;
    let _attached = forwarder.attach_native(&node1, EXTERNAL_DEV)?;
    let wire = Wire { switch_ns: cluster.switch_ns().to_owned(), port: cluster.switch_port(NodeId::ONE) };
    let floor = wire.count(|| {
        LiveFrames::new(forwarder.program()?, &node1, EXTERNAL_DEV, frames, args.fwd_batch)?.run(args.duration)
    })?;
    Ok(Ceilings { switch, node_drop, floor })
}

/// The wire sink on node 1's switch port (see `rproxy_tests::wire`).
struct Wire {
    switch_ns: String,
    port: String,
}

impl Wire {
    /// Runs `generate` and counts what the sink took meanwhile (waiting, at most a second, for
    /// the frames still in the port's ring).
    fn count(&self, generate: impl FnOnce() -> Result<Injected>) -> Result<Forwarded> {
        let (drops_before, passes_before) = wire::xdp_verdicts(&self.switch_ns, &self.port)?;
        let ticks = CpuTicks::read()?;
        let run = generate()?;
        let steal = CpuTicks::read()?.steal_percent_since(ticks);
        let mut last = wire::xdp_verdicts(&self.switch_ns, &self.port)?;
        for _ in 0..20 {
            thread::sleep(Duration::from_millis(50));
            let now = wire::xdp_verdicts(&self.switch_ns, &self.port)?;
            if now == last {
                break;
            }
            last = now;
        }
        let (drops, passes) = last;
        Ok(Forwarded {
            run,
            packets: drops.saturating_sub(drops_before),
            other: passes.saturating_sub(passes_before),
            steal,
        })
    }
}

/// One frame per flow from the client (`client_mac`) to `dst_mac`: flow `i` from source port
/// `FIRST_SOURCE_PORT + i` to `targets[i % len]`.
fn udp_frames(client_mac: [u8; 6], dst_mac: [u8; 6], targets: &[SocketAddrV4], args: &Args) -> Result<Vec<Vec<u8>>> {
    (0..args.udp_flows)
        .map(|i| {
            let flow = UdpFlow {
                src_mac: client_mac,
                dst_mac,
                src: SocketAddrV4::new(CLIENT_IP, FIRST_SOURCE_PORT + i),
                dst: targets[usize::from(i) % targets.len()],
            };
            pktgen::udp_frame(&flow, args.udp_size)
        })
        .collect()
}

/// Runs the generator on `frames` at the client's switch port for the duration.
fn inject(cluster: &mut Cluster, frames: Vec<Vec<u8>>, args: &Args) -> Result<Injected> {
    let (switch, port) = (cluster.switch_ns().to_owned(), cluster.client_switch_port());
    let program = cluster.pass_program().program()?;
    LiveFrames::new(program, &switch, &port, frames, args.batch)?.run(args.duration)
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

    let node_port = vec![SocketAddrV4::new(NodeId::ONE.ip(), NODE_PORT)];
    // The rules stay installed while they are measured, and are removed when dropped.
    let mut rules = None;
    let (datapath, targets) = match mode {
        Mode::Direct => {
            ip(Some(cluster.client_ns()), &["route", "add", "10.244.0.0/16", "via", &NodeId::ONE.ip().to_string()])?;
            let pods = backends.iter().map(|b| SocketAddrV4::new(b.ip, TARGET_PORT)).collect();
            (Datapath::Direct, pods)
        }
        Mode::Iptables | Mode::Nftables => {
            let baseline = if mode == Mode::Iptables { Baseline::Iptables } else { Baseline::Nftables };
            let ns = cluster.node(NodeId::ONE).ns().to_owned();
            let mut frontends = nodeport::frontends(&backends)?;
            frontends.extend(nodeport::remote_frontends(&backends)?);
            rules = Some(Installed::new(baseline, &ns, &frontends, &[NodeId::ONE.ip()])?);
            (Datapath::Rules, node_port)
        }
        Mode::Xdp | Mode::XdpNative | Mode::Tc => {
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

    let client_mac = mac_address(&client, EXTERNAL_DEV)?;
    let node_mac = mac_address(cluster.node(NodeId::ONE).ns(), EXTERNAL_DEV)?;
    let frames = udp_frames(client_mac, node_mac, &targets, args)?;
    let pod_ns: Vec<String> = backends.iter().map(|b| cluster.pod(&b.name).ns().to_owned()).collect();
    let counters = || pod_ns.iter().map(|ns| load::udp_counters(ns)).collect::<Result<Vec<_>>>();
    for s in &servers {
        s.pause_udp(true);
    }
    let before = counters()?;
    let ticks = CpuTicks::read()?;
    let udp = inject(&mut cluster, frames, args);
    let steal = CpuTicks::read()?.steal_percent_since(ticks);
    for s in &servers {
        s.pause_udp(false);
    }
    let udp = udp?;
    settle(&pod_ns)?;
    let counts: Vec<UdpCounters> = counters()?.into_iter().zip(before).map(|(after, b)| after.since(b)).collect();
    let delivered = backends.iter().zip(&counts).map(|(b, c)| (b.name.clone(), c.delivered)).collect();
    drop(servers);
    let fwd = forward(&mut cluster, mode, &backends, args)?;
    let mut notes = Vec::new();
    if datapath == Datapath::Agents
        && let Err(e) = cluster.ensure_agents_running()
    {
        notes.push(format!("an agent exited during the run: {}", first_line(&e)));
    }
    if let Some(rules) = rules {
        rules.remove()?;
    }
    Ok(Measured {
        tcp,
        udp,
        delivered,
        socket_drops: counts.iter().map(|c| c.socket_drops).sum(),
        refused: counts.iter().map(|c| c.refused).sum(),
        steal,
        syn_retransmits,
        fwd,
        notes,
    })
}

/// The forwarding measurement (see the module doc): frames from the client to the remote-only
/// Service's node port (in `direct`, to node 2's pods) injected as if node 1's `eth0` had
/// received them, counted by the wire sink where they leave node 1 for node 2.
fn forward(cluster: &mut Cluster, mode: Mode, backends: &[Backend], args: &Args) -> Result<Forwarded> {
    let node1 = cluster.node(NodeId::ONE).ns().to_owned();
    let node1_mac = mac_address(&node1, EXTERNAL_DEV)?;
    let node2_mac = mac_address(cluster.node(NodeId::TWO).ns(), EXTERNAL_DEV)?;
    let client_mac = mac_address(cluster.client_ns(), EXTERNAL_DEV)?;
    // The sink drops node 1's ARP requests to node 2 too: its entry must never need refreshing.
    let lladdr = node2_mac.map(|b| format!("{b:02x}")).join(":");
    let node2_ip = NodeId::TWO.ip().to_string();
    ip(Some(&node1), &["neigh", "replace", &node2_ip, "lladdr", &lladdr, "dev", EXTERNAL_DEV, "nud", "permanent"])?;
    cluster.sink_switch_port(NodeId::ONE, node2_mac)?;
    let targets: Vec<SocketAddrV4> = match mode {
        Mode::Direct => {
            backends.iter().filter(|b| b.node == NodeId::TWO).map(|b| SocketAddrV4::new(b.ip, TARGET_PORT)).collect()
        }
        _ => vec![SocketAddrV4::new(NodeId::ONE.ip(), REMOTE_NODE_PORT)],
    };
    let frames = udp_frames(client_mac, node1_mac, &targets, args)?;
    let wire = Wire { switch_ns: cluster.switch_ns().to_owned(), port: cluster.switch_port(NodeId::ONE) };
    // In native mode the agent's program is node 1's receive path: the generator runs it (with
    // the agent's maps) in place of the pass program, whose frames would enter after it.
    let agent_program;
    let program = if mode == Mode::XdpNative {
        let pin = Path::new("/sys/fs/bpf").join(format!("{}-generator", cluster.prefix()));
        agent_program = xdp::attached_program(&node1, EXTERNAL_DEV, &pin)?;
        &agent_program
    } else {
        cluster.pass_program().program()?
    };
    wire.count(|| LiveFrames::new(program, &node1, EXTERNAL_DEV, frames, args.fwd_batch)?.run(args.duration))
}

fn start_agents(cluster: &mut Cluster, backends: &[Backend], mode: Mode, args: &Args) -> Result<()> {
    let bin = match &args.agent {
        Some(bin) => bin.clone(),
        None => agent_bin()?,
    };
    let manifests = cluster.work_dir().join("manifests");
    std::fs::create_dir(&manifests)?;
    nodeport::write_manifests(&manifests, backends)?;
    nodeport::write_remote_manifests(&manifests, backends)?;
    let xdp_mode = mode.xdp_mode().context("not an agent mode")?;
    let extra = ["--devices", EXTERNAL_DEV, "--xdp-mode", xdp_mode, "--cgroup", "none"];
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

/// Waits (at most 2 s) until the backends' delivered counts stop moving: the readers, resumed,
/// count the datagrams still queued in their sockets when the generator stopped.
fn settle(pod_ns: &[String]) -> Result<()> {
    let total = || pod_ns.iter().map(|ns| load::udp_counters(ns).map(|c| c.delivered)).sum::<Result<u64>>();
    let mut last = total()?;
    for _ in 0..40 {
        thread::sleep(Duration::from_millis(50));
        let now = total()?;
        if now == last {
            return Ok(());
        }
        last = now;
    }
    Ok(())
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

fn report(runs: &[(Mode, Vec<Result<Measured>>)], all: &[Ceilings]) -> String {
    let ceilings: Vec<Injected> = all.iter().map(|c| c.switch).collect();
    let ceilings = ceilings.as_slice();
    let summaries: Vec<(Mode, Summary<'_>, &[Result<Measured>])> =
        runs.iter().map(|(m, r)| (*m, Summary::of(r), r.as_slice())).collect();
    let base = summaries.iter().find(|(m, s, _)| *m == Mode::Iptables && !s.ok.is_empty()).map(|(_, s, _)| s);
    let (base_conn, base_pps) = (base.map(|b| b.conn), base.map(|b| b.pps));
    let ceiling =
        (!ceilings.is_empty()).then(|| median(ceilings.iter().map(|c| load::rate(c.frames, c.elapsed)).collect()));
    let generator = generator_ns(ceilings);
    let rounds = runs.first().map_or(0, |(_, r)| r.len());
    let mut out = String::new();
    if rounds > 1 {
        let _ = writeln!(out, "\nmedians over {rounds} rounds (modes interleaved round by round)");
    }
    match ceiling {
        Some(c) => {
            let threads = ceilings.first().map_or(0, |s| s.threads);
            let _ = writeln!(
                out,
                "generator ceiling: {c:.0} frames/s ({threads} threads; frames the switch drops at once). gen%: the \
                 generator's share of a delivered packet's CPU time (its CPU per frame on the sink / the mode's per \
                 packet)"
            );
        }
        None => out.push_str("generator ceiling: not measured (failed)\n"),
    }
    let _ = writeln!(
        out,
        "{:<10} {:>9} {:>6} {:>7} {:>10} {:>10} {:>6} {:>7} {:>5}  {:>9} {:>9}",
        "mode", "conn/s", "fail", "vs ipt", "pps", "offered/s", "loss", "vs ipt", "gen%", "tcp n1/n2", "udp n1/n2"
    );
    for (mode, s, results) in &summaries {
        if s.ok.is_empty() {
            let first = results.iter().find_map(|r| r.as_ref().err()).map(first_line).unwrap_or_default();
            let _ = writeln!(out, "{:<10} FAILED: {first}", mode.name());
            continue;
        }
        let failed_rounds = results.len() - s.ok.len();
        let _ = writeln!(
            out,
            "{:<10} {:>9.0} {:>6} {:>7} {:>10.0} {:>10.0} {:>5.1}% {:>7} {:>5}  {:>9} {:>9}{}",
            mode.name(),
            s.conn,
            s.sum_of(|m| m.tcp.failed),
            ratio(s.conn, base_conn),
            s.pps,
            s.median_of(Measured::offered_per_second),
            s.median_of(Measured::loss_percent),
            ratio(s.pps, base_pps),
            generator.map_or_else(
                || "-".to_owned(),
                |g| format!("{:.0}", g * 100.0 / s.median_of(|m| cpu_ns(&m.udp, m.delivered_total())))
            ),
            spread(&s.counts(|m| &m.tcp.by_server)),
            spread(&s.counts(|m| &m.delivered)),
            if failed_rounds > 0 { format!("  ({failed_rounds} rounds failed)") } else { String::new() },
        );
    }
    cpu_per_packet(&mut out, &summaries, ceilings);
    forwarding(&mut out, &summaries, all);
    details(&mut out, &summaries, rounds);
    out
}

/// CPU time per packet in ns: the run's measured CPU time (see [`Injected::cpu`]) over the
/// packets it got through (infinite for none).
fn cpu_ns(run: &Injected, packets: u64) -> f64 {
    if packets == 0 { f64::INFINITY } else { run.cpu.as_secs_f64() * 1e9 / count(packets) }
}

/// The generator's CPU time per frame on the sink, median over the rounds (`None` if never
/// measured).
fn generator_ns(ceilings: &[Injected]) -> Option<f64> {
    (!ceilings.is_empty()).then(|| median(ceilings.iter().map(|c| cpu_ns(c, c.frames)).collect()))
}

/// Per mode: measured CPU time per delivered packet, that net of the generator's own (on the
/// sink), and iptables' net over the mode's.
fn cpu_per_packet(out: &mut String, summaries: &[(Mode, Summary<'_>, &[Result<Measured>])], ceilings: &[Injected]) {
    let generator = generator_ns(ceilings).unwrap_or(0.0);
    let net = |s: &Summary<'_>| s.median_of(|m| cpu_ns(&m.udp, m.delivered_total())) - generator;
    let base = summaries.iter().find(|(m, s, _)| *m == Mode::Iptables && !s.ok.is_empty()).map(|(_, s, _)| net(s));
    let _ = writeln!(
        out,
        "\nCPU time per delivered packet (measured: the generator threads, which run the softirqs of their frames, \
         plus ksoftirqd; steal and other processes excluded), net of the generator's own {generator:.0} ns per frame \
         (on the sink); iptables' net / the mode's net"
    );
    for (mode, s, _) in summaries {
        if s.ok.is_empty() {
            continue;
        }
        let n = net(s);
        let _ = writeln!(
            out,
            "{:<10} {:>7.0} ns, net {:>7.0} ns  {}",
            mode.name(),
            n + generator,
            n,
            base.filter(|_| n > 0.0).map_or_else(|| "-".to_owned(), |b| format!("{:.2}x", b / n))
        );
    }
}

/// Per mode: the forwarding measurement's rate and CPU time per packet, against iptables', and
/// the CPU time net of the generator's own (on the drop ceiling); the XDP floor first.
fn forwarding(out: &mut String, summaries: &[(Mode, Summary<'_>, &[Result<Measured>])], ceilings: &[Ceilings]) {
    let drops: Vec<Injected> = ceilings.iter().map(|c| c.node_drop).collect();
    let generator = generator_ns(&drops).unwrap_or(0.0);
    let fwd_median = |runs: &[&Forwarded], f: &dyn Fn(&Forwarded) -> f64| median(runs.iter().map(|r| f(r)).collect());
    let base = summaries.iter().find(|(m, s, _)| *m == Mode::Iptables && !s.ok.is_empty()).map(|(_, s, _)| {
        let runs: Vec<&Forwarded> = s.ok.iter().map(|m| &m.fwd).collect();
        (fwd_median(&runs, &Forwarded::pps), fwd_median(&runs, &Forwarded::cpu_ns) - generator)
    });
    let _ = writeln!(
        out,
        "\nnode 1 forwarding: UDP frames for node port {REMOTE_NODE_PORT} (a Service whose backends are all on node 2; \
         direct: node 2's pods) injected as if node 1's eth0 had received them (--fwd-batch frames per call), counted \
         where they leave node 1 for node 2 (the wire sink on its switch port). CPU: the generator threads' and \
         ksoftirqd's time per forwarded packet; net: less the generator's own {generator:.0} ns per frame (frames \
         dropped by node 1's XDP at once: {:.0}/s). floor: a program that only writes node 2's MAC and returns XDP_TX",
        median(drops.iter().map(|d| load::rate(d.frames, d.elapsed)).collect())
    );
    let _ = writeln!(
        out,
        "{:<10} {:>10} {:>10} {:>6} {:>6} {:>7} {:>10} {:>8} {:>8} {:>6}",
        "mode", "fwd pps", "offered/s", "fwd%", "other", "vs ipt", "CPU ns/pkt", "net ns", "ipt/mode", "stolen"
    );
    let mut row = |name: &str, runs: &[&Forwarded]| {
        let (pps, cpu) = (fwd_median(runs, &Forwarded::pps), fwd_median(runs, &Forwarded::cpu_ns));
        let net = cpu - generator;
        let _ = writeln!(
            out,
            "{name:<10} {pps:>10.0} {:>10.0} {:>5.1}% {:>6.0} {:>7} {cpu:>10.0} {net:>8.0} {:>8} {:>5.0}%",
            fwd_median(runs, &Forwarded::offered_per_second),
            fwd_median(runs, &|f| if f.run.frames == 0 { 0.0 } else { percent(f.packets, f.run.frames) }),
            fwd_median(runs, &|f| count(f.other)),
            ratio(pps, base.map(|b| b.0)),
            base.filter(|_| net > 0.0).map_or_else(|| "-".to_owned(), |b| format!("{:.2}x", b.1 / net)),
            fwd_median(runs, &|f| f.steal),
        );
    };
    if !ceilings.is_empty() {
        row("floor", &ceilings.iter().map(|c| &c.floor).collect::<Vec<_>>());
    }
    for (mode, s, _) in summaries {
        if !s.ok.is_empty() {
            row(mode.name(), &s.ok.iter().map(|m| &m.fwd).collect::<Vec<_>>());
        }
    }
}

/// Per mode: the UDP counts and SYN retransmits behind the table, failures and notes.
fn details(out: &mut String, summaries: &[(Mode, Summary<'_>, &[Result<Measured>])], rounds: usize) {
    let _ = writeln!(
        out,
        "\nmedians: UDP frames offered, delivered to the backends' sockets (of which dropped at a full socket buffer), \
         lost on the way, the machine's CPU time the hypervisor stole meanwhile; TCP SYNs the client retransmitted (a \
         lost SYN, or one refused by a backend's TIME_WAIT socket for a reused SNAT tuple)"
    );
    for (mode, s, _) in summaries {
        if s.ok.is_empty() {
            continue;
        }
        let _ = write!(
            out,
            "{:<10} UDP offered {:.0}, delivered {:.0} (socket buffers full {:.0}), lost {:.0}, CPU stolen {:.0}%; TCP SYN \
             retransmits {:.0}",
            mode.name(),
            s.median_of(|m| count(m.udp.frames)),
            s.median_of(|m| count(m.delivered_total())),
            s.median_of(|m| count(m.socket_drops)),
            s.median_of(|m| count(m.lost())),
            s.median_of(|m| m.steal),
            s.median_of(|m| count(m.syn_retransmits)),
        );
        if rounds > 1 {
            let per_round = |f: &dyn Fn(&Measured) -> f64| {
                s.ok.iter().map(|m| format!("{:.0}", f(m))).collect::<Vec<_>>().join(" ")
            };
            let _ = write!(
                out,
                "; rounds: conn/s {}; pps {}; CPU ns/packet {}; node 1 forwarding pps {}",
                per_round(&|m| m.tcp.per_second()),
                per_round(&Measured::pps),
                per_round(&|m| cpu_ns(&m.udp, m.delivered_total())),
                per_round(&|m| m.fwd.pps())
            );
        }
        out.push('\n');
    }
    for (mode, s, results) in summaries {
        for m in &s.ok {
            if let Some(e) = &m.tcp.first_error {
                let _ = writeln!(out, "{}: first TCP failure: {e}", mode.name());
            }
            if m.refused > 0 {
                let _ = writeln!(
                    out,
                    "{}: {} datagrams reached a backend's UDP layer but no socket (no port or bad checksum)",
                    mode.name(),
                    m.refused
                );
            }
            for note in &m.notes {
                let _ = writeln!(out, "{}: {note}", mode.name());
            }
        }
        if let Some(e) = results.iter().find_map(|r| r.as_ref().err()) {
            let _ = writeln!(out, "\n{} failed:\n{e:#}", mode.name());
        }
    }
}

/// A count as `f64`, for medians and rates.
#[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
fn count(n: u64) -> f64 {
    n as f64
}
