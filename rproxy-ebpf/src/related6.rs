//! ICMPv6 errors about translated flows, IPv6's twin of `related`: a backend's port unreachable,
//! a router's packet too big or time exceeded quote the packet as it was sent on (to the
//! backend, and for a source-translated flow from the node's address and SNAT port). The quote
//! becomes the packet the client sent and the error's source the service address when the
//! backend sent it, so that the client's socket learns of it (path MTU discovery included).
//!
//! Only errors (types 1 to 4) are looked at, never neighbour discovery, MLD or echo. Errors
//! with extension headers, outer or quoted, pass untouched. The ICMPv6 checksum covers a pseudo
//! header with the error's addresses: its difference is taken over them and the quote.
use network_types::{eth::EthHdr, ip::Ipv6Hdr};
use rproxy_common::{CT_DIR_REPLY, CtKey6, In6, Stat, icmp as msg, proto};

use crate::{
    csum,
    ctx::{Ctx, load_words, ptr_at},
    family::V6,
    maps::count,
    parse::{ETH_P_IPV6_BE, IP6_SADDR_OFF},
    related::Quote,
};

/// Offset of the ICMPv6 header after an IPv6 header without extension headers.
const ICMP_OFF: usize = EthHdr::LEN + Ipv6Hdr::LEN;
const ICMP_CSUM_OFF: usize = ICMP_OFF + 2;
/// Offset of the quoted IPv6 header, and of what is rewritten: that header and the first 8
/// bytes after it, as 12 words.
const QUOTE_OFF: usize = ICMP_OFF + 8;
const QUOTE_WORDS: usize = (Ipv6Hdr::LEN + 8) / 4;

/// An ICMPv6 error quoting a TCP or UDP packet.
pub struct Quoted6 {
    /// The error's own addresses and hop limit, and its IPv6 length (header included).
    pub src: In6,
    pub dst: In6,
    pub hop_limit: u8,
    pub ip_len: u16,
    /// The quote as 32-bit words in memory order: IPv6 header, then ports, then (UDP) length and
    /// checksum or (TCP) sequence number.
    words: [u32; QUOTE_WORDS],
}

