//! Shared by the packet test crates: the harness (embedded object, private maps, the agent's
//! writer) and frame building/checking with independently computed checksums (etherparse).
#![allow(dead_code, reason = "each test crate uses a different subset")]

pub mod fuzz;
pub mod node_netns;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use aya::programs::{TestRun, TestRunOptions};
use etherparse::{
    IpHeaders, Ipv4Header, Ipv4Options, NetSlice, PacketBuilder, SlicedPacket, TransportSlice, ip_number,
};
use rproxy_agent::{
    bpf::datapath::{Datapath, Maps},
    model::Desired,
    node::snat::PortRange,
    writer::Writer,
};
use rproxy_common::{CtKey4, Stat};

/// Kernel tests share nothing, but loading programs concurrently only costs time on 2 cores.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub struct Harness {
    pub dp: Datapath,
    pub maps: Maps,
    pub writer: Writer,
}

pub fn harness() -> Option<Harness> {
    let required = std::env::var("RPROXY_REQUIRE_KERNEL").is_ok_and(|v| v == "1");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(!required, "RPROXY_REQUIRE_KERNEL=1 but not running as root");
        eprintln!("skipping: packet tests need root (BPF_PROG_TEST_RUN)");
        return None;
    }
    let mut dp = match Datapath::load(None) {
        Ok(dp) => dp,
        Err(e) => panic!("loading the datapath: {e}"),
    };
    // As the agent does before attaching anything.
    dp.set_snat_ports(PortRange::DEFAULT).expect("SNAT port range");
    let maps = dp.take_maps().expect("maps");
    Some(Harness { dp, maps, writer: Writer::new() })
}

impl Harness {
    /// Programs `desired` as the agent does: the write, then the removal of the conntrack
    /// entries of UDP flows whose backend left.
    pub fn program(&mut self, desired: &Desired) {
        let r = self.writer.sync(desired, &mut self.maps);
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        let stale = r.stale_udp.iter().copied().collect();
        rproxy_agent::bpf::gc::purge_udp(&mut self.maps.conntrack, &stale);
        rproxy_agent::bpf::gc::purge_udp(&mut self.maps.conntrack6, &stale);
    }

    /// One conntrack GC pass as the agent runs it: expired entries go, and the backends that
    /// left every frontend are deleted once no entry names them. How many were deleted.
    pub fn gc(&mut self) -> usize {
        let writer = &self.writer;
        let pass = rproxy_agent::bpf::gc::run_pass(&mut self.maps.conntrack, |id| writer.has_backend(id))
            .merge(rproxy_agent::bpf::gc::run_pass(&mut self.maps.conntrack6, |id| writer.has_backend(id)));
        let (released, errors) = self.writer.release_orphans(|id| pass.in_use.contains(&id), &mut self.maps);
        assert!(errors.is_empty(), "{errors:?}");
        released
    }

    /// Runs `frame` through `prog` once: (return value, output frame).
    pub fn run(&mut self, prog: &'static str, frame: &[u8]) -> (u32, Vec<u8>) {
        test_run(self.dp.program(prog).expect("program"), prog, frame, None)
    }

    /// Runs `frame` through TC program `prog` as if it arrived on (or left through) device
    /// `ifindex` of the calling thread's network namespace.
    pub fn run_on(&mut self, prog: &'static str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct __sk_buff up to `ifindex`: ingress_ifindex at 36, ifindex at 40; the kernel
        // takes a shorter context and zeroes the rest.
        let mut ctx = [0u8; 44];
        ctx[36..40].copy_from_slice(&ifindex.to_ne_bytes());
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        test_run(self.dp.program(prog).expect("program"), prog, frame, Some(&ctx))
    }

    /// Runs `frame` through XDP program `prog` as received on device `ifindex` (queue 0) of the
    /// calling thread's network namespace.
    pub fn run_xdp(&mut self, prog: &'static str, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex.
        let len = u32::try_from(frame.len()).expect("small frame");
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&len.to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        test_run(self.dp.xdp_program(prog).expect("program"), prog, frame, Some(&ctx))
    }

    pub fn ct(&self, key: &CtKey4) -> Option<rproxy_common::CtValue4> {
        self.maps.conntrack.get(key, 0).ok()
    }

