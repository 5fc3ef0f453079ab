//! The east-west `ClusterIP` scale scenario of `cargo xtask bench-clusterip`
//! (`tests/examples/clusterip-bench.rs`), and its client.
//!
//! **Scenario** ([`Scenario`]): one node ([`crate::Lab`]) with three backend pods ([`BACKENDS`],
//! port [`TARGET_PORT`]) and a client pod ([`CLIENT`]). The measured Service `default/measured`
//! has cluster IP [`CLUSTER_IP`], TCP port [`PORT`] (named `http`) and every backend as an
//! endpoint. `services - 1` filler Services `default/filler-NNNNN` have distinct cluster IPs from
//! [`FIRST_FILLER_IP`] up in the service CIDR 10.96.0.0/16, the same port, and one endpoint
//! each: a backend, round-robin. Every address is in the cluster CIDR 10.244.0.0/16 ([`CONFIG`]),
//! so kube-proxy's rules do not masquerade. The measured Service's place in kube-proxy's
//! `KUBE-SERVICES` chain is chosen ([`Position`]): kube-proxy writes the chain in the order of a
//! Go map, which changes from sync to sync, so a Service sits anywhere; the benchmark puts it
//! last by default, iptables' worst case.
//!
//! **Client** ([`run_connections`]): threads in the client pod each take a fresh source address
//! and port ([`FreshTuples`]), connect to the target, send [`REQUEST`], read the backend's name to
//! EOF and close, timing each `connect()`: a blocking connect returns when the SYN-ACK has come
//! back, so its duration is the first packet's round trip through the datapath (SYN and SYN-ACK)
//! plus two system calls' worth of the client's own work. No source tuple is ever used twice in a
//! lab, so neither the node's conntrack, nor rproxy's, nor a backend's `TIME_WAIT` socket ever
//! sees a connection's 4-tuple again: every connection is a new flow. The backend
//! ([`crate::load::LoadServer`]) closes first, so the client never holds `TIME_WAIT`; its sockets
//! still set `SO_REUSEADDR`, so that a `bind()` never fails on a socket of an earlier connection
//! still closing.
use std::{
    collections::BTreeMap,
    fmt,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    ops::RangeInclusive,
    os::fd::{AsRawFd as _, OwnedFd},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::{
    socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt},
    time::TimeVal,
};

use crate::{
    kube_proxy::{self, ClusterIpConfig, Frontend, Ipv4Cidr},
    load::REQUEST,
    manifest::{Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServicePort, multi_document, write_atomic},
    netns::in_netns,
};

/// Kubernetes node name of the lab's node (`--node-name`, endpoints' `nodeName`).
pub const NODE_NAME: &str = "clusterip-node";
/// Kubernetes namespace of every object.
pub const NAMESPACE: &str = "default";
/// The measured Service's name.
pub const MEASURED: &str = "measured";
/// The measured Service's cluster IP.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// Every Service's port (TCP).
pub const PORT: u16 = 80;
/// Every Service port's name.
pub const PORT_NAME: &str = "http";
/// The backends' port.
pub const TARGET_PORT: u16 = 8080;
/// The first filler Service's cluster IP; filler `i` has the `i`-th address from it.
pub const FIRST_FILLER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 0);
/// kube-proxy's `--cluster-cidr` and the service CIDR.
pub const CONFIG: ClusterIpConfig = ClusterIpConfig {
    cluster_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 244, 0, 0), 16),
    service_cidr: Ipv4Cidr::new(Ipv4Addr::new(10, 96, 0, 0), 16),
};
/// The most Services a scenario has (fillers stay inside the service CIDR; rproxy takes 65,535
/// frontends).
pub const MAX_SERVICES: usize = 60_000;
/// Backend pods: name and address.
pub const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("backend-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("backend-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("backend-c", Ipv4Addr::new(10, 244, 1, 13)),
];
/// The client pod: name and (first) address; [`client_addresses`] gives it more.
pub const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 100));
/// The most addresses the client takes.
pub const MAX_CLIENT_ADDRESSES: u8 = 150;
/// Services per manifest file.
const SERVICES_PER_FILE: usize = 1000;

/// `n` client addresses (at most [`MAX_CLIENT_ADDRESSES`]): [`CLIENT`]'s, then the next ones up.
#[must_use]
pub fn client_addresses(n: u8) -> Vec<Ipv4Addr> {
    let first = CLIENT.1.to_bits();
    (0..u32::from(n.min(MAX_CLIENT_ADDRESSES))).map(|i| Ipv4Addr::from_bits(first + i)).collect()
}

