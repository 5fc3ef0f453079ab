//! Conntrack garbage collection.
//!
//! The datapath refreshes an entry's expiry on every packet in its direction (see
//! `rproxy_common::CtState` for lifetimes). A flow's two entries are removed together once both
//! have expired, so a one-way UDP stream (only the client talks) keeps its reply entry. Entries
//! pointing at a backend that no longer exists are removed at once. A backend that left every
//! Service is kept (orphaned) while entries name it, so its established connections live on;
//! each pass reports the backends still named ([`Pass::in_use`]), and the writer deletes the
//! orphans that are not. The map is an LRU, so a full table evicts the oldest entries by itself; the
//! GC keeps it from filling with dead flows. Each family has its own table (`RPX_CT4`, `RPX_CT6`);
//! the functions here serve both (`A`: the family's address).
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use rproxy_common::{
    CT_DIR_REPLY, CT_DIR_SERVICE, CtKey, CtKey4, CtKey6, CtState, CtValue, CtValue4, CtValue6, FlowKind, map_names,
};

use crate::{Error, Result};

/// Why an entry is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    Expired,
    BackendGone,
}

/// Decides one entry's fate. `pair` is the other entry of its flow, if present.
#[must_use]
pub fn verdict<A>(entry: &CtValue<A>, pair: Option<&CtValue<A>>, now_ns: u64, backend_exists: bool) -> Verdict {
    if !backend_exists {
        return Verdict::BackendGone;
    }
    let expired = |v: &CtValue<A>| v.expires_ns <= now_ns;
    let done = match pair {
        None => expired(entry),
        Some(p) => (expired(entry) && expired(p)) || closed_and_quiet(entry, p, now_ns),
    };
    if done { Verdict::Expired } else { Verdict::Keep }
}

/// A TCP flow is closed when the flags of its two entries together say so (both FINs or a RST),
/// and over when one of its entries has carried no packet for the closing lifetime since (after
/// both FINs only the last ACK and retransmissions can follow). The datapath judges each entry
/// by its own flags, and two CPUs accounting the last packets of both directions at once can
/// tear a pair: one entry says closed, the other still established with an expiry six hours
/// away, or an entry has the closed flags and the expiry an established packet wrote. The time
/// of an entry's last packet is its expiry less the lifetime its own flags give it.
fn closed_and_quiet<A>(a: &CtValue<A>, b: &CtValue<A>, now_ns: u64) -> bool {
    let datagram = CtState::Datagram as u8;
    if a.state == datagram || b.state == datagram {
        return false;
    }
    if CtState::from_tcp_flags(a.flags | b.flags) != CtState::Closing {
        return false;
    }
    let last_packet = |v: &CtValue<A>| v.expires_ns.saturating_sub(CtState::from_tcp_flags(v.flags).lifetime_ns());
    last_packet(a).min(last_packet(b)).saturating_add(CtState::Closing.lifetime_ns()) <= now_ns
}

/// Result of one pass.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pass {
    pub scanned: usize,
    pub expired: usize,
    pub backend_gone: usize,
    /// The backend ids that the entries left in the table name: an orphaned backend
    /// (`Writer::release_orphans`) not among them has no flow left.
    pub in_use: HashSet<u32>,
    /// SNAT ports held by the flows kept (north-south flows to another node's backend: one per
    /// reply entry), and the most held towards one backend, whose count the range bounds
    /// (`--snat-port-range`): ports are unique per backend, not per node.
    pub snat_ports: usize,
    pub snat_ports_busiest: usize,
}

impl Pass {
    /// This pass and `other` (of the other family's table) as one.
    #[must_use]
    pub fn merge(mut self, other: Self) -> Self {
        self.scanned += other.scanned;
        self.expired += other.expired;
        self.backend_gone += other.backend_gone;
        self.in_use.extend(other.in_use);
        self.snat_ports += other.snat_ports;
        self.snat_ports_busiest = self.snat_ports_busiest.max(other.snat_ports_busiest);
        self
    }
}

