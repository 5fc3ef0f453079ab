//! The soak test (`cargo xtask soak --minutes N`, and a two-minute run in the suite): the
//! two-node lab under continuous traffic of every kind while the Service's endpoints churn, the
//! agents restart and the programs are upgraded from the previous release and back, counting
//! every failure.
//!
//! **Lab.** [`Cluster`] with two nodes; on each, three dual-stack backend pods (hosts .11, .12,
//! .13 of the node's pod CIDR) serving TCP and UDP echo ([`crate::server`]) and a client pod
//! (.50). Service `soak`: `NodePort`, dual-stack (`10.96.0.30`, `fd00:96::30`), TCP and UDP port
//! 80 to 8080, node port 30180, `externalTrafficPolicy: Cluster`, so each node has local and
//! remote backends. Both agents run with `--devices eth0` on a manifests directory.
//!
//! **Traffic** (one thread per worker, each in its own namespace, paced, until the end):
//! - short TCP connections (connect, 1 KiB echoed and checked, close) and short UDP flows (a
//!   fresh socket per request, the echo checked) to the `ClusterIP` from a pod on each node,
//!   over IPv4 and IPv6; to the `NodePort` of each node from the external client (node 2's
//!   traffic to node 1's backends and back has its source translated); to the `ClusterIP` from node 1's host
//!   network (the socket hooks);
//! - long-lived TCP streams (a numbered 256-byte message echoed and checked every 100 ms) from
//!   the pods, the client and the host, over both families. A stream that breaks counts once
//!   and is opened again.
//!
//! **Churn.** Every `churn_every` the `EndpointSlices` are rewritten (atomically): one or two
//! endpoints change state among ready, not ready (ready and serving false, the pod still
//! running), terminating (serving) and gone from the slice, always leaving one ready endpoint on
//! each node. Established TCP flows keep their backend whatever its state, new flows go to
//! ready ones, UDP flows move at once (issue 17 §0).
//!
//! **Restarts.** `restarts` times, spread over the first 70 % of the run, each agent in turn
//! gets SIGTERM and starts again (waiting for its `agent running` line): the last 30 % run on
//! one agent instance, whose RSS must stay flat. With `previous_object` (the eBPF object of an
//! earlier release, `tests/fixtures/`), the agents start on it, the third restart upgrades to
//! this build's programs (migrating the maps to BTF ones), the sixth downgrades to the previous
//! programs again and the eighth upgrades once more.
//!
//! **End.** The workers stop (every stream closed by FIN), then the conntrack tables of both
//! nodes are watched until they are empty or the longest lifetime of an idle flow (60 s) and
//! two GC passes have gone by: what is left then is a leak. So are backends that no slot names
//! and no flow holds, and socket-level reverse-NAT entries.
use std::{
    collections::{BTreeMap, HashSet},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::maps::{HashMap as BpfHashMap, MapData};
use rproxy_common::{CtState, RevNat4, RevNat6, SockRevKey4, SockRevKey6, map_names};

use crate::{
    Cluster, NodeId,
    client::{self, TcpSession},
    demo::RUNNING_LINE,
    manifest::{Endpoint, EndpointPort, EndpointSlice, Protocol, write_atomic},
    netns::in_netns,
};

/// The Service's node port (TCP and UDP).
pub const NODE_PORT: u16 = 30180;
/// The Service's port.
pub const SERVICE_PORT: u16 = 80;
/// The backends' port.
pub const TARGET_PORT: u16 = 8080;
/// The Service's IPv4 cluster IP.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// The Service's IPv6 cluster IP.
pub const CLUSTER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x30);
/// Host numbers of each node's backend pods.
const BACKEND_HOSTS: [u8; 3] = [11, 12, 13];
/// Host number of each node's client pod.
const CLIENT_HOST: u8 = 50;
/// Connect, read and write timeout of every request.
const TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between a worker's requests.
const PACE: Duration = Duration::from_millis(40);
/// Pause between a stream's messages.
const STREAM_PACE: Duration = Duration::from_millis(100);
/// Failures kept verbatim per worker (the rest are counted).
const KEPT_FAILURES: usize = 20;
/// How long a started agent may take to say it runs (a migration included, debug build).
const START_TIMEOUT: Duration = Duration::from_mins(1);
/// The agents' conntrack GC interval (`--ct-gc-interval`, the default).
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// Allowed growth of the last agent instance's RSS over its life: this fraction of the first
/// sample, plus [`RSS_SLACK_KIB`].
const RSS_GROWTH: f64 = 0.10;
const RSS_SLACK_KIB: u64 = 4096;
/// Settling time of a fresh agent instance before its RSS samples count for flatness.
const RSS_WARMUP: Duration = Duration::from_secs(10);

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The agent binary.
    pub agent_bin: PathBuf,
    /// How long traffic runs (the drain comes after).
    pub duration: Duration,
    /// Agent restarts (each restarts both agents, one after the other).
    pub restarts: u32,
    /// The previous release's eBPF object: upgrade from it and back (see the module doc).
    pub previous_object: Option<PathBuf>,
    /// Time between two endpoint changes.
    pub churn_every: Duration,
    /// Seed of the churn.
    pub seed: u64,
    /// Each agent instance's log is copied here when it stops (and the last ones at the end).
    pub log_dir: Option<PathBuf>,
    /// Progress lines on stderr.
    pub verbose: bool,
}

