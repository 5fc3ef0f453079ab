//! The map writer: makes the BPF maps hold `model::Desired`, writing only what changed, in an
//! order that never lets a packet see a half-written service.
//!
//! Ordering (the datapath reads slot 0, picks a slot in `1..=count`, reads that backend):
//! - insert/grow: backends → rev-NAT → backend slots → slot 0 (the count published last). The
//!   rev-NAT entry is written before slot 0 (not after, as in a literal reading of "slot 0 then
//!   rev-NAT"), so that the reply to the very first translated packet finds it;
//! - shrink: rewrite the kept slots in place (each always holds a live backend), publish the new
//!   count, then delete the slots past it;
//! - delete: slot 0 (the service disappears at once), then its slots, then rev-NAT;
//! - a backend no service references any more is orphaned, not deleted: established flows
//!   keep it (as kube-proxy's NAT, which applies to new connections only), and it is deleted
//!   once the conntrack GC finds no flow that names it ([`Writer::release_orphans`]).
//!
//! A frontend with `SVC_F_ETP_LOCAL` also has a `SCOPE_LOCAL` set (the backends for traffic from
//! outside the cluster, [`ServiceEntry::local_slots`]): its slot 0 carries the same rev-NAT id
//! and flags with the local count (0 is meaningful: this node does not serve the frontend to
//! outside clients, so it exists whenever the flag is set), its slots `1..=count` the local
//! backends. Its writes follow the same rules, and so that a packet that sees the flag in the
//! `SCOPE_EXTERNAL` slot 0 always finds the local set complete:
//! - its slots are written with the external ones, its slot 0 just before the external slot 0;
//! - when the flag goes away, the external slot 0 (without the flag) is written first, then the
//!   local slot 0 and its slots are deleted;
//! - a removed frontend loses its external slot 0 first, then the local slot 0, then the slots.
//!
//! The writer keeps a mirror of what it wrote. On start it adopts what the pinned maps already
//! hold (ids included), so a restart rewrites nothing that is still right and established
//! connections, which point at backend ids and rev-NAT ids, keep working.
//!
//! A frontend with `SVC_F_SOURCE_RANGE` has its `loadBalancerSourceRanges` in the source range
//! trie under its rev-NAT id, and one with `SVC_F_AFFINITY` an affinity match per backend of its
//! slots (either scope): entries it gains are written before its slot 0, entries it loses are
//! deleted after it (and after the slots that named them), and a removed frontend's go before
//! its rev-NAT entry.
//!
//! A failed write (a full map, say) is reported with the Service it belongs to; that service keeps
//! its previous state and every other service is still written.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use foldhash::HashSetExt as _;
use ipnet::IpNet;
use rproxy_common::{
    AffinityMatch, BE_F_ACTIVE, BE_F_LOCAL, BE_F_TERMINATING, SCOPE_EXTERNAL, SCOPE_LOCAL, SVC_F_AFFINITY,
    SVC_F_ETP_LOCAL, ServiceValue, WireAddr, proto,
};

use crate::model::{Backend, BackendAddr, BackendState, Desired, Family, Frontend, ObjectRef, Protocol, ServiceEntry};

/// A key of the service maps, as the writer names it: the sink writes it to the map of the
/// frontend's family (`RPX_SVC4` or `RPX_SVC6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SvcKey {
    pub frontend: Frontend,
    /// `SCOPE_EXTERNAL` or `SCOPE_LOCAL`.
    pub scope: u8,
    /// 0 is the service itself, `1..=count` its backend slots.
    pub slot: u16,
}

/// A backend array entry: the backend and its `BE_F_*` flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendValue {
    pub addr: BackendAddr,
    pub flags: u8,
}

/// A rev-NAT array entry: the frontend's address and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatValue {
    pub addr: IpAddr,
    pub port: u16,
}

/// One map operation, in the order the writer issues them. Backend and rev-NAT ids are one
/// space over both families (the affinity matches and conntrack name them without a family);
/// each id's entry is in the array of its family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    PutBackend(u32, BackendValue),
    /// Zeroes backend id's entry in the array of this family.
    DelBackend(u32, Family),
    /// Slot ≥ 1 (a backend id) or slot 0 (the service).
    PutService(SvcKey, ServiceValue),
    DelService(SvcKey),
    PutRevNat(u16, RevNatValue),
    DelRevNat(u16, Family),
    /// A word of a filter map (`rproxy_common::filter`), which serves both families.
    PutFilterWord(FilterMap, u32, u64),
    /// A source range of the frontend with this rev-NAT id (`rproxy_common::SrcRange`), in the
    /// trie of its family.
    PutSrcRange(u16, IpNet),
    DelSrcRange(u16, IpNet),
    /// A backend id that affinity may use for the frontend with this rev-NAT id
    /// (`rproxy_common::AffinityMatch`).
    PutAffinityMatch(u16, u32),
    DelAffinityMatch(u16, u32),
}

/// Where operations go: the BPF maps, or a recorder in tests.
pub trait MapSink {
    fn apply(&mut self, op: &Op) -> Result<(), String>;

    /// `ops` in order. `Err((n, e))`: the first `n` were applied, op `n` failed with `e`, and the
    /// rest were not tried. A sink may write a run of operations on one map at once.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), (usize, String)> {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Where the writer's operations go: one by one, or a run of them at once (which a sink may
/// write in one system call: a new frontend's slots, a sync's new backends).
trait Run {
    fn op(&mut self, op: Op) -> Result<(), String>;

    /// [`MapSink::apply_all`].
    fn ops(&mut self, ops: &[Op]) -> Result<(), (usize, String)>;
}

/// A sink that counts the operations it is given.
struct Counting<'a, S> {
    sink: &'a mut S,
    ops: usize,
}

impl<S: MapSink> Run for Counting<'_, S> {
    fn op(&mut self, op: Op) -> Result<(), String> {
        self.ops += 1;
        self.sink.apply(&op)
    }

    fn ops(&mut self, ops: &[Op]) -> Result<(), (usize, String)> {
        self.ops += ops.len();
        self.sink.apply_all(ops)
    }
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Frontends written (new or changed), with the service they belong to and backend count.
    pub programmed: Vec<(Frontend, ObjectRef, usize)>,
    /// Frontends removed.
    pub removed: Vec<(Frontend, ObjectRef)>,
    /// Failures: the service (or "backend") concerned and the reason.
    pub errors: Vec<String>,
    /// Frontends whose write (or removal) failed: their maps keep the previous state, and a
    /// later sync of them retries.
    pub failed: BTreeSet<Frontend>,
    /// Map operations issued.
    pub ops: usize,
    /// UDP (rev-NAT id, backend id) pairs that stopped taking new flows: a removed backend (rev-NAT
    /// id 0: every service), a backend no longer in its service's slots, or a removed UDP
    /// frontend. Their conntrack
    /// entries are to be removed at once so the next datagram picks a live backend (kube-proxy
    /// clears UDP conntrack for stale endpoints the same way).
    pub stale_udp: Vec<(u16, u32)>,
}

