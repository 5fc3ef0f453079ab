//! Writer tests against a fake sink that holds the maps' contents and, after every single
#![expect(clippy::many_single_char_names, reason = "m(aps), w(riter), r(eport): short names keep the tables readable")]
//! operation, checks what a packet could observe: every published slot 0 (of either scope) has
//! all its slots, every slot names an existing backend, every slot 0 has its rev-NAT entry, and
//! a slot 0 with `SVC_F_ETP_LOCAL` has its `SCOPE_LOCAL` slot 0 with the same rev-NAT id and
//! flags, and every source range belongs to a rev-NAT id in use.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use super::*;

#[derive(Default)]
struct FakeMaps {
    services: BTreeMap<SvcKey, ServiceValue>,
    backends: BTreeMap<u32, BackendValue>,
    rev_nat: BTreeMap<u16, RevNatValue>,
    filter: BTreeMap<u32, u64>,
    be_filter: BTreeMap<u32, u64>,
    src_ranges: BTreeSet<(u16, IpNet)>,
    affinity: BTreeSet<(u16, u32)>,
    log: Vec<Op>,
    /// Fail every op whose service key has this address.
    fail_addr: Option<IpAddr>,
    /// Fail the writes of slot 0 of this address (after its slots, rev-NAT and ranges).
    fail_slot0: Option<IpAddr>,
    /// Fail backend inserts once this many backends exist.
    backend_capacity: Option<usize>,
    /// Skip the checks after each operation (for maps broken from outside the writer).
    unchecked: bool,
    /// The length of each run of operations given at once (`apply_all`).
    runs: Vec<usize>,
}

impl FakeMaps {
    fn check_consistent(&self) {
        for (k, v) in self.services.iter().filter(|(k, _)| k.slot == 0) {
            for s in 1..=v.count {
                let slot = self.services.get(&SvcKey { slot: s, ..*k });
                let slot = slot.unwrap_or_else(|| panic!("slot {s} of {k:?} missing while count is {}", v.count));
                assert!(self.backends.contains_key(&slot.backend_id), "slot {s} of {k:?} names missing backend");
            }
            assert!(self.rev_nat.contains_key(&v.rev_nat_id), "rev-NAT {} of {k:?} missing", v.rev_nat_id);
            assert!(has_bit(&self.filter, frontend_bit(k.frontend)), "{k:?} published without its service filter bit");
            if k.scope == SCOPE_EXTERNAL && v.flags & SVC_F_ETP_LOCAL != 0 {
                let local = self.services.get(&SvcKey { scope: SCOPE_LOCAL, ..*k });
                let local = local.unwrap_or_else(|| panic!("{k:?} has SVC_F_ETP_LOCAL but no local slot 0"));
                assert_eq!((local.rev_nat_id, local.flags), (v.rev_nat_id, v.flags), "{k:?}: local slot 0");
            }
        }
        for (id, net) in &self.src_ranges {
            assert!(self.rev_nat.contains_key(id), "source range {net} of rev-NAT id {id}, which has no entry");
        }
        for (id, be) in &self.affinity {
            assert!(
                self.rev_nat.contains_key(id),
                "affinity match of backend {be}, rev-NAT id {id}, which has no entry"
            );
            assert!(self.backends.contains_key(be), "affinity match of backend {be}, which does not exist");
        }
        // Every slot of a frontend with affinity has its match (a missing one would only make a
        // client pick afresh, but the writer never leaves one out).
        for (k, v) in self.services.iter().filter(|(k, v)| k.slot == 0 && v.flags & rproxy_common::SVC_F_AFFINITY != 0)
        {
            for s in 1..=v.count {
                let id = self.services[&SvcKey { slot: s, ..*k }].backend_id;
                assert!(self.affinity.contains(&(v.rev_nat_id, id)), "slot {s} of {k:?} has no affinity match");
            }
        }
    }

    fn check_backend_bits(&self) {
        for (id, b) in &self.backends {
            assert!(has_bit(&self.be_filter, backend_bit(*b)), "backend {id} written without its filter bit");
        }
    }

    fn adopted(&self) -> Adopted {
        Adopted {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
            filter: words(&self.filter),
            be_filter: words(&self.be_filter),
            src_ranges: self.src_ranges.iter().copied().collect(),
            affinity: self.affinity.iter().copied().collect(),
            undecoded: Vec::new(),
            backend_array: None,
        }
    }
}

impl MapSink for FakeMaps {
    /// One by one, so that every operation of a run is checked after it.
    fn apply_all(&mut self, ops: &[Op]) -> Result<(), (usize, String)> {
        self.runs.push(ops.len());
        for (i, op) in ops.iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        if let (Some(a), Op::PutService(k, _) | Op::DelService(k)) = (self.fail_addr, op)
            && k.frontend.addr == a
        {
            return Err(String::from("injected failure"));
        }
        if let (Some(a), Op::PutService(k, _)) = (self.fail_slot0, op)
            && k.frontend.addr == a
            && k.slot == 0
        {
            return Err(String::from("injected failure of slot 0"));
        }
        match *op {
            Op::PutBackend(id, v) => {
                if self.backend_capacity.is_some_and(|c| self.backends.len() >= c) && !self.backends.contains_key(&id) {
                    return Err(String::from("map full"));
                }
                self.backends.insert(id, v);
            }
            Op::DelBackend(id, _) => {
                assert!(
                    !self.services.values().any(|v| v.backend_id == id),
                    "backend {id} deleted while a slot names it"
                );
                self.backends.remove(&id);
            }
            Op::PutService(k, v) => {
                self.services.insert(k, v);
            }
            Op::DelService(k) => {
                self.services.remove(&k);
            }
            Op::PutRevNat(id, v) => {
                self.rev_nat.insert(id, v);
            }
            Op::DelRevNat(id, _) => {
                self.rev_nat.remove(&id);
            }
            Op::PutFilterWord(FilterMap::Services, i, w) => {
                self.filter.insert(i, w);
            }
            Op::PutFilterWord(FilterMap::Backends, i, w) => {
                self.be_filter.insert(i, w);
            }
            Op::PutSrcRange(id, net) => {
                self.src_ranges.insert((id, net));
            }
            Op::DelSrcRange(id, net) => {
                self.src_ranges.remove(&(id, net));
            }
            Op::PutAffinityMatch(id, be) => {
                self.affinity.insert((id, be));
            }
            Op::DelAffinityMatch(id, be) => {
                self.affinity.remove(&(id, be));
            }
        }
        self.log.push(*op);
        if !self.unchecked {
            self.check_consistent();
            self.check_backend_bits();
        }
        Ok(())
    }
}

