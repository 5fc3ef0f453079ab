//! ICMP errors about translated flows, conntrack's "related" packets. A backend that has no
//! socket for a datagram, or a router that cannot forward a packet of a flow to a backend,
//! answers with an ICMP error quoting the packet as it was sent on: to the backend's address and
//! port (and, for a source-translated flow, from the node's address and SNAT port). The client's
//! stack matches the quote against its own sockets, which know the service address, so the error
//! must be translated back like a reply: the quoted packet becomes the one the client sent, and the
//! error's own source becomes the service address when the backend sent it. Without this a
//! connected UDP socket never learns that a backend refused it, and path MTU discovery fails on
//! translated TCP flows.
//!
//! Handled on the way into a pod (`rpx_to_pod`: flows translated on the pod path), out of an
//! external device (`rpx_ext_egress`: north-south flows to this node's backends), and, for
//! north-south flows source-translated to another node's backend, where the error comes back in
//! (`nodeport::snat_error`, which forwards it to the client). Errors with IPv4 options, outer or
//! quoted, pass untouched. The handling is generic over the family through [`Quote`]; IPv6's
//! errors are in `related6`.
use aya_ebpf::programs::TcContext;
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use rproxy_common::{CT_DIR_REPLY, CtKey, CtKey4, CtValue, FlowKind, Stat, icmp as msg, proto};

use crate::{
    csum,
    ctx::Ctx,
    ctx::ptr_at,
    family::{Family, V4},
    icmp::{ICMP_OFF, QUOTE_LEN},
    maps::count,
    parse::{ETH_P_IP_BE, IP_CSUM_OFF, IP_MF, IP_OFFMASK, IP_SADDR_OFF},
};

/// ICMP types that quote the packet they are about.
const QUOTING_TYPES: [u8; 3] = [msg::DEST_UNREACH, msg::TIME_EXCEEDED, msg::PARAM_PROBLEM];
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
/// Offset of the quoted IPv4 header, and of what is rewritten: that header (without options)
/// and the first 8 bytes of its payload, as 7 words.
const QUOTE_OFF: usize = ICMP_OFF + 8;
const QUOTE_WORDS: usize = QUOTE_LEN / 4;

/// An ICMP error quoting a TCP or UDP packet.
pub struct Quoted {
    /// The error's own addresses, TTL and IPv4 total length.
    pub src: u32,
    pub dst: u32,
    pub ttl: u8,
    pub tot_len: u16,
    /// The quote, as 32-bit words in memory order: IPv4 header, then ports, then (UDP) length
    /// and checksum or (TCP) sequence number.
    words: [u32; QUOTE_WORDS],
}

impl Quoted {
    /// The quoted packet's protocol.
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        self.words[2].to_ne_bytes()[1]
    }
    /// The quoted packet's source and destination addresses (wire order).
    #[inline(always)]
    pub fn inner_src(&self) -> u32 {
        self.words[3]
    }
    #[inline(always)]
    pub fn inner_dst(&self) -> u32 {
        self.words[4]
    }
    /// The quoted packet's ports (wire order).
    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        let [s0, s1, d0, d1] = self.words[5].to_ne_bytes();
        (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]))
    }

    /// The reply entry of the quoted packet's flow: the key of a packet from its destination
    /// (the backend) back to its source.
    #[inline(always)]
    pub fn reply_key(&self) -> CtKey4 {
        let (sport, dport) = self.ports();
        CtKey4 {
            saddr: self.inner_dst(),
            daddr: self.inner_src(),
            sport: dport,
            dport: sport,
            proto: self.proto(),
            dir: CT_DIR_REPLY,
            _pad: [0, 0],
        }
    }
}

