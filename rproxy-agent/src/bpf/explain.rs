//! `rproxy-agent explain`: what the datapath would do with one packet, from the live maps,
//! without touching them. It follows the service decision of the programs (`rproxy-ebpf`'s
//! `lb::decide`, which every hook shares): conntrack first (a flow of the same origin whose
//! frontend and backend still exist is translated as it was), then the frontend (slot 0 of the
//! service map), whether this origin reaches it, `loadBalancerSourceRanges`, the traffic policy
//! (the local slots under `externalTrafficPolicy: Local` from outside), session affinity, and
//! the backend slots a new flow picks from. Where the programs pick at random, it lists every
//! candidate. Map lookups only: no conntrack, affinity, SNAT or counter write.
//!
//! [`explain`] is pure over a [`View`] of the maps (unit-tested with maps in memory); `run`
//! reads the pinned maps of an agent.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
};
use rproxy_common::{
    AffinityKey, AffinityMatch, AffinityValue, BE_F_ACTIVE, BE_F_LOCAL, BE_F_TERMINATING, Backend,
    CONFIG_F_EXTERNAL_CLUSTER_IP, CONFIG_F_POD_NETNS_LISTED, CONFIG_F_POD_SOCKETS, CT_DIR_SERVICE, CT_NAT_EXTERNAL,
    Config, CtKey, CtValue, FlowKind, In6, RevNat, SCOPE_EXTERNAL, SCOPE_LOCAL, SVC_F_AFFINITY,
    SVC_F_BY_CLIENT_ADDRESS, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_EXTERNAL_IP, SVC_F_ITP_LOCAL,
    SVC_F_LOAD_BALANCER, SVC_F_NO_LOCAL_ENDPOINTS, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE, ServiceKey, ServiceValue,
    SrcRange, WireAddr, map_names, proto,
};
use serde::Serialize;

use super::{
    dump::{Names, V4, V6, pinned},
    gc::monotonic_ns,
};
use crate::{Error, Result};

/// Where the packet comes from (`--from`), as the programs' `lb::Origin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Origin {
    /// A pod, on the host side of its veth: every frontend, with all its backends.
    Pod,
    /// An external device (`--devices`): north-south frontends (and `ClusterIP`s with
    /// `--external-cluster-ip`), only local backends under `externalTrafficPolicy: Local`.
    External,
    /// A host-network socket (the socket hooks): as from a pod, without source ranges, and the
    /// node counts as one client for affinity.
    Host,
}

/// The packet to explain.
#[derive(Clone, Copy, Debug)]
pub struct Query<A> {
    pub proto: u8,
    pub src: A,
    pub sport: u16,
    pub dst: A,
    pub dport: u16,
    pub origin: Origin,
}

/// The live maps of one family, as the explanation reads them (lookups only).
pub trait View<A> {
    fn service(&self, key: &ServiceKey<A>) -> Option<ServiceValue>;
    fn backend(&self, id: u32) -> Option<Backend<A>>;
    fn rev_nat(&self, id: u16) -> Option<RevNat<A>>;
    fn conntrack(&self, key: &CtKey<A>) -> Option<CtValue<A>>;
    /// Whether a source range of frontend `rev_nat_id` holds `client` (an LPM lookup).
    fn source_in_ranges(&self, rev_nat_id: u16, client: A) -> bool;
    fn affinity(&self, key: &AffinityKey<A>) -> Option<AffinityValue>;
    fn affinity_match(&self, m: &AffinityMatch) -> bool;
    /// `--external-cluster-ip` (`CONFIG_F_EXTERNAL_CLUSTER_IP`).
    fn external_cluster_ip(&self) -> bool;
    /// The socket hooks translate pods' TCP connections (`--pod-sockets` other than `none`:
    /// `CONFIG_F_POD_SOCKETS` or `CONFIG_F_POD_NETNS_LISTED`).
    fn pod_sockets(&self) -> bool;
    /// The datapath's clock now (`CLOCK_MONOTONIC`, ns).
    fn now_ns(&self) -> u64;
}

/// What the datapath would do (`-o json` prints it as is).
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// `translate` (to a backend), `pass` (untouched), `reject` (ICMP port unreachable back to
    /// the client) or `drop`.
    pub verdict: &'static str,
    /// Why, in words.
    pub reason: String,
    /// The frontend matched, if any.
    pub service: Option<ServiceView>,
    /// The backend the packet goes to, when it is known (an established flow, affinity, a single
    /// candidate); a new flow without affinity picks one of `candidates` at random.
    pub backend: Option<SocketAddr>,
    /// The packet after translation, when the backend is known: `src -> dst`.
    pub nat: Option<String>,
    /// The backend slots a new flow picks from, and any backend excluded, with why.
    pub candidates: Vec<Candidate>,
    /// The checks made, in order.
    pub steps: Vec<String>,
}

/// The frontend matched.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    pub frontend: SocketAddr,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    pub kind: &'static str,
    pub rev_nat_id: u16,
    /// The Service and port name, from the agent (`None` when it could not be asked).
    pub name: Option<String>,
    /// Policies: `etp-local`, `itp-local`, `affinity`, `source-ranges`.
    pub policies: Vec<&'static str>,
    /// Backend slots of the frontend (all of them, and the local ones).
    pub backends: u16,
}