/// Whether a filter's words have `bit`.
fn has_bit(words: &BTreeMap<u32, u64>, bit: u32) -> bool {
    words.get(&(bit >> 6)).copied().unwrap_or(0) & (1 << (bit & 63)) != 0
}

/// A filter's words as the map would hold them.
fn words(filter: &BTreeMap<u32, u64>) -> Vec<u64> {
    (0..rproxy_common::filter::WORDS).map(|i| filter.get(&i).copied().unwrap_or(0)).collect()
}

/// An address's last byte (the tests' addresses differ there).
fn last(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    }
}

fn fe(last: u8, port: u16) -> Frontend {
    Frontend { addr: Ipv4Addr::new(10, 96, 0, last).into(), port, proto: Protocol::Tcp }
}

fn be(last: u8) -> Backend {
    Backend {
        addr: BackendAddr { addr: Ipv4Addr::new(10, 244, 1, last).into(), port: 8080, proto: Protocol::Tcp },
        state: BackendState::Active,
        local: true,
    }
}

fn entry(name: &str, slots: &[u8], draining: &[u8]) -> ServiceEntry {
    ServiceEntry {
        service: ObjectRef::new("default", name),
        port_name: String::new(),
        flags: rproxy_common::SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        slots: slots.iter().map(|b| be(*b)).collect(),
        local_slots: Vec::new(),
        draining: draining.iter().map(|b| Backend { state: BackendState::Terminating, ..be(*b) }).collect(),
        source_ranges: Vec::new(),
    }
}

fn desired(items: &[(Frontend, ServiceEntry)]) -> Desired {
    Desired { services: items.iter().cloned().collect(), ..Desired::default() }
}

fn slot_backends(m: &FakeMaps, f: Frontend) -> Vec<IpAddr> {
    let k0 = key_of(f, 0);
    let count = m.services[&k0].count;
    (1..=count).map(|s| m.backends[&m.services[&SvcKey { slot: s, ..k0 }].backend_id].addr.addr).collect()
}

/// The id of the backend in `m` whose address ends in `n`.
fn backend_id(m: &FakeMaps, n: u8) -> u32 {
    *m.backends.iter().find(|(_, v)| last(v.addr.addr) == n).unwrap().0
}

/// A sync followed by a conntrack GC pass that finds no flow: the backends the sync orphaned
/// are deleted ([`Writer::release_orphans`]).
fn sync_idle(w: &mut Writer, d: &Desired, m: &mut FakeMaps) -> SyncReport {
    let r = w.sync(d, m);
    let (_, errors) = w.release_orphans(|_| false, m);
    assert!(errors.is_empty(), "{errors:?}");
    r
}

/// A backend that leaves every Service (unready, gone from its slice) stays in the map, orphaned,
/// while a flow uses it: established connections keep it, as under kube-proxy. It is deleted
/// once the GC finds no flow naming it; one that comes back first keeps its id; its UDP flows
/// are reported stale at once; an adopted backend no Service names is kept the same way.
#[test]
fn backends_that_leave_every_service_live_while_flows_use_them() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = fe(10, 80);
    w.sync(&desired(&[(f, entry("a", &[1, 2], &[]))]), &mut m);
    let id2 = backend_id(&m, 2);
    // Backend 2 leaves: out of the slots, still in the map, reported for its UDP flows.
    m.log.clear();
    let r = w.sync(&desired(&[(f, entry("a", &[1], &[]))]), &mut m);
    assert!(r.errors.is_empty() && !m.log.iter().any(|o| matches!(o, Op::DelBackend(..))), "{:?}", m.log);
    assert_eq!(slot_backends(&m, f), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    assert!(m.backends.contains_key(&id2));
    assert!(r.stale_udp.contains(&(0, id2)), "{:?}", r.stale_udp);
    assert_eq!((w.orphan_count(), w.backend_count()), (1, 2));
    assert!(w.has_backend(id2), "the GC must keep the flows of an orphan");
    // A GC pass that finds a flow on it keeps it.
    assert_eq!(w.release_orphans(|i| i == id2, &mut m), (0, Vec::new()));
    assert!(m.backends.contains_key(&id2));
    // It comes back (ready again): same id, no longer an orphan.
    w.sync(&desired(&[(f, entry("a", &[1, 2], &[]))]), &mut m);
    assert_eq!(backend_id(&m, 2), id2);
    assert_eq!(w.orphan_count(), 0);
    assert_eq!(w.release_orphans(|_| false, &mut m), (0, Vec::new()));
    // It leaves again, and no flow uses it: deleted, its filter bit cleared.
    w.sync(&desired(&[(f, entry("a", &[1], &[]))]), &mut m);
    assert_eq!(w.release_orphans(|_| false, &mut m), (1, Vec::new()));
    assert!(!m.backends.contains_key(&id2) && !w.has_backend(id2));
    m.check_backend_bits();
    assert_eq!(w.orphan_count(), 0);

    // A restarted writer adopts a backend no Service names as an orphan, not deleting it.
    w.sync(&desired(&[(f, entry("a", &[1, 3], &[]))]), &mut m);
    let id3 = backend_id(&m, 3);
    let d = desired(&[(f, entry("a", &[1], &[]))]);
    w.sync(&d, &mut m);
    let (mut w2, _) = Writer::adopt(m.adopted());
    m.log.clear();
    let r = w2.sync(&d, &mut m);
    assert_eq!(r.ops, 0, "{:?}", m.log);
    assert!(m.backends.contains_key(&id3) && w2.has_backend(id3));
    assert_eq!(w2.release_orphans(|i| i == id3, &mut m), (0, Vec::new()));
    assert_eq!(w2.release_orphans(|_| false, &mut m), (1, Vec::new()));
    assert!(!m.backends.contains_key(&id3));
}