/// What the writer wrote for one frontend. Its id lists are boxed slices rather than vectors
/// (here and in [`LocalScope`]): 8 bytes less a field, some 2 MB at 30,000 frontends.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    service: ObjectRef,
    value: ServiceValue,
    /// Backend ids in slots 1..=len.
    slots: Box<[u32]>,
    /// Backend ids kept for existing connections only.
    draining: Box<[u32]>,
    /// `None`: not found at adoption (rewritten by the next sync).
    rev_nat: Option<RevNatValue>,
    /// The `SCOPE_LOCAL` set, present exactly when the frontend has `SVC_F_ETP_LOCAL` (as
    /// written; adoption may find it otherwise, and the next sync corrects it).
    local: Option<LocalScope>,
    /// Source ranges written under the rev-NAT id, sorted.
    source_ranges: Box<[IpNet]>,
    /// With `SVC_F_AFFINITY`: the backend ids written as its affinity matches (those of its
    /// slots of both scopes), sorted.
    affinity_ids: Box<[u32]>,
}

/// A frontend's `SCOPE_LOCAL` entries.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LocalScope {
    /// Slot 0.
    value: ServiceValue,
    /// Backend ids in slots `1..=len`.
    slots: Box<[u32]>,
}

impl Programmed {
    /// Backend ids that take new flows: the slots of both scopes (for stale UDP flows).
    fn serving_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.iter().chain(self.local.iter().flat_map(|l| &l.slots)).copied()
    }

    /// Every backend id this frontend names: its slots of both scopes and its draining ones.
    fn referenced_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.serving_ids().chain(self.draining.iter().copied())
    }
}

/// When a backend became an orphan, in the writer's order of orphanings: a conntrack scan that
/// began at a stamp has seen the flows of every backend orphaned by then (no new flow picks an
/// orphan), but not those of one orphaned later.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrphanStamp(u64);

/// New backends written per run by a sync ([`Writer::sync_frontends`]): what one
/// `BPF_MAP_UPDATE_BATCH` call takes (`bpf::batch`).
const NEW_BACKEND_RUN: usize = 4096;

/// The writer's mirror of the maps.
#[derive(Debug)]
pub struct Writer {
    /// Backends programmed: their ids and flags.
    backends: BTreeMap<BackendAddr, (u32, u8)>,
    services: BTreeMap<Frontend, Programmed>,
    /// Ids in use (kept alongside the maps above so that allocation is O(log n)).
    /// Backend id → address (the reverse of `backends`): the ids in use, ordered for allocation.
    backend_ids: BTreeMap<u32, BackendAddr>,
    rev_nat_ids: BTreeSet<u16>,
    next_backend_id: u32,
    next_rev_nat_id: u16,
    /// Size of each family's backend array: ids are `1..backend_array`.
    backend_array: u32,
    /// How many programmed frontends name each backend id (in a slot or as draining), indexed
    /// by id: 4 bytes an id up to the highest in use (1.2 MB at 300,000 backends, where a map
    /// took 5 to 6).
    refs: Vec<u32>,
    /// Backend ids that may have lost their last reference (repeats possible): orphaned at the
    /// end of a sync if nothing names them by then.
    unreferenced: Vec<u32>,
    /// Backend ids no frontend names, still in the maps for the flows that use them, until
    /// [`Writer::release_orphans`] finds none does; each with the [`OrphanStamp`] of its
    /// orphaning.
    orphans: BTreeMap<u32, OrphanStamp>,
    /// The stamp of the latest orphaning.
    orphan_stamp: OrphanStamp,
    /// The service filter's bits and words.
    filter: filter::Filter,
    /// The backend filter's.
    be_filter: filter::Filter,
    /// Source ranges found at adoption under rev-NAT ids of no adopted frontend: deleted by the
    /// next sync.
    stale_src_ranges: Vec<(u16, IpNet)>,
    /// Affinity matches likewise.
    stale_affinity: Vec<(u16, u32)>,
}

/// What the pinned maps held at start, both families, decoded (`read_adopted`).
#[derive(Debug, Default)]
pub struct Adopted {
    pub services: Vec<(SvcKey, ServiceValue)>,
    pub backends: Vec<(u32, BackendValue)>,
    pub rev_nat: Vec<(u16, RevNatValue)>,
    /// The service filter's words (empty: none known).
    pub filter: Vec<u64>,
    /// The backend filter's words (empty: none known).
    pub be_filter: Vec<u64>,
    /// Source ranges, by rev-NAT id.
    pub src_ranges: Vec<(u16, IpNet)>,
    /// Affinity matches: (rev-NAT id, backend id).
    pub affinity: Vec<(u16, u32)>,
    /// Size of the backend arrays (`--backend-map-max`); `None`: the object's default.
    pub backend_array: Option<u32>,
    /// Entries that could not be decoded (an unknown protocol): left in place.
    pub undecoded: Vec<String>,
}

fn protocol(p: u8) -> Option<Protocol> {
    match p {
        proto::TCP => Some(Protocol::Tcp),
        proto::UDP => Some(Protocol::Udp),
        _ => None,
    }
}

/// The `SCOPE_EXTERNAL` key of `fe`'s `slot`.
fn key_of(fe: Frontend, slot: u16) -> SvcKey {
    SvcKey { frontend: fe, scope: SCOPE_EXTERNAL, slot }
}

/// The `SCOPE_LOCAL` key of `fe`'s `slot`.
fn local_key_of(fe: Frontend, slot: u16) -> SvcKey {
    SvcKey { scope: SCOPE_LOCAL, ..key_of(fe, slot) }
}

/// A filter bit (`rproxy_common::filter`) of an address, port (host order) and protocol.
fn filter_bit(addr: IpAddr, port: u16, proto: Protocol) -> u32 {
    match addr {
        IpAddr::V4(a) => rproxy_common::filter::bit(u32::wire(a), port.to_be(), proto.number()),
        IpAddr::V6(a) => rproxy_common::filter::bit6(&<[u32; 4]>::wire(a), port.to_be(), proto.number()),
    }
}

/// The service filter's bit of `fe`.
fn frontend_bit(fe: Frontend) -> u32 {
    filter_bit(fe.addr, fe.port, fe.proto)
}

/// The backend filter's bit of a backend.
fn backend_bit(be: BackendValue) -> u32 {
    addr_bit(be.addr)
}

/// The backend filter's bit of a backend's address, port and protocol.
fn addr_bit(addr: BackendAddr) -> u32 {
    filter_bit(addr.addr, addr.port, addr.proto)
}

/// The scope's name, for messages and `dump`.
#[must_use]
pub fn scope_name(scope: u8) -> &'static str {
    match scope {
        SCOPE_EXTERNAL => "external",
        SCOPE_LOCAL => "local",
        _ => "unknown",
    }
}

fn backend_value(b: &Backend) -> BackendValue {
    let mut flags = match b.state {
        BackendState::Active => BE_F_ACTIVE,
        BackendState::Terminating => BE_F_TERMINATING,
    };
    if b.local {
        flags |= BE_F_LOCAL;
    }
    BackendValue { addr: b.addr, flags }
}

/// Writes the slots `1..=ids.len()` of one scope (`key(slot)`) that differ from `old`, then
/// `last` (the scope's slot 0, which must follow its slots) in the same run: a sink writes them
/// with one system call, in order, and stops at the first that fails. Whether anything was
/// written.
fn write_slots(
    ids: &[u32],
    old: &[u32],
    key: impl Fn(u16) -> SvcKey,
    last: Option<Op>,
    run: &mut impl Run,
) -> Result<bool, String> {
    let puts: Vec<Op> = ids
        .iter()
        .enumerate()
        .filter(|(i, id)| old.get(*i) != Some(*id))
        .map(|(i, id)| {
            Op::PutService(key(slot_u16(i + 1)), ServiceValue { backend_id: *id, ..ServiceValue::default() })
        })
        .chain(last)
        .collect();
    if puts.is_empty() {
        return Ok(false);
    }
    run.ops(&puts).map_err(|(_, e)| e)?;
    Ok(true)
}