    pub fn ct6(&self, key: &rproxy_common::CtKey6) -> Option<rproxy_common::CtValue6> {
        self.maps.conntrack6.get(key, 0).ok()
    }

    pub fn stat(&self, s: Stat) -> u64 {
        rproxy_agent::bpf::datapath::stat_total(&self.maps.stats, s)
    }
}

#[derive(Clone, Copy, Default)]
#[expect(clippy::struct_excessive_bools, reason = "one bool per TCP flag, as on the wire")]
pub struct Tcp {
    pub syn: bool,
    pub ack: bool,
    pub fin: bool,
    pub rst: bool,
}

pub const SYN: Tcp = Tcp { syn: true, ack: false, fin: false, rst: false };
pub const SYN_ACK: Tcp = Tcp { syn: true, ack: true, fin: false, rst: false };
pub const ACK: Tcp = Tcp { syn: false, ack: true, fin: false, rst: false };
pub const FIN: Tcp = Tcp { syn: false, ack: true, fin: true, rst: false };
pub const RST: Tcp = Tcp { syn: false, ack: false, fin: false, rst: true };

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: etherparse::IpNumber, options: &[u8]) -> IpHeaders {
    let mut h = Ipv4Header::new(0, 64, proto, src.octets(), dst.octets()).expect("header");
    h.options = Ipv4Options::try_from(options).expect("options");
    IpHeaders::Ipv4(h, etherparse::Ipv4Extensions::default())
}

pub fn tcp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), f: Tcp, payload: &[u8], options: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(ipv4(src.0, dst.0, ip_number::TCP, options))
        .tcp(src.1, dst.1, 1000, 64240);
    if f.syn {
        b = b.syn();
    }
    if f.ack {
        b = b.ack(1);
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("write");
    out
}

pub fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ip(ipv4(src.0, dst.0, ip_number::UDP, &[]))
        .udp(src.1, dst.1);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("write");
    out
}

/// Parsed addresses of an output frame, with both checksums verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen {
    pub ttl: u8,
    pub src: (Ipv4Addr, u16),
    pub dst: (Ipv4Addr, u16),
    pub payload: Vec<u8>,
    pub options: Vec<u8>,
}

/// One `BPF_PROG_TEST_RUN` of `frame` (with context `ctx`, if any): (return value, output frame).
pub fn test_run<P>(prog: &P, name: &str, frame: &[u8], ctx: Option<&[u8]>) -> (u32, Vec<u8>)
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN of {name} with a {}-byte frame: {e}", frame.len()));
    out.truncate(res.data_size_out as usize);
    (res.return_value, out)
}

/// The conntrack key of a packet `src → dst` (host-order ports) in direction `dir`.
pub fn ct_key(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), proto: u8, dir: u8) -> CtKey4 {
    CtKey4 {
        saddr: u32::from(src.0).to_be(),
        daddr: u32::from(dst.0).to_be(),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// Ethernet addresses of a frame: (destination, source).
pub fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    (frame[0..6].try_into().expect("6 bytes"), frame[6..12].try_into().expect("6 bytes"))
}

pub fn parse_checked(frame: &[u8]) -> Seen {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = &p.net else { panic!("not IPv4") };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum(), "IPv4 header checksum");
    let (src, dst) = (Ipv4Addr::from(h.source), Ipv4Addr::from(h.destination));
    let (sp, dp, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.calc_checksum_ipv4(h.source, h.destination).expect("len");
            assert_eq!(t.checksum(), want, "TCP checksum");
            (t.source_port(), t.destination_port(), t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            if u.checksum() != 0 {
                let want = u.to_header().calc_checksum_ipv4_raw(h.source, h.destination, u.payload()).expect("len");
                assert_eq!(u.checksum(), want, "UDP checksum");
            }
            (u.source_port(), u.destination_port(), u.payload().to_vec())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Seen { ttl: h.time_to_live, src: (src, sp), dst: (dst, dp), payload, options: h.options.as_slice().to_vec() }
}

/// Ones' complement sum of `bytes` as 16-bit big-endian words, folded.
pub fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    u16::try_from(sum).expect("folded")
}

/// `out` is the ICMP error `typ`/`code` (with next-hop `mtu`) that `sent` calls for: from the
/// address it was sent to, back to its sender and its MAC, valid checksums, quoting its IPv4
/// header and first 8 payload bytes.
pub fn assert_icmp_error(out: &[u8], sent: &[u8], typ: u8, code: u8, mtu: u16) {
    assert_eq!(out.len(), 70, "Ethernet + IPv4 + ICMP + 28 quoted bytes");
    assert_eq!((&out[0..6], &out[6..12]), (&sent[6..12], &sent[0..6]), "MACs swapped");
    let ip = &out[14..34];
    assert_eq!((ip[0], ip[9], ip[8]), (0x45, 1, 64), "IPv4, ICMP, TTL 64");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 56);
    assert_eq!((&ip[12..16], &ip[16..20]), (&sent[30..34], &sent[26..30]), "from the address sent to, to the sender");
    assert_eq!(ones_sum(ip), 0xffff, "IPv4 header checksum");
    let icmp = &out[34..];
    assert_eq!((icmp[0], icmp[1]), (typ, code));
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu, "next-hop MTU");
    assert_eq!(ones_sum(icmp), 0xffff, "ICMP checksum");
    assert_eq!(&icmp[8..], &sent[14..42], "quote: the header and 8 bytes as they arrived");
}