/// The ICMP error this frame is, if it is one quoting a TCP or UDP packet (or its first
/// fragment), without IPv4 options in either header.
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C) -> Option<Quoted> {
    // Anything shorter than an error with its quote (ARP, say) is not one.
    let quote = ptr_at::<_, [u32; QUOTE_WORDS]>(ctx, QUOTE_OFF)?;
    let eth = ptr_at::<_, EthHdr>(ctx, 0)?;
    let outer = ptr_at::<_, Ipv4Hdr>(ctx, EthHdr::LEN)?;
    let icmp = ptr_at::<_, [u8; 8]>(ctx, ICMP_OFF)?;
    // SAFETY: all bounds-checked above; copied out, read unaligned (no alignment guarantee).
    let (ether_type, outer, icmp, words) =
        unsafe { ((*eth).ether_type, outer.read_unaligned(), icmp.read_unaligned(), quote.read_unaligned()) };
    if ether_type != ETH_P_IP_BE
        || outer.version() != 4
        || usize::from(outer.ihl()) != Ipv4Hdr::LEN
        || outer.proto != proto::ICMP
        || u16::from_be_bytes(outer.frags) & (IP_OFFMASK | IP_MF) != 0
        || !QUOTING_TYPES.contains(&icmp[0])
    {
        return None;
    }
    let [vihl, _, _, _] = words[0].to_ne_bytes();
    let [_, _, f0, f1] = words[1].to_ne_bytes();
    let q = Quoted {
        src: u32::from_ne_bytes(outer.src_addr),
        dst: u32::from_ne_bytes(outer.dst_addr),
        ttl: outer.ttl,
        tot_len: u16::from_be_bytes(outer.tot_len),
        words,
    };
    let known = q.proto() == proto::TCP || q.proto() == proto::UDP;
    (vihl == 0x45 && u16::from_be_bytes([f0, f1]) & IP_OFFMASK == 0 && known).then_some(q)
}

/// `q`'s quote with the tuple `(src, sport) → (dst, dport)` (wire order), its IPv4 and UDP
/// checksums updated. A UDP checksum of zero ("none") stays zero, a computed zero is written as
/// 0xffff.
#[inline(always)]
pub fn requote(q: &Quoted, src: (u32, u16), dst: (u32, u16)) -> [u32; QUOTE_WORDS] {
    let old = q.words;
    let [s0, s1] = src.1.to_ne_bytes();
    let [d0, d1] = dst.1.to_ne_bytes();
    let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
    let addr = csum::diff(&[old[3], old[4]], &[src.0, dst.0]);
    let port = csum::diff(&[old[5]], &[ports]);
    let [ttl, inner_proto, c0, c1] = old[2].to_ne_bytes();
    let ip = csum::apply(u16::from_ne_bytes([c0, c1]), addr, 0).to_ne_bytes();
    let mut new = old;
    new[2] = u32::from_ne_bytes([ttl, inner_proto, ip[0], ip[1]]);
    new[3] = src.0;
    new[4] = dst.0;
    new[5] = ports;
    if inner_proto == proto::UDP {
        // The UDP checksum is in the quote (bytes 6..8): pseudo header and ports changed.
        let [l0, l1, u0, u1] = old[6].to_ne_bytes();
        let udp = u16::from_ne_bytes([u0, u1]);
        if udp != 0 {
            let sum = csum::apply(udp, addr, port);
            let u = if sum == 0 { 0xffff } else { sum }.to_ne_bytes();
            new[6] = u32::from_ne_bytes([l0, l1, u[0], u[1]]);
        }
    }
    new
}

/// Writes `new` as `q`'s quote and `(src, dst)` as the error's addresses, with the ICMP
/// checksum updated by one difference over the quote and the IPv4 header's by the addresses'.
#[inline(always)]
pub fn rewrite<C: Ctx>(ctx: &C, q: &Quoted, new: [u32; QUOTE_WORDS], src: u32, dst: u32) -> Result<(), i64> {
    let old = q.words;
    csum::fold_diff(ctx, ICMP_CSUM_OFF, csum::diff(&old, &new), false)?;
    if (src, dst) != (q.src, q.dst) {
        csum::fold_diff(ctx, IP_CSUM_OFF, csum::diff(&[q.src, q.dst], &[src, dst]), true)?;
    }
    let quote: *mut [u32; QUOTE_WORDS] = ptr_at(ctx, QUOTE_OFF).ok_or(-1i64)?;
    let addrs: *mut [u32; 2] = ptr_at(ctx, IP_SADDR_OFF).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the helpers, which may move skb data.
    unsafe {
        quote.write_unaligned(new);
        addrs.write_unaligned([src, dst]);
    }
    count(Stat::IcmpRelated);
    Ok(())
}