/// Issues `op(id, item)` for each of `items` (sorted) that `except` (sorted) lacks: the entries
/// of a per-frontend set (source ranges, affinity matches) to write or delete. Whether anything
/// was issued.
fn set_ops<T: Ord + Copy>(
    id: u16,
    items: &[T],
    except: &[T],
    op: fn(u16, T) -> Op,
    run: &mut impl Run,
) -> Result<bool, String> {
    let mut issued = false;
    for item in items.iter().filter(|i| except.binary_search(i).is_err()) {
        run.op(op(id, *item))?;
        issued = true;
    }
    Ok(issued)
}

/// Groups `(rev-NAT id, item)` pairs by id, each group sorted.
fn by_id<T: Ord>(pairs: Vec<(u16, T)>) -> BTreeMap<u16, Vec<T>> {
    let mut groups: BTreeMap<u16, Vec<T>> = BTreeMap::new();
    for (id, item) in pairs {
        groups.entry(id).or_default().push(item);
    }
    for items in groups.values_mut() {
        items.sort_unstable();
        items.dedup();
    }
    groups
}

/// The backend ids a frontend's affinity matches name: those of its slots of both scopes
/// (sorted, unique), or none without `SVC_F_AFFINITY`.
fn affinity_ids(flags: u16, slot_ids: &[u32], local: Option<&LocalScope>) -> Vec<u32> {
    if flags & SVC_F_AFFINITY == 0 {
        return Vec::new();
    }
    let ids: BTreeSet<u32> = slot_ids.iter().chain(local.iter().flat_map(|l| &l.slots)).copied().collect();
    ids.into_iter().collect()
}

/// Deletes the `SCOPE_LOCAL` slots past the new count, or, when the flag is gone (the external
/// slot 0 no longer leads there), the whole set: slot 0, then the slots. Whether anything was
/// deleted.
fn shrink_local(
    fe: Frontend,
    local: Option<&LocalScope>,
    old_local: Option<&LocalScope>,
    run: &mut impl Run,
) -> Result<bool, String> {
    let old_len = old_local.map_or(0, |o| o.slots.len());
    match (local, old_local) {
        (Some(l), _) => {
            for s in l.slots.len() + 1..=old_len {
                run.op(Op::DelService(local_key_of(fe, slot_u16(s))))?;
            }
            Ok(old_len > l.slots.len())
        }
        (None, Some(_)) => {
            run.op(Op::DelService(local_key_of(fe, 0)))?;
            for s in 1..=old_len {
                run.op(Op::DelService(local_key_of(fe, slot_u16(s))))?;
            }
            Ok(true)
        }
        (None, None) => Ok(false),
    }
}

fn slot_u16(slot: usize) -> u16 {
    u16::try_from(slot).expect("slot counts are bounded by BACKENDS_PER_SERVICE_MAX")
}

impl Default for Writer {
    fn default() -> Self {
        Self::new()
    }
}

impl Writer {
    /// A writer for empty maps.
    #[must_use]
    pub fn new() -> Self {
        Self {
            backends: BTreeMap::new(),
            services: BTreeMap::new(),
            backend_ids: BTreeMap::new(),
            rev_nat_ids: BTreeSet::new(),
            next_backend_id: 1,
            next_rev_nat_id: 1,
            backend_array: rproxy_common::limits::BACKENDS_MAX,
            refs: Vec::new(),
            unreferenced: Vec::new(),
            orphans: BTreeMap::new(),
            orphan_stamp: OrphanStamp(0),
            filter: filter::Filter::new(FilterMap::Services),
            be_filter: filter::Filter::new(FilterMap::Backends),
            stale_src_ranges: Vec::new(),
            stale_affinity: Vec::new(),
        }
    }

    /// A writer whose mirror is what the pinned maps hold. Entries that cannot be interpreted
    /// (unknown protocol, a slot 0 without its slots) are left for the first sync to overwrite
    /// or delete; they are returned as warnings.
    #[must_use]
    pub fn adopt(adopted: Adopted) -> (Self, Vec<String>) {
        let mut w = Self {
            filter: filter::Filter::adopt(FilterMap::Services, adopted.filter),
            be_filter: filter::Filter::adopt(FilterMap::Backends, adopted.be_filter),
            backend_array: adopted.backend_array.unwrap_or(rproxy_common::limits::BACKENDS_MAX),
            ..Self::new()
        };
        let mut warnings = adopted.undecoded;
        for (id, be) in adopted.backends {
            w.backends.insert(be.addr, (id, be.flags));
            w.backend_ids.insert(id, be.addr);
            w.be_filter.add(backend_bit(be));
        }
        let rev_nat: BTreeMap<u16, RevNatValue> = adopted.rev_nat.into_iter().collect();
        let mut src_ranges = by_id(adopted.src_ranges);
        let mut affinity = by_id(adopted.affinity);
        let entries: BTreeMap<SvcKey, ServiceValue> = adopted.services.into_iter().collect();
        // The backend ids of slots 1..=count of the set whose slot 0 is `key0`, if all are there.
        let slot_ids = |key0: &SvcKey, count: u16| -> Option<Vec<u32>> {
            (1..=count).map(|slot| entries.get(&SvcKey { slot, ..*key0 }).map(|v| v.backend_id)).collect()
        };
        for (key, value) in entries.iter().filter(|(k, _)| k.slot == 0) {
            let fe = key.frontend;
            match key.scope {
                SCOPE_EXTERNAL => {}
                SCOPE_LOCAL => {
                    if !entries.contains_key(&SvcKey { scope: SCOPE_EXTERNAL, ..*key }) {
                        warnings.push(format!("{fe}: local-scope entries without the service; left in place"));
                    }
                    continue;
                }
                other => {
                    warnings.push(format!("{fe}: service entry with unknown scope {other}; left in place"));
                    continue;
                }
            }
            let Some(ids) = slot_ids(key, value.count) else {
                warnings.push(format!("{fe}: slot missing, will be rewritten"));
                continue;
            };
            let local_key = SvcKey { scope: SCOPE_LOCAL, ..*key };
            let local = entries.get(&local_key).and_then(|local_value| {
                let slots = slot_ids(&local_key, local_value.count);
                if slots.is_none() {
                    warnings.push(format!("{fe}: local-scope slot missing, will be rewritten"));
                }
                Some(LocalScope { value: *local_value, slots: slots?.into() })
            });
            let rn = rev_nat.get(&value.rev_nat_id).copied();
            let service = ObjectRef::new("", "(adopted)");
            w.rev_nat_ids.insert(value.rev_nat_id);
            let source_ranges = src_ranges.remove(&value.rev_nat_id).unwrap_or_default();
            let affinity_ids = affinity.remove(&value.rev_nat_id).unwrap_or_default();
            let p = Programmed {
                service,
                value: *value,
                slots: ids.into(),
                draining: Box::default(),
                rev_nat: rn,
                local,
                source_ranges: source_ranges.into(),
                affinity_ids: affinity_ids.into(),
            };
            w.reference(&p);
            w.services.insert(fe, p);
            w.filter.add(frontend_bit(fe));
        }
        w.stale_src_ranges =
            src_ranges.into_iter().flat_map(|(id, nets)| nets.into_iter().map(move |net| (id, net))).collect();
        w.stale_affinity = affinity.into_iter().flat_map(|(id, ids)| ids.into_iter().map(move |be| (id, be))).collect();
        // The first sync rewrites the words a previous agent left otherwise.
        w.filter.mark_all();
        w.be_filter.mark_all();
        // Backends no adopted service names: orphaned by the first sync unless it uses them,
        // and deleted once no flow does.
        w.unreferenced = w.backend_ids.keys().filter(|id| w.refs_of(**id) == 0).copied().collect();
        w.next_backend_id = w.backend_ids.last_key_value().map_or(0, |(id, _)| *id).wrapping_add(1).max(1);
        w.next_rev_nat_id = w.rev_nat_ids.last().copied().unwrap_or(0).wrapping_add(1).max(1);
        (w, warnings)
    }