/// A backend a new flow may get, or one it may not, with why.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Candidate {
    pub backend_id: u32,
    pub addr: Option<SocketAddr>,
    pub local: bool,
    pub terminating: bool,
    /// Why a new flow cannot get it (`None`: it can).
    pub excluded: Option<String>,
}

fn sock<A: WireAddr>(addr: A, port: u16) -> SocketAddr {
    SocketAddr::new(addr.ip().into(), u16::from_be(port))
}

fn kind(flags: u16) -> &'static str {
    match flags {
        f if f & SVC_F_CLUSTER_IP != 0 => "ClusterIP",
        f if f & SVC_F_NODE_PORT != 0 => "NodePort",
        f if f & SVC_F_EXTERNAL_IP != 0 => "ExternalIP",
        f if f & SVC_F_LOAD_BALANCER != 0 => "LoadBalancer",
        _ => "?",
    }
}

/// A backend of the map that may serve (`lb::backend`): active or terminating.
fn live<A: Copy>(be: Option<Backend<A>>) -> Option<Backend<A>> {
    be.filter(|b| b.flags & (BE_F_ACTIVE | BE_F_TERMINATING) != 0)
}

/// The explanation of `q` with the maps `m`; `name` gives a frontend's Service and port name.
pub fn explain<A: WireAddr + Default + PartialEq>(
    q: &Query<A>,
    m: &impl View<A>,
    name: impl Fn(SocketAddr, u8) -> Option<String>,
    hairpin: A,
) -> Explanation {
    let mut x = Explanation::default();
    if conntrack(q, m, &name, &mut x) {
        return x;
    }
    new_flow(q, m, &name, hairpin, x)
}

/// Conntrack first (`lb::existing`): `true` when `x` is complete (an established flow).
fn conntrack<A: WireAddr + PartialEq>(
    q: &Query<A>,
    m: &impl View<A>,
    name: &impl Fn(SocketAddr, u8) -> Option<String>,
    x: &mut Explanation,
) -> bool {
    let to = sock(q.dst, q.dport);
    let from = sock(q.src, q.sport);
    let ct_key = CtKey {
        saddr: q.src,
        daddr: q.dst,
        sport: q.sport,
        dport: q.dport,
        proto: q.proto,
        dir: CT_DIR_SERVICE,
        _pad: [0; 2],
    };
    if let Some(v) = m.conntrack(&ct_key) {
        let external = v.nat_flags & CT_NAT_EXTERNAL != 0;
        let alive = m.rev_nat(v.rev_nat_id).is_some_and(|r| r.addr == q.dst && r.port == q.dport);
        if external != (q.origin == Origin::External) {
            x.steps.push(format!("conntrack: a flow {from} -> {to} of another origin (ignored)"));
        } else if !alive {
            x.steps.push(format!("conntrack: a flow of a removed frontend (rev-NAT id {}): ignored", v.rev_nat_id));
        } else if let Some(be) = live(m.backend(v.backend_id)) {
            let left = v.expires_ns.saturating_sub(m.now_ns()) / 1_000_000_000;
            x.steps.push(format!(
                "conntrack: established flow, backend id {}, expires in {left} s unless renewed",
                v.backend_id
            ));
            x.verdict = "translate";
            x.reason = format!("an established flow: it keeps its backend ({})", kind_word(v.kind()));
            x.service = m.service(&slot0(q)).map(|s| service_view(q, &s, name));
            x.backend = Some(sock(be.addr, be.port));
            x.nat = Some(format!("{} -> {}", sock(v.nat_addr, v.nat_port), sock(v.pair_addr, v.pair_port)));
            return true;
        } else {
            x.steps.push(format!("conntrack: the flow's backend (id {}) is gone: a live one is picked", v.backend_id));
        }
    } else {
        x.steps.push(format!("conntrack: no flow {from} -> {to}"));
    }
    false
}