/// What a worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    Tcp,
    Udp,
    Stream,
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "short TCP",
            Self::Udp => "UDP",
            Self::Stream => "TCP stream",
        })
    }
}

#[derive(Debug, Clone)]
struct WorkerSpec {
    /// Who sends (for the report): "pod node1", "client", "host node1".
    origin: String,
    ns: String,
    target: SocketAddr,
    load: Load,
    /// UDP over a connected socket (as resolvers do), not `sendto`.
    connected_udp: bool,
}

/// One worker's counts.
#[derive(Debug, Clone)]
pub struct WorkerReport {
    pub origin: String,
    pub target: SocketAddr,
    pub load: String,
    /// Requests answered correctly (streams: messages echoed).
    pub ok: u64,
    /// Failed connections, lost UDP replies, broken streams.
    pub failed: u64,
    /// Streams opened (streams only).
    pub opened: u64,
    /// The first failures: seconds into the run and the error.
    pub failures: Vec<(f64, String)>,
    /// When each failure was seen (seconds into the run), all of them.
    pub failed_at: Vec<f64>,
}

/// One RSS sample of an agent.
#[derive(Debug, Clone, Copy)]
pub struct RssSample {
    pub at: Duration,
    pub node: u8,
    /// Agent instance on that node, from 0.
    pub instance: u32,
    pub kib: u64,
}

/// What a node held after the drain.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    pub conntrack4: usize,
    pub conntrack6: usize,
    /// Backends in no slot that are not terminating endpoints of the last slices (which drain
    /// by design): kept for flows, they must go once none holds them.
    pub orphan_backends: usize,
    /// Socket reverse-NAT entries made since the last switch to this build's programs (those of
    /// closed sockets must be gone: `sock_release`).
    pub sock_rev_nat: usize,
    /// Socket reverse-NAT entries already there at that switch: left by the previous release's
    /// programs, which have no `sock_release` (they wait for the LRU).
    pub sock_rev_nat_before: usize,
    /// A few of the entries left, for the report.
    pub examples: Vec<String>,
}

impl Leftovers {
    fn total(&self) -> usize {
        self.conntrack4 + self.conntrack6 + self.orphan_backends + self.sock_rev_nat
    }
}

/// The outcome of a soak run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub duration: Duration,
    pub seed: u64,
    pub workers: Vec<WorkerReport>,
    pub churn_steps: u64,
    /// Restarts done: (seconds into the run, node, programs started: "previous" or "this").
    pub restarts: Vec<(f64, u8, &'static str)>,
    pub rss: Vec<RssSample>,
    /// How long after the traffic stopped the tables were empty (`None`: they never were).
    pub drained_after: Option<Duration>,
    pub leftovers: BTreeMap<u8, Leftovers>,
    /// The map migration of the first upgrade from the previous release's programs (its maps
    /// have no BTF): seconds into the run from the first agent's stop to the last agent's
    /// `agent running`. A flow opened while the programs are swapped device by device may meet
    /// a new program and an old one (docs/maps.md, "Upgrading from maps without BTF").
    pub migration: Option<(f64, f64)>,
}

impl Report {
    /// Whether a failure seen at `at` may come from the migration's program swap: seen during
    /// the migration, or within a request's timeout after it.
    fn in_migration(&self, at: f64) -> bool {
        self.migration.is_some_and(|(from, to)| at >= from && at <= to + TIMEOUT.as_secs_f64())
    }

    /// A worker's failures seen during the migration (see [`Report::migration`]).
    #[must_use]
    pub fn failed_in_migration(&self, w: &WorkerReport) -> u64 {
        w.failed_at.iter().filter(|&&at| self.in_migration(at)).count() as u64
    }