/// An ICMP error `typ`/`code` from `src` to `dst` quoting `quoted` (an IPv4 header and what
/// follows of its packet), with valid checksums, as a backend's or a router's stack sends it.
pub fn icmp_error_frame(src: Ipv4Addr, dst: Ipv4Addr, typ: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let mut icmp = vec![typ, code, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = !ones_sum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let len = u16::try_from(20 + icmp.len()).expect("small frame").to_be_bytes();
    let mut ip = vec![0x45, 0xc0, len[0], len[1], 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = !ones_sum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 8, 0];
    frame.extend(ip);
    frame.extend(icmp);
    frame
}

/// The ICMP error `frame` (see [`icmp_error_frame`]) was translated back for the client that
/// sent `sent`: it comes from `src`, both checksums hold, and its quote is `sent`'s IPv4 header
/// and first 8 payload bytes exactly, as the client's stack must find them.
pub fn assert_related_error(out: &[u8], sent: &[u8], src: Ipv4Addr) {
    let ip = &out[14..34];
    assert_eq!(&ip[12..16], &src.octets(), "the error's source");
    assert_eq!(ones_sum(ip), 0xffff, "IPv4 header checksum");
    assert_eq!(ones_sum(&out[34..]), 0xffff, "ICMP checksum");
    assert_eq!(&out[42..70], &sent[14..42], "the quote is the packet the client sent");
}

/// An IPv6 TCP frame `src → dst` with flags `f`.
pub fn tcp6_frame(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), f: Tcp, payload: &[u8]) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.0.octets(), dst.0.octets(), 64)
        .tcp(src.1, dst.1, 1000, 64240);
    if f.syn {
        b = b.syn();
    }
    if f.ack {
        b = b.ack(1);
    }
    if f.fin {
        b = b.fin();
    }
    if f.rst {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("write");
    out
}

/// An IPv6 UDP frame `src → dst`.
pub fn udp6_frame(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), payload: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv6(src.0.octets(), dst.0.octets(), 64)
        .udp(src.1, dst.1);
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("write");
    out
}

/// Parsed addresses of an IPv6 output frame, with its L4 checksum verified.
#[derive(Debug, PartialEq, Eq)]
pub struct Seen6 {
    pub hop_limit: u8,
    pub src: (Ipv6Addr, u16),
    pub dst: (Ipv6Addr, u16),
    pub payload: Vec<u8>,
}

pub fn parse6_checked(frame: &[u8]) -> Seen6 {
    let p = SlicedPacket::from_ethernet(frame).expect("output parses");
    let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
    let h = ip.header().to_header();
    let (src, dst) = (Ipv6Addr::from(h.source), Ipv6Addr::from(h.destination));
    let (sp, dp, payload) = match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = t.calc_checksum_ipv6(h.source, h.destination).expect("len");
            assert_eq!(t.checksum(), want, "TCP checksum");
            (t.source_port(), t.destination_port(), t.payload().to_vec())
        }
        Some(TransportSlice::Udp(u)) => {
            let want = u.to_header().calc_checksum_ipv6_raw(h.source, h.destination, u.payload()).expect("len");
            assert_eq!(u.checksum(), want, "UDP checksum");
            (u.source_port(), u.destination_port(), u.payload().to_vec())
        }
        other => panic!("unexpected transport {other:?}"),
    };
    Seen6 { hop_limit: h.hop_limit, src: (src, sp), dst: (dst, dp), payload }
}