/// A new flow (`lb::decide_new`): the frontend, who reaches it, source ranges, the traffic
/// policy, affinity, the backend slots.
fn new_flow<A: WireAddr + Default + PartialEq>(
    q: &Query<A>,
    m: &impl View<A>,
    name: &impl Fn(SocketAddr, u8) -> Option<String>,
    hairpin: A,
    mut x: Explanation,
) -> Explanation {
    let to = sock(q.dst, q.dport);
    let from = sock(q.src, q.sport);
    let key = slot0(q);
    let Some(svc) = m.service(&key) else {
        x.verdict = "pass";
        x.reason = format!("{to}/{} is not a frontend", proto_name(q.proto));
        return x;
    };
    x.service = Some(service_view(q, &svc, name));
    x.steps.push(format!("frontend {to}/{}: {} (rev-NAT id {})", proto_name(q.proto), kind(svc.flags), svc.rev_nat_id));
    if q.origin == Origin::Pod && q.proto == proto::TCP && m.pod_sockets() {
        x.steps.push(if svc.flags & SVC_F_BY_CLIENT_ADDRESS == 0 {
            "socket hooks (--pod-sockets): a pod's TCP connect() in their scope goes to the backend chosen \
             here; its packets carry the backend's address, pass the pod's device untranslated and leave no \
             conntrack entry (so an open connection of such a pod shows no flow above)"
                .to_owned()
        } else {
            "socket hooks (--pod-sockets): not at connect(), ClientIP affinity and source ranges go by the \
             pod's address: the pod's device translates the packets"
                .to_owned()
        });
    }
    let external = q.origin == Origin::External;
    let north_south = SVC_F_NODE_PORT | SVC_F_EXTERNAL_IP | SVC_F_LOAD_BALANCER;
    if external && svc.flags & north_south == 0 && !(svc.flags & SVC_F_CLUSTER_IP != 0 && m.external_cluster_ip()) {
        x.verdict = "pass";
        x.reason = "a ClusterIP, which packets from outside do not reach (--external-cluster-ip=false)".into();
        return x;
    }
    if q.origin != Origin::Host && svc.flags & SVC_F_SOURCE_RANGE != 0 {
        if m.source_in_ranges(svc.rev_nat_id, q.src) {
            x.steps.push(format!("loadBalancerSourceRanges: {} is inside", from.ip()));
        } else {
            x.verdict = "drop";
            x.reason = format!("{} is outside the frontend's loadBalancerSourceRanges (src_range_drop)", from.ip());
            return x;
        }
    }
    let etp_local = external && svc.flags & SVC_F_ETP_LOCAL != 0 && svc.count != 0;
    let (slots_key, slots) = if etp_local {
        let local_key = ServiceKey { scope: SCOPE_LOCAL, ..key };
        let Some(local) = m.service(&local_key) else {
            x.candidates = candidates(m, &key, &svc, |be| {
                (be.flags & BE_F_LOCAL == 0).then(|| "not on this node (externalTrafficPolicy Local)".to_owned())
            });
            x.verdict = "drop";
            x.reason = "externalTrafficPolicy Local and no endpoint on this node: dropped, so that load balancers go by the health check (no_backend)".into();
            return x;
        };
        x.steps.push(format!("externalTrafficPolicy Local from outside: the {} local backends", local.count));
        (local_key, local)
    } else {
        (key, svc)
    };
    x.candidates = candidates(m, &slots_key, &slots, |_| None);
    if etp_local {
        // The cluster-wide slots that are not local, for the record.
        let remote = candidates(m, &key, &svc, |be| {
            (be.flags & BE_F_LOCAL == 0).then(|| "not on this node (externalTrafficPolicy Local)".to_owned())
        });
        x.candidates.extend(remote.into_iter().filter(|c| c.excluded.is_some()));
    }
    if slots.count == 0 {
        let (verdict, reason) = if svc.rejects() {
            (
                "reject",
                "the Service has no endpoint: ICMP port unreachable back to the client, as kube-proxy's REJECT (no_backend)",
            )
        } else if svc.count == 0 {
            (
                "drop",
                "internalTrafficPolicy Local and no endpoint on this node: dropped, as kube-proxy drops it (no_backend)",
            )
        } else {
            ("drop", "no backend in the slots a new flow picks from (no_backend)")
        };
        x.verdict = verdict;
        x.reason = reason.into();
        return x;
    }
    if svc.flags & SVC_F_AFFINITY != 0
        && let Some((id, be)) = affinity(q, m, &svc, etp_local, &mut x.steps)
    {
        x.verdict = "translate";
        x.reason = format!("a new flow: sessionAffinity ClientIP keeps the client on backend id {id}");
        x.backend = Some(sock(be.addr, be.port));
        x.nat = Some(nat_of(q, &be, etp_local, hairpin));
        return x;
    }
    let usable: Vec<&Candidate> = x.candidates.iter().filter(|c| c.excluded.is_none()).collect();
    x.verdict = "translate";
    if let [only] = usable.as_slice() {
        x.reason = "a new flow: the only backend".into();
        x.backend = only.addr;
        if let Some(be) = live(m.backend(only.backend_id)) {
            x.nat = Some(nat_of(q, &be, etp_local, hairpin));
        }
    } else {
        x.reason = format!("a new flow: one of {} backends, picked uniformly at random", usable.len());
    }
    x
}

/// `ClientIP` affinity (`lb::select_backend_for`): the client's last backend, if that was within
/// the frontend's timeout, the backend still serves it, exists, and (`local_only`) is local.
fn affinity<A: WireAddr + Default>(
    q: &Query<A>,
    m: &impl View<A>,
    svc: &ServiceValue,
    local_only: bool,
    steps: &mut Vec<String>,
) -> Option<(u32, Backend<A>)> {
    let client = if q.origin == Origin::Host { A::default() } else { q.src };
    let akey = AffinityKey { client, rev_nat_id: svc.rev_nat_id, _pad: 0 };
    let timeout_ns = u64::from(svc.affinity_timeout) * 1_000_000_000;
    let Some(a) = m.affinity(&akey) else {
        steps.push("sessionAffinity: no backend remembered for this client".into());
        return None;
    };
    let age = m.now_ns().saturating_sub(a.last_used_ns);
    if age > timeout_ns {
        let ago = (age - timeout_ns) / 1_000_000_000;
        steps.push(format!("sessionAffinity: the client's last backend (id {}) expired {ago} s ago", a.backend_id));
        return None;
    }
    if !m.affinity_match(&AffinityMatch { backend_id: a.backend_id, rev_nat_id: svc.rev_nat_id, _pad: 0 }) {
        steps.push(format!(
            "sessionAffinity: the client's last backend (id {}) no longer serves this frontend",
            a.backend_id
        ));
        return None;
    }
    let be = live(m.backend(a.backend_id)).filter(|be| !local_only || be.flags & BE_F_LOCAL != 0);
    if be.is_none() {
        steps.push(format!("sessionAffinity: the client's last backend (id {}) is gone or not local", a.backend_id));
    }
    be.map(|be| (a.backend_id, be))
}