/// Where the measured Service's rule sits among the Services' rules in `KUBE-SERVICES`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    First,
    Middle,
    Last,
}

impl Position {
    const ALL: [Self; 3] = [Self::First, Self::Middle, Self::Last];

    /// `first`, `middle` or `last`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::First => "first",
            Self::Middle => "middle",
            Self::Last => "last",
        }
    }

    /// From [`Position::name`].
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .with_context(|| format!("unknown position {s:?} (known: first, middle, last)"))
    }
}

/// A scenario: `services` Services in all, the measured one at `position` (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scenario {
    services: usize,
    position: Position,
}

impl Scenario {
    /// 1 to [`MAX_SERVICES`] Services.
    pub fn new(services: usize, position: Position) -> Result<Self> {
        ensure!((1..=MAX_SERVICES).contains(&services), "{services} Services: 1 to {MAX_SERVICES} are possible");
        Ok(Self { services, position })
    }

    /// Services in all, the measured one included.
    #[must_use]
    pub fn services(self) -> usize {
        self.services
    }

    /// The measured Service's place.
    #[must_use]
    pub fn position(self) -> Position {
        self.position
    }

    /// The measured Service's index among the Services' rules (0-based).
    #[must_use]
    pub fn measured_index(self) -> usize {
        match self.position {
            Position::First => 0,
            Position::Middle => self.services / 2,
            Position::Last => self.services - 1,
        }
    }

    /// Filler `i`'s cluster IP (`None` past the service CIDR).
    #[must_use]
    pub fn filler_ip(i: usize) -> Option<Ipv4Addr> {
        let ip = Ipv4Addr::from_bits(FIRST_FILLER_IP.to_bits().checked_add(u32::try_from(i).ok()?)?);
        CONFIG.service_cidr.contains(ip).then_some(ip)
    }

    /// Every Service with its `EndpointSlice`, in `KUBE-SERVICES` order.
    pub fn objects(self) -> Result<Vec<(Service, EndpointSlice)>> {
        let measured = self.measured_index();
        let mut objects = Vec::with_capacity(self.services);
        for filler in 0..self.services - 1 {
            if objects.len() == measured {
                objects.push(measured_objects());
            }
            let ip =
                Self::filler_ip(filler).with_context(|| format!("filler {filler} is past {}", CONFIG.service_cidr))?;
            let backend = BACKENDS[filler % BACKENDS.len()].1;
            objects.push(service_objects(&format!("filler-{filler:05}"), ip, &[backend]));
        }
        if objects.len() == measured {
            objects.push(measured_objects());
        }
        Ok(objects)
    }

    /// The Services' frontends for the kube-proxy baselines, in `KUBE-SERVICES` order.
    pub fn frontends(self) -> Result<Vec<Frontend>> {
        let mut all = Vec::with_capacity(self.services);
        for (service, slice) in self.objects()? {
            all.extend(kube_proxy::cluster_ip_frontends(&service, &slice)?);
        }
        Ok(all)
    }

    /// Writes every Service and `EndpointSlice` to `dir`, [`SERVICES_PER_FILE`] Services per
    /// file (`services-NNN.yaml`). Returns the number of files.
    pub fn write_manifests(self, dir: &Path) -> Result<usize> {
        let objects = self.objects()?;
        let mut files = 0;
        for (i, chunk) in objects.chunks(SERVICES_PER_FILE).enumerate() {
            let docs: Vec<&dyn fmt::Display> =
                chunk.iter().flat_map(|(s, e)| [s as &dyn fmt::Display, e as &dyn fmt::Display]).collect();
            write_atomic(&dir.join(format!("services-{i:03}.yaml")), &multi_document(&docs))?;
            files += 1;
        }
        Ok(files)
    }
}

/// The measured Service and its slice (every backend).
fn measured_objects() -> (Service, EndpointSlice) {
    service_objects(MEASURED, CLUSTER_IP, &BACKENDS.map(|b| b.1))
}

/// Service `name` on `cluster_ip`:[`PORT`] → [`TARGET_PORT`] of `endpoints`, all ready.
fn service_objects(name: &str, cluster_ip: Ipv4Addr, endpoints: &[Ipv4Addr]) -> (Service, EndpointSlice) {
    let service = Service {
        namespace: NAMESPACE.into(),
        name: name.into(),
        cluster_ip,
        ports: vec![ServicePort {
            name: PORT_NAME.into(),
            protocol: Protocol::Tcp,
            port: PORT,
            target_port: TARGET_PORT.into(),
        }],
    };
    let slice = EndpointSlice {
        namespace: NAMESPACE.into(),
        name: format!("{name}-1"),
        service_name: name.into(),
        endpoints: endpoints.iter().map(|&ip| Endpoint::ready(ip, NODE_NAME)).collect(),
        ports: vec![EndpointPort { name: PORT_NAME.into(), protocol: Protocol::Tcp, port: TARGET_PORT }],
    };
    (service, slice)
}