/// The IPv6 conntrack key of a packet `src → dst` (host-order ports) in direction `dir`.
pub fn ct6_key(src: (Ipv6Addr, u16), dst: (Ipv6Addr, u16), proto: u8, dir: u8) -> rproxy_common::CtKey6 {
    use rproxy_common::WireAddr;
    rproxy_common::CtKey6 {
        saddr: <[u32; 4]>::wire(src.0),
        daddr: <[u32; 4]>::wire(dst.0),
        sport: src.1.to_be(),
        dport: dst.1.to_be(),
        proto,
        dir,
        _pad: [0; 2],
    }
}

/// An address family the packet tests run their cases in: each case is written once over
/// `IpAddr`s and runs for both (see `both_families!` in `packets.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    /// Host `host` of the pods' range: `10.244.1.host`, `fd00:244:1::host`.
    #[must_use]
    pub fn pod(self, host: u8) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 244, 1, host).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, u16::from(host)).into(),
        }
    }

    /// Address `n` of the Services' range: `10.96.0.n`, `fd00:96::n`.
    #[must_use]
    pub fn svc(self, n: u8) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 96, 0, n).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(n)).into(),
        }
    }

    /// A router's address: `10.0.0.1`, `fd00:10::1`.
    #[must_use]
    pub fn router(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 0, 0, 1).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1).into(),
        }
    }

    /// The hairpin address (`rproxy_common::hairpin`).
    #[must_use]
    pub fn hairpin(self) -> IpAddr {
        use rproxy_common::WireAddr as _;
        match self {
            Self::V4 => Ipv4Addr::from(u32::from_be(rproxy_common::hairpin::ADDR)).into(),
            Self::V6 => rproxy_common::hairpin::ADDR6.ip().into(),
        }
    }

    /// Length of the IP header of the frames built here (no options, no extension headers).
    #[must_use]
    pub fn ip_len(self) -> usize {
        match self {
            Self::V4 => 20,
            Self::V6 => 40,
        }
    }

    /// What an ICMP error quotes of a packet (`frame[14..]`): its IP header and 8 bytes.
    #[must_use]
    pub fn quote(self, frame: &[u8]) -> Vec<u8> {
        frame[14..14 + self.ip_len() + 8].to_vec()
    }
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(a) => a,
        IpAddr::V6(a) => panic!("{a}: not IPv4"),
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => panic!("{a}: not IPv6"),
    }
}

/// A TCP frame `src → dst` of their family, with flags `f`.
#[must_use]
pub fn tcp(src: (IpAddr, u16), dst: (IpAddr, u16), f: Tcp, payload: &[u8]) -> Vec<u8> {
    match src.0 {
        IpAddr::V4(s) => tcp_frame((s, src.1), (v4(dst.0), dst.1), f, payload, &[]),
        IpAddr::V6(s) => tcp6_frame((s, src.1), (v6(dst.0), dst.1), f, payload),
    }
}

/// A UDP frame `src → dst` of their family.
#[must_use]
pub fn udp(src: (IpAddr, u16), dst: (IpAddr, u16), payload: &[u8]) -> Vec<u8> {
    match src.0 {
        IpAddr::V4(s) => udp_frame((s, src.1), (v4(dst.0), dst.1), payload),
        IpAddr::V6(s) => udp6_frame((s, src.1), (v6(dst.0), dst.1), payload),
    }
}

/// An output frame of either family, its checksums verified ([`parse_checked`],
/// [`parse6_checked`]).
#[derive(Debug, PartialEq, Eq)]
pub struct SeenIp {
    /// TTL or hop limit.
    pub ttl: u8,
    pub src: (IpAddr, u16),
    pub dst: (IpAddr, u16),
    pub payload: Vec<u8>,
}

#[must_use]
pub fn parse(frame: &[u8]) -> SeenIp {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let s = parse_checked(frame);
            SeenIp { ttl: s.ttl, src: (s.src.0.into(), s.src.1), dst: (s.dst.0.into(), s.dst.1), payload: s.payload }
        }
        0x86dd => {
            let s = parse6_checked(frame);
            SeenIp {
                ttl: s.hop_limit,
                src: (s.src.0.into(), s.src.1),
                dst: (s.dst.0.into(), s.dst.1),
                payload: s.payload,
            }
        }
        other => panic!("EtherType {other:#06x}: not IP"),
    }
}