fn kind_word(k: FlowKind) -> &'static str {
    match k {
        FlowKind::EastWest => "east-west",
        FlowKind::Hairpin => "hairpin: the client is its own backend",
        FlowKind::External => "north-south to a backend here",
        FlowKind::ExternalSnat => "north-south to another node, source translated",
        FlowKind::Direct => "straight to a backend, source port translated (a live flow held the tuple)",
    }
}

fn proto_name(p: u8) -> &'static str {
    match p {
        rproxy_common::proto::TCP => "TCP",
        rproxy_common::proto::UDP => "UDP",
        _ => "?",
    }
}

fn slot0<A: Copy>(q: &Query<A>) -> ServiceKey<A> {
    ServiceKey { addr: q.dst, port: q.dport, slot: 0, proto: q.proto, scope: SCOPE_EXTERNAL, _pad: [0; 2] }
}

fn service_view<A: WireAddr>(
    q: &Query<A>,
    svc: &ServiceValue,
    name: &impl Fn(SocketAddr, u8) -> Option<String>,
) -> ServiceView {
    let frontend = sock(q.dst, q.dport);
    let policies = [
        (SVC_F_ETP_LOCAL, "etp-local"),
        (SVC_F_ITP_LOCAL, "itp-local"),
        (SVC_F_AFFINITY, "affinity"),
        (SVC_F_SOURCE_RANGE, "source-ranges"),
        (SVC_F_NO_LOCAL_ENDPOINTS, "no-local-endpoints"),
    ];
    ServiceView {
        frontend,
        kind: kind(svc.flags),
        rev_nat_id: svc.rev_nat_id,
        name: name(frontend, q.proto),
        policies: policies.iter().filter(|(f, _)| svc.flags & f != 0).map(|(_, n)| *n).collect(),
        backends: svc.count,
    }
}

/// The slots `1..=svc.count` of `key`, with `exclude`'s verdict on each live backend.
fn candidates<A: WireAddr>(
    m: &impl View<A>,
    key: &ServiceKey<A>,
    svc: &ServiceValue,
    exclude: impl Fn(&Backend<A>) -> Option<String>,
) -> Vec<Candidate> {
    (1..=svc.count)
        .map(|slot| {
            let id = m.service(&ServiceKey { slot, ..*key }).map_or(0, |s| s.backend_id);
            match live(m.backend(id)) {
                Some(be) => Candidate {
                    backend_id: id,
                    addr: Some(sock(be.addr, be.port)),
                    local: be.flags & BE_F_LOCAL != 0,
                    terminating: be.flags & BE_F_TERMINATING != 0,
                    excluded: exclude(&be),
                },
                None => Candidate {
                    backend_id: id,
                    addr: None,
                    local: false,
                    terminating: false,
                    excluded: Some("the slot's backend is gone (being rewritten)".into()),
                },
            }
        })
        .collect()
}

/// The packet after a new flow to `be`: DNAT; from a pod to itself, SNAT to the hairpin
/// address; a pod's other TCP, its port folded into the SNAT range (`first + port % count`,
/// another one of the range if a live flow holds that); from outside to another node's
/// backend, SNAT to a node address and port.
fn nat_of<A: WireAddr + PartialEq>(q: &Query<A>, be: &Backend<A>, etp_local: bool, hairpin: A) -> String {
    let dst = sock(be.addr, be.port);
    let src = sock(q.src, q.sport);
    match q.origin {
        Origin::External if !etp_local && be.flags & BE_F_LOCAL == 0 => {
            format!("(a node address):(an SNAT port) -> {dst}")
        }
        Origin::Pod if be.addr == q.src => format!("{} -> {dst}", sock(hairpin, q.sport)),
        Origin::Pod if q.proto == proto::TCP => {
            format!("{}:({} folded into --snat-port-range) -> {dst}", src.ip(), src.port())
        }
        _ => format!("{src} -> {dst}"),
    }
}

/// The pinned maps of one family.
struct Live<A>
where
    A: Pod,
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    CtKey<A>: Pod,
    CtValue<A>: Pod,
    SrcRange<A>: Pod,
    AffinityKey<A>: Pod,
{
    services: HashMap<MapData, ServiceKey<A>, ServiceValue>,
    backends: Array<MapData, Backend<A>>,
    rev_nat: Array<MapData, RevNat<A>>,
    ct: HashMap<MapData, CtKey<A>, CtValue<A>>,
    src_ranges: LpmTrie<MapData, SrcRange<A>, u8>,
    affinity: HashMap<MapData, AffinityKey<A>, AffinityValue>,
    affinity_match: HashMap<MapData, AffinityMatch, u8>,
    config: Array<MapData, Config>,
}