    /// Everything that misses the goal (zero failures, no leak, flat RSS); empty on success.
    /// Failures during the migration of the first upgrade (the documented swap window) are
    /// reported apart ([`Report::failed_in_migration`]) and are not problems.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for w in &self.workers {
            let outside = w.failed - self.failed_in_migration(w).min(w.failed);
            if outside > 0 {
                out.push(format!("{} {} to {}: {outside} failed", w.origin, w.load, w.target));
            }
        }
        for w in self.workers.iter().filter(|w| w.ok == 0) {
            out.push(format!("{} {} to {}: nothing succeeded", w.origin, w.load, w.target));
        }
        for (node, left) in &self.leftovers {
            if left.total() > 0 {
                out.push(format!(
                    "node{node}: left after the drain: {} IPv4 and {} IPv6 conntrack entries, {} orphaned backends, \
                     {} socket rev-NAT entries",
                    left.conntrack4, left.conntrack6, left.orphan_backends, left.sock_rev_nat
                ));
            }
        }
        for (node, first, last) in self.last_instance_rss() {
            #[expect(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "KiB"
            )]
            let limit = (first as f64 * (1.0 + RSS_GROWTH)) as u64 + RSS_SLACK_KIB;
            if last > limit {
                out.push(format!("node{node}: the last agent's RSS grew from {first} KiB to {last} KiB"));
            }
        }
        out
    }

    /// For each node: the last agent instance's first RSS sample after its warm-up and its last.
    #[must_use]
    pub fn last_instance_rss(&self) -> Vec<(u8, u64, u64)> {
        let mut out = Vec::new();
        for node in [1, 2] {
            let Some(last) = self.rss.iter().filter(|s| s.node == node).map(|s| s.instance).max() else { continue };
            let samples: Vec<&RssSample> = self.rss.iter().filter(|s| s.node == node && s.instance == last).collect();
            let Some(start) = samples.first().map(|s| s.at) else { continue };
            let settled: Vec<&&RssSample> = samples.iter().filter(|s| s.at >= start + RSS_WARMUP).collect();
            if let (Some(first), Some(end)) = (settled.first(), settled.last()) {
                out.push((node, first.kib, end.kib));
            }
        }
        out
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak: {:.0} s of traffic, churn seed {:#x}", self.duration.as_secs_f64(), self.seed)?;
        writeln!(f, "{:<12} {:<11} {:<24} {:>9} {:>7} {:>7}", "origin", "load", "target", "ok", "failed", "opened")?;
        for w in &self.workers {
            writeln!(
                f,
                "{:<12} {:<11} {:<24} {:>9} {:>7} {:>7}",
                w.origin,
                w.load,
                w.target.to_string(),
                w.ok,
                w.failed,
                if w.load == Load::Stream.to_string() { w.opened.to_string() } else { "-".into() }
            )?;
        }
        let (ok, failed): (u64, u64) = self.workers.iter().fold((0, 0), |(o, x), w| (o + w.ok, x + w.failed));
        writeln!(f, "total: {ok} ok, {failed} failed; {} endpoint changes", self.churn_steps)?;
        if let Some((from, to)) = self.migration {
            let during: u64 = self.workers.iter().map(|w| self.failed_in_migration(w)).sum();
            writeln!(
                f,
                "map migration of the first upgrade: {from:.2}s to {to:.2}s; failures in it (the program swap's \
                 window, docs/maps.md): {during}"
            )?;
        }
        let restarts: Vec<String> =
            self.restarts.iter().map(|(at, node, programs)| format!("{at:.0}s node{node} ({programs})")).collect();
        writeln!(f, "agent starts after the first: {}", restarts.join(", "))?;
        for node in [1u8, 2] {
            let mut per_instance: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
            for s in self.rss.iter().filter(|s| s.node == node) {
                let e = per_instance.entry(s.instance).or_insert((u64::MAX, 0));
                e.0 = e.0.min(s.kib);
                e.1 = e.1.max(s.kib);
            }
            let text: Vec<String> =
                per_instance.values().map(|(lo, hi)| format!("{}-{}", lo / 1024, hi / 1024)).collect();
            writeln!(f, "node{node} agent RSS MiB per instance (min-max): {}", text.join(" "))?;
        }
        for (node, first, last) in self.last_instance_rss() {
            writeln!(f, "node{node} last agent RSS after warm-up: {first} KiB -> {last} KiB at the end")?;
        }
        match self.drained_after {
            Some(d) => writeln!(f, "conntrack empty {:.0} s after the traffic stopped", d.as_secs_f64())?,
            None => writeln!(f, "conntrack not empty at the end of the drain")?,
        }
        for (node, left) in &self.leftovers {
            writeln!(
                f,
                "node{node} left: conntrack {} IPv4 + {} IPv6, orphaned backends {}, socket rev-NAT {} (and {} from \
                 before the last switch to this build's programs)",
                left.conntrack4, left.conntrack6, left.orphan_backends, left.sock_rev_nat, left.sock_rev_nat_before
            )?;
            for e in &left.examples {
                writeln!(f, "  {e}")?;
            }
        }
        for w in self.workers.iter().filter(|w| !w.failures.is_empty()) {
            writeln!(f, "failures of {} {} to {}:", w.origin, w.load, w.target)?;
            for (at, e) in &w.failures {
                writeln!(f, "  {at:7.2}s {e}")?;
            }
        }
        Ok(())
    }
}