/// Source tuples (address, port) handed out once each, from any thread: the `k`-th is port
/// `first + k / addresses` of address `k % addresses` (consecutive connections change address).
#[derive(Debug)]
pub struct FreshTuples {
    addrs: Vec<Ipv4Addr>,
    first_port: u16,
    ports: u64,
    next: AtomicU64,
}

impl FreshTuples {
    /// Every pair of `addrs` and `ports`.
    pub fn new(addrs: Vec<Ipv4Addr>, ports: RangeInclusive<u16>) -> Result<Self> {
        ensure!(!addrs.is_empty() && !ports.is_empty(), "no source addresses or no ports");
        let (first_port, last_port) = ports.into_inner();
        ensure!(first_port > 0, "port 0 is not a source port");
        Ok(Self { addrs, first_port, ports: u64::from(last_port - first_port) + 1, next: AtomicU64::new(0) })
    }

    /// A tuple never handed out before, or `None` once all have been.
    pub fn take(&self) -> Option<SocketAddrV4> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.addrs.len() as u64;
        if k >= n * self.ports {
            return None;
        }
        let addr = self.addrs[usize::try_from(k % n).ok()?];
        let port = self.first_port.checked_add(u16::try_from(k / n).ok()?)?;
        Some(SocketAddrV4::new(addr, port))
    }

    /// How many tuples there are.
    #[must_use]
    pub fn capacity(&self) -> u64 {
        self.addrs.len() as u64 * self.ports
    }

    /// How many have been handed out (or asked for past the end).
    #[must_use]
    pub fn used(&self) -> u64 {
        self.next.load(Ordering::Relaxed).min(self.capacity())
    }
}

/// When a [`run_connections`] run stops: after `duration`, or once each worker has made
/// `per_worker` connections (`None`: no count limit).
#[derive(Clone, Copy, Debug)]
pub struct Limit {
    pub duration: Duration,
    pub per_worker: Option<u64>,
}

/// Outcome of [`run_connections`].
#[derive(Clone, Debug, Default)]
pub struct ConnRun {
    /// Connections that got a backend's name back.
    pub ok: u64,
    /// Connections that failed (bind, connect, write, read, or no name).
    pub failed: u64,
    /// From the start of the first worker to the end of the last.
    pub elapsed: Duration,
    /// `connect()` durations of the successful connections, in nanoseconds, sorted.
    pub connect_ns: Vec<u32>,
    /// Successful connections per backend name.
    pub by_server: BTreeMap<String, u64>,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// The source tuples ran out before the limit.
    pub exhausted: bool,
}

impl ConnRun {
    /// Adds `other`'s counts, times and durations to this run's (a run made in slices: `elapsed`
    /// becomes the sum of the slices').
    pub fn absorb(&mut self, other: Self) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.elapsed += other.elapsed;
        self.connect_ns.extend(other.connect_ns);
        self.connect_ns.sort_unstable();
        for (name, n) in other.by_server {
            *self.by_server.entry(name).or_default() += n;
        }
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.exhausted |= other.exhausted;
    }

    /// Successful connections per second.
    #[must_use]
    pub fn per_second(&self) -> f64 {
        crate::load::rate(self.ok, self.elapsed)
    }

    /// The `p`-th percentile (0 to 100, nearest rank) of the connect durations.
    #[must_use]
    pub fn connect_percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.connect_ns, p).map(|ns| Duration::from_nanos(u64::from(ns)))
    }
}

/// The `p`-th percentile (nearest rank; `p` clamped to 0..=100) of `sorted` (`None` if empty).
#[must_use]
pub fn percentile(sorted: &[u32], p: f64) -> Option<u32> {
    let last = sorted.len().checked_sub(1)?;
    // ceil(p/100 · n) - 1, within 0..=last; lengths stay far below 2^52.
    #[expect(clippy::cast_precision_loss, reason = "lengths are far below 2^52")]
    let rank = (p.clamp(0.0, 100.0) / 100.0 * sorted.len() as f64).ceil();
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "0 ≤ rank ≤ len, a whole number")]
    let index = (rank as usize).saturating_sub(1).min(last);
    sorted.get(index).copied()
}