impl<A> View<A> for Live<A>
where
    A: Pod,
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    CtKey<A>: Pod,
    CtValue<A>: Pod,
    SrcRange<A>: Pod,
    AffinityKey<A>: Pod,
{
    fn service(&self, key: &ServiceKey<A>) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }
    fn backend(&self, id: u32) -> Option<Backend<A>> {
        self.backends.get(&id, 0).ok()
    }
    fn rev_nat(&self, id: u16) -> Option<RevNat<A>> {
        self.rev_nat.get(&u32::from(id), 0).ok()
    }
    fn conntrack(&self, key: &CtKey<A>) -> Option<CtValue<A>> {
        self.ct.get(key, 0).ok()
    }
    fn source_in_ranges(&self, rev_nat_id: u16, client: A) -> bool {
        #[expect(clippy::cast_possible_truncation, reason = "an address is 4 or 16 bytes")]
        let bits = SrcRange::<A>::ID_BITS + 8 * size_of::<A>() as u32;
        let key = Key::new(bits, SrcRange { rev_nat_id, _pad: 0, addr: client });
        self.src_ranges.get(&key, 0).is_ok()
    }
    fn affinity(&self, key: &AffinityKey<A>) -> Option<AffinityValue> {
        self.affinity.get(key, 0).ok()
    }
    fn affinity_match(&self, m: &AffinityMatch) -> bool {
        self.affinity_match.get(m, 0).is_ok()
    }
    fn external_cluster_ip(&self) -> bool {
        self.config.get(&0, 0).is_ok_and(|c| c.flags & CONFIG_F_EXTERNAL_CLUSTER_IP != 0)
    }
    fn pod_sockets(&self) -> bool {
        self.config.get(&0, 0).is_ok_and(|c| {
            c.host_netns_cookie != 0 && c.flags & (CONFIG_F_POD_SOCKETS | CONFIG_F_POD_NETNS_LISTED) != 0
        })
    }
    fn now_ns(&self) -> u64 {
        monotonic_ns()
    }
}

/// The names of the agent's frontends (`GET /frontends` on its metrics address), by
/// `address:port/PROTO`.
fn agent_names(agent: Option<SocketAddr>) -> std::result::Result<BTreeMap<String, String>, String> {
    let agent = agent.ok_or("no --agent address")?;
    let timeout = Duration::from_secs(1);
    let mut conn = TcpStream::connect_timeout(&agent, timeout).map_err(|e| format!("{agent}: {e}"))?;
    conn.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    write!(conn, "GET /frontends HTTP/1.0\r\nHost: {agent}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).map_err(|e| format!("{agent}: {e}"))?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).ok_or("no HTTP body")?;
    let list: Vec<crate::metrics::FrontendName> =
        serde_json::from_str(body).map_err(|e| format!("{agent}/frontends: {e}"))?;
    Ok(list.into_iter().map(|f| (f.frontend, format!("{}/{}:{}", f.namespace, f.service, f.port))).collect())
}

/// What `explain` is asked.
#[derive(Clone, Debug)]
pub struct Args {
    pub proto: u8,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub origin: Origin,
    /// The agent's metrics address, for the Services' names.
    pub agent: Option<SocketAddr>,
    pub json: bool,
}

/// Explains `args`'s packet with the maps pinned in `dir`, to `out`.
pub fn run(dir: &Path, args: &Args, out: &mut impl Write) -> Result<()> {
    let names = agent_names(args.agent);
    let name = |fe: SocketAddr, proto: u8| names.as_ref().ok()?.get(&format!("{fe}/{}", proto_name(proto))).cloned();
    let mut x = match (args.src.ip(), args.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let q = query(args, u32::wire(s), u32::wire(d));
            explain(&q, &open_live::<u32>(dir, &V4)?, name, rproxy_common::hairpin::ADDR)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let q = query(args, In6::wire(s), In6::wire(d));
            explain(&q, &open_live::<In6>(dir, &V6)?, name, rproxy_common::hairpin::ADDR6)
        }
        _ => {
            return Err(Error::Usage(format!("--src {} and --dst {} are not of one family", args.src, args.dst)));
        }
    };
    if let Err(e) = &names {
        x.steps.push(format!("Service names not shown: {e}"));
    }
    let io = |source| Error::Io { what: "writing the explanation".into(), source };
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &x).map_err(|e| io(e.into()))?;
        writeln!(out).map_err(io)
    } else {
        write!(out, "{}", render(&x)).map_err(io)
    }
}

fn query<A>(args: &Args, src: A, dst: A) -> Query<A> {
    Query {
        proto: args.proto,
        src,
        sport: args.src.port().to_be(),
        dst,
        dport: args.dst.port().to_be(),
        origin: args.origin,
    }
}