/// An ICMP error quoting a TCP or UDP packet, in either family: IPv4's [`Quoted`], IPv6's
/// `related6::Quoted6`. The generic handling ([`rev_nat`], `nodeport::snat_error`) is written
/// once over it.
pub trait Quote<F: Family>: Sized {
    /// The error this frame is, if it is one this datapath may translate.
    fn parse<C: Ctx>(ctx: &C) -> Option<Self>;
    /// The error's own addresses.
    fn src(&self) -> F::Addr;
    fn dst(&self) -> F::Addr;
    /// The error's TTL (hop limit) and IP length.
    fn ttl(&self) -> u8;
    fn ip_len(&self) -> u16;
    /// The quoted packet's addresses.
    fn inner_src(&self) -> F::Addr;
    fn inner_dst(&self) -> F::Addr;
    /// The conntrack reply key of the quoted packet's flow.
    fn flow_key(&self) -> CtKey<F::Addr>;
    /// Rewrites the quote to the tuple `from → to` and the error's addresses to `(src, dst)`,
    /// with every checksum updated; counts `IcmpRelated`.
    fn translate<C: Ctx>(
        &self,
        ctx: &C,
        from: (F::Addr, u16),
        to: (F::Addr, u16),
        src: F::Addr,
        dst: F::Addr,
    ) -> Result<(), i64>;
}

impl Quote<V4> for Quoted {
    #[inline(always)]
    fn parse<C: Ctx>(ctx: &C) -> Option<Self> {
        parse(ctx)
    }
    #[inline(always)]
    fn src(&self) -> u32 {
        self.src
    }
    #[inline(always)]
    fn dst(&self) -> u32 {
        self.dst
    }
    #[inline(always)]
    fn ttl(&self) -> u8 {
        self.ttl
    }
    #[inline(always)]
    fn ip_len(&self) -> u16 {
        self.tot_len
    }
    #[inline(always)]
    fn inner_src(&self) -> u32 {
        Quoted::inner_src(self)
    }
    #[inline(always)]
    fn inner_dst(&self) -> u32 {
        Quoted::inner_dst(self)
    }
    #[inline(always)]
    fn flow_key(&self) -> CtKey<u32> {
        self.reply_key()
    }
    #[inline(always)]
    fn translate<C: Ctx>(&self, ctx: &C, from: (u32, u16), to: (u32, u16), src: u32, dst: u32) -> Result<(), i64> {
        rewrite(ctx, self, requote(self, from, to), src, dst)
    }
}

/// Translates an ICMP error about a flow whose destination this node translated (no SNAT)
/// back for its client (see the module doc): `external` for the north-south egress (entries
/// with `CT_NAT_EXTERNAL`), else the pod path's. Anything else is left untouched; `Err` only
/// when a helper failed after the packet was changed (the caller drops it).
#[inline(always)]
pub fn rev_nat<F: Family>(ctx: &TcContext, external: bool) -> Result<(), i64> {
    let Some(q) = F::Quoted::parse(ctx) else {
        return Ok(());
    };
    let Some(v) = flow::<F>(&q) else {
        return Ok(());
    };
    let ours = match v.kind() {
        FlowKind::External => external,
        FlowKind::EastWest | FlowKind::Direct => !external,
        _ => false,
    };
    if !ours {
        return Ok(());
    }
    // The reply entry's pair is the frontend the client addressed (a direct flow's, the backend
    // itself); the backend's own error comes from it, a router's keeps its address. Its nat side
    // is the client's own address and port (its source port may have been translated).
    let src = if q.src() == q.inner_dst() { v.pair_addr } else { q.src() };
    q.translate(ctx, (v.nat_addr, v.nat_port), (v.pair_addr, v.pair_port), src, q.dst())
}

/// The conntrack reply entry of the flow `q` quotes.
#[inline(always)]
pub fn flow<F: Family>(q: &F::Quoted) -> Option<CtValue<F::Addr>> {
    // SAFETY: copied out at once.
    unsafe { F::conntrack().get(q.flow_key()) }.copied()
}