    /// Number of frontends programmed.
    #[must_use]
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    /// The rev-NAT id of frontend `fe`, if it is programmed (or adopted).
    #[must_use]
    pub fn rev_nat_id(&self, fe: &Frontend) -> Option<u16> {
        self.services.get(fe).map(|p| p.value.rev_nat_id)
    }

    /// The frontends programmed (or adopted).
    pub fn frontends(&self) -> impl Iterator<Item = Frontend> + '_ {
        self.services.keys().copied()
    }

    /// Number of backends programmed.
    #[must_use]
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// Whether backend `id` is programmed (for conntrack GC).
    #[must_use]
    pub fn has_backend(&self, id: u32) -> bool {
        self.backend_ids.contains_key(&id)
    }

    /// The ids of the backends programmed (orphans included), for a GC pass away from the
    /// agent's loop (`gc::run_pass_deferred`).
    #[must_use]
    pub fn backend_ids(&self) -> std::collections::HashSet<u32> {
        self.backend_ids.keys().copied().collect()
    }

    /// Makes the maps hold `desired`: every frontend is compared.
    pub fn sync(&mut self, desired: &Desired, sink: &mut impl MapSink) -> SyncReport {
        let all: BTreeSet<Frontend> = self.services.keys().chain(desired.services.keys()).copied().collect();
        self.sync_frontends(desired, &all, sink)
    }

    /// Makes the maps hold `desired` for the given frontends only (those a change may have
    /// touched; the others are assumed unchanged): O(changed), not O(all services).
    pub fn sync_frontends(
        &mut self,
        desired: &Desired,
        frontends: &BTreeSet<Frontend>,
        sink: &mut impl MapSink,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let mut run = Counting { sink, ops: 0 };

        let first = self.services.is_empty();
        // 1. Frontends that are no longer wanted.
        for fe in frontends.iter().filter(|fe| !desired.services.contains_key(fe)) {
            let Some(p) = self.services.get(fe) else { continue };
            let mut ops = vec![Op::DelService(key_of(*fe, 0))];
            let local_slots = p.local.as_ref().map(|l| l.slots.len());
            ops.extend(local_slots.map(|_| Op::DelService(local_key_of(*fe, 0))));
            ops.extend((1..=p.slots.len()).map(|s| Op::DelService(key_of(*fe, slot_u16(s)))));
            ops.extend((1..=local_slots.unwrap_or(0)).map(|s| Op::DelService(local_key_of(*fe, slot_u16(s)))));
            ops.extend(p.source_ranges.iter().map(|net| Op::DelSrcRange(p.value.rev_nat_id, *net)));
            ops.extend(p.affinity_ids.iter().map(|be| Op::DelAffinityMatch(p.value.rev_nat_id, *be)));
            ops.push(Op::DelRevNat(p.value.rev_nat_id, Family::of(fe.addr)));
            match ops.into_iter().try_for_each(|op| run.op(op)) {
                Ok(()) => {
                    let p = self.services.remove(fe).expect("present");
                    self.filter.remove(frontend_bit(*fe));
                    self.rev_nat_ids.remove(&p.value.rev_nat_id);
                    self.unreference(&p);
                    if fe.proto == Protocol::Udp {
                        report.stale_udp.extend(p.serving_ids().map(|id| (p.value.rev_nat_id, id)));
                    }
                    report.removed.push((*fe, p.service));
                }
                Err(e) => {
                    report.errors.push(format!("Service {} frontend {fe}: removing: {e}", p.service));
                    report.failed.insert(*fe);
                }
            }
        }

        // The filter bits of new frontends, a word at a time, and the new backends with theirs:
        // the presets below then find them set, and a first sync of 300,000 backends writes each
        // filter word once instead of once per bit. A failure here is left to those presets.
        let wanted = || frontends.iter().filter_map(|fe| desired.services.get(fe).map(|e| (fe, e)));
        self.filter.preset_all(
            wanted().filter(|(fe, _)| !self.services.contains_key(fe)).map(|(fe, _)| frontend_bit(*fe)),
            &mut run,
        );
        self.write_new_backends(&wanted().map(|(_, e)| e), &mut run);

        // 2. New and changed frontends; a new one's filter bit first.
        for fe in frontends {
            let Some(entry) = desired.services.get(fe) else { continue };
            let new = !self.services.contains_key(fe);
            if new && let Err(e) = self.filter.preset(frontend_bit(*fe), &mut run) {
                report.errors.push(format!("Service {} frontend {fe}: {e}", entry.service));
                report.failed.insert(*fe);
                continue;
            }
            let result = self.sync_frontend(*fe, entry, &mut run, &mut report.stale_udp);
            if new && result.is_ok() {
                self.filter.add(frontend_bit(*fe));
            }
            match result {
                Ok(true) => report.programmed.push((*fe, entry.service.clone(), entry.slots.len())),
                Ok(false) => {}
                Err(e) => {
                    report.errors.push(format!("Service {} frontend {fe}: {e}", entry.service));
                    report.failed.insert(*fe);
                }
            }
        }

        if first {
            crate::model::pack(&mut self.services);
        }

        // Source ranges and affinity matches a previous agent left under ids no frontend has.
        for (id, net) in std::mem::take(&mut self.stale_src_ranges) {
            if let Err(e) = run.op(Op::DelSrcRange(id, net)) {
                report.errors.push(format!("source range {net} of rev-NAT id {id}: removing: {e}"));
                self.stale_src_ranges.push((id, net));
            }
        }
        for (id, be) in std::mem::take(&mut self.stale_affinity) {
            if let Err(e) = run.op(Op::DelAffinityMatch(id, be)) {
                report.errors.push(format!("affinity match of backend {be}, rev-NAT id {id}: removing: {e}"));
                self.stale_affinity.push((id, be));
            }
        }

        // 3. Backends no service references any more become orphans: no new flow can pick them,
        // but their entries stay while established flows use them (`release_orphans`). Their
        // UDP flows move at once, as kube-proxy clears UDP conntrack of stale endpoints.
        let candidates = std::mem::take(&mut self.unreferenced);
        for id in candidates {
            if self.refs_of(id) == 0 && self.backend_ids.contains_key(&id) && !self.orphans.contains_key(&id) {
                self.orphan_stamp.0 += 1;
                self.orphans.insert(id, self.orphan_stamp);
                // Rev-NAT id 0: the backend's UDP flows of every service.
                report.stale_udp.push((0, id));
            }
        }
        // 4. Filter bits no programmed frontend or backend has any more (and those preset for
        // entries whose write failed).
        report.errors.extend(self.filter.flush(&mut run));
        report.errors.extend(self.be_filter.flush(&mut run));
        report.stale_udp.sort_unstable();
        report.stale_udp.dedup();
        report.ops = run.ops;
        report
    }

    /// Deletes the orphaned backends (named by no frontend) that no flow uses any more:
    /// `in_use(id)` says whether a conntrack entry names backend `id` (the conntrack GC's
    /// answer). A backend that left its Service (unready, removed from its slice) so keeps its
    /// established TCP connections until they end, as under kube-proxy, where NAT applies to new
    /// connections only. Returns how many were deleted, and the errors.
    pub fn release_orphans(&mut self, in_use: impl Fn(u32) -> bool, sink: &mut impl MapSink) -> (usize, Vec<String>) {
        self.release_orphans_scanned_at(self.orphan_stamp, in_use, sink)
    }

    /// [`Writer::release_orphans`] with the answer of a conntrack scan that began at `scanned_at`
    /// ([`Writer::orphan_stamp`] then), away from the writer: only backends orphaned before it
    /// began are judged by it. One orphaned since may have had a flow created after the scan
    /// read the table (it was in its Service's slots until then), which the scan never saw.
    pub fn release_orphans_scanned_at(
        &mut self,
        scanned_at: OrphanStamp,
        in_use: impl Fn(u32) -> bool,
        sink: &mut impl MapSink,
    ) -> (usize, Vec<String>) {
        let mut run = Counting { sink, ops: 0 };
        let mut released = 0;
        let mut errors = Vec::new();
        let idle: Vec<u32> = self
            .orphans
            .iter()
            .filter(|&(id, since)| *since <= scanned_at && !in_use(*id))
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            let Some(addr) = self.backend_ids.get(&id).copied() else {
                self.orphans.remove(&id);
                continue;
            };
            match run.op(Op::DelBackend(id, Family::of(addr.addr))) {
                Ok(()) => {
                    if self.backends.remove(&addr).is_some() {
                        self.be_filter.remove(addr_bit(addr));
                    }
                    self.backend_ids.remove(&id);
                    self.orphans.remove(&id);
                    released += 1;
                }
                Err(e) => errors.push(format!("backend {addr} (id {id}): removing: {e}")),
            }
        }
        errors.extend(self.be_filter.flush(&mut run));
        (released, errors)
    }

    /// Where the orphaning of backends stands: taken when a conntrack scan begins, for
    /// [`Writer::release_orphans_scanned_at`].
    #[must_use]
    pub fn orphan_stamp(&self) -> OrphanStamp {
        self.orphan_stamp
    }

    /// Number of orphaned backends: named by no frontend, kept for the flows that use them.
    #[must_use]
    pub fn orphan_count(&self) -> usize {
        self.orphans.len()
    }

    /// Counts the references `p` makes to backends.
    fn reference(&mut self, p: &Programmed) {
        for id in p.referenced_ids() {
            let i = usize::try_from(id).expect("u32 fits usize");
            if i >= self.refs.len() {
                self.refs.resize(i + 1, 0);
            }
            self.refs[i] += 1;
        }
    }

    /// How many programmed frontends name backend `id`.
    fn refs_of(&self, id: u32) -> u32 {
        usize::try_from(id).ok().and_then(|i| self.refs.get(i)).copied().unwrap_or(0)
    }

    /// Drops the references `p` made; backends left unnamed become deletion candidates.
    fn unreference(&mut self, p: &Programmed) {
        for id in p.referenced_ids() {
            if let Some(n) = self.refs.get_mut(usize::try_from(id).expect("u32 fits usize"))
                && *n > 0
            {
                *n -= 1;
                if *n == 0 {
                    self.unreferenced.push(id);
                }
            }
        }
    }

    /// Writes one frontend. `Ok(true)` if anything changed.
    fn sync_frontend(
        &mut self,
        fe: Frontend,
        entry: &ServiceEntry,
        run: &mut impl Run,
        stale_udp: &mut Vec<(u16, u32)>,
    ) -> Result<bool, String> {
        let rev_nat_id = match self.services.get(&fe) {
            Some(p) => p.value.rev_nat_id,
            None => self.alloc_rev_nat_id()?,
        };
        let result = self.write_frontend(fe, entry, rev_nat_id, run, stale_udp);
        if result.is_err() {
            // What this attempt wrote and nothing records: best-effort removal (errors are
            // already reported). For a new frontend, its slots (no slot 0 leads to them) and
            // rev-NAT entry; for any, the source ranges and affinity matches it added, which
            // must not outlive the attempt under an id another frontend may get.
            let old = self.services.get(&fe);
            let mut undo = Vec::new();
            if old.is_none() {
                // At most as many slots as a write gets to (a larger set fails before any).
                let max = usize::from(rproxy_common::limits::BACKENDS_PER_SERVICE_MAX);
                undo.push(Op::DelService(local_key_of(fe, 0)));
                undo.extend((1..=entry.slots.len().min(max)).map(|s| Op::DelService(key_of(fe, slot_u16(s)))));
                undo.extend(
                    (1..=entry.local_slots.len().min(max)).map(|s| Op::DelService(local_key_of(fe, slot_u16(s)))),
                );
            }
            let kept: &[IpNet] = old.map_or(&[], |p| &p.source_ranges);
            undo.extend(
                entry
                    .source_ranges
                    .iter()
                    .filter(|n| kept.binary_search(n).is_err())
                    .map(|n| Op::DelSrcRange(rev_nat_id, *n)),
            );
            let kept: &[u32] = old.map_or(&[], |p| &p.affinity_ids);
            let tried = entry.slots.iter().chain(&entry.local_slots).filter_map(|b| self.backends.get(&b.addr));
            undo.extend(
                tried
                    .map(|(id, _)| *id)
                    .filter(|id| kept.binary_search(id).is_err())
                    .map(|id| Op::DelAffinityMatch(rev_nat_id, id)),
            );
            if old.is_none() {
                undo.push(Op::DelRevNat(rev_nat_id, Family::of(fe.addr)));
            }
            for op in undo {
                let _ = run.op(op);
            }
        }
        result
    }

    /// [`Writer::sync_frontend`] with the frontend's rev-NAT id chosen.
    fn write_frontend(
        &mut self,
        fe: Frontend,
        entry: &ServiceEntry,
        rev_nat_id: u16,
        run: &mut impl Run,
        stale_udp: &mut Vec<(u16, u32)>,
    ) -> Result<bool, String> {
        const MAX: u16 = rproxy_common::limits::BACKENDS_PER_SERVICE_MAX;
        let etp_local = entry.flags & SVC_F_ETP_LOCAL != 0;
        let largest = if etp_local { entry.slots.len().max(entry.local_slots.len()) } else { entry.slots.len() };
        if largest > usize::from(MAX) {
            return Err(format!("{largest} backends exceed the limit of {MAX} per service port"));
        }
        let mut changed = false;
        // Backends first: every id a slot will name exists before the slot does.
        let mut slot_ids = Vec::with_capacity(entry.slots.len());
        let mut draining = Vec::with_capacity(entry.draining.len());
        for b in entry.slots.iter().chain(&entry.draining) {
            let (id, fresh) = self.ensure_backend(b, run)?;
            changed |= fresh;
            if slot_ids.len() < entry.slots.len() { slot_ids.push(id) } else { draining.push(id) }
        }
        // The local backends are among those already (the translation guarantees it), so this
        // only looks their ids up; a backend that is not is written like the others.
        let mut local_ids = Vec::new();
        if etp_local {
            for b in &entry.local_slots {
                let (id, fresh) = self.ensure_backend(b, run)?;
                changed |= fresh;
                local_ids.push(id);
            }
        }
        let old = self.services.get(&fe);
        let value = ServiceValue {
            backend_id: 0,
            count: slot_u16(slot_ids.len()),
            rev_nat_id,
            flags: entry.flags,
            _pad: 0,
            affinity_timeout: entry.affinity_timeout,
        };
        let local = etp_local.then(|| LocalScope {
            value: ServiceValue { count: slot_u16(local_ids.len()), ..value },
            slots: local_ids.into(),
        });
        let rev_nat = RevNatValue { addr: fe.addr, port: fe.port };
        let old_slots: &[u32] = old.map_or(&[], |p| &p.slots);
        let old_local = old.and_then(|p| p.local.as_ref());
        let old_local_slots: &[u32] = old_local.map_or(&[], |l| &l.slots);

        if old.is_none_or(|p| p.rev_nat != Some(rev_nat)) {
            run.op(Op::PutRevNat(rev_nat_id, rev_nat))?;
            changed = true;
        }
        // Source ranges the frontend gains, before the slot 0 that may carry the flag they serve;
        // affinity matches before the slots that name their backends.
        let old_ranges: &[IpNet] = old.map_or(&[], |p| &p.source_ranges);
        changed |= set_ops(rev_nat_id, &entry.source_ranges, old_ranges, Op::PutSrcRange, run)?;
        let affinity_ids = affinity_ids(entry.flags, &slot_ids, local.as_ref());
        let old_affinity: &[u32] = old.map_or(&[], |p| &p.affinity_ids);
        changed |= set_ops(rev_nat_id, &affinity_ids, old_affinity, Op::PutAffinityMatch, run)?;
        // Slots that differ, up to the new count (growing or rewriting in place), of both scopes,
        // then slot 0 (with the external slots when there is no local scope).
        let slot0 = old.is_none_or(|p| p.value != value).then(|| Op::PutService(key_of(fe, 0), value));
        if let Some(l) = &local {
            changed |= write_slots(&slot_ids, old_slots, |s| key_of(fe, s), None, run)?;
            changed |= write_slots(&l.slots, old_local_slots, |s| local_key_of(fe, s), None, run)?;
            // The local slot 0 before the external one, which may carry the flag that leads to it.
            if old_local.is_none_or(|o| o.value != l.value) {
                run.op(Op::PutService(local_key_of(fe, 0), l.value))?;
                changed = true;
            }
            if let Some(op) = slot0 {
                run.op(op)?;
                changed = true;
            }
        } else {
            changed |= write_slots(&slot_ids, old_slots, |s| key_of(fe, s), slot0, run)?;
        }
        // Ranges it loses, once slot 0 no longer leads to them (or still does, to fewer).
        changed |= set_ops(rev_nat_id, old_ranges, &entry.source_ranges, Op::DelSrcRange, run)?;
        // Shrinking: the counts are already published, the slots past them are unreachable.
        for s in slot_ids.len() + 1..=old_slots.len() {
            run.op(Op::DelService(key_of(fe, slot_u16(s))))?;
            changed = true;
        }
        changed |= shrink_local(fe, local.as_ref(), old_local, run)?;
        // Affinity matches of backends no slot names any more.
        changed |= set_ops(rev_nat_id, old_affinity, &affinity_ids, Op::DelAffinityMatch, run)?;
        changed |= old.is_none_or(|p| *p.draining != *draining);
        // The id counts as used only once the service is recorded: a failed attempt frees it.
        self.rev_nat_ids.insert(rev_nat_id);
        let new = Programmed {
            service: entry.service.clone(),
            value,
            slots: slot_ids.into(),
            draining: draining.into(),
            rev_nat: Some(rev_nat),
            local,
            source_ranges: entry.source_ranges.as_slice().into(),
            affinity_ids: affinity_ids.into(),
        };
        self.reference(&new);
        if let Some(old) = self.services.insert(fe, new) {
            self.unreference(&old);
            if fe.proto == Protocol::Udp {
                let now: BTreeSet<u32> = self.services[&fe].serving_ids().collect();
                stale_udp.extend(old.serving_ids().filter(|id| !now.contains(id)).map(|id| (rev_nat_id, id)));
            }
        }
        Ok(changed)
    }

    /// Writes the backends of `entries` that are new, in runs of [`NEW_BACKEND_RUN`] (a sink
    /// may take each in one system call: a first sync of 300,000 backends), after their filter
    /// bits (a word at a time, over all of them), so that each frontend's own pass
    /// ([`Writer::ensure_backend`]) finds them written. One whose filter bit could not be set,
    /// or whose write fails, is left to that pass, which reports it with its Service; so is a
    /// last run of one.
    ///
    /// Runs rather than all at once: what a run needs (its values, ids and operations, and the
    /// set that keeps a backend shared by two Services from being written twice) is held for one
    /// run only; for 300,000 backends at once it came to 35 MB at the agent's peak.
    fn write_new_backends<'e, I>(&mut self, entries: &I, run: &mut impl Run)
    where
        I: Iterator<Item = &'e ServiceEntry> + Clone,
    {
        let first = self.backends.is_empty();
        self.write_new_backend_runs(entries, run);
        if first {
            crate::model::pack(&mut self.backends);
            crate::model::pack(&mut self.backend_ids);
        }
    }

    fn write_new_backend_runs<'e, I>(&mut self, entries: &I, run: &mut impl Run)
    where
        I: Iterator<Item = &'e ServiceEntry> + Clone,
    {
        let all = || entries.clone().flat_map(|e| e.slots.iter().chain(&e.local_slots).chain(&e.draining));
        self.be_filter.preset_all(
            all().filter(|b| !self.backends.contains_key(&b.addr)).map(|b| backend_bit(backend_value(b))),
            run,
        );
        let mut backends = all();
        let mut values = Vec::with_capacity(NEW_BACKEND_RUN);
        let mut in_run = foldhash::HashSet::with_capacity(NEW_BACKEND_RUN);
        let mut ops = Vec::with_capacity(NEW_BACKEND_RUN);
        loop {
            values.clear();
            in_run.clear();
            for b in backends.by_ref() {
                // Backends of earlier runs are in `self.backends` by now.
                if self.backends.contains_key(&b.addr) || !in_run.insert(b.addr) {
                    continue;
                }
                let value = backend_value(b);
                if self.be_filter.written_has(backend_bit(value)) {
                    values.push(value);
                    if values.len() == NEW_BACKEND_RUN {
                        break;
                    }
                }
            }
            if values.len() < 2 {
                return;
            }
            // Ids are taken (and held) before the write: each allocation skips the ids in use.
            ops.clear();
            for value in &values {
                let Ok(id) = self.alloc_backend_id() else { break };
                self.backend_ids.insert(id, value.addr);
                ops.push(Op::PutBackend(id, *value));
            }
            let written = match run.ops(&ops) {
                Ok(()) => ops.len(),
                Err((n, _)) => n,
            };
            for (i, op) in ops.iter().enumerate() {
                let Op::PutBackend(id, value) = *op else { continue };
                if i < written {
                    self.be_filter.add(backend_bit(value));
                    self.backends.insert(value.addr, (id, value.flags));
                    // Unreferenced until a service that uses it is recorded (which may fail).
                    self.unreferenced.push(id);
                } else {
                    self.backend_ids.remove(&id);
                }
            }
            if written < values.len() {
                // A failed write or a full array: the rest go through `ensure_backend`.
                return;
            }
        }
    }

    /// The id of backend `b`, writing it if it is new or its flags changed. `(id, written)`.
    fn ensure_backend(&mut self, b: &Backend, run: &mut impl Run) -> Result<(u32, bool), String> {
        let value = backend_value(b);
        if let Some(&(id, flags)) = self.backends.get(&b.addr) {
            // An orphan back in a Service keeps its id (and its flows).
            self.orphans.remove(&id);
            if flags == value.flags {
                return Ok((id, false));
            }
            run.op(Op::PutBackend(id, value)).map_err(|e| format!("backend {}: {e}", b.addr))?;
            self.backends.insert(b.addr, (id, value.flags));
            return Ok((id, true));
        }
        let id = self.alloc_backend_id().map_err(|e| format!("backend {}: {e}", b.addr))?;
        // Its filter bit first: a reply from it must never be hidden from the datapath.
        self.be_filter.preset(backend_bit(value), run).map_err(|e| format!("backend {}: {e}", b.addr))?;
        run.op(Op::PutBackend(id, value)).map_err(|e| format!("backend {}: {e}", b.addr))?;
        self.be_filter.add(backend_bit(value));
        self.backends.insert(b.addr, (id, value.flags));
        self.backend_ids.insert(id, b.addr);
        // Unreferenced until a service that uses it is recorded (which may fail).
        self.unreferenced.push(id);
        Ok((id, true))
    }

    /// Next free backend id, in `1..backend_array` (the backend array's size). Ids grow
    /// monotonically (wrapping, skipping ids in use) so that a removed backend's id is not handed
    /// out again soon: stale conntrack entries must not start pointing at another pod.
    fn alloc_backend_id(&mut self) -> Result<u32, String> {
        let max = self.backend_array;
        if self.backend_ids.len() >= (max - 1) as usize {
            return Err(format!("backend map full ({} backends: --backend-map-max)", max - 1));
        }
        let next = |id: u32| if id + 1 >= max { 1 } else { id + 1 };
        let mut id = if (1..max).contains(&self.next_backend_id) { self.next_backend_id } else { 1 };
        while self.backend_ids.contains_key(&id) {
            id = next(id);
        }
        self.next_backend_id = next(id);
        Ok(id)
    }

    /// Next free rev-NAT id, same policy as backend ids.
    fn alloc_rev_nat_id(&mut self) -> Result<u16, String> {
        if self.rev_nat_ids.len() >= usize::from(u16::MAX) {
            return Err(String::from("no free rev-NAT id (65535 service ports programmed)"));
        }
        let mut id = self.next_rev_nat_id.max(1);
        while self.rev_nat_ids.contains(&id) {
            id = id.wrapping_add(1).max(1);
        }
        self.next_rev_nat_id = id.wrapping_add(1).max(1);
        Ok(id)
    }
}