/// What the packet tests read of a conntrack entry, either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ct {
    pub backend_id: u32,
    pub state: u8,
    pub flags: u8,
    pub nat_flags: u8,
}

impl Harness {
    /// The conntrack entry of a packet `src → dst` (host-order ports) in direction `dir`.
    #[must_use]
    pub fn ct_of(&self, src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8, dir: u8) -> Option<Ct> {
        match src.0 {
            IpAddr::V4(s) => self.ct(&ct_key((s, src.1), (v4(dst.0), dst.1), proto, dir)).map(|v| Ct {
                backend_id: v.backend_id,
                state: v.state,
                flags: v.flags,
                nat_flags: v.nat_flags,
            }),
            IpAddr::V6(s) => self.ct6(&ct6_key((s, src.1), (v6(dst.0), dst.1), proto, dir)).map(|v| Ct {
                backend_id: v.backend_id,
                state: v.state,
                flags: v.flags,
                nat_flags: v.nat_flags,
            }),
        }
    }

    /// Gives the pod's TCP flow `client → frontend`, opened with `port` (a port of the SNAT
    /// range) towards `backend`, the client's own port instead: the flow as the pod path opened
    /// every flow before its TCP flows took ports of the SNAT range, which an upgraded agent
    /// finds in conntrack.
    pub fn keep_client_port(
        &mut self,
        client: (IpAddr, u16),
        frontend: (IpAddr, u16),
        backend: (IpAddr, u16),
        port: u16,
    ) {
        use rproxy_common::{CT_DIR_REPLY, CT_DIR_SERVICE, proto::TCP};
        fn moved<A: Copy + aya::Pod>(
            map: &mut aya::maps::HashMap<aya::maps::MapData, rproxy_common::CtKey<A>, rproxy_common::CtValue<A>>,
            service: rproxy_common::CtKey<A>,
            reply: rproxy_common::CtKey<A>,
        ) where
            rproxy_common::CtKey<A>: aya::Pod,
            rproxy_common::CtValue<A>: aya::Pod,
        {
            let mut v = map.get(&service, 0).expect("the flow's service entry");
            let r = map.get(&reply, 0).expect("the flow's reply entry");
            // The reply entry's nat side is the client's own address and port.
            v.nat_port = r.nat_port;
            map.insert(service, v, 0).expect("writing the service entry");
            map.remove(&reply).expect("removing the reply entry");
            map.insert(rproxy_common::CtKey { dport: r.nat_port, ..reply }, r, 0).expect("writing the reply entry");
        }
        match client.0 {
            IpAddr::V4(c) => moved(
                &mut self.maps.conntrack,
                ct_key((c, client.1), (v4(frontend.0), frontend.1), TCP, CT_DIR_SERVICE),
                ct_key((v4(backend.0), backend.1), (c, port), TCP, CT_DIR_REPLY),
            ),
            IpAddr::V6(c) => moved(
                &mut self.maps.conntrack6,
                ct6_key((c, client.1), (v6(frontend.0), frontend.1), TCP, CT_DIR_SERVICE),
                ct6_key((v6(backend.0), backend.1), (c, port), TCP, CT_DIR_REPLY),
            ),
        }
    }

    /// Removes that entry (as when it expires).
    pub fn remove_ct(&mut self, src: (IpAddr, u16), dst: (IpAddr, u16), proto: u8, dir: u8) {
        let _ = match src.0 {
            IpAddr::V4(s) => self.maps.conntrack.remove(&ct_key((s, src.1), (v4(dst.0), dst.1), proto, dir)),
            IpAddr::V6(s) => self.maps.conntrack6.remove(&ct6_key((s, src.1), (v6(dst.0), dst.1), proto, dir)),
        };
    }

    /// The backend id the writer gave `addr`.
    #[must_use]
    pub fn backend_id(&self, addr: IpAddr) -> u32 {
        use rproxy_agent::bpf::datapath::used_entries;
        let found = match addr {
            IpAddr::V4(a) => used_entries(&self.maps.backends).into_iter().find(|(_, b)| b.ip() == a).map(|(id, _)| id),
            IpAddr::V6(a) => {
                used_entries(&self.maps.backends6).into_iter().find(|(_, b)| b.ip() == a).map(|(id, _)| id)
            }
        };
        found.unwrap_or_else(|| panic!("no backend {addr}"))
    }