/// Plans one pass over a snapshot of the table: the keys to delete.
#[must_use]
pub fn plan<A: Copy + Eq + Hash, S: std::hash::BuildHasher>(
    entries: &HashMap<CtKey<A>, CtValue<A>, S>,
    now_ns: u64,
    backend_exists: impl Fn(u32) -> bool,
) -> (Vec<CtKey<A>>, Pass) {
    let mut pass = Pass { scanned: entries.len(), ..Pass::default() };
    let mut doomed = Vec::new();
    let mut snat_per_backend: HashMap<u32, usize> = HashMap::new();
    for (k, v) in entries {
        let pair = entries.get(&k.pair(v));
        match verdict(v, pair, now_ns, backend_exists(v.backend_id)) {
            Verdict::Keep => {
                pass.in_use.insert(v.backend_id);
                if k.dir == CT_DIR_REPLY && v.kind() == FlowKind::ExternalSnat {
                    pass.snat_ports += 1;
                    *snat_per_backend.entry(v.backend_id).or_default() += 1;
                }
            }
            Verdict::Expired => {
                pass.expired += 1;
                doomed.push(*k);
            }
            Verdict::BackendGone => {
                pass.backend_gone += 1;
                doomed.push(*k);
            }
        }
    }
    pass.snat_ports_busiest = snat_per_backend.into_values().max().unwrap_or(0);
    (doomed, pass)
}

/// The conntrack entries of UDP flows that must move at once: those whose (rev-NAT id, backend
/// id) is in `stale`, where rev-NAT id 0 stands for every service (the backend is gone). Both
/// entries of a flow carry the same ids, so both go.
#[must_use]
pub fn plan_udp_purge<A: Copy + Eq + Hash, S: std::hash::BuildHasher>(
    entries: &HashMap<CtKey<A>, CtValue<A>, S>,
    stale: &BTreeSet<(u16, u32)>,
) -> Vec<CtKey<A>> {
    entries
        .iter()
        .filter(|(k, v)| {
            k.proto == rproxy_common::proto::UDP
                && (stale.contains(&(v.rev_nat_id, v.backend_id)) || stale.contains(&(0, v.backend_id)))
        })
        .map(|(k, _)| *k)
        .collect()
}

/// How long the reply entry of a purged UDP flow still translates: a reply already on its way
/// from the old backend reaches the client as the service's (its service entry goes at once, so
/// the client's next datagram picks a current backend). After it, the entry is over: a new flow
/// may take its tuple, and the GC removes it.
pub const UDP_PURGE_GRACE_NS: u64 = 2_000_000_000;

/// Moves the UDP flows of stale backends (see [`plan_udp_purge`]): their service entries are
/// removed, their reply entries expire [`UDP_PURGE_GRACE_NS`] from now. Returns the number of
/// flows moved.
pub fn purge_udp<A: Copy + Eq + Hash>(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    stale: &BTreeSet<(u16, u32)>,
) -> usize
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    if stale.is_empty() {
        return 0;
    }
    let snapshot: HashMap<CtKey<A>, CtValue<A>> = ct.iter().filter_map(Result::ok).collect();
    let doomed = plan_udp_purge(&snapshot, stale);
    let until = monotonic_ns() + UDP_PURGE_GRACE_NS;
    let mut moved = 0;
    for k in &doomed {
        if k.dir == CT_DIR_SERVICE {
            moved += usize::from(ct.remove(k).is_ok());
        } else if let Some(mut v) = snapshot.get(k).copied().filter(|v| v.expires_ns > until) {
            v.expires_ns = until;
            // Only where it still is (`BPF_EXIST`): a flow that ended meanwhile stays gone.
            let _ = ct.insert(k, v, BPF_EXIST);
        }
    }
    moved
}

/// `BPF_EXIST`: update only an existing key.
const BPF_EXIST: u64 = 2;