/// Which map a run of operations written at once goes to (`MapSink::apply_all`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum BatchOf {
    Backends(Family),
    Services(Family),
}

impl BatchOf {
    fn of(op: &Op) -> Option<Self> {
        match op {
            Op::PutBackend(_, v) => Some(Self::Backends(Family::of(v.addr.addr))),
            Op::PutService(k, _) => Some(Self::Services(Family::of(k.frontend.addr))),
            _ => None,
        }
    }
}

/// The map key of a service entry.
fn service_key<A: WireAddr>(k: &SvcKey, addr: A::Ip) -> rproxy_common::ServiceKey<A> {
    let (port, proto) = (k.frontend.port, k.frontend.proto.number());
    rproxy_common::ServiceKey { scope: k.scope, ..rproxy_common::ServiceKey::new(addr, port, proto, k.slot) }
}

/// The map value of a backend.
fn backend_entry<A: WireAddr>(v: &BackendValue, addr: A::Ip) -> rproxy_common::Backend<A> {
    rproxy_common::Backend::new(addr, v.addr.port, v.addr.proto.number(), v.flags)
}

/// Writes a run of operations on `map` at once, `entry` giving each one's key and value there
/// (every op of the run has one: `BatchOf`).
fn update_run<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::MapData,
    ops: &[Op],
    entry: impl Fn(&Op) -> Option<(K, V)>,
) -> Result<(), (usize, std::io::Error)> {
    use std::os::fd::AsFd as _;
    let entries: Vec<(K, V)> = ops.iter().filter_map(entry).collect();
    crate::bpf::batch::update_all(map.fd().as_fd(), &entries)
}