/// From namespace `ns`, `workers` threads each take a tuple from `tuples` and make one connection
/// from it ([`exchange_from`]), worker `w`'s `k`-th to `targets[(w + k) % len]`, until `limit`
/// or the tuples run out. Every socket operation times out after `timeout`.
pub fn run_connections(
    ns: &str,
    tuples: &FreshTuples,
    targets: &[SocketAddrV4],
    workers: usize,
    limit: Limit,
    timeout: Duration,
) -> Result<ConnRun> {
    ensure!(!targets.is_empty() && workers > 0, "no targets or no workers");
    let results: Vec<Result<(ConnRun, Instant, Instant)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    in_netns(ns, || {
                        let start = Instant::now();
                        let mut r = ConnRun::default();
                        let mut k = w;
                        let mut made = 0u64;
                        while start.elapsed() < limit.duration && limit.per_worker.is_none_or(|n| made < n) {
                            let Some(source) = tuples.take() else {
                                r.exhausted = true;
                                break;
                            };
                            let target = targets[k % targets.len()];
                            k += 1;
                            made += 1;
                            match exchange_from(source, target, timeout) {
                                Ok((name, connect)) => {
                                    r.ok += 1;
                                    r.connect_ns.push(u32::try_from(connect.as_nanos()).unwrap_or(u32::MAX));
                                    *r.by_server.entry(name).or_default() += 1;
                                }
                                Err(e) => {
                                    r.failed += 1;
                                    r.first_error.get_or_insert_with(|| format!("{source} → {target}: {e:#}"));
                                }
                            }
                        }
                        (r, start, Instant::now())
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut total = ConnRun::default();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for result in results {
        let (r, start, end) = result?;
        total.ok += r.ok;
        total.failed += r.failed;
        total.connect_ns.extend(r.connect_ns);
        for (name, n) in r.by_server {
            *total.by_server.entry(name).or_default() += n;
        }
        total.first_error = total.first_error.or(r.first_error);
        total.exhausted |= r.exhausted;
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |l| l.max(end)));
    }
    total.connect_ns.sort_unstable();
    total.elapsed = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
    Ok(total)
}

