//! The address family, as a type: the service decision, conntrack, NAT and forwarding are
//! written once, generic over `F: Family`, and instantiated for IPv4 (`V4`) and IPv6 (`V6`) by
//! the entry points (as `Ctx` makes the same code run at TC and at XDP). A family brings its address type, its
//! maps (`rproxy_common`'s generic layouts with its address) and what differs in its headers.
use aya_ebpf::bindings::bpf_fib_lookup;
use rproxy_common::{In6, ServiceValue, filter, hairpin, icmp as icmp_msg};

use crate::{
    conntrack::Entry,
    csum,
    ctx::{Ctx, ptr_at, store_words},
    icmp, icmp6,
    maps::{
        AFFINITY4, AFFINITY6, AffinityMap, BE4, BE6, BackendMap, CT4, CT6, ConntrackMap, RNAT4, RNAT6, ROUTE4, ROUTE6,
        RevNatMap, RouteMap, SNAT_SCRATCH, SRC_RANGE4, SRC_RANGE6, SVC4, SVC6, ServiceMap, SrcRangeMap,
    },
    parse::{IP_SADDR_OFF, IP_TTL_OFF, IP6_HOP_LIMIT_OFF, IP6_SADDR_OFF, Packet},
    related::{self, Quote},
    related6,
};

/// An address family.
pub trait Family: Sized + 'static {
    /// Addresses as keys, values and headers carry them (network byte order).
    type Addr: Copy + PartialEq + Default;
    /// `AF_INET` or `AF_INET6`, for FIB lookups.
    const AF: u8;
    /// ICMP's protocol number in this family (for the FIB lookups of the errors it forwards).
    const ICMP: u8;
    /// An ICMP error quoting a packet (`related`).
    type Quoted: Quote<Self>;
    /// The address a pod reaching itself through its Service sees the connection come from
    /// (`rproxy_common::hairpin`).
    const HAIRPIN: Self::Addr;
    /// Whether a new north-south flow to another node's backend, and an ICMP error arriving on
    /// an external device, go through stages, programs of their own entered by tail call
    /// (`rproxy_common::calls`), rather than inline: IPv6's path does not fit one program's
    /// stack with them.
    const STAGES: bool;

    /// 4 or 6 (`rproxy_common::MonitorEvent::family`).
    const VERSION: u8;
    /// Offset in the frame of the source address, which the destination address follows.
    const SADDR_OFF: usize;
    /// An address in a 16-byte slot (`rproxy_common::MonitorEvent`): IPv4's in the first word.
    fn slot(addr: Self::Addr) -> In6;

    /// The frame's TCP or UDP packet of this family (see `parse`).
    fn parse<C: Ctx>(ctx: &C) -> Option<Packet<Self>>;
    fn services() -> &'static ServiceMap<Self::Addr>;
    fn backends() -> &'static BackendMap<Self::Addr>;
    fn rev_nat() -> &'static RevNatMap<Self::Addr>;
    fn conntrack() -> &'static ConntrackMap<Self::Addr>;
    /// This CPU's storage for a new flow's conntrack entry (`maps::SnatScratch`), for paths
    /// whose stack has no room for one (`conntrack::create_nat`, `conntrack::open_remapped`).
    fn entry_scratch() -> Option<*mut Entry<Self::Addr>>;
    fn affinity() -> &'static AffinityMap<Self::Addr>;
    fn src_ranges() -> &'static SrcRangeMap<Self::Addr>;
    fn routes() -> &'static RouteMap<Self::Addr>;

    /// Bits of an address (for the source range trie's full-length lookups).
    const ADDR_BITS: u32;
    /// An address's bit in a filter map (`rproxy_common::filter`).
    fn filter_bit(addr: Self::Addr, port: u16, proto: u8) -> u32;
    /// Whether `a` and `b` are the same address, in as few instructions as the family allows.
    fn same(a: Self::Addr, b: Self::Addr) -> bool;
    /// The checksum difference (`csum::diff`) of the addresses `old` becoming `new`, each a
    /// (source, destination) pair: what the L4 pseudo header (and IPv4's header) sees change.
    fn addr_diff(old: [Self::Addr; 2], new: [Self::Addr; 2]) -> u32;
    /// Folds an address difference into the IP header's checksum, if the family has one.
    fn fold_ip_csum<C: Ctx>(ctx: &C, diff: u32) -> Result<(), i64>;
    /// Writes the source and destination addresses into the IP header.
    fn write_addrs<C: Ctx>(ctx: &C, saddr: Self::Addr, daddr: Self::Addr) -> Result<(), i64>;
    /// Turns `pkt` into the ICMP error `error` to its sender (see `icmp`); `false` when none is
    /// sent (a header the family does not quote, the rate limit, a helper failure).
    fn icmp_error<C: Ctx>(ctx: &C, pkt: &Packet<Self>, error: IcmpError, now: u64) -> bool;
    /// Decrements the TTL (hop limit) of a packet this node forwards (above 1, checked).
    fn dec_ttl<C: Ctx>(ctx: &C) -> Result<(), i64>;
    /// Sets a FIB lookup's source and destination addresses.
    ///
    /// # Safety
    /// `p` points to a `bpf_fib_lookup` the caller owns.
    unsafe fn fib_set_src(p: *mut bpf_fib_lookup, saddr: Self::Addr);
    /// # Safety
    /// As for `fib_set_src`.
    unsafe fn fib_set_dst(p: *mut bpf_fib_lookup, daddr: Self::Addr);
    /// The source address a FIB lookup reports.
    ///
    /// # Safety
    /// As for `fib_set_src`, after the lookup.
    unsafe fn fib_src(p: *const bpf_fib_lookup) -> Self::Addr;

    /// A new flow to frontend `svc` that has no backend at all: turned into "port unreachable"
    /// from the service address, as kube-proxy's `REJECT` answers. `false` when the frontend
    /// has backends (their slots being rewritten, or none local: the caller drops) or no error
    /// is sent.
    #[inline(always)]
    fn reject<C: Ctx>(ctx: &C, pkt: &Packet<Self>, svc: &ServiceValue, now: u64) -> bool {
        svc.rejects() && Self::icmp_error(ctx, pkt, IcmpError::PortUnreachable, now)
    }
}