/// The clock the datapath uses (`bpf_ktime_get_coarse_ns`: `CLOCK_MONOTONIC_COARSE`).
#[must_use]
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .expect("CLOCK_MONOTONIC_COARSE is always available");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// Spreads a GC pass over time: after each chunk of work it sleeps as long as the chunk took (at
/// most [`MAX_PAUSE`]), so a pass over a large table holds at most half a CPU while it runs and
/// leaves the rest to the node's new connections (on a busy node a pass over 440,000 entries held
/// a CPU for most of a second, and the first packets of new flows waited behind it).
pub struct Pacer {
    resumed: std::time::Instant,
    pauses: bool,
}

/// The longest pause between two chunks of a pass.
pub const MAX_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);
/// Entries deleted between two pauses.
const DELETES_PER_CHUNK: usize = 1024;

impl Pacer {
    /// A pacer that pauses (the GC thread's).
    #[must_use]
    pub fn pausing() -> Self {
        Self { resumed: std::time::Instant::now(), pauses: true }
    }

    /// A pacer that never pauses (a pass on the agent's loop, or a test's).
    #[must_use]
    pub fn never() -> Self {
        Self { resumed: std::time::Instant::now(), pauses: false }
    }

    /// The end of a chunk of work: sleeps as long as it took, then the next chunk starts.
    pub fn pause(&mut self) {
        if self.pauses {
            std::thread::sleep(self.resumed.elapsed().min(MAX_PAUSE));
            self.resumed = std::time::Instant::now();
        }
    }
}

/// Every entry of a conntrack table: read in chunks with `BPF_MAP_LOOKUP_BATCH` through `fd` (a
/// descriptor of the same map) where there is one and the kernel has it, pausing between chunks;
/// else key by key with aya's iterator.
fn snapshot<A: Copy + Eq + Hash>(
    ct: &aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    pacer: &mut Pacer,
) -> HashMap<CtKey<A>, CtValue<A>>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
{
    if let Some(fd) = fd {
        match super::batch::lookup_all::<CtKey<A>, CtValue<A>>(fd, || pacer.pause()) {
            Ok(Some(entries)) => return entries.into_iter().collect(),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "conntrack GC: batch lookup failed; walking key by key"),
        }
    }
    ct.iter().filter_map(Result::ok).collect()
}

/// Runs one pass against the conntrack map.
pub fn run_pass<A: Copy + Eq + Hash>(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    backend_exists: impl Fn(u32) -> bool,
) -> Pass
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod + PartialEq,
{
    let snapshot = snapshot(ct, None, &mut Pacer::never());
    let (doomed, mut pass) = plan(&snapshot, monotonic_ns(), backend_exists);
    for k in doomed {
        let Some(was) = snapshot.get(&k) else { continue };
        if let Deleted::Changed(now) = delete_unchanged(ct, &k, was) {
            pass.in_use.insert(now.backend_id);
        }
    }
    pass
}

/// What [`delete_unchanged`] did.
enum Deleted<V> {
    Yes,
    /// The entry holds another value now: kept.
    Changed(V),
    /// Gone already (evicted, or the flow ended), or the delete failed.
    No,
}

/// Deletes `k` if it still holds `was`. Read again right before the delete: an entry the
/// datapath refreshed since the snapshot, or replaced (a closed flow's SNAT port taken over by a
/// new flow), is left for the next pass to judge (and its backend is still in use).
fn delete_unchanged<A: Copy + Eq + Hash>(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    k: &CtKey<A>,
    was: &CtValue<A>,
) -> Deleted<CtValue<A>>
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod + PartialEq,
{
    match ct.get(k, 0).ok() {
        Some(now) if now == *was => {
            if ct.remove(k).is_ok() {
                Deleted::Yes
            } else {
                Deleted::No
            }
        }
        Some(now) => Deleted::Changed(now),
        None => Deleted::No,
    }
}

/// Entries a deferred pass leaves for the loop to judge ([`settle_gone`]).
pub type Gone<A> = Vec<(CtKey<A>, CtValue<A>)>;