/// One connection from `source` (bound with `SO_REUSEADDR`) to `target`: connect, send
/// [`REQUEST`], read to EOF, close. Returns the backend's name and how long `connect()` took.
/// Must run in the namespace that has `source`.
pub fn exchange_from(source: SocketAddrV4, target: SocketAddrV4, timeout: Duration) -> Result<(String, Duration)> {
    let fd: OwnedFd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    // A blocking connect() gives up after the send timeout.
    let limit = TimeVal::new(i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX), i64::from(timeout.subsec_micros()));
    setsockopt(&fd, sockopt::SendTimeout, &limit).context("SO_SNDTIMEO")?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(source)).context("bind")?;
    let started = Instant::now();
    connect(fd.as_raw_fd(), &SockaddrIn::from(target)).context("connect")?;
    let connect_time = started.elapsed();
    let mut stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(REQUEST).context("write")?;
    let mut answer = Vec::with_capacity(64);
    stream.read_to_end(&mut answer).context("read")?;
    let Some(line) = answer.strip_suffix(b"\n") else { bail!("no newline-terminated answer: {answer:?}") };
    ensure!(!line.is_empty() && !line.contains(&b'\n'), "answer {answer:?} is not one name");
    Ok((String::from_utf8(line.to_vec()).context("name is not UTF-8")?, connect_time))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measured_service_sits_where_asked_and_every_cluster_ip_is_distinct() {
        for (position, index) in [(Position::First, 0), (Position::Middle, 500), (Position::Last, 999)] {
            let scenario = Scenario::new(1000, position).expect("scenario");
            let objects = scenario.objects().expect("objects");
            assert_eq!(objects.len(), 1000);
            assert_eq!(objects[index].0.name, MEASURED);
            assert_eq!(objects[index].0.cluster_ip, CLUSTER_IP);
            assert_eq!(objects[index].1.endpoints.len(), BACKENDS.len());
            let ips: std::collections::BTreeSet<Ipv4Addr> = objects.iter().map(|(s, _)| s.cluster_ip).collect();
            assert_eq!(ips.len(), 1000);
            assert!(ips.iter().all(|&ip| CONFIG.service_cidr.contains(ip)));
            let fillers: Vec<_> = objects.iter().filter(|(s, _)| s.name != MEASURED).collect();
            assert!(fillers.iter().all(|(_, slice)| slice.endpoints.len() == 1));
        }
        let one = Scenario::new(1, Position::Middle).expect("one");
        assert_eq!(one.objects().expect("objects")[0].0.name, MEASURED);
    }

    #[test]
    fn scenarios_stay_inside_the_service_cidr() {
        assert!(Scenario::new(0, Position::Last).is_err());
        assert!(Scenario::new(MAX_SERVICES + 1, Position::Last).is_err());
        let objects = Scenario::new(MAX_SERVICES, Position::Last).expect("largest").objects().expect("objects");
        assert_eq!(objects.len(), MAX_SERVICES);
        assert_eq!(Scenario::filler_ip(0), Some(FIRST_FILLER_IP));
        assert_eq!(Scenario::filler_ip(65_280), None, "10.97.0.0 is past 10.96.0.0/16");
        assert_eq!(Scenario::filler_ip(65_279), Some(Ipv4Addr::new(10, 96, 255, 255)));
    }

    #[test]
    fn frontends_follow_the_rule_order() {
        let scenario = Scenario::new(5, Position::Middle).expect("scenario");
        let frontends = scenario.frontends().expect("frontends");
        assert_eq!(frontends.len(), 5);
        assert_eq!(frontends[2].service, MEASURED);
        assert_eq!(frontends[2].endpoints.len(), 3);
        assert_eq!(frontends[0].endpoints, [SocketAddrV4::new(BACKENDS[0].1, TARGET_PORT)]);
        assert_eq!(frontends[1].endpoints, [SocketAddrV4::new(BACKENDS[1].1, TARGET_PORT)]);
    }

    #[test]
    fn manifests_are_written_a_thousand_services_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Scenario::new(2500, Position::Last).expect("scenario").write_manifests(dir.path()).expect("write");
        assert_eq!(files, 3);
        let text = std::fs::read_to_string(dir.path().join("services-002.yaml")).expect("read");
        assert_eq!(text.matches("kind: Service\n").count(), 500);
        assert_eq!(text.matches("kind: EndpointSlice\n").count(), 500);
        assert!(text.contains(&format!("name: {MEASURED}\n")), "the last file has the measured Service");
    }

    #[test]
    fn fresh_tuples_never_repeat_and_run_out() {
        let tuples = FreshTuples::new(client_addresses(3), 1000..=1003).expect("tuples");
        assert_eq!(tuples.capacity(), 12);
        let taken: Vec<SocketAddrV4> = std::iter::from_fn(|| tuples.take()).collect();
        assert_eq!(taken.len(), 12);
        let distinct: std::collections::BTreeSet<_> = taken.iter().collect();
        assert_eq!(distinct.len(), 12);
        assert_eq!(taken[0], SocketAddrV4::new(CLIENT.1, 1000));
        assert_eq!(taken[1], SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 101), 1000), "addresses first");
        assert_eq!(taken[11], SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 102), 1003));
        assert_eq!(tuples.take(), None);
        assert_eq!(tuples.used(), 12);
        assert!(FreshTuples::new(Vec::new(), 1..=2).is_err());
        assert!(FreshTuples::new(client_addresses(1), 0..=2).is_err());
        assert_eq!(client_addresses(200).len(), usize::from(MAX_CLIENT_ADDRESSES));
    }

    #[test]
    fn absorbed_runs_add_up() {
        let run = |ok, ns: Vec<u32>, secs| ConnRun {
            ok,
            failed: 1,
            elapsed: Duration::from_secs(secs),
            connect_ns: ns,
            by_server: BTreeMap::from([("backend-a".to_owned(), ok)]),
            first_error: Some(format!("error {ok}")),
            exhausted: false,
        };
        let mut total = ConnRun::default();
        total.absorb(run(3, vec![5, 9, 20], 1));
        total.absorb(run(2, vec![1, 7], 3));
        assert_eq!((total.ok, total.failed, total.elapsed), (5, 2, Duration::from_secs(4)));
        assert_eq!(total.connect_ns, [1, 5, 7, 9, 20]);
        assert_eq!(total.by_server["backend-a"], 5);
        assert_eq!(total.first_error.as_deref(), Some("error 3"));
        assert!((total.per_second() - 1.25).abs() < 1e-9);
        assert_eq!(total.connect_percentile(50.0), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&values, 50.0), Some(50));
        assert_eq!(percentile(&values, 99.0), Some(99));
        assert_eq!(percentile(&values, 100.0), Some(100));
        assert_eq!(percentile(&values, 0.0), Some(1));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }
}
