//! rproxy's own connection tracking: one LRU map per family, two entries per translated flow
//! (see `rproxy_common::CtKey`). TCP state follows the flags seen both ways and selects the entry's
//! lifetime; the agent's garbage collector removes expired pairs.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns};
use rproxy_common::{
    Backend, CT_DIR_RECLAIM, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_FIN_FWD, CT_F_FIN_REV, CT_F_RST, CT_F_SEEN_REV,
    CT_F_SYN_FWD, CT_F_SYN_REV, CT_NAT_SNAT, CtKey, CtState, CtValue, Stat, proto, snat,
};

use crate::{
    family::Family,
    maps::{CONFIG, SNAT_CURSOR, count},
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

/// `BPF_ANY`: create or replace (a reused tuple overwrites a stale entry).
pub const BPF_ANY: u64 = 0;
/// `BPF_NOEXIST`: create only (the SNAT port allocation relies on it).
pub const BPF_NOEXIST: u64 = 1;

/// `CLOCK_MONOTONIC_COARSE`: a tick's resolution is plenty for lifetimes of seconds, and it
/// costs far less per packet than the precise clock.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Flags a client packet contributes.
#[inline(always)]
pub fn fwd_bits<F: Family>(pkt: &Packet<F>) -> u8 {
    let f = pkt.tcp_flags;
    let mut b = 0;
    if f & TCP_SYN != 0 {
        b |= CT_F_SYN_FWD;
    }
    if f & TCP_FIN != 0 {
        b |= CT_F_FIN_FWD;
    }
    if f & TCP_RST != 0 {
        b |= CT_F_RST;
    }
    b
}

/// Flags a backend packet contributes.
#[inline(always)]
pub fn rev_bits<F: Family>(pkt: &Packet<F>) -> u8 {
    let f = pkt.tcp_flags;
    let mut b = CT_F_SEEN_REV;
    if f & TCP_SYN != 0 {
        b |= CT_F_SYN_REV;
    }
    if f & TCP_FIN != 0 {
        b |= CT_F_FIN_REV;
    }
    if f & TCP_RST != 0 {
        b |= CT_F_RST;
    }
    b
}

/// True for a bare SYN (a client opening a connection).
#[inline(always)]
pub fn is_syn<F: Family>(pkt: &Packet<F>) -> bool {
    pkt.proto == proto::TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

#[inline(always)]
fn state_of(proto_: u8, flags: u8) -> CtState {
    if proto_ == proto::TCP { CtState::from_tcp_flags(flags) } else { CtState::Datagram }
}

#[inline(always)]
pub fn service_key<F: Family>(pkt: &Packet<F>) -> CtKey<F::Addr> {
    CtKey {
        saddr: pkt.saddr,
        daddr: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir: CT_DIR_SERVICE,
        _pad: [0, 0],
    }
}

#[inline(always)]
pub fn reply_key<F: Family>(pkt: &Packet<F>) -> CtKey<F::Addr> {
    CtKey { dir: CT_DIR_REPLY, ..service_key(pkt) }
}

/// Accounts one packet on an existing entry. Packets that add TCP flags (SYN, FIN, RST, first
/// reply) move the state of both entries of the flow; others only refresh their own expiry.
/// A bare SYN on a closing entry reopens the flow (client port reuse) with the same backend.
/// `ct` is the entry in direction `dir` (`CT_DIR_*`) of a flow of protocol `proto`.
#[inline(always)]
pub fn account<F: Family>(ct: *mut CtValue<F::Addr>, dir: u8, proto: u8, bits: u8, reopen: bool, now: u64) {
    // SAFETY: `ct` comes from a successful map lookup; the value stays valid for this program run
    // (RCU), and concurrent writers only store whole fields.
    let v = unsafe { &mut *ct };
    let old = v.flags;
    let new = if reopen && v.state == CtState::Closing as u8 { bits } else { old | bits };
    if new == old {
        // The lifetime from the flags, not from `state`: another CPU may be between writing
        // this entry's flags and its state. Two CPUs moving the pair at once can still leave
        // its entries with different flags; the GC judges a flow by both entries' flags.
        v.expires_ns = now + state_of(proto, old).lifetime_ns();
        return;
    }
    let state = state_of(proto, new);
    let expires = now + state.lifetime_ns();
    v.flags = new;
    v.state = state as u8;
    v.expires_ns = expires;
    if let Some(p) = F::conntrack().get_ptr_mut(pair_key(dir, proto, v)) {
        // SAFETY: as above.
        let p = unsafe { &mut *p };
        p.flags = new;
        p.state = state as u8;
        p.expires_ns = expires;
    }
}

/// The key of the other entry of a flow whose entry in direction `dir` holds `v` (built from the
/// value alone: the caller's key need not be on the stack).
#[inline(always)]
pub fn pair_key<A: Copy>(dir: u8, proto: u8, v: &CtValue<A>) -> CtKey<A> {
    let (saddr, daddr, sport, dport, dir) = if dir == CT_DIR_SERVICE {
        (v.pair_addr, v.nat_addr, v.pair_port, v.nat_port, CT_DIR_REPLY)
    } else {
        (v.nat_addr, v.pair_addr, v.nat_port, v.pair_port, CT_DIR_SERVICE)
    };
    CtKey { saddr, daddr, sport, dport, proto, dir, _pad: [0, 0] }
}

/// One conntrack entry, key and value. A new flow's two entries are built in one of these,
/// the reply entry first ([`reply_entry`]), then turned into the service entry
/// ([`Entry::make_service`]): one key and one value on the stack, not four (IPv6's are 40 and 56
/// bytes, and the whole call chain has 512).
pub struct Entry<A> {
    pub key: CtKey<A>,
    pub value: CtValue<A>,
}

impl<A: Copy> Entry<A> {
    /// The reply entry `(backend → nat)` becomes the service entry `(client → frontend)` of
    /// packet `pkt`'s flow: the value's pair is the backend, its nat side the address the
    /// backend sees (the reply key's destination: a SNAT port chosen since is kept).
    #[inline(always)]
    pub fn make_service<F: Family<Addr = A>>(&mut self, pkt: &Packet<F>) {
        let (k, v) = (&mut self.key, &mut self.value);
        v.pair_addr = k.saddr;
        v.pair_port = k.sport;
        v.nat_addr = k.daddr;
        v.nat_port = k.dport;
        k.saddr = pkt.saddr;
        k.daddr = pkt.daddr;
        k.sport = pkt.sport;
        k.dport = pkt.dport;
        k.dir = CT_DIR_SERVICE;
    }

    /// The service entry's key becomes the reply entry's again (the value is left as it is).
    #[inline(always)]
    pub fn make_reply_key(&mut self) {
        let (k, v) = (&mut self.key, &self.value);
        k.saddr = v.pair_addr;
        k.daddr = v.nat_addr;
        k.sport = v.pair_port;
        k.dport = v.nat_port;
        k.dir = CT_DIR_REPLY;
    }
}

/// The reply entry of a new flow translated to backend `be` with the source translated to
/// `nat` (the client itself without SNAT): replies from the backend to `nat` pair with the
/// frontend the client addressed.
#[inline(always)]
pub fn reply_entry<F: Family>(
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    nat: (F::Addr, u16),
    nat_flags: u8,
    now: u64,
) -> Entry<F::Addr> {
    let bits = fwd_bits(pkt);
    let state = state_of(pkt.proto, bits);
    Entry {
        key: flow_reply_key(pkt.proto, be, nat),
        value: CtValue {
            expires_ns: now + state.lifetime_ns(),
            backend_id,
            rev_nat_id,
            flags: bits,
            state: state as u8,
            pair_addr: pkt.daddr,
            pair_port: pkt.dport,
            nat_addr: pkt.saddr,
            nat_port: pkt.sport,
            nat_flags,
            _pad: [0, 0, 0],
        },
    }
}

/// The reply entry's key of a flow of protocol `proto` to backend `be` whose source the backend
/// sees as `nat`: the key of the backend's replies.
#[inline(always)]
pub fn flow_reply_key<A: Copy>(proto: u8, be: &Backend<A>, nat: (A, u16)) -> CtKey<A> {
    CtKey { saddr: be.addr, daddr: nat.0, sport: be.port, dport: nat.1, proto, dir: CT_DIR_REPLY, _pad: [0, 0] }
}

/// Opens a new translated flow (`create_nat`), unless a live flow of another frontend holds the
/// tuple its replies come back on: two live connections never share one (the replies of one
/// would be translated for the other). A flow that is over gives the tuple up: its other entry
/// goes, unless this flow's own service entry took its place. Used wherever a flow is opened
/// without a port of its own (the pod path, north-south to a local backend); flows with an SNAT
/// port take a free one ([`allocate_port`]).
#[inline(always)]
pub fn open<F: Family>(
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    nat: (F::Addr, u16),
    nat_flags: u8,
    now: u64,
) -> Result<(), Stat> {
    let reply = flow_reply_key(pkt.proto, be, nat);
    let stale = match reply_holder::<F>(&reply, pkt, now) {
        Holder::Live { .. } => return Err(Stat::CtClash),
        Holder::Stale(other) => Some(other),
        Holder::Free => None,
    };
    create_nat(pkt, backend_id, be, rev_nat_id, nat, nat_flags, now).map_err(|_| Stat::CtInsertFail)?;
    if let Some(other) = stale.filter(|other| *other != service_key(pkt)) {
        let _ = F::conntrack().remove(other);
    }
    Ok(())
}

/// Finds a free port of the SNAT range (`Config`) for the reply entry `reply` (its `dport` is
/// set to each candidate in turn) and inserts the entry: the first port after this CPU's cursor
/// that is free, or, among the first `RECLAIM_TRIES`, held by a quietly closed flow
/// ([`reclaim_snat`]). Returns the port (wire order), or `None` after `TRIES` taken ports or
/// with an empty range. See `rproxy_common::snat`: the north-south SNAT takes `snat::TRIES` and
/// `snat::RECLAIM_TRIES`, a flow moved off a clash ([`open_remapped`]) [`CLASH_TRIES`] and none
/// (each try is code the verifier walks at every program load, a take-over try much more: the
/// clashes are rare, and a port on the client's own address is rarely taken).
#[inline(always)]
pub fn allocate_port<F: Family, const TRIES: u32, const RECLAIM_TRIES: u32>(
    reply: &mut CtKey<F::Addr>,
    value: &CtValue<F::Addr>,
    now: u64,
) -> Option<u16> {
    let config = CONFIG.get(0)?;
    let (first, ports) = (config.snat_port_min, config.snat_port_count());
    if ports == 0 {
        return None;
    }
    let cursor = SNAT_CURSOR.get_ptr_mut(0)?;
    // SAFETY: per-CPU slot; only this CPU touches it while this program runs.
    let mut next = unsafe { *cursor };
    if next == 0 {
        // First use on this CPU: start somewhere random, so CPUs walk different stretches.
        // SAFETY: helper without arguments.
        next = unsafe { bpf_get_prandom_u32() };
    }
    for i in 0..TRIES {
        let offset = next % ports;
        next = offset + 1;
        #[expect(clippy::cast_possible_truncation, reason = "offset < ports <= 65536 - first: no overflow")]
        let p = first.wrapping_add(offset as u16).to_be();
        reply.dport = p;
        // Taking over is tried on the first ports only, the oldest in this CPU's walk: each
        // try adds a copy of `reclaim_snat` for the verifier to check.
        if F::conntrack().insert(&*reply, value, BPF_NOEXIST).is_ok()
            || (i < RECLAIM_TRIES && reclaim_snat::<F>(reply, value, now))
        {
            // SAFETY: as above. Never 0 here (offset + 1), so the random start happens once.
            unsafe { *cursor = next };
            return Some(p);
        }
    }
    // SAFETY: as above.
    unsafe { *cursor = next };
    None
}

/// The source port a pod's TCP flow through a frontend takes (`pod::from_pod`), wire order:
/// the pod's own port `sport` folded into the SNAT range (`Config`), `first + sport % count`.
/// The pod's connections straight to backends (to a pod's address, or made at `connect()` by
/// the socket hooks) take the kernel's ephemeral ports, above the range, and are not in
/// conntrack: a flow with the pod's own port could land on one's tuple. Folding keeps the
/// order in which the pod's kernel hands its ports out (one after the other for a
/// destination), so a tuple comes back to a backend no sooner than the pod's own would (a
/// backend's `TIME_WAIT` socket of an earlier connection); it is one-to-one over any
/// `count` consecutive ports, so the kernel's ephemeral range (28,232 ports by default, the
/// range 28,976) maps without overlap. The pod's own port with an empty range.
#[inline(always)]
pub fn pod_port(sport: u16) -> u16 {
    let Some(config) = CONFIG.get(0) else { return sport };
    let count = config.snat_port_count();
    if count == 0 {
        return sport;
    }
    #[expect(clippy::cast_possible_truncation, reason = "the remainder < count <= 65536 - first: no overflow")]
    let offset = (u32::from(u16::from_be(sport)) % count) as u16;
    config.snat_port_min.wrapping_add(offset).to_be()
}

/// Ports tried for a flow moved off a clash ([`open_remapped`]).
pub const CLASH_TRIES: u32 = 8;

/// Opens a new flow whose reply tuple a live flow holds ([`open`] refused it, or
/// `pod::direct_syn` found it) with another source port, as netfilter's NAT does for a clashing
/// tuple: the backend sees the client's address `nat_addr` (its own, or the hairpin address)
/// with a port of `--snat-port-range` whose reply tuple is free ([`allocate_port`], with
/// [`CLASH_TRIES`] and no take-over: the reply entry takes it with `BPF_NOEXIST`, so two CPUs
/// never share one), counted as `PortRemapped`. The reply entry's nat side keeps the client's
/// own address and port, which the replies get back. Returns the port (wire order);
/// `Err(CtClash)` when no port was free or the range is empty.
#[inline(always)]
pub fn open_remapped<F: Family>(
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    nat_addr: F::Addr,
    nat_flags: u8,
    now: u64,
) -> Result<u16, Stat> {
    let e = F::entry_scratch().ok_or(Stat::CtInsertFail)?;
    // SAFETY: this CPU's slot, written whole before it is read; only this program uses it
    // while it runs.
    let e = unsafe {
        e.write(reply_entry(pkt, backend_id, be, rev_nat_id, (nat_addr, pkt.sport), nat_flags, now));
        &mut *e
    };
    let port = allocate_port::<F, CLASH_TRIES, 0>(&mut e.key, &e.value, now).ok_or(Stat::CtClash)?;
    e.make_service(pkt);
    if F::conntrack().insert(&e.key, &e.value, BPF_ANY).is_err() {
        e.make_reply_key();
        let _ = F::conntrack().remove(&e.key);
        return Err(Stat::CtInsertFail);
    }
    count(Stat::PortRemapped);
    Ok(port)
}

/// Opens a new flow whose backend sees the client as `nat` ([`open`]); when a live flow holds
/// that reply tuple, with another port on `nat`'s address ([`open_remapped`]). Returns the
/// source port the backend sees. The pod path and north-south flows to a local backend.
#[inline(always)]
pub fn open_or_remap<F: Family>(
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    nat: (F::Addr, u16),
    nat_flags: u8,
    now: u64,
) -> Result<u16, Stat> {
    match open(pkt, backend_id, be, rev_nat_id, nat, nat_flags, now) {
        Ok(()) => Ok(nat.1),
        Err(Stat::CtClash) => open_remapped(pkt, backend_id, be, rev_nat_id, nat.0, nat_flags, now),
        Err(why) => Err(why),
    }
}

/// Records a new translated flow whose source the backend sees as `nat` (the client itself
/// unless translated), with `CT_NAT_*` flags: the reply entry first, then the service entry, so
/// that the entry a reply needs exists before any packet of the flow is forwarded. The entry is
/// built in this CPU's scratch (`Family::entry_scratch`), not on the stack.
#[inline(always)]
pub fn create_nat<F: Family>(
    pkt: &Packet<F>,
    backend_id: u32,
    be: &Backend<F::Addr>,
    rev_nat_id: u16,
    nat: (F::Addr, u16),
    nat_flags: u8,
    now: u64,
) -> Result<(), i32> {
    let e = F::entry_scratch().ok_or(-1)?;
    // SAFETY: as in `open_remapped`.
    let e = unsafe {
        e.write(reply_entry(pkt, backend_id, be, rev_nat_id, nat, nat_flags, now));
        &mut *e
    };
    F::conntrack().insert(&e.key, &e.value, BPF_ANY)?;
    e.make_service(pkt);
    F::conntrack().insert(&e.key, &e.value, BPF_ANY)
}

/// Takes over the SNAT port of `reply` (a reply key whose insertion failed: the port is in use
/// towards this backend) if the flow holding it has closed and been quiet for
/// `snat::REUSE_AFTER_NS`, storing `value` in its place. Without this a closed flow would hold
/// its port until its entries expire and the agent's GC removes them (10 to 20 s), which caps
/// new connections to one backend at a few hundred per second.
///
/// Two CPUs must never take one port. The claim is made under a lock entry: the same key with
/// `CT_DIR_RECLAIM`, inserted with `BPF_NOEXIST` (only one CPU succeeds) and removed before
/// returning. Under it the entry is read again and checked, removed, and the new one inserted
/// with `BPF_NOEXIST` (a CPU that found the port free in between has it instead). Only entries
/// not yet expired, on both sides of the old flow, are taken: the GC never removes an entry that
/// was alive when it looked (it re-reads before deleting). The old flow's client-side entry is
/// removed too, so a late packet of the old client cannot touch the new flow.
#[inline(always)]
pub fn reclaim_snat<F: Family>(reply: &mut CtKey<F::Addr>, value: &CtValue<F::Addr>, now: u64) -> bool {
    // A cheap look first: most taken ports belong to open flows.
    if reclaimable::<F>(reply, now).is_none() {
        return false;
    }
    // The lock is the key itself with another direction (its value does not matter: it is
    // `value`, so a lock that somehow stayed would expire with it).
    let ct = F::conntrack();
    reply.dir = CT_DIR_RECLAIM;
    let locked = ct.insert(&*reply, value, BPF_NOEXIST).is_ok();
    reply.dir = CT_DIR_REPLY;
    if !locked {
        return false;
    }
    let won = claim::<F>(reply, value, now);
    reply.dir = CT_DIR_RECLAIM;
    let _ = ct.remove(&*reply);
    reply.dir = CT_DIR_REPLY;
    won
}

#[inline(always)]
fn claim<F: Family>(reply: &CtKey<F::Addr>, value: &CtValue<F::Addr>, now: u64) -> bool {
    let Some(client_side) = reclaimable::<F>(reply, now) else {
        return false;
    };
    let ct = F::conntrack();
    if ct.remove(reply).is_err() || ct.insert(reply, value, BPF_NOEXIST).is_err() {
        return false;
    }
    let _ = ct.remove(client_side);
    true
}

/// If the SNAT reply entry `reply` and its client-side pair are quietly closing, the pair's key.
#[inline(always)]
fn reclaimable<F: Family>(reply: &CtKey<F::Addr>, now: u64) -> Option<CtKey<F::Addr>> {
    // SAFETY: read in place; a concurrent update stores whole fields.
    let old = unsafe { F::conntrack().get(reply) }?;
    if old.nat_flags & CT_NAT_SNAT == 0 || !quiet_closing(old, now) {
        return None;
    }
    let client_side = reply.pair(old);
    // SAFETY: as above.
    if let Some(c) = unsafe { F::conntrack().get(client_side) }
        && !quiet_closing(c, now)
    {
        return None;
    }
    Some(client_side)
}

/// A closing entry, not expired, that has seen no packet for `snat::REUSE_AFTER_NS` (every
/// packet sets the expiry to the state's lifetime from now).
#[inline(always)]
fn quiet_closing<A>(v: &CtValue<A>, now: u64) -> bool {
    let last_packet = v.expires_ns.saturating_sub(CtState::Closing.lifetime_ns());
    v.state == CtState::Closing as u8 && v.expires_ns > now && now >= last_packet + snat::REUSE_AFTER_NS
}

/// Who holds the reply entry a new connection needs.
pub enum Holder<A> {
    /// Nobody.
    Free,
    /// A flow that is over (closing, or expired but not yet collected), or the same
    /// connection's earlier flow: the new connection replaces it. Its other entry, to remove.
    Stale(CtKey<A>),
    /// A live flow of another frontend (to backend `backend_id`): the new connection must not
    /// take its tuple.
    Live { backend_id: u32 },
}

/// Who holds `reply`, the entry the replies of `pkt`'s new connection (to a frontend, or
/// straight to a backend) would hit. Two live connections never share one: the replies of one
/// would be translated for the other. The same connection's earlier flow (same client address
/// and port, same destination) is stale.
#[inline(always)]
pub fn reply_holder<F: Family>(reply: &CtKey<F::Addr>, pkt: &Packet<F>, now: u64) -> Holder<F::Addr> {
    // SAFETY: copied out at once.
    let Some(v) = (unsafe { F::conntrack().get(reply) }).copied() else {
        return Holder::Free;
    };
    let over = v.expires_ns <= now || v.state == CtState::Closing as u8;
    let same =
        (v.pair_addr, v.pair_port) == (pkt.daddr, pkt.dport) && (v.nat_addr, v.nat_port) == (pkt.saddr, pkt.sport);
    if over || same { Holder::Stale(reply.pair(&v)) } else { Holder::Live { backend_id: v.backend_id } }
}

/// The reply entry that replies to `pkt` would hit if `pkt` were the first packet of a flow
/// translated for its source: the key of a packet from its destination back to its source.
#[inline(always)]
pub fn reverse_reply_key<F: Family>(pkt: &Packet<F>) -> CtKey<F::Addr> {
    CtKey {
        saddr: pkt.daddr,
        daddr: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: CT_DIR_REPLY,
        _pad: [0, 0],
    }
}

/// Removes a flow's two entries: `key` and its pair `other`.
#[inline(always)]
pub fn remove_flow<F: Family>(key: &CtKey<F::Addr>, other: &CtKey<F::Addr>) {
    let _ = F::conntrack().remove(other);
    let _ = F::conntrack().remove(key);
}