    /// The session affinity entry of `client` for rev-NAT id `rev_nat_id`.
    #[must_use]
    pub fn affinity(&self, client: IpAddr, rev_nat_id: u16) -> Option<rproxy_common::AffinityValue> {
        use rproxy_common::{AffinityKey, WireAddr};
        match client {
            IpAddr::V4(c) => self.maps.affinity.get(&AffinityKey { client: u32::wire(c), rev_nat_id, _pad: 0 }, 0).ok(),
            IpAddr::V6(c) => {
                self.maps.affinity6.get(&AffinityKey { client: <[u32; 4]>::wire(c), rev_nat_id, _pad: 0 }, 0).ok()
            }
        }
    }

    /// Writes that entry, as the datapath would.
    pub fn set_affinity(&mut self, client: IpAddr, rev_nat_id: u16, value: rproxy_common::AffinityValue) {
        use rproxy_common::{AffinityKey, WireAddr};
        match client {
            IpAddr::V4(c) => {
                self.maps.affinity.insert(AffinityKey { client: u32::wire(c), rev_nat_id, _pad: 0 }, value, 0)
            }
            IpAddr::V6(c) => {
                self.maps.affinity6.insert(AffinityKey { client: <[u32; 4]>::wire(c), rev_nat_id, _pad: 0 }, value, 0)
            }
        }
        .expect("affinity entry written");
    }
}

/// ICMP and ICMPv6 errors, as the tests build and check them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// Destination unreachable, port unreachable (ICMP 3/3, ICMPv6 1/4).
    PortUnreachable,
    /// Too big for the next hop of `mtu` (ICMP 3/4 "fragmentation needed", ICMPv6 2/0).
    TooBig(u16),
    /// Time exceeded in transit (ICMP 11/0, ICMPv6 3/0).
    TimeExceeded,
}

impl IcmpKind {
    fn type_code(self, fam: Fam) -> (u8, u8) {
        match (self, fam) {
            (Self::PortUnreachable, Fam::V4) => (3, 3),
            (Self::TooBig(_), Fam::V4) => (3, 4),
            (Self::PortUnreachable, Fam::V6) => (1, 4),
            (Self::TooBig(_), Fam::V6) => (2, 0),
            (Self::TimeExceeded, Fam::V4) => (11, 0),
            (Self::TimeExceeded, Fam::V6) => (3, 0),
        }
    }
}

/// The ICMPv6 checksum of message `icmp` from `src` to `dst` (the field zeroed or not: the sum
/// over everything is 0xffff when valid).
fn icmp6_sum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::try_from(icmp.len()).expect("small").to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(icmp);
    ones_sum(&pseudo)
}

/// An ICMP or ICMPv6 error `kind` from `src` to `dst` quoting `quoted` (an IP header and what
/// follows of its packet), with valid checksums, as a backend's or a router's stack sends it.
#[must_use]
pub fn icmp_error(kind: IcmpKind, src: IpAddr, dst: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let fam = if src.is_ipv4() { Fam::V4 } else { Fam::V6 };
    let (typ, code) = kind.type_code(fam);
    match fam {
        Fam::V4 => {
            let mut frame = icmp_error_frame(v4(src), v4(dst), typ, code, quoted);
            if let IcmpKind::TooBig(mtu) = kind {
                let icmp = &mut frame[34..];
                icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
                icmp[2..4].copy_from_slice(&[0, 0]);
                let sum = !ones_sum(icmp);
                icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            }
            frame
        }
        Fam::V6 => {
            let info = if let IcmpKind::TooBig(mtu) = kind { u32::from(mtu) } else { 0 };
            let mut icmp = vec![typ, code, 0, 0];
            icmp.extend_from_slice(&info.to_be_bytes());
            icmp.extend_from_slice(quoted);
            let sum = !icmp6_sum(v6(src), v6(dst), &icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            let len = u16::try_from(icmp.len()).expect("small").to_be_bytes();
            let mut frame = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd];
            frame.extend_from_slice(&[0x60, 0, 0, 0, len[0], len[1], 58, 64]);
            frame.extend_from_slice(&v6(src).octets());
            frame.extend_from_slice(&v6(dst).octets());
            frame.extend(icmp);
            frame
        }
    }
}