/// State of one endpoint in the slices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpState {
    Ready,
    NotReady,
    Terminating,
    Gone,
}

/// The churned endpoints: (node, host) → state.
#[derive(Debug, Clone)]
struct Endpoints {
    states: Vec<(NodeId, u8, EpState)>,
    rng: u64,
}

impl Endpoints {
    fn new(seed: u64) -> Self {
        let states =
            NodeId::ALL.iter().flat_map(|&id| BACKEND_HOSTS.iter().map(move |&h| (id, h, EpState::Ready))).collect();
        Self { states, rng: seed | 1 }
    }

    /// xorshift64*.
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).unwrap_or(1)).unwrap_or(0)
    }

    /// One or two endpoints change state; each node keeps a ready one.
    fn step(&mut self) {
        const STATES: [EpState; 4] = [EpState::Ready, EpState::NotReady, EpState::Terminating, EpState::Gone];
        for _ in 0..=self.below(2) {
            let i = self.below(self.states.len());
            let s = STATES[self.below(STATES.len())];
            self.states[i].2 = s;
        }
        for id in NodeId::ALL {
            if !self.states.iter().any(|(n, _, s)| *n == id && *s == EpState::Ready) {
                let host = BACKEND_HOSTS[self.below(BACKEND_HOSTS.len())];
                if let Some(e) = self.states.iter_mut().find(|(n, h, _)| *n == id && *h == host) {
                    e.2 = EpState::Ready;
                }
            }
        }
    }

    /// The addresses of the terminating endpoints (both families).
    fn draining(&self) -> Vec<IpAddr> {
        self.states
            .iter()
            .filter(|(_, _, s)| *s == EpState::Terminating)
            .flat_map(|&(id, host, _)| [IpAddr::from(id.pod_ip(host)), IpAddr::from(id.pod_ip6(host))])
            .collect()
    }

    /// Both families' `EndpointSlices`.
    fn manifests(&self) -> String {
        let mut out = String::new();
        for v6 in [false, true] {
            let endpoints = self
                .states
                .iter()
                .filter(|(_, _, s)| *s != EpState::Gone)
                .map(|&(id, host, s)| {
                    let address: IpAddr = if v6 { id.pod_ip6(host).into() } else { id.pod_ip(host).into() };
                    Endpoint {
                        ready: s == EpState::Ready,
                        serving: matches!(s, EpState::Ready | EpState::Terminating),
                        terminating: s == EpState::Terminating,
                        ..Endpoint::ready(address, &id.k8s_name())
                    }
                })
                .collect();
            let slice = EndpointSlice {
                namespace: "default".into(),
                name: format!("soak-{}", if v6 { "v6" } else { "v4" }),
                service_name: "soak".into(),
                endpoints,
                ports: [Protocol::Tcp, Protocol::Udp]
                    .into_iter()
                    .map(|protocol| EndpointPort {
                        name: protocol.to_string().to_lowercase(),
                        protocol,
                        port: TARGET_PORT,
                    })
                    .collect(),
            };
            let _ = write!(out, "---\n{slice}");
        }
        out
    }
}

/// The Service (see the module doc).
fn service_manifest() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: soak, namespace: default}}\nspec:\n  type: NodePort\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {CLUSTER_IP}\n  \
         clusterIPs: [{CLUSTER_IP}, \"{CLUSTER_IP6}\"]\n  externalTrafficPolicy: Cluster\n  ports:\n  \
         - {{name: tcp, protocol: TCP, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}\n  \
         - {{name: udp, protocol: UDP, port: {SERVICE_PORT}, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}\n"
    )
}

/// The workers (see the module doc).
fn workers(cluster: &Cluster) -> Vec<WorkerSpec> {
    let mut out = Vec::new();
    let mut add = |origin: String, ns: &str, target: SocketAddr, loads: &[Load]| {
        for &load in loads {
            // The host's sockets: connected, as resolvers' are (see `sock_release`).
            let connected_udp = origin.starts_with("host");
            out.push(WorkerSpec { origin: origin.clone(), ns: ns.to_owned(), target, load, connected_udp });
        }
    };
    let all = [Load::Tcp, Load::Udp, Load::Stream];
    let v4 = SocketAddr::from((CLUSTER_IP, SERVICE_PORT));
    let v6 = SocketAddr::from((CLUSTER_IP6, SERVICE_PORT));
    for id in NodeId::ALL {
        let pod = cluster.pod(&client_name(id));
        add(format!("pod node{}", id.number()), pod.ns(), v4, &all);
        add(format!("pod node{}", id.number()), pod.ns(), v6, &all);
        let client = cluster.client_ns();
        add("client".into(), client, SocketAddr::from((id.ip(), NODE_PORT)), &all);
        add("client".into(), client, SocketAddr::from((id.ip6(), NODE_PORT)), &all);
    }
    let host = cluster.node(NodeId::ONE).ns();
    add("host node1".into(), host, v4, &all);
    add("host node1".into(), host, v6, &[Load::Tcp, Load::Stream]);
    out
}

