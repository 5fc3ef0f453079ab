//! What the datapath reports about the packets it translates and drops, beyond the global
//! counters (`maps::count`): per-Service counters (`RPX_SVC_STATS`, by rev-NAT id) and, while
//! `rproxy-agent monitor` runs, one event per packet in a ring buffer (`RPX_EVENTS`). With the
//! monitor off, an event costs the load of its switch and a branch.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use rproxy_common::{MonitorEvent, Stat, monitor};

use crate::{
    ctx::{Ctx, ptr_at},
    family::Family,
    maps::{EVENTS, MONITOR, SVC_STATS, count},
    parse::Packet,
};

/// A packet translated at `hook` (`monitor::HOOK_*`), already rewritten: counted as `stat`
/// (`NewFlow`, `Established` or `RevNat`), for its frontend `rev_nat_id`, and reported when
/// the monitor asks for translations.
#[inline(always)]
pub fn translated<C: Ctx, F: Family>(ctx: &C, hook: u8, stat: Stat, pkt: &Packet<F>, rev_nat_id: u16, backend_id: u32) {
    count(stat);
    #[cfg(feature = "log")]
    if !F::STAGES && matches!(stat, Stat::NewFlow) {
        aya_log_ebpf::debug!(ctx, "new flow: proto {} rev-NAT id {} backend id {}", pkt.proto, rev_nat_id, backend_id);
    }
    if let Some(s) = SVC_STATS.get_ptr_mut(u32::from(rev_nat_id)) {
        // SAFETY: this CPU's slot; only this CPU writes it while this program runs.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += u64::from(pkt.ip_len);
            if matches!(stat, Stat::NewFlow) {
                (*s).new_flows += 1;
            }
        }
    }
    if on(monitor::ON_TRANSLATIONS) {
        emit::<C, F>(ctx, monitor::KIND_TRANSLATION, hook, stat, pkt, rev_nat_id, backend_id);
    }
}

/// A `connect()` (or an unconnected UDP send) of protocol `proto` that the socket hooks sent to
/// backend `backend_id` at `(be, be_port)` of frontend `rev_nat_id` (`reason` `NewFlow`: counted
/// as one new flow of the frontend; its packets pass untranslated and are not counted), or
/// refused (`NoBackend`, counted by the service decision: `(be, be_port)` is then the service
/// address, `backend_id` 0). Reported when the monitor asks (`monitor::HOOK_CONNECT`).
#[inline(always)]
pub fn connected<F: Family>(reason: Stat, proto: u8, be: F::Addr, be_port: u16, rev_nat_id: u16, backend_id: u32) {
    let translated = matches!(reason, Stat::NewFlow);
    if translated && let Some(s) = SVC_STATS.get_ptr_mut(u32::from(rev_nat_id)) {
        // SAFETY: this CPU's slot; only this CPU writes it while this program runs.
        unsafe { (*s).new_flows += 1 };
    }
    let kind = if translated { monitor::KIND_TRANSLATION } else { monitor::KIND_DROP };
    if !on(if translated { monitor::ON_TRANSLATIONS } else { monitor::ON_DROPS }) {
        return;
    }
    let Some(mut entry) = EVENTS.reserve_untyped::<MonitorEvent>(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: the reserved event, written whole before it is submitted.
    unsafe {
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).saddr = [0; 4];
        (*e).daddr = F::slot(be);
        (*e).sport = 0;
        (*e).dport = be_port;
        (*e).backend_id = backend_id;
        (*e).rev_nat_id = rev_nat_id;
        (*e).ip_len = 0;
        (*e).kind = kind;
        (*e).reason = reason as u8;
        (*e).family = F::VERSION;
        (*e).proto = proto;
        (*e).hook = monitor::HOOK_CONNECT;
        (*e)._pad = [0; 7];
    }
    entry.submit(0);
}

/// A packet dropped (or rejected) at `hook` for `reason`, still as it came, and counted by the
/// caller or the service decision: reported when the monitor asks for drops. `rev_nat_id` and
/// `backend_id` are 0 where not known.
#[inline(always)]
pub fn dropped<C: Ctx, F: Family>(ctx: &C, hook: u8, reason: Stat, pkt: &Packet<F>, rev_nat_id: u16, backend_id: u32) {
    #[cfg(feature = "log")]
    if !F::STAGES {
        aya_log_ebpf::debug!(ctx, "drop: reason {} proto {} rev-NAT id {}", reason as u8, pkt.proto, rev_nat_id);
    }
    if on(monitor::ON_DROPS) {
        emit::<C, F>(ctx, monitor::KIND_DROP, hook, reason, pkt, rev_nat_id, backend_id);
    }
}

/// `count(reason)` and [`dropped`].
#[inline(always)]
pub fn count_drop<C: Ctx, F: Family>(
    ctx: &C,
    hook: u8,
    reason: Stat,
    pkt: &Packet<F>,
    rev_nat_id: u16,
    backend_id: u32,
) {
    count(reason);
    dropped(ctx, hook, reason, pkt, rev_nat_id, backend_id);
}

/// Whether the monitor wants events of kind `bit`.
#[inline(always)]
fn on(bit: u32) -> bool {
    MONITOR.get(0).is_some_and(|m| m & bit != 0)
}

/// Writes one event into the ring buffer (none when it is full: the monitor reads too slowly).
/// The addresses and ports are copied from the packet itself, not from values the path holds:
/// the IPv6 north-south programs have no stack left for keeping a tuple around for this.
#[inline(always)]
fn emit<C: Ctx, F: Family>(
    ctx: &C,
    kind: u8,
    hook: u8,
    reason: Stat,
    pkt: &Packet<F>,
    rev_nat_id: u16,
    backend_id: u32,
) {
    let Some(mut entry) = EVENTS.reserve_untyped::<MonitorEvent>(0) else {
        return;
    };
    let e = entry.as_mut_ptr();
    // The packet's fields are bounds-checked after the helper call, for the verifier to see the
    // checks hold where the loads are; the addresses' (a constant offset) first, the ports' (a
    // variable one) next, so that the compiler cannot drop the first as implied by the second.
    let Some(addrs) = ptr_at::<C, [F::Addr; 2]>(ctx, F::SADDR_OFF) else {
        entry.discard(0);
        return;
    };
    // SAFETY: bounds-checked packet pointer; the reserved event.
    unsafe {
        let [saddr, daddr] = addrs.read_unaligned();
        (*e).saddr = F::slot(saddr);
        (*e).daddr = F::slot(daddr);
    }
    let Some(ports) = ptr_at::<C, [u16; 2]>(ctx, pkt.l4_off) else {
        entry.discard(0);
        return;
    };
    // SAFETY: as above; the event is written whole before it is submitted.
    unsafe {
        let [sport, dport] = ports.read_unaligned();
        (*e).time_ns = bpf_ktime_get_ns();
        (*e).sport = sport;
        (*e).dport = dport;
        (*e).backend_id = backend_id;
        (*e).rev_nat_id = rev_nat_id;
        (*e).ip_len = pkt.ip_len;
        (*e).kind = kind;
        (*e).reason = reason as u8;
        (*e).family = F::VERSION;
        (*e).proto = pkt.proto;
        (*e).hook = hook;
        (*e)._pad = [0; 7];
    }
    entry.submit(0);
}