#[test]
fn programs_grows_shrinks_and_removes_consistently() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let r = sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1, 2, 3], &[]))]), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.programmed.len(), 1);
    assert_eq!(slot_backends(&m, fe(10, 80)).len(), 3);
    // Slot 0 is published after its slots and rev-NAT.
    let pos0 = m.log.iter().position(|o| matches!(o, Op::PutService(k, _) if k.slot == 0)).unwrap();
    assert_eq!(pos0, m.log.len() - 1);

    // Grow to 5.
    m.log.clear();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1, 2, 3, 4, 5], &[]))]), &mut m);
    assert_eq!(slot_backends(&m, fe(10, 80)).len(), 5);
    assert!(matches!(m.log.last(), Some(Op::PutService(k, v)) if k.slot == 0 && v.count == 5));

    // Shrink to 2 (backends 4 and 5): count first, then trailing slots, then unused backends.
    m.log.clear();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[4, 5], &[]))]), &mut m);
    assert_eq!(slot_backends(&m, fe(10, 80)), vec![Ipv4Addr::new(10, 244, 1, 4), Ipv4Addr::new(10, 244, 1, 5)]);
    assert_eq!(m.backends.len(), 2);
    assert_eq!(m.services.len(), 3);

    // Remove.
    m.log.clear();
    let r = sync_idle(&mut w, &Desired::default(), &mut m);
    assert_eq!(r.removed.len(), 1);
    assert!(matches!(m.log[0], Op::DelService(k) if k.slot == 0), "slot 0 goes first: {:?}", m.log);
    assert!(m.services.is_empty() && m.backends.is_empty() && m.rev_nat.is_empty());
}

#[test]
fn unchanged_state_writes_nothing() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let d = desired(&[(fe(10, 80), entry("a", &[1, 2], &[])), (fe(11, 53), entry("b", &[2, 3], &[]))]);
    w.sync(&d, &mut m);
    let r = w.sync(&d, &mut m);
    assert_eq!(r.ops, 0);
    assert!(r.programmed.is_empty());
}

#[test]
fn restart_adopts_maps_and_writes_nothing() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let d = desired(&[(fe(10, 80), entry("a", &[1, 2, 3], &[])), (fe(11, 53), entry("b", &[3], &[9]))]);
    w.sync(&d, &mut m);
    let ids_before = m.backends.clone();
    let (mut w2, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    m.log.clear();
    let r = w2.sync(&d, &mut m);
    assert_eq!(r.ops, 0, "restart rewrote {:?}", m.log);
    assert_eq!(m.backends, ids_before, "backend ids kept across restart");
    // New ids after adoption do not collide with adopted ones.
    let d2 = desired(&[(fe(10, 80), entry("a", &[1, 2, 3, 7], &[])), (fe(11, 53), entry("b", &[3], &[9]))]);
    w2.sync(&d2, &mut m);
    assert_eq!(m.backends.len(), 5);
}

#[test]
fn shared_and_draining_backends_live_until_unreferenced() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1, 2], &[])), (fe(11, 80), entry("b", &[2], &[]))]), &mut m);
    // Backend 2 terminates: out of a's slots, still in the map (existing connections), flagged.
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1], &[2])), (fe(11, 80), entry("b", &[2], &[]))]), &mut m);
    assert_eq!(slot_backends(&m, fe(10, 80)), vec![Ipv4Addr::new(10, 244, 1, 1)]);
    assert_eq!(m.backends.len(), 2);
    // Gone from b too, but still draining in a: kept.
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1], &[2])), (fe(11, 80), entry("b", &[1], &[]))]), &mut m);
    assert_eq!(m.backends.len(), 2);
    let two = m.backends.values().find(|b| b.addr.addr == Ipv4Addr::new(10, 244, 1, 2)).unwrap();
    assert_eq!(two.flags & BE_F_TERMINATING, BE_F_TERMINATING);
    // Gone everywhere: deleted once no flow uses it.
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1], &[])), (fe(11, 80), entry("b", &[1], &[]))]), &mut m);
    assert_eq!(m.backends.len(), 1);
}

#[test]
fn empty_backend_set_is_published_with_count_zero() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1], &[]))]), &mut m);
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[], &[]))]), &mut m);
    assert_eq!(m.services[&key_of(fe(10, 80), 0)].count, 0);
    assert_eq!(m.services.len(), 1);
    assert!(m.backends.is_empty());
}

#[test]
fn a_failing_service_is_reported_and_others_are_written() {
    let mut m = FakeMaps { fail_addr: Some(Ipv4Addr::new(10, 96, 0, 11).into()), ..FakeMaps::default() };
    let mut w = Writer::new();
    let r = w.sync(&desired(&[(fe(10, 80), entry("a", &[1], &[])), (fe(11, 80), entry("bad", &[2], &[]))]), &mut m);
    assert_eq!(r.errors.len(), 1);
    assert!(r.errors[0].contains("default/bad") && r.errors[0].contains("10.96.0.11:80/TCP"), "{:?}", r.errors);
    assert_eq!(r.failed, BTreeSet::from([fe(11, 80)]));
    assert_eq!(slot_backends(&m, fe(10, 80)).len(), 1);
    // Retrying the failed frontends alone (as the agent does) fails again while the fault lasts,
    // and completes the write once it is gone.
    let d = desired(&[(fe(10, 80), entry("a", &[1], &[])), (fe(11, 80), entry("bad", &[2], &[]))]);
    let again = w.sync_frontends(&d, &r.failed, &mut m);
    assert_eq!((again.errors.len(), &again.failed), (1, &r.failed));
    m.fail_addr = None;
    let r = w.sync_frontends(&d, &r.failed, &mut m);
    assert!(r.errors.is_empty() && r.failed.is_empty());
    assert_eq!(slot_backends(&m, fe(11, 80)).len(), 1);
    // A removal that fails is reported the same way, and retried.
    m.fail_addr = Some(Ipv4Addr::new(10, 96, 0, 11).into());
    let d = desired(&[(fe(10, 80), entry("a", &[1], &[]))]);
    let r = w.sync(&d, &mut m);
    assert_eq!(r.failed, BTreeSet::from([fe(11, 80)]));
    assert!(r.errors[0].contains("removing"), "{:?}", r.errors);
    m.fail_addr = None;
    let r = w.sync_frontends(&d, &r.failed, &mut m);
    assert!(r.errors.is_empty() && r.failed.is_empty());
    assert!(!m.services.contains_key(&key_of(fe(11, 80), 0)));
}