/// One pass as the GC thread runs it, away from the agent's loop, with `known` the backends
/// programmed when the pass started: expired flows are deleted as by [`run_pass`]; the entries
/// naming a backend not in `known` are returned instead of deleted, for the loop to judge
/// against the backends programmed by then ([`settle_gone`]): such a backend may have been added
/// after `known` was taken, and its new flows must not go.
///
/// The table is read in chunks through `fd` (see [`snapshot`]), and `pacer` pauses between
/// chunks of reads and of deletes.
pub fn run_pass_deferred<A: Copy + Eq + Hash, S: std::hash::BuildHasher>(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    known: &HashSet<u32, S>,
    pacer: &mut Pacer,
) -> (Pass, Gone<A>)
where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod + PartialEq,
{
    let snapshot = snapshot(ct, fd, pacer);
    pacer.pause();
    let (doomed, mut pass) = plan(&snapshot, monotonic_ns(), |id| known.contains(&id));
    pacer.pause();
    let mut gone = Vec::new();
    for (i, k) in doomed.into_iter().enumerate() {
        if i % DELETES_PER_CHUNK == DELETES_PER_CHUNK - 1 {
            pacer.pause();
        }
        let Some(v) = snapshot.get(&k).copied() else { continue };
        if !known.contains(&v.backend_id) {
            pass.backend_gone -= 1;
            gone.push((k, v));
            continue;
        }
        if let Deleted::Changed(now) = delete_unchanged(ct, &k, &v) {
            pass.in_use.insert(now.backend_id);
        }
    }
    (pass, gone)
}

/// The loop's half of a deferred pass: of the entries whose backend the GC thread did not know
/// (`gone`), those whose backend is still not programmed (`backend_exists`) are deleted (unless
/// refreshed since) and counted in `pass.backend_gone`; the others' backends are in use.
pub fn settle_gone<A: Copy + Eq + Hash>(
    ct: &mut aya::maps::HashMap<aya::maps::MapData, CtKey<A>, CtValue<A>>,
    gone: Gone<A>,
    backend_exists: impl Fn(u32) -> bool,
    pass: &mut Pass,
) where
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod + PartialEq,
{
    for (k, v) in gone {
        if backend_exists(v.backend_id) {
            pass.in_use.insert(v.backend_id);
            continue;
        }
        match delete_unchanged(ct, &k, &v) {
            Deleted::Yes => pass.backend_gone += 1,
            Deleted::Changed(now) => {
                pass.in_use.insert(now.backend_id);
            }
            Deleted::No => {}
        }
    }
}

/// How full a conntrack table may get before the agent warns (a share of its entries): an LRU
/// table that is full evicts its least recently used flows, idle long-lived ones included.
pub const NEARLY_FULL: f64 = 0.9;
/// Below this share after a warning, the table is said to be back to normal.
pub const FULL_CLEARED: f64 = 0.8;

/// Whether a table's fill crosses the warning threshold: `Some(true)` when `entries` of
/// `capacity` reach [`NEARLY_FULL`] while it was not `warned`, `Some(false)` when a warned table
/// falls below [`FULL_CLEARED`], `None` otherwise (hysteresis: one line each way).
#[must_use]
pub fn fill_crossing(entries: usize, capacity: u32, warned: bool) -> Option<bool> {
    #[expect(clippy::cast_precision_loss, reason = "a share of a table, far below 2^52 entries")]
    let share = entries as f64 / f64::from(capacity.max(1));
    match (warned, share) {
        (false, s) if s >= NEARLY_FULL => Some(true),
        (true, s) if s < FULL_CLEARED => Some(false),
        _ => None,
    }
}