/// The BPF maps as a sink: each operation goes to the map of its family.
impl MapSink for crate::bpf::datapath::Maps {
    /// Runs of backend or service writes of one family go to their map in one system call per
    /// 4,096 (`BPF_MAP_UPDATE_BATCH`); the rest one by one.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), (usize, String)> {
        use IpAddr::{V4, V6};
        use aya::maps::IterableMap as _;
        let mut at = 0;
        while at < ops.len() {
            let of = BatchOf::of(&ops[at]);
            let run = ops[at..].iter().take_while(|op| of.is_some() && BatchOf::of(op) == of).count();
            if run < 2 {
                self.apply(&ops[at]).map_err(|e| (at, e))?;
                at += 1;
                continue;
            }
            let run_ops = &ops[at..at + run];
            let written = match of {
                Some(BatchOf::Backends(Family::V4)) => update_run(self.backends.map(), run_ops, |op| match op {
                    Op::PutBackend(id, v @ BackendValue { addr: BackendAddr { addr: V4(a), .. }, .. }) => {
                        Some((*id, backend_entry::<u32>(v, *a)))
                    }
                    _ => None,
                }),
                Some(BatchOf::Backends(Family::V6)) => update_run(self.backends6.map(), run_ops, |op| match op {
                    Op::PutBackend(id, v @ BackendValue { addr: BackendAddr { addr: V6(a), .. }, .. }) => {
                        Some((*id, backend_entry::<[u32; 4]>(v, *a)))
                    }
                    _ => None,
                }),
                Some(BatchOf::Services(Family::V4)) => update_run(self.services.map(), run_ops, |op| match op {
                    Op::PutService(k @ SvcKey { frontend: Frontend { addr: V4(a), .. }, .. }, v) => {
                        Some((service_key::<u32>(k, *a), *v))
                    }
                    _ => None,
                }),
                Some(BatchOf::Services(Family::V6)) => update_run(self.services6.map(), run_ops, |op| match op {
                    Op::PutService(k @ SvcKey { frontend: Frontend { addr: V6(a), .. }, .. }, v) => {
                        Some((service_key::<[u32; 4]>(k, *a), *v))
                    }
                    _ => None,
                }),
                None => Ok(()),
            };
            written.map_err(|(n, e)| (at + n, format!("bpf_map_update_batch: {e}")))?;
            at += run;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        use IpAddr::{V4, V6};
        use rproxy_common::{Backend, RevNat};
        let r = match *op {
            Op::PutBackend(id, v) => match v.addr.addr {
                V4(a) => self.backends.set(id, backend_entry::<u32>(&v, a), 0),
                V6(a) => self.backends6.set(id, backend_entry::<[u32; 4]>(&v, a), 0),
            },
            // Array entries cannot be deleted: zero marks the id free.
            Op::DelBackend(id, Family::V4) => self.backends.set(id, Backend::default(), 0),
            Op::DelBackend(id, Family::V6) => self.backends6.set(id, Backend::default(), 0),
            Op::PutService(k, v) => match k.frontend.addr {
                V4(a) => self.services.insert(service_key::<u32>(&k, a), v, 0),
                V6(a) => self.services6.insert(service_key::<[u32; 4]>(&k, a), v, 0),
            },
            Op::DelService(k) => ignore_missing(match k.frontend.addr {
                V4(a) => self.services.remove(&service_key::<u32>(&k, a)),
                V6(a) => self.services6.remove(&service_key::<[u32; 4]>(&k, a)),
            }),
            Op::PutRevNat(id, v) => match v.addr {
                V4(a) => self.rev_nat.set(u32::from(id), RevNat::new(a, v.port), 0),
                V6(a) => self.rev_nat6.set(u32::from(id), RevNat::new(a, v.port), 0),
            },
            Op::DelRevNat(id, Family::V4) => self.rev_nat.set(u32::from(id), RevNat::default(), 0),
            Op::DelRevNat(id, Family::V6) => self.rev_nat6.set(u32::from(id), RevNat::default(), 0),
            Op::PutFilterWord(FilterMap::Services, i, w) => self.svc_filter.set(i, w, 0),
            Op::PutFilterWord(FilterMap::Backends, i, w) => self.be_filter.set(i, w, 0),
            Op::PutSrcRange(id, IpNet::V4(net)) => {
                self.src_range.insert(&src_range_key(id, net.network(), net.prefix_len()), 1, 0)
            }
            Op::PutSrcRange(id, IpNet::V6(net)) => {
                self.src_range6.insert(&src_range_key(id, net.network(), net.prefix_len()), 1, 0)
            }
            Op::DelSrcRange(id, IpNet::V4(net)) => {
                ignore_missing(self.src_range.remove(&src_range_key(id, net.network(), net.prefix_len())))
            }
            Op::DelSrcRange(id, IpNet::V6(net)) => {
                ignore_missing(self.src_range6.remove(&src_range_key(id, net.network(), net.prefix_len())))
            }
            Op::PutAffinityMatch(id, be) => self.affinity_match.insert(affinity_match(id, be), 1, 0),
            Op::DelAffinityMatch(id, be) => ignore_missing(self.affinity_match.remove(&affinity_match(id, be))),
        };
        r.map_err(|e| match e {
            aya::maps::MapError::SyscallError(s) => format!("{}: {}", s.call, s.io_error),
            other => other.to_string(),
        })
    }
}