#[test]
fn full_backend_map_fails_only_that_service() {
    let mut m = FakeMaps { backend_capacity: Some(2), ..FakeMaps::default() };
    let mut w = Writer::new();
    let r = w.sync(&desired(&[(fe(10, 80), entry("a", &[1, 2], &[])), (fe(11, 80), entry("b", &[3], &[]))]), &mut m);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].contains("default/b") && r.errors[0].contains("map full"));
    assert_eq!(slot_backends(&m, fe(10, 80)).len(), 2);
    assert!(!m.services.contains_key(&key_of(fe(11, 80), 0)));
}

#[test]
fn backend_ids_stay_within_the_adopted_array() {
    let mut m = FakeMaps::default();
    // An array of 4 (`--backend-map-max`): ids 1 to 3.
    let (mut w, _) = Writer::adopt(Adopted { backend_array: Some(4), ..m.adopted() });
    let r = w.sync(&desired(&[(fe(10, 80), entry("a", &[1, 2, 3], &[])), (fe(11, 80), entry("b", &[4], &[]))]), &mut m);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(r.errors[0].contains("default/b") && r.errors[0].contains("--backend-map-max"), "{:?}", r.errors);
    assert_eq!(m.backends.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
    // Once a's backends are gone, b's take ids from the start again, never past the array.
    sync_idle(&mut w, &desired(&[]), &mut m);
    let r = sync_idle(&mut w, &desired(&[(fe(11, 80), entry("b", &[4, 5], &[]))]), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(m.backends.len(), 2);
    assert!(m.backends.keys().all(|id| (1..4).contains(id)), "{:?}", m.backends.keys());
}

#[test]
fn ids_are_not_reused_at_once() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[1], &[]))]), &mut m);
    let first = *m.backends.keys().next().unwrap();
    sync_idle(&mut w, &desired(&[(fe(10, 80), entry("a", &[2], &[]))]), &mut m);
    let second = *m.backends.keys().next().unwrap();
    assert_ne!(first, second);
}

fn udp(f: Frontend) -> Frontend {
    Frontend { proto: Protocol::Udp, ..f }
}

fn udp_entry(name: &str, slots: &[u8], draining: &[u8]) -> ServiceEntry {
    let mut e = entry(name, slots, draining);
    for b in e.slots.iter_mut().chain(e.draining.iter_mut()) {
        b.addr.proto = Protocol::Udp;
    }
    e
}

/// What a packet could observe: per frontend, the backend addresses in slot order, and the set
/// of backend entries.
type Observable = (BTreeMap<SvcKey, Vec<IpAddr>>, BTreeSet<(IpAddr, u16, u8)>);

fn observable(m: &FakeMaps) -> Observable {
    let mut services = BTreeMap::new();
    for (k, v) in m.services.iter().filter(|(k, _)| k.slot == 0) {
        let ips = (1..=v.count).map(|s| m.backends[&m.services[&SvcKey { slot: s, ..*k }].backend_id].addr.addr);
        services.insert(*k, ips.collect());
    }
    (services, m.backends.values().map(|b| (b.addr.addr, b.addr.port, b.flags)).collect())
}

#[test]
fn incremental_sync_matches_full_sync() {
    let mut seed = 0x1234_5678_9abc_def1_u64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        u8::try_from(seed % n).unwrap()
    };
    let (mut full_maps, mut inc_maps) = (FakeMaps::default(), FakeMaps::default());
    let (mut full, mut inc) = (Writer::new(), Writer::new());
    let mut current = Desired::default();
    let mut saw_local = (0usize, 0usize);
    for step in 0..400 {
        let mut next = current.clone();
        for _ in 0..=rand(3) {
            let f = fe(rand(6), 80);
            if rand(4) == 0 {
                next.services.remove(&f);
            } else {
                let slots: Vec<u8> = (0..rand(5)).map(|_| rand(8)).collect::<BTreeSet<_>>().into_iter().collect();
                let draining: Vec<u8> =
                    (0..rand(2)).map(|_| 20 + rand(3)).collect::<BTreeSet<_>>().into_iter().collect();
                let mut e = entry("s", &slots, &draining);
                if rand(2) == 0 {
                    // ETP Local, with some of the slots and draining backends as local slots.
                    e.flags = rproxy_common::SVC_F_NODE_PORT | SVC_F_ETP_LOCAL;
                    let candidates = e.slots.iter().chain(&e.draining).copied().collect::<Vec<_>>();
                    e.local_slots = candidates.into_iter().filter(|_| rand(2) == 0).collect();
                    e.local_slots.sort_unstable();
                }
                next.services.insert(f, e);
            }
        }
        let changed: BTreeSet<Frontend> = current
            .services
            .keys()
            .chain(next.services.keys())
            .filter(|f| current.services.get(f) != next.services.get(f))
            .copied()
            .collect();
        let rf = sync_idle(&mut full, &next, &mut full_maps);
        let ri = inc.sync_frontends(&next, &changed, &mut inc_maps);
        inc.release_orphans(|_| false, &mut inc_maps);
        assert!(rf.errors.is_empty() && ri.errors.is_empty(), "step {step}");
        assert_eq!(observable(&full_maps), observable(&inc_maps), "step {step}");
        assert_eq!(full.backend_count(), inc.backend_count(), "step {step}");
        // The maps hold exactly the desired state: one slot 0 per frontend and per local set,
        // and their slots.
        let expected_entries: usize = next
            .services
            .values()
            .map(|e| 1 + e.slots.len() + if e.flags & SVC_F_ETP_LOCAL != 0 { 1 + e.local_slots.len() } else { 0 })
            .sum();
        assert_eq!(inc_maps.services.len(), expected_entries, "step {step}");
        for (f, e) in &next.services {
            let local_key = local_key_of(*f, 0);
            let want = (e.flags & SVC_F_ETP_LOCAL != 0).then(|| e.local_slots.iter().map(|b| b.addr.addr).collect());
            assert_eq!(observable(&inc_maps).0.get(&local_key).cloned(), want, "step {step}: {f}");
            if want.is_some() {
                saw_local.0 += 1;
                saw_local.1 += usize::from(!e.local_slots.is_empty());
            }
        }
        // Nothing unreferenced is left behind.
        let used: BTreeSet<u8> =
            next.services.values().flat_map(|e| e.slots.iter().chain(&e.draining).map(|b| last(b.addr.addr))).collect();
        assert_eq!(inc_maps.backends.len(), used.len(), "step {step}");
        current = next;
    }
    assert!(saw_local.0 > 100 && saw_local.1 > 50, "{saw_local:?}");
}