fn client_name(id: NodeId) -> String {
    format!("client-{}", id.number())
}

/// Shared failure log of the run, for progress lines.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    verbose: bool,
}

impl Shared {
    fn at(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, or less if the run stops.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() && Instant::now() < until {
            thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

fn run_worker(spec: &WorkerSpec, shared: &Shared) -> WorkerReport {
    let mut report = WorkerReport {
        origin: spec.origin.clone(),
        target: spec.target,
        load: if spec.connected_udp && spec.load == Load::Udp { "UDP conn.".into() } else { spec.load.to_string() },
        ok: 0,
        failed: 0,
        opened: 0,
        failures: Vec::new(),
        failed_at: Vec::new(),
    };
    let fail = |report: &mut WorkerReport, e: &anyhow::Error| {
        report.failed += 1;
        let at = shared.at();
        report.failed_at.push(at);
        if shared.verbose {
            eprintln!("soak: {at:7.2}s {} {} to {}: {e:#}", spec.origin, spec.load, spec.target);
        }
        if report.failures.len() < KEPT_FAILURES {
            report.failures.push((at, format!("{e:#}")));
        }
    };
    let (ip, port) = (spec.target.ip(), spec.target.port());
    let mut n: u64 = 0;
    match spec.load {
        Load::Tcp | Load::Udp => {
            while !shared.stopped() {
                n += 1;
                let payload = message(n, 1024);
                let got = match spec.load {
                    Load::Tcp => client::tcp_request(ip, port, &payload, TIMEOUT),
                    _ if spec.connected_udp => connected_udp_request(spec.target, &payload),
                    _ => client::udp_request(ip, port, &payload, TIMEOUT),
                };
                match got.and_then(|(name, echo)| {
                    ensure!(
                        echo == payload,
                        "{name} echoed {} bytes that differ from the {} sent",
                        echo.len(),
                        payload.len()
                    );
                    Ok(())
                }) {
                    Ok(()) => report.ok += 1,
                    Err(e) => fail(&mut report, &e),
                }
                shared.pause(PACE);
            }
        }
        Load::Stream => {
            while !shared.stopped() {
                let mut session = match TcpSession::connect(ip, port, TIMEOUT) {
                    Ok(s) => s,
                    Err(e) => {
                        fail(&mut report, &e);
                        shared.pause(PACE);
                        continue;
                    }
                };
                report.opened += 1;
                while !shared.stopped() {
                    n += 1;
                    match session.echo(&message(n, 256)) {
                        Ok(()) => report.ok += 1,
                        Err(e) => {
                            fail(&mut report, &e.context(format!("stream to {} broke", session.server())));
                            break;
                        }
                    }
                    shared.pause(STREAM_PACE);
                }
            }
        }
    }
    report
}

/// A UDP request over a connected socket (a fresh one: a new flow): the reply must come back
/// through it.
fn connected_udp_request(to: SocketAddr, payload: &[u8]) -> Result<(String, Vec<u8>)> {
    let socket = std::net::UdpSocket::bind(client::unspecified(to.ip(), 0)).context("UDP bind")?;
    socket.connect(to).context("UDP connect")?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send(payload).context("send")?;
    let mut buf = vec![0; 65536];
    let n = socket.recv(&mut buf).context("no reply")?;
    let nl = buf[..n].iter().position(|&b| b == b'\n').context("no server name line")?;
    let name = String::from_utf8_lossy(&buf[..nl]).split(' ').next().unwrap_or_default().to_owned();
    Ok((name, buf[nl + 1..n].to_vec()))
}

/// `len` bytes that differ from one message to the next.
fn message(n: u64, len: usize) -> Vec<u8> {
    let mut out = format!("{n:016x}").into_bytes();
    out.extend((0..len.saturating_sub(16)).map(|i| u8::try_from((i as u64 + n) % 251).unwrap_or(0)));
    out
}

/// Reads an agent's resident set size.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Counts what node `dir`'s maps hold (see [`Leftovers`]); `draining` are the addresses of the
/// terminating endpoints.
fn leftovers(dir: &Path, draining: &[IpAddr], baseline: Option<&SockKeys>) -> Result<Leftovers> {
    let snapshot = rproxy_agent::bpf::dump::read(dir, true).with_context(|| format!("reading {}", dir.display()))?;
    let mut left = Leftovers::default();
    for (fam, view) in [(4, &snapshot.ipv4), (6, &snapshot.ipv6)] {
        let Some(view) = view else { continue };
        if fam == 4 {
            left.conntrack4 = view.conntrack_entries;
        } else {
            left.conntrack6 = view.conntrack_entries;
        }
        for b in view.backends.iter().filter(|b| b.in_no_slot && !draining.contains(&b.address.ip())) {
            left.orphan_backends += 1;
            left.examples.push(format!("orphaned backend {b:?}"));
        }
        for c in view.conntrack.iter().flatten().take(3) {
            left.examples.push(format!("{c:?}"));
        }
    }
    let now = SockKeys::read(dir)?;
    let before = baseline.unwrap_or(&EMPTY_KEYS);
    left.sock_rev_nat_before = now.v4.intersection(&before.v4).count() + now.v6.intersection(&before.v6).count();
    left.sock_rev_nat = now.v4.len() + now.v6.len() - left.sock_rev_nat_before;
    Ok(left)
}

/// The keys of a node's socket reverse-NAT maps.
#[derive(Debug, Default)]
struct SockKeys {
    v4: HashSet<SockRevKey4>,
    v6: HashSet<SockRevKey6>,
}

static EMPTY_KEYS: std::sync::LazyLock<SockKeys> = std::sync::LazyLock::new(SockKeys::default);

impl SockKeys {
    fn read(dir: &Path) -> Result<Self> {
        Ok(Self {
            v4: keys::<SockRevKey4, RevNat4>(&dir.join(map_names::SOCK_REV_NAT4))?.into_iter().collect(),
            v6: keys::<SockRevKey6, RevNat6>(&dir.join(map_names::SOCK_REV_NAT6))?.into_iter().collect(),
        })
    }
}

fn keys<K: aya::Pod, V: aya::Pod>(pin: &Path) -> Result<Vec<K>> {
    let data = MapData::from_pin(pin).with_context(|| format!("opening {}", pin.display()))?;
    let map = BpfHashMap::<_, K, V>::try_from(aya::maps::Map::LruHashMap(data))
        .with_context(|| format!("{} as a hash map", pin.display()))?;
    Ok(map.keys().filter_map(Result::ok).collect())
}

/// The agents' arguments for the programs of `object` (`None`: this build's).
fn agent_args(object: Option<&Path>) -> Vec<String> {
    let mut args = vec!["--devices".to_owned(), "eth0".to_owned()];
    if let Some(o) = object {
        args.extend(["--ebpf-object".to_owned(), o.display().to_string()]);
    }
    args
}

/// Which programs the agents run after restart `i` (1-based) of the schedule in the module doc.
fn programs_after(restart: u32, previous: bool, current: bool) -> bool {
    if !previous {
        return current;
    }
    match restart {
        3 | 8 => false,
        6 => true,
        _ => current,
    }
}

/// Starts node `id`'s agent and waits for its `agent running` line.
fn start_agent(cluster: &mut Cluster, id: NodeId, opts: &Options, dir: &Path, previous: bool) -> Result<()> {
    let object = if previous { opts.previous_object.as_deref() } else { None };
    let args = agent_args(object);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = cluster.node_mut(id);
    node.start_agent(&opts.agent_bin, dir, &args)?;
    let started = Instant::now();
    while !node.agent_log().contains(RUNNING_LINE) {
        node.ensure_agent_running()?;
        ensure!(started.elapsed() < START_TIMEOUT, "node{}'s agent not running after {START_TIMEOUT:?}", id.number());
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Copies node `id`'s agent log to the log dir as instance `instance`'s.
fn keep_log(cluster: &Cluster, id: NodeId, instance: u32, opts: &Options) {
    if let (Some(dir), Some(log)) = (&opts.log_dir, cluster.node(id).agent_log_path()) {
        let _ = std::fs::create_dir_all(dir);
        let _ = std::fs::copy(log, dir.join(format!("agent-node{}-{instance}.log", id.number())));
    }
}

/// Builds the lab, runs the soak (see the module doc) and reports. Fails only when the lab
/// cannot be built or an agent dies; failures of the traffic are in the report.
pub fn run(opts: &Options) -> Result<Report> {
    let mut cluster = Cluster::new()?;
    for id in NodeId::ALL {
        for host in BACKEND_HOSTS {
            let name = format!("be-{}-{host}", id.number());
            cluster.add_pod_dual(id, &name, id.pod_ip(host), id.pod_ip6(host))?.serve(TARGET_PORT)?;
        }
        cluster.add_pod_dual(id, &client_name(id), id.pod_ip(CLIENT_HOST), id.pod_ip6(CLIENT_HOST))?;
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("service.yaml"), service_manifest())?;
    let mut endpoints = Endpoints::new(opts.seed);
    write_atomic(&dir.path().join("slices.yaml"), &endpoints.manifests())?;

    let mut previous = opts.previous_object.is_some();
    for id in NodeId::ALL {
        start_agent(&mut cluster, id, opts, dir.path(), previous)?;
    }
    // Both NodePorts and the ClusterIP answer before the traffic starts.
    let ready_by = Instant::now() + Duration::from_secs(20);
    for target in [SocketAddr::from((NodeId::ONE.ip(), NODE_PORT)), SocketAddr::from((NodeId::TWO.ip(), NODE_PORT))] {
        while cluster.in_client(|| client::tcp_request(target.ip(), target.port(), b"hello", TIMEOUT))?.is_err() {
            ensure!(Instant::now() < ready_by, "{target} never answered");
            thread::sleep(Duration::from_millis(100));
        }
    }

    let shared = Arc::new(Shared { start: Instant::now(), stop: AtomicBool::new(false), verbose: opts.verbose });
    let handles: Vec<JoinHandle<Result<WorkerReport>>> = workers(&cluster)
        .into_iter()
        .map(|spec| {
            let shared = shared.clone();
            thread::spawn(move || in_netns(&spec.ns.clone(), || run_worker(&spec, &shared)))
        })
        .collect();
    let churn_steps = Arc::new(Mutex::new(0u64));
    let churn = {
        let (shared, steps, path, every) =
            (shared.clone(), churn_steps.clone(), dir.path().join("slices.yaml"), opts.churn_every);
        thread::spawn(move || -> Result<Endpoints> {
            while !shared.stopped() {
                shared.pause(every);
                endpoints.step();
                write_atomic(&path, &endpoints.manifests())?;
                *steps.lock().unwrap_or_else(PoisonError::into_inner) += 1;
            }
            Ok(endpoints)
        })
    };

    let mut report = Report { duration: opts.duration, seed: opts.seed, ..Report::default() };
    let mut baselines = BTreeMap::new();
    let outcome = drive(&mut cluster, opts, dir.path(), &shared, &mut previous, &mut report, &mut baselines);
    shared.stop.store(true, Ordering::Relaxed);
    for h in handles {
        report.workers.push(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?);
    }
    let endpoints = churn.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
    let draining = endpoints.draining();
    report.churn_steps = *churn_steps.lock().unwrap_or_else(PoisonError::into_inner);
    outcome?;
    let stopped = Instant::now();
    if opts.verbose {
        eprintln!("soak: traffic stopped; waiting for the conntrack tables to empty");
    }
    // The longest lifetime of an idle flow (UDP, unanswered SYN), then two GC passes.
    let drain = Duration::from_nanos(CtState::Datagram.lifetime_ns()) + 2 * GC_INTERVAL + Duration::from_secs(5);
    loop {
        cluster.ensure_agents_running()?;
        sample_rss(&cluster, &shared, &mut report);
        let mut left = BTreeMap::new();
        for id in NodeId::ALL {
            left.insert(id.number(), leftovers(cluster.node(id).pin_dir(), &draining, baselines.get(&id.number()))?);
        }
        let empty = left.values().all(|l| l.total() == 0);
        report.leftovers = left;
        if empty {
            report.drained_after = Some(stopped.elapsed());
            break;
        }
        if stopped.elapsed() > drain {
            break;
        }
        thread::sleep(Duration::from_secs(2));
    }
    for id in NodeId::ALL {
        keep_log(&cluster, id, instance_of(&report, id.number()), opts);
    }
    Ok(report)
}

fn instance_of(report: &Report, node: u8) -> u32 {
    u32::try_from(report.restarts.iter().filter(|(_, n, _)| *n == node).count()).unwrap_or(u32::MAX)
}

fn sample_rss(cluster: &Cluster, shared: &Shared, report: &mut Report) {
    for id in NodeId::ALL {
        if let Some(kib) = cluster.node(id).agent_pid().and_then(rss_kib) {
            let instance = instance_of(report, id.number());
            report.rss.push(RssSample { at: shared.start.elapsed(), node: id.number(), instance, kib });
        }
    }
}

/// The main loop while traffic runs: RSS samples every second, the restarts on schedule.
fn drive(
    cluster: &mut Cluster,
    opts: &Options,
    dir: &Path,
    shared: &Shared,
    previous: &mut bool,
    report: &mut Report,
    baselines: &mut BTreeMap<u8, SockKeys>,
) -> Result<()> {
    let restart_at = |i: u32| opts.duration.mul_f64(0.7 * f64::from(i) / f64::from(opts.restarts.max(1)));
    let mut done = 0;
    let mut next_sample = Instant::now();
    while shared.start.elapsed() < opts.duration {
        cluster.ensure_agents_running()?;
        if Instant::now() >= next_sample {
            sample_rss(cluster, shared, report);
            next_sample += Duration::from_secs(1);
        }
        if done < opts.restarts && shared.start.elapsed() >= restart_at(done + 1) {
            done += 1;
            let next = programs_after(done, opts.previous_object.is_some(), *previous);
            let label = if next { "previous" } else { "this" };
            if opts.verbose {
                let change = match (*previous, next) {
                    (true, false) => " (upgrade)",
                    (false, true) => " (downgrade)",
                    _ => "",
                };
                eprintln!("soak: {:7.2}s restart {done}: programs of {label} build{change}", shared.at());
            }
            // The first switch from the previous release's programs migrates the maps; later ones
            // find BTF maps already.
            let migrating = *previous && !next && report.migration.is_none();
            let from = shared.at();
            for id in NodeId::ALL {
                let instance = instance_of(report, id.number());
                cluster.node_mut(id).stop_agent()?;
                keep_log(cluster, id, instance, opts);
                start_agent(cluster, id, opts, dir, next)?;
                report.restarts.push((shared.at(), id.number(), label));
                if *previous && !next {
                    baselines.insert(id.number(), SockKeys::read(cluster.node(id).pin_dir())?);
                }
            }
            if migrating {
                report.migration = Some((from, shared.at()));
            }
            *previous = next;
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn churn_keeps_a_ready_endpoint_on_each_node_and_changes_something() {
        let mut e = Endpoints::new(7);
        let mut changed = 0;
        for _ in 0..1000 {
            let before = e.states.clone();
            e.step();
            changed += usize::from(before != e.states);
            for id in NodeId::ALL {
                assert!(e.states.iter().any(|(n, _, s)| *n == id && *s == EpState::Ready));
            }
        }
        assert!(changed > 500, "only {changed} of 1000 steps changed a state");
        for s in [EpState::NotReady, EpState::Terminating, EpState::Gone] {
            let mut e = Endpoints::new(11);
            assert!((0..200).any(|_| {
                e.step();
                e.states.iter().any(|(_, _, x)| *x == s)
            }));
        }
    }

    #[test]
    fn slices_hold_the_states() {
        let mut e = Endpoints::new(1);
        e.states[0].2 = EpState::Gone;
        e.states[1].2 = EpState::NotReady;
        e.states[2].2 = EpState::Terminating;
        let text = e.manifests();
        assert_eq!(text.matches("kind: EndpointSlice").count(), 2);
        assert!(!text.contains("10.244.1.11"), "a gone endpoint is left out:\n{text}");
        assert!(text.contains("- 10.244.1.12\n  conditions:\n    ready: false\n    serving: false"), "{text}");
        assert!(
            text.contains("- 10.244.1.13\n  conditions:\n    ready: false\n    serving: true\n    terminating: true")
        );
        assert!(text.contains("addressType: IPv6"));
    }

    #[test]
    fn upgrades_and_downgrades_follow_the_schedule() {
        let mut on_previous = true;
        let mut seen = Vec::new();
        for i in 1..=10 {
            on_previous = programs_after(i, true, on_previous);
            seen.push(on_previous);
        }
        assert_eq!(seen, [true, true, false, false, false, true, true, false, false, false]);
        assert!(!(1..=10).any(|i| programs_after(i, false, false)));
    }

    #[test]
    fn rss_flatness_uses_the_last_instance_after_its_warm_up() {
        let s = |at: u64, instance: u32, kib: u64| RssSample { at: Duration::from_secs(at), node: 1, instance, kib };
        let report = Report {
            rss: vec![
                s(0, 0, 50_000),
                s(5, 0, 90_000),
                s(10, 1, 20_000),
                s(15, 1, 30_000),
                s(20, 1, 31_000),
                s(40, 1, 40_000),
            ],
            ..Report::default()
        };
        assert_eq!(report.last_instance_rss(), [(1, 31_000, 40_000)]);
        assert_eq!(report.problems().len(), 1, "{:?}", report.problems());
    }

    #[test]
    fn failures_in_the_migration_window_are_reported_apart() {
        let worker = |failed_at: Vec<f64>| WorkerReport {
            origin: "pod node1".into(),
            target: SocketAddr::from(([10, 96, 0, 30], 80)),
            load: "UDP".into(),
            ok: 10,
            failed: failed_at.len() as u64,
            opened: 0,
            failures: Vec::new(),
            failed_at,
        };
        // The swap ran from 25 s to 29 s; a failure is seen up to a timeout (3 s) later.
        let report = Report {
            workers: vec![worker(vec![28.9]), worker(vec![31.5, 40.0])],
            migration: Some((25.0, 29.0)),
            ..Report::default()
        };
        assert_eq!(report.failed_in_migration(&report.workers[0]), 1);
        assert_eq!(report.failed_in_migration(&report.workers[1]), 1);
        assert_eq!(report.problems(), ["pod node1 UDP to 10.96.0.30:80: 1 failed"]);
        assert!(report.to_string().contains("failures in it (the program swap's window, docs/maps.md): 2"));
        // Without a migration every failure counts.
        let report = Report { migration: None, ..report };
        assert_eq!(report.problems().len(), 2);
    }
}