/// Both conntrack tables as the GC thread holds them: its own handles on the pinned maps, so a
/// pass never borrows the agent loop's.
pub struct Tables {
    pub ct4: BpfHashMap<MapData, CtKey4, CtValue4>,
    pub ct6: BpfHashMap<MapData, CtKey6, CtValue6>,
    /// Descriptors of the same two maps, for batch reads (aya's maps do not lend theirs).
    fd4: Option<std::os::fd::OwnedFd>,
    fd6: Option<std::os::fd::OwnedFd>,
}

impl Tables {
    /// Opens `RPX_CT4` and `RPX_CT6` pinned in `bpffs`.
    pub fn open(bpffs: &std::path::Path) -> Result<Self> {
        type Opened<K, V> = (BpfHashMap<MapData, K, V>, Option<std::os::fd::OwnedFd>);
        fn open<K: aya::Pod, V: aya::Pod>(dir: &std::path::Path, name: &'static str) -> Result<Opened<K, V>> {
            use std::os::fd::AsFd as _;
            let data = MapData::from_pin(dir.join(name)).map_err(|source| Error::Map { name, source })?;
            let fd = data.fd().as_fd().try_clone_to_owned().ok();
            Ok((BpfHashMap::try_from(Map::LruHashMap(data)).map_err(|source| Error::Map { name, source })?, fd))
        }
        let (ct4, fd4) = open(bpffs, map_names::CT4)?;
        let (ct6, fd6) = open(bpffs, map_names::CT6)?;
        Ok(Self { ct4, ct6, fd4, fd6 })
    }
}

/// What a pass of the GC thread ([`run_deferred`]) hands back to the loop: the tables, each
/// family's pass and the entries whose backend it did not know ([`settle_gone`]), and how long
/// it took.
pub struct Deferred {
    pub tables: Tables,
    pub v4: (Pass, Gone<u32>),
    pub v6: (Pass, Gone<rproxy_common::In6>),
    pub elapsed: std::time::Duration,
}

/// One pass over both tables with `known` the backends programmed (see [`run_pass_deferred`]).
/// Blocking: run it on a thread of its own.
#[must_use]
pub fn run_deferred<S: std::hash::BuildHasher>(mut tables: Tables, known: &HashSet<u32, S>) -> Deferred {
    use std::os::fd::AsFd as _;
    let started = std::time::Instant::now();
    let mut pacer = Pacer::pausing();
    let v4 = run_pass_deferred(&mut tables.ct4, tables.fd4.as_ref().map(|f| f.as_fd()), known, &mut pacer);
    let v6 = run_pass_deferred(&mut tables.ct6, tables.fd6.as_ref().map(|f| f.as_fd()), known, &mut pacer);
    Deferred { tables, v4, v6, elapsed: started.elapsed() }
}

#[cfg(test)]
mod tests {
    use rproxy_common::{CT_DIR_REPLY, CT_DIR_SERVICE, CtKey4, CtValue4};

    use super::*;

    fn flow(expires_fwd: u64, expires_rev: u64, backend: u32) -> [(CtKey4, CtValue4); 2] {
        let svc = CtKey4 { saddr: 1, daddr: 2, sport: 3, dport: 4, proto: 17, dir: CT_DIR_SERVICE, _pad: [0; 2] };
        let sv = CtValue4 {
            expires_ns: expires_fwd,
            backend_id: backend,
            pair_addr: 9,
            pair_port: 8,
            nat_addr: 1,
            nat_port: 3,
            ..CtValue4::default()
        };
        let rk = svc.pair(&sv);
        assert_eq!(rk.dir, CT_DIR_REPLY);
        let rv = CtValue4 {
            expires_ns: expires_rev,
            backend_id: backend,
            pair_addr: 2,
            pair_port: 4,
            nat_addr: 1,
            nat_port: 3,
            ..CtValue4::default()
        };
        assert_eq!(rk.pair(&rv), svc);
        [(svc, sv), (rk, rv)]
    }