#[test]
fn udp_backends_leaving_a_service_are_reported_stale() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let (a, b) = (udp(fe(1, 53)), udp(fe(2, 53)));
    w.sync(&desired(&[(a, udp_entry("a", &[1, 2, 3], &[])), (b, udp_entry("b", &[3], &[]))]), &mut m);
    let rn = |m: &FakeMaps, f: Frontend| m.services[&key_of(f, 0)].rev_nat_id;
    let (id2, id3, rn_a) = (backend_id(&m, 2), backend_id(&m, 3), rn(&m, a));

    // Backend 2 leaves everything (gone from the map); backend 3 leaves service a only and turns
    // terminating there (draining: TCP would keep it, UDP moves on).
    let r = w.sync(&desired(&[(a, udp_entry("a", &[1], &[3])), (b, udp_entry("b", &[3], &[]))]), &mut m);
    assert_eq!(r.stale_udp, vec![(0, id2), (rn_a, id2), (rn_a, id3)]);

    // Removing service b: its remaining pair goes stale, and backend 3 stays (a drains it).
    let rn_b = rn(&m, b);
    let r = w.sync(&desired(&[(a, udp_entry("a", &[1], &[3]))]), &mut m);
    assert_eq!(r.stale_udp, vec![(rn_b, id3)]);

    // TCP frontends report nothing.
    let t = fe(3, 80);
    w.sync(&desired(&[(t, entry("t", &[5, 6], &[]))]), &mut m);
    let r = w.sync(&desired(&[(t, entry("t", &[5], &[]))]), &mut m);
    assert_eq!(r.stale_udp.len(), 1, "only the deleted backend: {:?}", r.stale_udp);
    assert_eq!(r.stale_udp[0].0, 0);
}

fn etp_entry(name: &str, slots: &[u8], draining: &[u8], local_slots: &[u8]) -> ServiceEntry {
    let mut e = entry(name, slots, draining);
    e.flags = rproxy_common::SVC_F_NODE_PORT | SVC_F_ETP_LOCAL;
    e.local_slots =
        e.slots.iter().chain(&e.draining).filter(|b| local_slots.contains(&last(b.addr.addr))).copied().collect();
    e
}

/// The backend addresses of `f`'s `SCOPE_LOCAL` slots, `None` without its slot 0.
fn local_backends(m: &FakeMaps, f: Frontend) -> Option<Vec<Ipv4Addr>> {
    let v4 = |ip: &IpAddr| match ip {
        IpAddr::V4(a) => *a,
        IpAddr::V6(_) => unreachable!("IPv4 backends"),
    };
    observable(m).0.get(&local_key_of(f, 0)).map(|ips| ips.iter().map(v4).collect())
}

#[test]
fn etp_local_programs_the_local_scope() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = fe(10, 30080);
    let ip = |last| Ipv4Addr::new(10, 244, 1, last);
    let r = sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1, 2, 3], &[], &[1]))]), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(slot_backends(&m, f).len(), 3);
    assert_eq!(local_backends(&m, f), Some(vec![ip(1)]));
    let (ext0, loc0) = (m.services[&key_of(f, 0)], m.services[&local_key_of(f, 0)]);
    assert_eq!(loc0, ServiceValue { count: 1, ..ext0 }, "same rev-NAT id, flags and timeout");
    // The local slot 0 is published just before the external one, which comes last.
    let n = m.log.len();
    assert!(matches!(m.log[n - 2], Op::PutService(k, _) if k == local_key_of(f, 0)), "{:?}", m.log);
    assert!(matches!(m.log[n - 1], Op::PutService(k, _) if k == key_of(f, 0)), "{:?}", m.log);

    // Grow the local set, then shrink it to nothing: count 0 stays published.
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1, 2, 3], &[], &[1, 3]))]), &mut m);
    assert_eq!(local_backends(&m, f), Some(vec![ip(1), ip(3)]));
    m.log.clear();
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1, 2, 3], &[], &[]))]), &mut m);
    assert_eq!(local_backends(&m, f), Some(vec![]));
    assert_eq!(m.log[0], Op::PutService(local_key_of(f, 0), ServiceValue { count: 0, ..ext0 }), "count first");
    assert_eq!(m.services.len(), 1 + 3 + 1);

    // The flag goes away: the external slot 0 without it first, then the local entries.
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1, 2, 3], &[], &[2]))]), &mut m);
    m.log.clear();
    sync_idle(&mut w, &desired(&[(f, entry("a", &[1, 2, 3], &[]))]), &mut m);
    assert_eq!(local_backends(&m, f), None);
    assert!(matches!(m.log[0], Op::PutService(k, v) if k == key_of(f, 0) && v.flags & SVC_F_ETP_LOCAL == 0));
    assert_eq!(m.log[1..], [Op::DelService(local_key_of(f, 0)), Op::DelService(local_key_of(f, 1))]);
    assert_eq!(m.services.len(), 1 + 3);

    // Back to ETP Local, then removed: everything goes, the external slot 0 first.
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1, 2, 3], &[], &[1, 2]))]), &mut m);
    assert_eq!(m.services.len(), 1 + 3 + 1 + 2);
    m.log.clear();
    sync_idle(&mut w, &Desired::default(), &mut m);
    assert_eq!(m.log[0], Op::DelService(key_of(f, 0)));
    assert_eq!(m.log[1], Op::DelService(local_key_of(f, 0)));
    assert!(m.services.is_empty() && m.backends.is_empty() && m.rev_nat.is_empty());
}

#[test]
fn local_slots_keep_their_backends_referenced() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = fe(10, 30080);
    // A local terminating backend (draining for pods, serving outside clients), then one named
    // only by the local set (not what the translation produces, but the writer copes).
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1], &[21], &[21]))]), &mut m);
    assert_eq!(local_backends(&m, f), Some(vec![Ipv4Addr::new(10, 244, 1, 21)]));
    let mut only_local = etp_entry("a", &[1], &[], &[]);
    only_local.local_slots = vec![be(5)];
    sync_idle(&mut w, &desired(&[(f, only_local)]), &mut m);
    assert_eq!(local_backends(&m, f), Some(vec![Ipv4Addr::new(10, 244, 1, 5)]));
    assert_eq!(m.backends.len(), 2, "backend 21 deleted, 5 kept for the local slot");
    // Gone from the local set: deleted (FakeMaps checks that no slot names it any more).
    sync_idle(&mut w, &desired(&[(f, etp_entry("a", &[1], &[], &[]))]), &mut m);
    assert_eq!(m.backends.len(), 1);
}