/// The affinity match of backend `be` for the frontend with rev-NAT id `id`.
fn affinity_match(id: u16, be: u32) -> AffinityMatch {
    AffinityMatch { backend_id: be, rev_nat_id: id, _pad: 0 }
}

/// The trie key of the source range `addr/len` of the frontend with rev-NAT id `id`.
fn src_range_key<A>(id: u16, addr: A::Ip, len: u8) -> aya::maps::lpm_trie::Key<rproxy_common::SrcRange<A>>
where
    A: WireAddr,
    rproxy_common::SrcRange<A>: aya::Pod,
{
    let data = rproxy_common::SrcRange { rev_nat_id: id, _pad: 0, addr: A::wire(addr) };
    aya::maps::lpm_trie::Key::new(rproxy_common::SrcRange::<A>::ID_BITS + u32::from(len), data)
}

/// The source range a trie key names, if it is one the writer could have written.
pub(crate) fn src_range_of<A>(key: &aya::maps::lpm_trie::Key<rproxy_common::SrcRange<A>>) -> Option<(u16, IpNet)>
where
    A: WireAddr,
    rproxy_common::SrcRange<A>: aya::Pod,
{
    let data = key.data();
    let len = u8::try_from(key.prefix_len().checked_sub(rproxy_common::SrcRange::<A>::ID_BITS)?).ok()?;
    let net = IpNet::new(data.addr.ip().into(), len).ok()?;
    Some((data.rev_nat_id, net))
}