    #[test]
    fn a_nearly_full_table_is_reported_once_each_way() {
        assert_eq!(fill_crossing(899, 1000, false), None);
        assert_eq!(fill_crossing(900, 1000, false), Some(true));
        assert_eq!(fill_crossing(950, 1000, true), None, "once");
        assert_eq!(fill_crossing(850, 1000, true), None, "hysteresis");
        assert_eq!(fill_crossing(799, 1000, true), Some(false));
        assert_eq!(fill_crossing(0, 0, false), None);
    }

    #[test]
    fn verdicts() {
        let table = [
            // (entry expires, pair expires, backend exists) → verdict at now=100
            (50, Some(60), true, Verdict::Expired),
            (50, Some(150), true, Verdict::Keep),
            (150, Some(50), true, Verdict::Keep),
            (50, None, true, Verdict::Expired),
            (150, None, true, Verdict::Keep),
            (150, Some(150), false, Verdict::BackendGone),
        ];
        for (e, p, exists, want) in table {
            let v = CtValue4 { expires_ns: e, ..CtValue4::default() };
            let pv = p.map(|x| CtValue4 { expires_ns: x, ..CtValue4::default() });
            assert_eq!(verdict(&v, pv.as_ref(), 100, exists), want, "{e} {p:?} {exists}");
        }
    }

    #[test]
    fn udp_purge_takes_stale_pairs_only() {
        let mut t: HashMap<CtKey4, CtValue4> = HashMap::new();
        let mut add = |sport: u16, proto: u8, rev_nat_id: u16, backend: u32| {
            for (mut k, mut v) in flow(200, 200, backend) {
                k.proto = proto;
                if k.dir == CT_DIR_SERVICE {
                    k.sport = sport;
                } else {
                    k.dport = sport;
                }
                v.rev_nat_id = rev_nat_id;
                t.insert(k, v);
            }
        };
        add(1000, 17, 5, 7); // stale pair (5, 7)
        add(1001, 17, 6, 7); // same backend, other service: kept
        add(1002, 6, 5, 7); // TCP to the stale pair: kept (ends by itself)
        add(1003, 17, 6, 9); // backend 9 gone from every service
        add(1004, 17, 5, 8); // live
        let doomed = plan_udp_purge(&t, &BTreeSet::from([(5, 7), (0, 9)]));
        let mut ports: Vec<u16> =
            doomed.iter().map(|k| if k.dir == CT_DIR_SERVICE { k.sport } else { k.dport }).collect();
        ports.sort_unstable();
        assert_eq!(ports, [1000, 1000, 1003, 1003]);
    }

    #[test]
    fn pairs_go_together() {
        let backends = BTreeSet::from([7]);
        // One-way stream: the reply entry expired, the service entry is fresh: both kept.
        let t: HashMap<_, _> = flow(200, 50, 7).into_iter().collect();
        let (doomed, pass) = plan(&t, 100, |id| backends.contains(&id));
        assert!(doomed.is_empty());
        assert_eq!(pass.in_use, HashSet::from([7]), "a kept flow keeps its backend in use");
        // Both expired: both removed, and the backend no longer in use.
        let t: HashMap<_, _> = flow(60, 50, 7).into_iter().collect();
        let (doomed, pass) = plan(&t, 100, |id| backends.contains(&id));
        assert_eq!(doomed.len(), 2);
        assert!(pass.in_use.is_empty());
        // Backend 7 removed: both removed although fresh.
        let t: HashMap<_, _> = flow(200, 200, 7).into_iter().collect();
        let (doomed, pass) = plan(&t, 100, |_| false);
        assert_eq!((doomed.len(), pass.backend_gone), (2, 2));
    }