#[test]
fn restart_adopts_local_scopes_and_writes_nothing() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let d = desired(&[
        (fe(10, 30080), etp_entry("a", &[1, 2, 3], &[21], &[2, 21])),
        (fe(11, 30081), etp_entry("b", &[4], &[], &[])),
        (fe(12, 80), entry("c", &[1], &[])),
    ]);
    sync_idle(&mut w, &d, &mut m);
    let before = (m.services.clone(), m.backends.clone());
    let (mut w2, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    m.log.clear();
    let r = sync_idle(&mut w2, &d, &mut m);
    assert_eq!(r.ops, 0, "restart rewrote {:?}", m.log);
    assert_eq!((m.services.clone(), m.backends.clone()), before);
    // The adopted local sets are the writer's to change and remove.
    sync_idle(&mut w2, &desired(&[(fe(10, 30080), entry("a", &[1, 2, 3], &[]))]), &mut m);
    assert_eq!(local_backends(&m, fe(10, 30080)), None);
    assert_eq!(m.services.len(), 4);
    assert_eq!(m.backends.len(), 3);

    // A local set with a missing slot is reported and rewritten by the next sync.
    sync_idle(&mut w2, &d, &mut m);
    assert_eq!(local_backends(&m, fe(10, 30080)).map(|v| v.len()), Some(2));
    let mut broken = m.adopted();
    broken.services.retain(|(k, _)| *k != local_key_of(fe(10, 30080), 2));
    let (mut w3, warnings) = Writer::adopt(broken);
    assert_eq!(warnings, vec![String::from("10.96.0.10:30080/TCP: local-scope slot missing, will be rewritten")]);
    m.services.remove(&local_key_of(fe(10, 30080), 2));
    m.unchecked = true;
    let r = sync_idle(&mut w3, &d, &mut m);
    assert!(r.errors.is_empty());
    m.check_consistent();
    assert_eq!(local_backends(&m, fe(10, 30080)).map(|v| v.len()), Some(2));
}

#[test]
fn udp_backends_leaving_the_local_scope_are_reported_stale() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = udp(fe(1, 30053));
    let etp_udp = |slots: &[u8], draining: &[u8], local: &[u8]| {
        let mut e = udp_entry("a", slots, draining);
        e.flags = rproxy_common::SVC_F_NODE_PORT | SVC_F_ETP_LOCAL;
        e.local_slots =
            e.slots.iter().chain(&e.draining).filter(|b| local.contains(&last(b.addr.addr))).copied().collect();
        e
    };
    w.sync(&desired(&[(f, etp_udp(&[1], &[3], &[3]))]), &mut m);
    let id3 = backend_id(&m, 3);
    let rn = m.services[&key_of(f, 0)].rev_nat_id;
    // 3 stays (draining) but no longer serves outside clients: its UDP flows move on.
    let r = w.sync(&desired(&[(f, etp_udp(&[1], &[3], &[]))]), &mut m);
    assert_eq!(r.stale_udp, vec![(rn, id3)]);
}

/// A first sync writes each filter word once, with all its new bits, not once per new entry
/// (300,000 backends would otherwise write most of the backend filter's 262,144 bits one by
/// one), and gives the sink its new backends, and each frontend's slots and slot 0, as one run
/// each.
#[test]
fn a_first_sync_writes_each_filter_word_once_and_backends_and_slots_in_runs() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let backend = |n: u16| {
        let [hi, lo] = n.to_be_bytes();
        Backend { addr: BackendAddr { addr: Ipv4Addr::new(10, 244, hi, lo).into(), ..be(0).addr }, ..be(0) }
    };
    let services: Vec<_> = (0..200u16)
        .map(|i| {
            (
                fe(1, 1000 + i),
                ServiceEntry { slots: (0..10).map(|j| backend(i * 10 + j)).collect(), ..entry("many", &[], &[]) },
            )
        })
        .collect();
    let r = sync_idle(&mut w, &desired(&services), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!((m.services.len(), m.backends.len()), (200 * 11, 2000));
    let mut writes: BTreeMap<(bool, u32), usize> = BTreeMap::new();
    for op in &m.log {
        if let Op::PutFilterWord(map, word, _) = op {
            *writes.entry((*map == FilterMap::Services, *word)).or_default() += 1;
        }
    }
    assert!(writes.values().all(|&n| n == 1), "words written more than once: {writes:?}");
    m.check_backend_bits();
    // The new backends go to the sink in one run, and each frontend's slots with its slot 0
    // (last) in one run.
    assert_eq!(m.runs.iter().filter(|&&n| n == 2000).count(), 1, "{:?}", m.runs);
    assert_eq!(m.runs.iter().filter(|&&n| n == 11).count(), 200, "{:?}", m.runs);
    let at = |slot: u16| m.log.iter().position(|op| matches!(op, Op::PutService(k, _) if k.slot == slot));
    assert!(at(10) < at(0), "slot 0 after the slots it counts");
}