fn open_live<A>(dir: &Path, n: &Names) -> Result<Live<A>>
where
    A: Pod,
    ServiceKey<A>: Pod,
    Backend<A>: Pod,
    RevNat<A>: Pod,
    CtKey<A>: Pod,
    CtValue<A>: Pod,
    SrcRange<A>: Pod,
    AffinityKey<A>: Pod,
{
    Ok(Live {
        services: pinned(dir, n.services)?,
        backends: pinned(dir, n.backends)?,
        rev_nat: pinned(dir, n.rev_nat)?,
        ct: pinned(dir, n.ct)?,
        src_ranges: pinned(dir, n.src_range)?,
        affinity: pinned(dir, n.affinity)?,
        affinity_match: pinned(dir, map_names::AFFINITY_MATCH)?,
        config: pinned(dir, map_names::CONFIG)?,
    })
}

/// The explanation as text.
#[must_use]
pub fn render(x: &Explanation) -> String {
    let mut s = format!("verdict: {}\nreason:  {}\n", x.verdict, x.reason);
    if let Some(svc) = &x.service {
        let name = svc.name.as_deref().unwrap_or("(name unknown)");
        let _ = writeln!(
            s,
            "service: {name} {} {} rev-NAT id {}, {} backends",
            svc.kind, svc.frontend, svc.rev_nat_id, svc.backends
        );
        if !svc.policies.is_empty() {
            let _ = writeln!(s, "policy:  {}", svc.policies.join(", "));
        }
    }
    if let Some(b) = x.backend {
        let _ = writeln!(s, "backend: {b}");
    }
    if let Some(n) = &x.nat {
        let _ = writeln!(s, "nat:     {n}");
    }
    if !x.candidates.is_empty() {
        s.push_str("candidates:\n");
        for c in &x.candidates {
            let addr = c.addr.map_or_else(|| "?".to_owned(), |a| a.to_string());
            let mut tags = Vec::new();
            if c.local {
                tags.push("local");
            }
            if c.terminating {
                tags.push("terminating");
            }
            let _ = write!(
                s,
                "  #{} {addr}{}",
                c.backend_id,
                if tags.is_empty() { String::new() } else { format!(" ({})", tags.join(", ")) }
            );
            match &c.excluded {
                Some(why) => {
                    let _ = writeln!(s, "  excluded: {why}");
                }
                None => s.push('\n'),
            }
        }
    }
    s.push_str("steps:\n");
    for step in &x.steps {
        let _ = writeln!(s, "  - {step}");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, collections::HashMap as Map, net::Ipv4Addr};

    use rproxy_common::{SCOPE_LOCAL, proto};

    use super::*;

    /// Maps in memory, IPv4.
    #[derive(Default)]
    struct Mem {
        services: Map<(u32, u16, u16, u8, u8), ServiceValue>,
        backends: Map<u32, Backend<u32>>,
        rev_nat: Map<u16, RevNat<u32>>,
        ct: Map<(u32, u32, u16, u16), CtValue<u32>>,
        ranges: Vec<(u16, u32)>,
        affinity: Map<(u32, u16), AffinityValue>,
        matches: Vec<(u16, u32)>,
        external_cluster_ip: bool,
        pod_sockets: bool,
        now: u64,
        lookups: Cell<u32>,
    }

    impl View<u32> for Mem {
        fn service(&self, k: &ServiceKey<u32>) -> Option<ServiceValue> {
            self.lookups.set(self.lookups.get() + 1);
            self.services.get(&(k.addr, k.port, k.slot, k.proto, k.scope)).copied()
        }
        fn backend(&self, id: u32) -> Option<Backend<u32>> {
            self.backends.get(&id).copied()
        }
        fn rev_nat(&self, id: u16) -> Option<RevNat<u32>> {
            self.rev_nat.get(&id).copied()
        }
        fn conntrack(&self, k: &CtKey<u32>) -> Option<CtValue<u32>> {
            (k.dir == CT_DIR_SERVICE).then(|| self.ct.get(&(k.saddr, k.daddr, k.sport, k.dport)).copied()).flatten()
        }
        fn source_in_ranges(&self, id: u16, client: u32) -> bool {
            self.ranges.contains(&(id, client))
        }
        fn affinity(&self, k: &AffinityKey<u32>) -> Option<AffinityValue> {
            self.affinity.get(&(k.client, k.rev_nat_id)).copied()
        }
        fn affinity_match(&self, m: &AffinityMatch) -> bool {
            self.matches.contains(&(m.rev_nat_id, m.backend_id))
        }
        fn external_cluster_ip(&self) -> bool {
            self.external_cluster_ip
        }
        fn pod_sockets(&self) -> bool {
            self.pod_sockets
        }
        fn now_ns(&self) -> u64 {
            self.now
        }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);

    fn ip(a: Ipv4Addr) -> u32 {
        u32::wire(a)
    }

    /// A frontend `VIP:80/TCP` with `flags` and backends `10.244.1.1x:8080` (id x, `flags` each),
    /// the local ones also in the local scope.
    fn frontend(flags: u16, backends: &[(u32, u8)]) -> Mem {
        let mut m = Mem::default();
        let port = 80u16.to_be();
        #[expect(clippy::cast_possible_truncation, reason = "a handful of backends")]
        let count = backends.len() as u16;
        let svc = ServiceValue { count, rev_nat_id: 7, flags, ..ServiceValue::default() };
        m.services.insert((ip(VIP), port, 0, proto::TCP, SCOPE_EXTERNAL), svc);
        let local: Vec<_> = backends.iter().filter(|(_, f)| f & BE_F_LOCAL != 0).collect();
        #[expect(clippy::cast_possible_truncation, reason = "a handful of backends")]
        if !local.is_empty() {
            let lsvc = ServiceValue { count: local.len() as u16, ..svc };
            m.services.insert((ip(VIP), port, 0, proto::TCP, SCOPE_LOCAL), lsvc);
            for (slot, (id, _)) in local.iter().enumerate() {
                let v = ServiceValue { backend_id: *id, ..ServiceValue::default() };
                m.services.insert((ip(VIP), port, slot as u16 + 1, proto::TCP, SCOPE_LOCAL), v);
            }
        }
        for (slot, (id, bflags)) in backends.iter().enumerate() {
            #[expect(clippy::cast_possible_truncation, reason = "a handful of backends")]
            let slot = slot as u16 + 1;
            m.services.insert(
                (ip(VIP), port, slot, proto::TCP, SCOPE_EXTERNAL),
                ServiceValue { backend_id: *id, ..ServiceValue::default() },
            );
            #[expect(clippy::cast_possible_truncation, reason = "small ids")]
            let addr = ip(Ipv4Addr::new(10, 244, 1, 10 + *id as u8));
            m.backends
                .insert(*id, Backend { addr, port: 8080u16.to_be(), proto: proto::TCP, flags: *bflags | BE_F_ACTIVE });
        }
        m.rev_nat.insert(7, RevNat { addr: ip(VIP), port, _pad: 0 });
        m
    }

    fn ask(m: &Mem, origin: Origin) -> Explanation {
        let q = Query {
            proto: proto::TCP,
            src: ip(CLIENT),
            sport: 40000u16.to_be(),
            dst: ip(VIP),
            dport: 80u16.to_be(),
            origin,
        };
        explain(&q, m, |fe, _| Some(format!("default/demo:http at {fe}")), rproxy_common::hairpin::ADDR)
    }

    #[test]
    fn a_pods_tcp_connect_is_the_socket_hooks_unless_affinity_needs_its_address() {
        let steps = |m: &Mem, origin| ask(m, origin).steps.join("\n");
        let mut m = frontend(SVC_F_CLUSTER_IP, &[(1, 0), (2, 0)]);
        assert!(!steps(&m, Origin::Pod).contains("socket hooks"), "--pod-sockets none");
        m.pod_sockets = true;
        let x = ask(&m, Origin::Pod);
        assert_eq!(x.verdict, "translate");
        assert!(x.steps.iter().any(|s| s.contains("connect() in their scope goes to the backend")), "{:?}", x.steps);
        assert!(!steps(&m, Origin::Host).contains("--pod-sockets"), "host sockets are the hooks' anyway");
        let mut m = frontend(SVC_F_CLUSTER_IP | SVC_F_AFFINITY, &[(1, 0)]);
        m.pod_sockets = true;
        assert!(steps(&m, Origin::Pod).contains("not at connect()"), "{}", steps(&m, Origin::Pod));
        // The pod's device gives such a flow a source port of the SNAT range.
        let x = ask(&m, Origin::Pod);
        assert_eq!(
            x.nat.as_deref(),
            Some("10.244.1.100:(40000 folded into --snat-port-range) -> 10.244.1.11:8080"),
            "{x:?}"
        );
    }

    #[test]
    fn a_new_flow_lists_its_candidates_and_a_removed_slot() {
        let mut m = frontend(SVC_F_CLUSTER_IP, &[(1, 0), (2, 0), (3, BE_F_TERMINATING)]);
        m.backends.remove(&2);
        let x = ask(&m, Origin::Pod);
        assert_eq!((x.verdict, x.backend), ("translate", None));
        assert!(x.reason.contains("one of 2 backends"), "{}", x.reason);
        assert_eq!(
            x.service.as_ref().map(|s| (s.kind, s.rev_nat_id, s.name.clone())),
            Some(("ClusterIP", 7, Some("default/demo:http at 10.96.0.10:80".into())))
        );
        let excluded: Vec<_> =
            x.candidates.iter().map(|c| (c.backend_id, c.excluded.is_some(), c.terminating)).collect();
        assert_eq!(excluded, [(1, false, false), (2, true, false), (3, false, true)]);
    }

    #[test]
    fn an_established_flow_keeps_its_backend_unless_it_is_gone() {
        let mut m = frontend(SVC_F_CLUSTER_IP, &[(1, 0), (2, 0)]);
        let be = m.backends[&2];
        let v = CtValue {
            backend_id: 2,
            rev_nat_id: 7,
            pair_addr: be.addr,
            pair_port: be.port,
            nat_addr: ip(CLIENT),
            nat_port: 40000u16.to_be(),
            expires_ns: 30_000_000_000,
            ..CtValue::default()
        };
        m.ct.insert((ip(CLIENT), ip(VIP), 40000u16.to_be(), 80u16.to_be()), v);
        let x = ask(&m, Origin::Pod);
        assert_eq!((x.verdict, x.backend), ("translate", Some("10.244.1.12:8080".parse().unwrap())));
        assert_eq!(x.nat.as_deref(), Some("10.244.1.100:40000 -> 10.244.1.12:8080"));
        // From outside the same tuple is another origin's flow: ignored, and a ClusterIP passes.
        let x = ask(&m, Origin::External);
        assert_eq!(x.verdict, "pass");
        assert!(x.steps.iter().any(|s| s.contains("another origin")), "{x:?}");
        m.backends.remove(&2);
        let x = ask(&m, Origin::Pod);
        assert!(x.reason.contains("the only backend") && x.steps.iter().any(|s| s.contains("is gone")), "{x:?}");
    }

    #[test]
    fn from_outside_a_cluster_ip_passes_unless_external_cluster_ips_are_on() {
        let mut m = frontend(SVC_F_CLUSTER_IP, &[(1, 0)]);
        assert_eq!(ask(&m, Origin::External).verdict, "pass");
        m.external_cluster_ip = true;
        let x = ask(&m, Origin::External);
        assert_eq!(x.verdict, "translate");
        assert_eq!(
            x.nat.as_deref(),
            Some("(a node address):(an SNAT port) -> 10.244.1.11:8080"),
            "a remote backend: SNAT"
        );
    }

    #[test]
    fn source_ranges_drop_outsiders_but_not_the_node() {
        let mut m = frontend(SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGE, &[(1, BE_F_LOCAL)]);
        let x = ask(&m, Origin::External);
        assert_eq!(x.verdict, "drop");
        assert!(x.reason.contains("loadBalancerSourceRanges"), "{}", x.reason);
        assert_eq!(ask(&m, Origin::Host).verdict, "translate");
        m.ranges.push((7, ip(CLIENT)));
        let x = ask(&m, Origin::External);
        assert_eq!((x.verdict, x.nat.as_deref()), ("translate", Some("10.244.1.100:40000 -> 10.244.1.11:8080")));
    }

    #[test]
    fn etp_local_from_outside_takes_local_backends_or_drops() {
        let m = frontend(SVC_F_NODE_PORT | SVC_F_ETP_LOCAL, &[(1, 0), (2, BE_F_LOCAL)]);
        let x = ask(&m, Origin::External);
        assert_eq!((x.verdict, x.backend), ("translate", Some("10.244.1.12:8080".parse().unwrap())));
        assert!(
            x.candidates
                .iter()
                .any(|c| c.backend_id == 1 && c.excluded.as_deref().is_some_and(|e| e.contains("not on this node")))
        );
        let none_here = frontend(SVC_F_NODE_PORT | SVC_F_ETP_LOCAL, &[(1, 0)]);
        let x = ask(&none_here, Origin::External);
        assert_eq!(x.verdict, "drop");
        assert!(x.reason.contains("no endpoint on this node"), "{}", x.reason);
        // From a pod, every backend.
        assert!(ask(&m, Origin::Pod).reason.contains("one of 2"));
    }

    #[test]
    fn no_endpoint_rejects_and_unknown_addresses_pass() {
        let m = frontend(SVC_F_CLUSTER_IP, &[]);
        let x = ask(&m, Origin::Pod);
        assert_eq!(x.verdict, "reject");
        assert!(x.reason.contains("port unreachable"), "{}", x.reason);
        let x = ask(&Mem::default(), Origin::Pod);
        assert_eq!((x.verdict, x.service.is_none()), ("pass", true));
    }

    #[test]
    fn affinity_keeps_a_fresh_valid_choice_only() {
        let mut m = frontend(SVC_F_CLUSTER_IP | SVC_F_AFFINITY, &[(1, 0), (2, 0)]);
        m.services.values_mut().filter(|s| s.rev_nat_id == 7).for_each(|s| s.affinity_timeout = 10);
        m.now = 100_000_000_000;
        m.affinity.insert((ip(CLIENT), 7), AffinityValue { last_used_ns: 95_000_000_000, backend_id: 2, _pad: 0 });
        m.matches.push((7, 2));
        let x = ask(&m, Origin::Pod);
        assert_eq!(x.backend, Some("10.244.1.12:8080".parse().unwrap()));
        assert!(x.reason.contains("sessionAffinity"), "{}", x.reason);
        m.now = 200_000_000_000;
        let x = ask(&m, Origin::Pod);
        assert!(x.backend.is_none() && x.steps.iter().any(|s| s.contains("expired")), "{x:?}");
    }

    #[test]
    fn a_pod_reaching_itself_is_hairpinned() {
        let mut m = frontend(SVC_F_CLUSTER_IP, &[(1, 0)]);
        m.backends.get_mut(&1).unwrap().addr = ip(CLIENT);
        let x = ask(&m, Origin::Pod);
        assert_eq!(x.nat.as_deref(), Some("169.254.42.1:40000 -> 10.244.1.100:8080"));
        let text = render(&x);
        assert!(text.starts_with("verdict: translate\n") && text.contains("default/demo:http"), "{text}");
    }
}