/// The ICMP errors the datapath sends (`rproxy_common::icmp`).
#[derive(Clone, Copy)]
pub enum IcmpError {
    /// Forwarding would take the TTL to 0.
    TimeExceeded,
    /// Too big for the route, whose MTU this is ("fragmentation needed").
    TooBig(u16),
    /// No endpoint for the frontend.
    PortUnreachable,
}

/// IPv4.
pub struct V4;

impl Family for V4 {
    type Addr = u32;
    type Quoted = related::Quoted;
    const AF: u8 = 2;
    const ICMP: u8 = rproxy_common::proto::ICMP;
    const HAIRPIN: u32 = hairpin::ADDR;
    const STAGES: bool = false;
    const VERSION: u8 = 4;
    const SADDR_OFF: usize = IP_SADDR_OFF;

    #[inline(always)]
    fn slot(addr: u32) -> In6 {
        [addr, 0, 0, 0]
    }
    const ADDR_BITS: u32 = 32;

    #[inline(always)]
    fn parse<C: Ctx>(ctx: &C) -> Option<Packet<Self>> {
        crate::parse::parse_ipv4(ctx)
    }
    #[inline(always)]
    fn services() -> &'static ServiceMap<u32> {
        &SVC4
    }
    #[inline(always)]
    fn backends() -> &'static BackendMap<u32> {
        &BE4
    }
    #[inline(always)]
    fn rev_nat() -> &'static RevNatMap<u32> {
        &RNAT4
    }
    #[inline(always)]
    fn conntrack() -> &'static ConntrackMap<u32> {
        &CT4
    }
    #[inline(always)]
    fn entry_scratch() -> Option<*mut Entry<u32>> {
        // SAFETY: a pointer into this CPU's slot, not a reference.
        SNAT_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &raw mut (*s).entry4 })
    }
    #[inline(always)]
    fn affinity() -> &'static AffinityMap<u32> {
        &AFFINITY4
    }
    #[inline(always)]
    fn src_ranges() -> &'static SrcRangeMap<u32> {
        &SRC_RANGE4
    }
    #[inline(always)]
    fn routes() -> &'static RouteMap<u32> {
        &ROUTE4
    }

    #[inline(always)]
    fn filter_bit(addr: u32, port: u16, proto: u8) -> u32 {
        filter::bit(addr, port, proto)
    }

    #[inline(always)]
    fn same(a: u32, b: u32) -> bool {
        a == b
    }

    #[inline(always)]
    fn addr_diff(old: [u32; 2], new: [u32; 2]) -> u32 {
        csum::diff(&old, &new)
    }

    #[inline(always)]
    fn fold_ip_csum<C: Ctx>(ctx: &C, diff: u32) -> Result<(), i64> {
        csum::fold_diff(ctx, crate::parse::IP_CSUM_OFF, diff, true)
    }

    #[inline(always)]
    fn icmp_error<C: Ctx>(ctx: &C, pkt: &Packet<Self>, error: IcmpError, now: u64) -> bool {
        let (typ, code, mtu) = match error {
            IcmpError::TimeExceeded => (icmp_msg::TIME_EXCEEDED, 0, 0),
            IcmpError::TooBig(mtu) => (icmp_msg::DEST_UNREACH, icmp_msg::FRAG_NEEDED, mtu),
            IcmpError::PortUnreachable => (icmp_msg::DEST_UNREACH, icmp_msg::PORT_UNREACH, 0),
        };
        icmp::reply(ctx, pkt, typ, code, mtu, now)
    }

    #[inline(always)]
    fn dec_ttl<C: Ctx>(ctx: &C) -> Result<(), i64> {
        let word: *mut [u8; 2] = ptr_at(ctx, IP_TTL_OFF).ok_or(-1i64)?;
        // SAFETY: bounds-checked by ptr_at; TTL and protocol, one 16-bit word of the header.
        let [ttl, proto] = unsafe { word.read_unaligned() };
        let new = [ttl.saturating_sub(1), proto];
        csum::update_ip_word(ctx, u16::from_ne_bytes([ttl, proto]), u16::from_ne_bytes(new))?;
        // The checksum helper may have moved the skb's data: check again.
        let word: *mut [u8; 2] = ptr_at(ctx, IP_TTL_OFF).ok_or(-1i64)?;
        // SAFETY: as above.
        unsafe { word.write_unaligned(new) };
        Ok(())
    }

    #[inline(always)]
    unsafe fn fib_set_src(p: *mut bpf_fib_lookup, saddr: u32) {
        // SAFETY: the caller's struct; unions of plain integers.
        unsafe { (*p).__bindgen_anon_3.ipv4_src = saddr };
    }

    #[inline(always)]
    unsafe fn fib_set_dst(p: *mut bpf_fib_lookup, daddr: u32) {
        // SAFETY: as above.
        unsafe { (*p).__bindgen_anon_4.ipv4_dst = daddr };
    }

    #[inline(always)]
    unsafe fn fib_src(p: *const bpf_fib_lookup) -> u32 {
        // SAFETY: as above; the helper fills the union as IPv4 for family AF_INET.
        unsafe { (*p).__bindgen_anon_3.ipv4_src }
    }

    #[inline(always)]
    fn write_addrs<C: Ctx>(ctx: &C, saddr: u32, daddr: u32) -> Result<(), i64> {
        let ip: *mut [u32; 2] = ptr_at(ctx, IP_SADDR_OFF).ok_or(-1i64)?;
        // SAFETY: bounds-checked; unaligned because the Ethernet header leaves no alignment
        // guarantee.
        unsafe { store_words(ip.cast(), &[saddr, daddr]) };
        Ok(())
    }
}