/// The service filter holds exactly the bits of the programmed frontends once a sync is done:
/// a removed frontend's bit is cleared unless another frontend shares it, and a frontend whose
/// write failed leaves no bit behind. A restarted writer clears the bits a previous one left.
#[test]
fn service_filter_follows_the_frontends() {
    let filter_of = |m: &FakeMaps| -> BTreeSet<u32> {
        m.filter.iter().flat_map(|(i, w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i * 64 + b)).collect()
    };
    let bits = |fes: &[Frontend]| -> BTreeSet<u32> {
        fes.iter()
            .map(|fe| {
                let IpAddr::V4(a) = fe.addr else { unreachable!("IPv4 frontends") };
                rproxy_common::filter::bit(u32::from(a).to_be(), fe.port.to_be(), fe.proto.number())
            })
            .collect()
    };
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let (a, b, c) = (fe(10, 80), fe(11, 80), fe(11, 443));
    let r = sync_idle(
        &mut w,
        &desired(&[(a, entry("a", &[1], &[])), (b, entry("b", &[2], &[])), (c, entry("c", &[3], &[]))]),
        &mut m,
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(filter_of(&m), bits(&[a, b, c]));
    assert!(w.filter.written_has(frontend_bit(a)));

    sync_idle(&mut w, &desired(&[(a, entry("a", &[1], &[]))]), &mut m);
    assert_eq!(filter_of(&m), bits(&[a]));

    // A frontend whose write fails: its bit, set before the attempt, is gone after it.
    m.fail_addr = Some(Ipv4Addr::new(10, 96, 0, 12).into());
    let r = sync_idle(&mut w, &desired(&[(a, entry("a", &[1], &[])), (fe(12, 80), entry("bad", &[4], &[]))]), &mut m);
    assert_eq!(r.failed, BTreeSet::from([fe(12, 80)]));
    assert_eq!(filter_of(&m), bits(&[a]));
    m.fail_addr = None;

    // A bit left by a previous agent for a frontend that no longer exists is cleared by the next
    // agent's first sync; the adopted frontend's bit stays.
    let stale = bits(&[fe(99, 99)]).into_iter().next().unwrap();
    *m.filter.entry(stale >> 6).or_default() |= 1 << (stale & 63);
    let (mut w, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    sync_idle(&mut w, &desired(&[(a, entry("a", &[1], &[]))]), &mut m);
    assert_eq!(filter_of(&m), bits(&[a]));
    // The backend filter: exactly the backends written (1), the others' bits cleared.
    let be_bits: BTreeSet<u32> = m.backends.values().map(|b| backend_bit(*b)).collect();
    let held: BTreeSet<u32> = m
        .be_filter
        .iter()
        .flat_map(|(i, w)| (0..64).filter(move |b| w & (1 << b) != 0).map(move |b| i * 64 + b))
        .collect();
    assert_eq!((m.backends.len(), held), (1, be_bits));
}

fn lb_entry(name: &str, slots: &[u8], ranges: &[&str]) -> ServiceEntry {
    ServiceEntry {
        flags: rproxy_common::SVC_F_LOAD_BALANCER | rproxy_common::SVC_F_SOURCE_RANGE,
        // Sorted, as the translation leaves them.
        source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect::<BTreeSet<_>>().into_iter().collect(),
        ..entry(name, slots, &[])
    }
}

fn ranges(m: &FakeMaps) -> Vec<String> {
    m.src_ranges.iter().map(|(id, net)| format!("{id}:{net}")).collect()
}

/// `loadBalancerSourceRanges`: ranges a frontend gains are written before its slot 0, ranges it
/// loses deleted after, all of a removed frontend's before its rev-NAT entry (the fake maps
/// check after every operation that each range's rev-NAT id is in use); a restart adopts them
/// and writes nothing, and ranges under no adopted frontend's id are deleted.
#[test]
fn source_ranges_follow_their_frontend() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let lb = fe(20, 80);
    let r = w.sync(&desired(&[(lb, lb_entry("lb", &[1], &["10.0.0.0/8", "192.168.1.0/24"]))]), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(ranges(&m), ["1:10.0.0.0/8", "1:192.168.1.0/24"]);
    let slot0 = m.log.iter().position(|o| matches!(o, Op::PutService(k, _) if k.slot == 0)).unwrap();
    assert!(m.log[..slot0].iter().filter(|o| matches!(o, Op::PutSrcRange(..))).count() == 2, "{:?}", m.log);

    m.log.clear();
    w.sync(&desired(&[(lb, lb_entry("lb", &[1], &["192.168.1.0/24", "172.16.0.0/12"]))]), &mut m);
    assert_eq!(ranges(&m), ["1:172.16.0.0/12", "1:192.168.1.0/24"]);
    assert_eq!(
        m.log,
        [Op::PutSrcRange(1, "172.16.0.0/12".parse().unwrap()), Op::DelSrcRange(1, "10.0.0.0/8".parse().unwrap())]
    );

    // A restart writes nothing; a range a previous agent left under an unused id goes.
    m.src_ranges.insert((77, "10.1.0.0/16".parse().unwrap()));
    m.rev_nat.insert(77, RevNatValue { addr: Ipv4Addr::UNSPECIFIED.into(), port: 0 });
    let (mut w2, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    m.rev_nat.remove(&77);
    m.log.clear();
    let same = desired(&[(lb, lb_entry("lb", &[1], &["192.168.1.0/24", "172.16.0.0/12"]))]);
    let r = w2.sync(&same, &mut m);
    assert!(r.errors.is_empty() && r.programmed.is_empty(), "{r:?}");
    assert_eq!(m.log, [Op::DelSrcRange(77, "10.1.0.0/16".parse().unwrap())]);

    // Removed: its ranges go before its rev-NAT entry.
    m.log.clear();
    w2.sync(&Desired::default(), &mut m);
    assert!(m.src_ranges.is_empty());
    let last_range = m.log.iter().rposition(|o| matches!(o, Op::DelSrcRange(..))).unwrap();
    let rev_nat = m.log.iter().position(|o| matches!(o, Op::DelRevNat(..))).unwrap();
    assert!(last_range < rev_nat, "{:?}", m.log);
}

/// A new frontend whose write fails (at its slot 0, after everything else) leaves nothing
/// behind: not the ranges it was given (they would otherwise stay under an id another frontend
/// may get), nor its slots and rev-NAT entry.
#[test]
fn a_failed_frontend_leaves_no_source_ranges() {
    let lb = fe(21, 80);
    let mut m = FakeMaps { fail_slot0: Some(lb.addr), ..FakeMaps::default() };
    let mut w = Writer::new();
    let r = sync_idle(&mut w, &desired(&[(lb, lb_entry("lb", &[1], &["10.0.0.0/8"]))]), &mut m);
    assert_eq!(r.errors.len(), 1, "{:?}", r.errors);
    assert!(m.log.iter().any(|o| matches!(o, Op::PutSrcRange(..))), "{:?}", m.log);
    assert!(m.src_ranges.is_empty(), "{:?}", m.src_ranges);
    // Nor its slots and rev-NAT entry (it was new), nor its backend.
    assert!(m.services.is_empty() && m.rev_nat.is_empty() && m.backends.is_empty(), "{:?}", m.log);
}

fn affinity_entry(name: &str, slots: &[u8], draining: &[u8]) -> ServiceEntry {
    ServiceEntry {
        flags: rproxy_common::SVC_F_CLUSTER_IP | rproxy_common::SVC_F_AFFINITY,
        affinity_timeout: 10_800,
        ..entry(name, slots, draining)
    }
}

fn matches(m: &FakeMaps) -> Vec<(u16, IpAddr)> {
    m.affinity.iter().map(|(id, be)| (*id, m.backends[be].addr.addr)).collect()
}

/// `ClientIP` affinity: each slot's backend has its match before the slot 0 that publishes it,
/// a backend leaving the slots loses it after them (draining ones have none), a removed
/// frontend's go before its rev-NAT entry, the flag going away removes them all, and a restart
/// adopts them with zero writes.
#[test]
fn affinity_matches_follow_the_slots() {
    let ip = |last| IpAddr::from(Ipv4Addr::new(10, 244, 1, last));
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = fe(30, 80);
    w.sync(&desired(&[(f, affinity_entry("aff", &[1, 2], &[]))]), &mut m);
    assert_eq!(matches(&m), [(1, ip(1)), (1, ip(2))]);
    w.sync(&desired(&[(f, affinity_entry("aff", &[2, 3], &[1]))]), &mut m);
    assert_eq!(matches(&m), [(1, ip(2)), (1, ip(3))], "backend 1 only drains: no match");

    let (mut w2, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    m.log.clear();
    let r = w2.sync(&desired(&[(f, affinity_entry("aff", &[2, 3], &[1]))]), &mut m);
    assert_eq!(r.ops, 0, "restart rewrote {:?}", m.log);

    w2.sync(&desired(&[(f, entry("aff", &[2, 3], &[1]))]), &mut m);
    assert!(m.affinity.is_empty(), "the flag went away");
    w2.sync(&desired(&[(f, affinity_entry("aff", &[2], &[]))]), &mut m);
    assert_eq!(matches(&m), [(1, ip(2))]);
    m.log.clear();
    w2.sync(&Desired::default(), &mut m);
    assert!(m.affinity.is_empty());
    let last = m.log.iter().rposition(|o| matches!(o, Op::DelAffinityMatch(..))).unwrap();
    let rev_nat = m.log.iter().position(|o| matches!(o, Op::DelRevNat(..))).unwrap();
    assert!(last < rev_nat, "{:?}", m.log);
}

/// IPv6 frontends and backends beside IPv4 ones: one id space for backends and rev-NAT entries
/// (the affinity matches and conntrack name ids without a family), each entry written to and
/// removed from its family's map, the filter bits of both kinds, and a restart that adopts both
/// families and writes nothing.
#[test]
fn both_families_share_the_id_spaces_and_keep_their_maps() {
    let v6 = |last: u16| IpAddr::from(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, last));
    let fe6 = Frontend { addr: v6(0x96), port: 80, proto: Protocol::Tcp };
    let be6 = |last| Backend {
        addr: BackendAddr { addr: v6(last), port: 8080, proto: Protocol::Tcp },
        state: BackendState::Active,
        local: false,
    };
    let mut e6 = entry("web", &[], &[]);
    e6.slots = vec![be6(1), be6(2)];
    let d = desired(&[(fe(1, 80), entry("web", &[1], &[])), (fe6, e6)]);
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let r = w.sync(&d, &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let ids: BTreeSet<u32> = m.backends.keys().copied().collect();
    assert_eq!(ids.len(), 3, "one id per backend over both families: {:?}", m.backends);
    let rev_nat_ids: BTreeSet<u16> = m.rev_nat.keys().copied().collect();
    assert_eq!(rev_nat_ids.len(), 2);
    assert_eq!(slot_backends(&m, fe6), [v6(1), v6(2)]);
    assert!(
        has_bit(&m.filter, frontend_bit(fe6)) && m.backends.values().all(|b| has_bit(&m.be_filter, backend_bit(*b)))
    );

    // A restart adopts both families and writes nothing.
    let (mut w2, warnings) = Writer::adopt(m.adopted());
    assert!(warnings.is_empty(), "{warnings:?}");
    m.log.clear();
    let r = w2.sync(&d, &mut m);
    assert!(r.errors.is_empty() && m.log.is_empty(), "{:?} {:?}", r.errors, m.log);

    // Removing the IPv6 frontend removes from the IPv6 maps only.
    let r = sync_idle(&mut w2, &desired(&[(fe(1, 80), entry("web", &[1], &[]))]), &mut m);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(m.log.iter().any(|o| matches!(o, Op::DelRevNat(_, Family::V6))), "{:?}", m.log);
    assert_eq!(m.log.iter().filter(|o| matches!(o, Op::DelBackend(_, Family::V6))).count(), 2, "{:?}", m.log);
    assert!(!m.log.iter().any(|o| matches!(o, Op::DelBackend(_, Family::V4) | Op::DelRevNat(_, Family::V4))));
    assert_eq!(m.backends.len(), 1);
}

/// A conntrack scan that began before a backend was orphaned has not seen the flows opened to it
/// while it was still in its Service's slots: its answer must not release that backend; the
/// next scan's may. (Seen in the e2e suite: a GC pass begun at start, on an empty table, came
/// back after a backend turned unready and released it under an open connection.)
#[test]
fn a_scan_that_began_before_a_backend_was_orphaned_does_not_release_it() {
    let mut m = FakeMaps::default();
    let mut w = Writer::new();
    let f = fe(10, 80);
    w.sync(&desired(&[(f, entry("a", &[1, 2], &[]))]), &mut m);
    let id2 = backend_id(&m, 2);
    let began = w.orphan_stamp();
    // Backend 2 leaves while that scan runs (a flow to it may have been opened after it read).
    w.sync(&desired(&[(f, entry("a", &[1], &[]))]), &mut m);
    assert_eq!(w.orphan_count(), 1);
    assert_eq!(w.release_orphans_scanned_at(began, |_| false, &mut m), (0, Vec::new()));
    assert!(m.backends.contains_key(&id2) && w.has_backend(id2));
    // A scan that began after: its answer counts.
    let later = w.orphan_stamp();
    assert_eq!(w.release_orphans_scanned_at(later, |i| i == id2, &mut m), (0, Vec::new()));
    assert_eq!(w.release_orphans_scanned_at(later, |_| false, &mut m), (1, Vec::new()));
    assert!(!m.backends.contains_key(&id2));
}