impl Quoted6 {
    /// The quoted packet's next header.
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        self.words[1].to_ne_bytes()[2]
    }
    #[inline(always)]
    pub fn inner_src(&self) -> In6 {
        [self.words[2], self.words[3], self.words[4], self.words[5]]
    }
    #[inline(always)]
    pub fn inner_dst(&self) -> In6 {
        [self.words[6], self.words[7], self.words[8], self.words[9]]
    }
    /// The quoted packet's ports (wire order).
    #[inline(always)]
    fn ports(&self) -> (u16, u16) {
        let [s0, s1, d0, d1] = self.words[10].to_ne_bytes();
        (u16::from_ne_bytes([s0, s1]), u16::from_ne_bytes([d0, d1]))
    }

    /// The reply entry of the quoted packet's flow.
    #[inline(always)]
    pub fn reply_key(&self) -> CtKey6 {
        let (sport, dport) = self.ports();
        CtKey6 {
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

/// The ICMPv6 error this frame is, if it is one quoting a TCP or UDP packet, without extension
/// headers in either IPv6 header.
#[inline(always)]
pub fn parse<C: Ctx>(ctx: &C) -> Option<Quoted6> {
    let quote = ptr_at::<_, [u32; QUOTE_WORDS]>(ctx, QUOTE_OFF)?;
    let eth = ptr_at::<_, EthHdr>(ctx, 0)?;
    let outer = ptr_at::<_, Ipv6Hdr>(ctx, EthHdr::LEN)?;
    let icmp = ptr_at::<_, [u8; 8]>(ctx, ICMP_OFF)?;
    // SAFETY: all bounds-checked above; fields read in place (unaligned: packed byte fields).
    let (ether_type, outer, icmp_type) = unsafe { ((*eth).ether_type, &*outer, (*icmp)[0]) };
    if ether_type != ETH_P_IPV6_BE
        || outer.version() != 6
        || outer.next_hdr != proto::ICMPV6
        || !(msg::V6_DEST_UNREACH..=msg::V6_PARAM_PROBLEM).contains(&icmp_type)
    {
        return None;
    }
    // SAFETY: as above.
    let q = unsafe {
        Quoted6 {
            src: load_words(outer.src_addr.as_ptr()),
            dst: load_words(outer.dst_addr.as_ptr()),
            hop_limit: outer.hop_limit,
            ip_len: u16::from_be_bytes(outer.payload_len).saturating_add(40),
            words: load_words(quote.cast()),
        }
    };
    let words = q.words;
    let version = words[0].to_ne_bytes()[0] >> 4;
    (version == 6 && (q.proto() == proto::TCP || q.proto() == proto::UDP)).then_some(q)
}

/// `q`'s quote with the tuple `(src, sport) → (dst, dport)` (wire order), its UDP checksum
/// updated (zero stays zero, a computed zero is written as 0xffff).
#[inline(always)]
pub fn requote(q: &Quoted6, src: (In6, u16), dst: (In6, u16)) -> [u32; QUOTE_WORDS] {
    let [s0, s1] = src.1.to_ne_bytes();
    let [d0, d1] = dst.1.to_ne_bytes();
    let ports = u32::from_ne_bytes([s0, s1, d0, d1]);
    let addr = csum::add(csum::diff(&q.inner_src(), &src.0), csum::diff(&q.inner_dst(), &dst.0));
    let port = csum::diff(&[q.words[10]], &[ports]);
    let mut new = q.words;
    new[2] = src.0[0];
    new[3] = src.0[1];
    new[4] = src.0[2];
    new[5] = src.0[3];
    new[6] = dst.0[0];
    new[7] = dst.0[1];
    new[8] = dst.0[2];
    new[9] = dst.0[3];
    new[10] = ports;
    if q.proto() == proto::UDP {
        // The UDP checksum is in the quote (bytes 6..8 of the UDP header).
        let [l0, l1, u0, u1] = q.words[11].to_ne_bytes();
        let udp = u16::from_ne_bytes([u0, u1]);
        if udp != 0 {
            let sum = csum::apply(udp, addr, port);
            let u = if sum == 0 { 0xffff } else { sum }.to_ne_bytes();
            new[11] = u32::from_ne_bytes([l0, l1, u[0], u[1]]);
        }
    }
    new
}

/// Writes `new` as `q`'s quote and `(src, dst)` as the error's addresses, with the ICMPv6
/// checksum updated by one difference over the pseudo header's addresses and the quote.
#[inline(always)]
pub fn rewrite<C: Ctx>(ctx: &C, q: &Quoted6, new: [u32; QUOTE_WORDS], src: In6, dst: In6) -> Result<(), i64> {
    let quote = csum::diff(&q.words, &new);
    let addrs = csum::add(csum::diff(&q.src, &src), csum::diff(&q.dst, &dst));
    csum::fold_diff(ctx, ICMP_CSUM_OFF, csum::add(quote, addrs), false)?;
    let out_quote: *mut [u32; QUOTE_WORDS] = ptr_at(ctx, QUOTE_OFF).ok_or(-1i64)?;
    let out_addrs: *mut [In6; 2] = ptr_at(ctx, IP6_SADDR_OFF).ok_or(-1i64)?;
    // SAFETY: bounds-checked after the helpers, which may move skb data.
    unsafe {
        out_quote.write_unaligned(new);
        out_addrs.write_unaligned([src, dst]);
    }
    count(Stat::IcmpRelated);
    Ok(())
}

impl Quote<V6> for Quoted6 {
    #[inline(always)]
    fn parse<C: Ctx>(ctx: &C) -> Option<Self> {
        parse(ctx)
    }
    #[inline(always)]
    fn src(&self) -> In6 {
        self.src
    }
    #[inline(always)]
    fn dst(&self) -> In6 {
        self.dst
    }
    #[inline(always)]
    fn ttl(&self) -> u8 {
        self.hop_limit
    }
    #[inline(always)]
    fn ip_len(&self) -> u16 {
        self.ip_len
    }
    #[inline(always)]
    fn inner_src(&self) -> In6 {
        Quoted6::inner_src(self)
    }
    #[inline(always)]
    fn inner_dst(&self) -> In6 {
        Quoted6::inner_dst(self)
    }
    #[inline(always)]
    fn flow_key(&self) -> CtKey6 {
        self.reply_key()
    }
    #[inline(always)]
    fn translate<C: Ctx>(&self, ctx: &C, from: (In6, u16), to: (In6, u16), src: In6, dst: In6) -> Result<(), i64> {
        rewrite(ctx, self, requote(self, from, to), src, dst)
    }
}