/// IPv6.
pub struct V6;

impl Family for V6 {
    type Addr = In6;
    type Quoted = related6::Quoted6;
    const AF: u8 = 10;
    const ICMP: u8 = rproxy_common::proto::ICMPV6;
    const HAIRPIN: In6 = hairpin::ADDR6;
    const STAGES: bool = true;
    const ADDR_BITS: u32 = 128;
    const VERSION: u8 = 6;
    const SADDR_OFF: usize = IP6_SADDR_OFF;

    #[inline(always)]
    fn slot(addr: In6) -> In6 {
        addr
    }

    #[inline(always)]
    fn parse<C: Ctx>(ctx: &C) -> Option<Packet<Self>> {
        crate::parse::parse_ipv6(ctx)
    }
    #[inline(always)]
    fn services() -> &'static ServiceMap<In6> {
        &SVC6
    }
    #[inline(always)]
    fn backends() -> &'static BackendMap<In6> {
        &BE6
    }
    #[inline(always)]
    fn rev_nat() -> &'static RevNatMap<In6> {
        &RNAT6
    }
    #[inline(always)]
    fn conntrack() -> &'static ConntrackMap<In6> {
        &CT6
    }
    #[inline(always)]
    fn entry_scratch() -> Option<*mut Entry<In6>> {
        // SAFETY: a pointer into this CPU's slot, not a reference.
        SNAT_SCRATCH.get_ptr_mut(0).map(|s| unsafe { &raw mut (*s).entry })
    }
    #[inline(always)]
    fn affinity() -> &'static AffinityMap<In6> {
        &AFFINITY6
    }
    #[inline(always)]
    fn src_ranges() -> &'static SrcRangeMap<In6> {
        &SRC_RANGE6
    }
    #[inline(always)]
    fn routes() -> &'static RouteMap<In6> {
        &ROUTE6
    }

    #[inline(always)]
    fn filter_bit(addr: In6, port: u16, proto: u8) -> u32 {
        filter::bit6(&addr, port, proto)
    }

    /// The words' differences or-ed together, one branch: `==` on the arrays becomes a
    /// 128-bit comparison that LLVM assembles from the words in registers with shifts and ors
    /// (some 25 instructions and spills, where this takes eight).
    #[inline(always)]
    fn same(a: In6, b: In6) -> bool {
        (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) == 0
    }

    #[inline(always)]
    fn addr_diff(old: [In6; 2], new: [In6; 2]) -> u32 {
        csum::add(csum::diff(&old[0], &new[0]), csum::diff(&old[1], &new[1]))
    }

    #[inline(always)]
    fn fold_ip_csum<C: Ctx>(_ctx: &C, _diff: u32) -> Result<(), i64> {
        // IPv6 has no header checksum.
        Ok(())
    }

    #[inline(always)]
    fn icmp_error<C: Ctx>(ctx: &C, pkt: &Packet<Self>, error: IcmpError, now: u64) -> bool {
        let (typ, code, info) = match error {
            IcmpError::TimeExceeded => (icmp_msg::V6_TIME_EXCEEDED, 0, 0),
            IcmpError::TooBig(mtu) => (icmp_msg::V6_PACKET_TOO_BIG, 0, u32::from(mtu)),
            IcmpError::PortUnreachable => (icmp_msg::V6_DEST_UNREACH, icmp_msg::V6_PORT_UNREACH, 0),
        };
        icmp6::reply(ctx, pkt, typ, code, info, now)
    }

    #[inline(always)]
    fn dec_ttl<C: Ctx>(ctx: &C) -> Result<(), i64> {
        let hop: *mut u8 = ptr_at(ctx, IP6_HOP_LIMIT_OFF).ok_or(-1i64)?;
        // SAFETY: bounds-checked by ptr_at; no checksum covers the hop limit.
        unsafe { *hop = (*hop).saturating_sub(1) };
        Ok(())
    }

    #[inline(always)]
    unsafe fn fib_set_src(p: *mut bpf_fib_lookup, saddr: In6) {
        // SAFETY: the caller's struct; unions of plain integers.
        unsafe { (*p).__bindgen_anon_3.ipv6_src = saddr };
    }

    #[inline(always)]
    unsafe fn fib_set_dst(p: *mut bpf_fib_lookup, daddr: In6) {
        // SAFETY: as above.
        unsafe { (*p).__bindgen_anon_4.ipv6_dst = daddr };
    }

    #[inline(always)]
    unsafe fn fib_src(p: *const bpf_fib_lookup) -> In6 {
        // SAFETY: as above; the helper fills the union as IPv6 for family AF_INET6.
        unsafe { (*p).__bindgen_anon_3.ipv6_src }
    }

    #[inline(always)]
    fn write_addrs<C: Ctx>(ctx: &C, saddr: In6, daddr: In6) -> Result<(), i64> {
        let ip: *mut [In6; 2] = ptr_at(ctx, IP6_SADDR_OFF).ok_or(-1i64)?;
        let ip = ip.cast::<u8>();
        // SAFETY: bounds-checked; unaligned because the Ethernet header leaves no alignment
        // guarantee.
        unsafe {
            store_words(ip, &saddr);
            store_words(ip.add(16), &daddr);
        }
        Ok(())
    }
}