fn ignore_missing(r: Result<(), aya::maps::MapError>) -> Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Reads what the pinned maps of both families hold, for `Writer::adopt`: every service entry
/// and every non-zero (used) backend and rev-NAT array entry, decoded (in chunks: a few hundred
/// system calls for 500,000 backend ids).
#[must_use]
pub fn read_adopted(maps: &crate::bpf::datapath::Maps) -> Adopted {
    use crate::bpf::datapath::hash_entries;
    let mut a = Adopted {
        // A word that cannot be read makes the whole filter unknown (see `Filter::adopt`).
        filter: read_words(&maps.svc_filter),
        be_filter: read_words(&maps.be_filter),
        affinity: hash_entries(&maps.affinity_match).into_iter().map(|(m, _)| (m.rev_nat_id, m.backend_id)).collect(),
        ..nothing_adopted(maps)
    };
    adopt_family(&mut a, &maps.services, &maps.backends, &maps.rev_nat, &maps.src_range);
    adopt_family(&mut a, &maps.services6, &maps.backends6, &maps.rev_nat6, &maps.src_range6);
    a
}

/// Decodes one family's service, backend, rev-NAT and source range maps into `a`.
fn adopt_family<A>(
    a: &mut Adopted,
    services: &aya::maps::HashMap<aya::maps::MapData, rproxy_common::ServiceKey<A>, ServiceValue>,
    backends: &aya::maps::Array<aya::maps::MapData, rproxy_common::Backend<A>>,
    rev_nat: &aya::maps::Array<aya::maps::MapData, rproxy_common::RevNat<A>>,
    src_range: &aya::maps::LpmTrie<aya::maps::MapData, rproxy_common::SrcRange<A>, u8>,
) where
    A: WireAddr,
    rproxy_common::ServiceKey<A>: aya::Pod,
    rproxy_common::Backend<A>: aya::Pod + Default + PartialEq,
    rproxy_common::RevNat<A>: aya::Pod + Default + PartialEq,
    rproxy_common::SrcRange<A>: aya::Pod,
{
    use crate::bpf::datapath::{hash_entries, used_entries};
    for (k, v) in hash_entries(services) {
        let (addr, port) = (k.ip().into(), k.host_port());
        match protocol(k.proto) {
            Some(proto) => {
                a.services.push((SvcKey { frontend: Frontend { addr, port, proto }, scope: k.scope, slot: k.slot }, v));
            }
            None => a.undecoded.push(format!("service entry {addr} port {port}: unknown protocol {}", k.proto)),
        }
    }
    for (id, b) in used_entries(backends) {
        let (addr, port) = (b.ip().into(), b.host_port());
        match protocol(b.proto) {
            Some(proto) => {
                a.backends.push((id, BackendValue { addr: BackendAddr { addr, port, proto }, flags: b.flags }));
            }
            None => a.undecoded.push(format!("backend {id}: unknown protocol {}", b.proto)),
        }
    }
    // Rev-NAT ids are u16; the arrays have exactly u16::MAX + 1 entries.
    a.rev_nat.extend(
        used_entries(rev_nat).into_iter().filter_map(|(i, r)| {
            Some((u16::try_from(i).ok()?, RevNatValue { addr: r.ip().into(), port: r.host_port() }))
        }),
    );
    a.src_ranges.extend(src_range.keys().filter_map(Result::ok).filter_map(|k| src_range_of(&k)));
}

/// What maps created empty hold: nothing but their sizes (reading the backend arrays whole
/// takes a quarter of a second at 524,288 entries, to find zeros).
#[must_use]
pub fn nothing_adopted(maps: &crate::bpf::datapath::Maps) -> Adopted {
    // Both families' arrays have the same size (`MapSizes::backends`).
    Adopted { backend_array: Some(maps.backends.len().min(maps.backends6.len())), ..Adopted::default() }
}

fn read_words(map: &aya::maps::Array<aya::maps::MapData, u64>) -> Vec<u64> {
    (0..rproxy_common::filter::WORDS).map(|i| map.get(&i, 0)).collect::<Result<Vec<u64>, _>>().unwrap_or_default()
}

mod filter;
pub use filter::FilterMap;
#[cfg(test)]
mod tests;