/// `out` is the port unreachable that `sent` calls for: see [`assert_icmp_reply`].
pub fn assert_port_unreachable(out: &[u8], sent: &[u8]) {
    assert_icmp_reply(out, sent, IcmpKind::PortUnreachable);
}

/// `out` is the ICMP or ICMPv6 error `kind` that `sent` calls for: from the address it was sent
/// to, back to its sender and its MAC, TTL (hop limit) 64, valid checksums, the MTU of a "too
/// big", quoting its IP header and first 8 payload bytes as they arrived.
pub fn assert_icmp_reply(out: &[u8], sent: &[u8], kind: IcmpKind) {
    let mtu = if let IcmpKind::TooBig(mtu) = kind { mtu } else { 0 };
    if u16::from_be_bytes([sent[12], sent[13]]) == 0x0800 {
        let (typ, code) = kind.type_code(Fam::V4);
        assert_icmp_error(out, sent, typ, code, mtu);
        return;
    }
    let (typ, code) = kind.type_code(Fam::V6);
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "Ethernet + IPv6 + ICMPv6 + 48 quoted bytes");
    assert_eq!((&out[0..6], &out[6..12]), (&sent[6..12], &sent[0..6]), "MACs swapped");
    let ip = &out[14..54];
    assert_eq!((ip[0] >> 4, ip[6], ip[7]), (6, 58, 64), "IPv6, ICMPv6, hop limit 64");
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56, "payload length");
    assert_eq!((&ip[8..24], &ip[24..40]), (&sent[38..54], &sent[22..38]), "from the address sent to, to the sender");
    let icmp = &out[54..];
    assert_eq!((icmp[0], icmp[1]), (typ, code), "type and code");
    assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), u32::from(mtu), "MTU");
    let (s, d): ([u8; 16], [u8; 16]) = (ip[8..24].try_into().expect("16"), ip[24..40].try_into().expect("16"));
    assert_eq!(icmp6_sum(s.into(), d.into(), icmp), 0xffff, "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &sent[14..62], "quote: the header and 8 bytes as they arrived");
}

/// The IP destination of a frame of either family.
#[must_use]
pub fn ip_dst(frame: &[u8]) -> IpAddr {
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 {
        IpAddr::from(<[u8; 4]>::try_from(&frame[30..34]).expect("4"))
    } else {
        IpAddr::from(<[u8; 16]>::try_from(&frame[38..54]).expect("16"))
    }
}

/// The TTL (hop limit) of a frame of either family.
#[must_use]
pub fn ip_ttl(frame: &[u8]) -> u8 {
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 { frame[14 + 8] } else { frame[14 + 7] }
}

/// Sets the TTL (hop limit) of a frame of either family, the IPv4 header checksum made again.
pub fn set_ttl(frame: &mut [u8], ttl: u8) {
    if u16::from_be_bytes([frame[12], frame[13]]) == 0x0800 {
        frame[14 + 8] = ttl;
        let ihl = usize::from(frame[14] & 0x0f) * 4;
        frame[24..26].fill(0);
        let sum = !ones_sum(&frame[14..14 + ihl]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
    } else {
        frame[14 + 7] = ttl;
    }
}

/// The error `out` (built by [`icmp_error`]) was translated back for the client that sent
/// `sent`: it comes from `src`, its checksums hold, and its quote is `sent`'s IP header and
/// first 8 payload bytes exactly, as the client's stack must find them.
pub fn assert_related(out: &[u8], sent: &[u8], src: IpAddr) {
    match src {
        IpAddr::V4(s) => assert_related_error(out, sent, s),
        IpAddr::V6(s) => {
            let ip = &out[14..54];
            assert_eq!(&ip[8..24], &s.octets(), "the error's source");
            let (s, d): ([u8; 16], [u8; 16]) = (ip[8..24].try_into().expect("16"), ip[24..40].try_into().expect("16"));
            assert_eq!(icmp6_sum(s.into(), d.into(), &out[54..]), 0xffff, "ICMPv6 checksum");
            assert_eq!(&out[62..110], &sent[14..62], "the quote is the packet the client sent");
        }
    }
}