    #[test]
    fn a_closed_tcp_flow_goes_once_quiet_even_when_its_entries_disagree_on_its_flags() {
        use rproxy_common::{CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_SEEN_REV, CT_F_SYN_FWD, CT_F_SYN_REV};
        const S: u64 = 1_000_000_000;
        let est = CT_F_SYN_FWD | CT_F_SYN_REV | CT_F_SEEN_REV;
        // Each entry's expiry is its last packet plus the lifetime of its own flags.
        let tcp = |(svc_flags, svc_last): (u8, u64), (rev_flags, rev_last): (u8, u64)| {
            let [(k1, mut v1), (k2, mut v2)] = flow(0, 0, 7);
            for (v, flags, last) in [(&mut v1, svc_flags, svc_last), (&mut v2, rev_flags, rev_last)] {
                let state = CtState::from_tcp_flags(flags);
                (v.flags, v.state, v.expires_ns) = (flags, state as u8, last * S + state.lifetime_ns());
            }
            HashMap::from([(k1, v1), (k2, v2)])
        };
        let now = 1_000 * S;
        // Seen in the soak: the service entry has both FINs, the reply entry missed the
        // backend's (two CPUs wrote the pair at once) and expires in six hours. Quiet for more
        // than the closing lifetime: both go.
        let torn = tcp((est | CT_F_FIN_FWD | CT_F_FIN_REV, 900), (est | CT_F_FIN_FWD, 900));
        let (doomed, pass) = plan(&torn, now, |_| true);
        assert_eq!(doomed.len(), 2);
        assert!(pass.in_use.is_empty());
        // Neither entry says closed, but together they do: both go once quiet.
        let torn = tcp((est | CT_F_FIN_REV, 900), (est | CT_F_FIN_FWD, 900));
        assert_eq!(plan(&torn, now, |_| true).0.len(), 2);
        // Seen too: both entries closed, the reply entry's expiry written by an established
        // packet's accounting after the flags changed (six hours away). The service side is quiet:
        // both go.
        let closed = est | CT_F_FIN_FWD | CT_F_FIN_REV;
        let mut t = tcp((closed, 900), (closed, 900));
        for (k, v) in &mut t {
            if k.dir == CT_DIR_REPLY {
                v.expires_ns = 990 * S + CtState::Established.lifetime_ns();
            }
        }
        assert_eq!(plan(&t, now, |_| true).0.len(), 2);
        // Closed, packets a moment ago on both sides (last ACKs): kept for now.
        let recent = tcp((closed, 995), (closed, 992));
        assert!(plan(&recent, now, |_| true).0.is_empty());
        // Established and quiet on one side (a one-way stream): kept.
        let one_way = tcp((est, 900), (est, 100));
        assert!(plan(&one_way, now, |_| true).0.is_empty());
        // A half-closed flow (one FIN): kept, the other side may still send.
        let half = tcp((est | CT_F_FIN_FWD, 900), (est | CT_F_FIN_FWD, 900));
        assert!(plan(&half, now, |_| true).0.is_empty());
    }

    #[test]
    fn snat_ports_are_counted_per_backend_on_live_flows_only() {
        // Three north-south flows with SNAT (two to backend 7, one to 8), one east-west flow, and
        // one expired SNAT flow to 7.
        let mut t: HashMap<CtKey4, CtValue4> = HashMap::new();
        let snat = rproxy_common::CT_NAT_EXTERNAL | rproxy_common::CT_NAT_SNAT;
        for (sport, backend, expires, flags) in
            [(10, 7, 200, snat), (11, 7, 200, snat), (12, 8, 200, snat), (13, 7, 200, 0), (14, 7, 50, snat)]
        {
            for (mut k, mut v) in flow(expires, expires, backend) {
                k.sport = if k.dir == CT_DIR_SERVICE { sport } else { k.sport };
                k.dport = if k.dir == CT_DIR_REPLY { sport } else { k.dport };
                v.nat_port = sport;
                v.nat_flags = flags;
                t.insert(k, v);
            }
        }
        let (_, pass) = plan(&t, 100, |_| true);
        assert_eq!((pass.snat_ports, pass.snat_ports_busiest), (3, 2));
        let merged = pass.merge(Pass { snat_ports: 4, snat_ports_busiest: 4, ..Pass::default() });
        assert_eq!((merged.snat_ports, merged.snat_ports_busiest), (7, 4));
    }
}
