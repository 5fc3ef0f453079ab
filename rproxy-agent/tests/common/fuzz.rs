//! Datapath fuzzing through `BPF_PROG_TEST_RUN`: frames from a structure-aware generator, valid
//! and broken, through every program of the datapath with maps programmed so that frames hit and
//! miss frontends, backends and conntrack. Shared by the test (`tests/datapath/fuzz.rs`, a fixed
//! seed) and `cargo xtask fuzz-datapath` (`examples/fuzz-datapath.rs`, long runs).
//!
//! The generator builds a TCP, UDP or ICMP-error frame of either family between addresses of a
//! small pool (the frontends, the backends, the node, clients, strangers) and ports of a small
//! pool, so that the frames make, continue and answer flows; then it may break it: IPv4 options,
//! fragments, TTL 0 or 1, every TCP flag combination, UDP without a checksum, IPv6 extension
//! headers, a VLAN tag, a wrong IP or L4 checksum, a wrong length field, or a truncation at any
//! offset.
//!
//! Checked on every frame: the program returns a verdict its hook may return; a frame it
//! changed, whose checksums were valid, has valid IP and L4 checksums (an IPv4 UDP checksum of
//! zero stays zero); a frame that involves no address of the pools the datapath acts on leaves
//! untouched and passes. Checked every `CHECK_EVERY` frames and at the end: every conntrack
//! entry's pair exists (a flow is two entries, or none).
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use rproxy_agent::model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry};
use rproxy_common::{
    CT_DIR_RECLAIM, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT,
    SVC_F_SOURCE_RANGE, prog_names,
};

use super::{Harness, ones_sum};

/// How often the conntrack pairing is checked (it walks the tables).
pub const CHECK_EVERY: u64 = 2_000;

const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC
const TC_OK: u32 = 0;
const TC_SHOT: u32 = 2;
const TC_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

/// The programs frames go through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    FromPod,
    ToPod,
    ExtIngress,
    ExtEgress,
    Xdp,
}

const PROGS: [Prog; 5] = [Prog::FromPod, Prog::ToPod, Prog::ExtIngress, Prog::ExtEgress, Prog::Xdp];

/// The addresses of one family the datapath acts on, and others.
struct Pool {
    vips: Vec<IpAddr>,
    node: IpAddr,
    local_pods: Vec<IpAddr>,
    remote_pod: IpAddr,
    clients: Vec<IpAddr>,
    strangers: Vec<IpAddr>,
    hairpin: IpAddr,
}

fn pool(v6: bool) -> Pool {
    let a4 = |a, b, c, d| IpAddr::from(Ipv4Addr::new(a, b, c, d));
    let a6 = |a: u16, b: u16, c: u16| IpAddr::from(Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, c));
    if v6 {
        Pool {
            vips: vec![a6(0x96, 0, 10), a6(0x96, 0, 11), a6(0x96, 0, 12), a6(0x96, 0, 13)],
            node: a6(0x31, 0, 1),
            local_pods: vec![a6(0x244, 1, 0x11), a6(0x244, 1, 0x12)],
            remote_pod: a6(0x244, 2, 0x21),
            clients: vec![a6(0x31, 0, 0x64), a6(0x244, 1, 0x64)],
            strangers: vec![a6(0x99, 0, 1), a6(0x31, 0, 0x77)],
            hairpin: rproxy_common::WireAddr::ip(rproxy_common::hairpin::ADDR6).into(),
        }
    } else {
        Pool {
            vips: vec![a4(10, 96, 0, 10), a4(10, 96, 0, 11), a4(10, 96, 0, 12), a4(10, 96, 0, 13)],
            node: a4(172, 31, 0, 1),
            local_pods: vec![a4(10, 244, 1, 11), a4(10, 244, 1, 12)],
            remote_pod: a4(10, 244, 2, 21),
            clients: vec![a4(172, 31, 0, 100), a4(10, 244, 1, 100)],
            strangers: vec![a4(192, 0, 2, 1), a4(172, 31, 0, 77)],
            hairpin: a4(169, 254, 42, 1),
        }
    }
}

impl Pool {
    /// Whether the datapath may act on a packet with this address (as source or destination).
    fn acted_on(&self, a: IpAddr) -> bool {
        self.vips.contains(&a)
            || a == self.node
            || self.local_pods.contains(&a)
            || a == self.remote_pod
            || a == self.hairpin
            // The pod client is also a backend (the hairpin case).
            || a == self.clients[1]
    }
}

const PORTS: [u16; 6] = [80, 8080, 30080, 30081, 40000, 53];

/// The Services the fuzzer programs, for both families: `ClusterIP`s (TCP and UDP, local and
/// remote backends, one a client pod's own address for hairpin), one with `ClientIP` affinity,
/// one without endpoints, a `LoadBalancer` with source ranges, `NodePort`s with and without
/// `externalTrafficPolicy: Local`.
#[must_use]
pub fn desired() -> Desired {
    let mut d = Desired::default();
    for v6 in [false, true] {
        let p = pool(v6);
        let be = |addr: IpAddr, proto, local| Backend {
            addr: BackendAddr { addr, port: 8080, proto },
            state: BackendState::Active,
            local,
        };
        for proto in [Protocol::Tcp, Protocol::Udp] {
            let all = vec![
                be(p.local_pods[0], proto, true),
                be(p.local_pods[1], proto, true),
                be(p.remote_pod, proto, false),
                be(p.clients[1], proto, true),
            ];
            let mut add =
                |addr, port, flags, slots: Vec<Backend>, local_slots: Vec<Backend>, ranges: Vec<ipnet::IpNet>| {
                    let entry = ServiceEntry {
                        service: ObjectRef::new("fuzz", &format!("s{port}")),
                        port_name: String::new(),
                        flags,
                        affinity_timeout: if flags & SVC_F_AFFINITY != 0 { 30 } else { 0 },
                        slots,
                        local_slots,
                        draining: Vec::new(),
                        source_ranges: ranges,
                    };
                    d.services.insert(Frontend { addr, port, proto }, entry);
                };
            add(p.vips[0], 80, SVC_F_CLUSTER_IP, all.clone(), vec![], vec![]);
            add(p.vips[1], 80, SVC_F_CLUSTER_IP | SVC_F_AFFINITY, all.clone(), vec![], vec![]);
            add(p.vips[2], 80, SVC_F_CLUSTER_IP, vec![], vec![], vec![]);
            let range: ipnet::IpNet =
                if v6 { "fd00:31::/64".parse().expect("CIDR") } else { "172.31.0.0/24".parse().expect("CIDR") };
            add(p.vips[3], 80, SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGE, all.clone(), vec![], vec![range]);
            add(p.node, 30080, SVC_F_NODE_PORT, all.clone(), vec![], vec![]);
            let local: Vec<Backend> = all.iter().filter(|b| b.local).copied().collect();
            add(p.node, 30081, SVC_F_NODE_PORT | SVC_F_ETP_LOCAL, all, local, vec![]);
        }
    }
    d
}

/// One frame and what it is.
pub struct Case {
    pub frame: Vec<u8>,
    pub prog: Prog,
    /// Whether any address of the frame (outer or quoted) is one the datapath acts on.
    pub acted_on: bool,
    /// Whether its IP and L4 checksums (and lengths) were left valid.
    pub valid: bool,
    pub description: String,
}

/// A failed property: the seed and frame number reproduce it.
#[derive(Debug)]
pub struct Failure {
    pub frame_no: u64,
    pub what: String,
}

/// Totals of a run.
#[derive(Debug, Default)]
pub struct Report {
    pub frames: u64,
    pub changed: u64,
    pub dropped: u64,
    pub per_prog: [u64; 5],
}

/// The generator.
pub struct Gen {
    rng: fastrand::Rng,
}

impl Gen {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self { rng: fastrand::Rng::with_seed(seed) }
    }

    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn addr(&mut self, p: &Pool) -> IpAddr {
        match self.rng.u8(..6) {
            0 => self.pick(&p.vips),
            1 => p.node,
            2 => self.pick(&p.local_pods),
            3 => p.remote_pod,
            4 => self.pick(&p.clients),
            _ => self.pick(&p.strangers),
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.u8(..4) == 0 { self.rng.u16(1..) } else { self.pick(&PORTS) }
    }

    /// The next case.
    pub fn case(&mut self) -> Case {
        let v6 = self.rng.bool();
        let p = pool(v6);
        let mut prog = self.pick(&PROGS);
        let (mut src, mut dst) = (self.addr(&p), self.addr(&p));
        let (mut sport, mut dport) = (self.port(), self.port());
        // Half the frames belong to flows: a client to a frontend, or a backend's reply to a
        // client, on few ports, so that they open, continue and answer flows.
        match self.rng.u8(..4) {
            0 => {
                src = self.pick(&[p.clients[0], p.clients[1], p.local_pods[0], p.strangers[0]]);
                (dst, dport) =
                    self.pick(&[(p.vips[0], 80), (p.vips[1], 80), (p.vips[3], 80), (p.node, 30080), (p.node, 30081)]);
                sport = 40_000 + self.rng.u16(..4);
                prog = self.pick(&[Prog::FromPod, Prog::ExtIngress, Prog::Xdp]);
            }
            1 => {
                (src, sport) = (self.pick(&[p.local_pods[0], p.local_pods[1], p.remote_pod, p.clients[1]]), 8080);
                dst = self.pick(&[p.clients[0], p.clients[1], p.local_pods[0], p.strangers[0]]);
                dport = 40_000 + self.rng.u16(..4);
                prog = self.pick(&[Prog::ToPod, Prog::ExtEgress, Prog::FromPod]);
            }
            _ => {}
        }
        let mut acted_on = p.acted_on(src) || p.acted_on(dst);
        let mut desc = format!("{prog:?} {src}:{sport} -> {dst}:{dport}");
        let payload: Vec<u8> = (0..self.rng.usize(..64)).map(|_| self.rng.u8(..)).collect();
        let kind = self.rng.u8(..10);
        let mut frame = if kind < 5 {
            let flags = self.rng.u8(..);
            let _ = write!(desc, " tcp flags {flags:#04x}");
            build(src, dst, |b, out| {
                let b = b.tcp(sport, dport, self.rng.u32(..), 65_535);
                let b = if flags & 0x02 != 0 { b.syn() } else { b };
                let b = if flags & 0x10 != 0 { b.ack(self.rng.u32(..)) } else { b };
                let b = if flags & 0x01 != 0 { b.fin() } else { b };
                let b = if flags & 0x04 != 0 { b.rst() } else { b };
                let b = if flags & 0x08 != 0 { b.psh() } else { b };
                let b = if flags & 0x20 != 0 { b.urg(0) } else { b };
                b.write_to_vec(out, &payload).map_err(|e| format!("{e:?}"))
            })
        } else if kind < 9 {
            desc.push_str(" udp");
            build(src, dst, |b, out| b.udp(sport, dport).write_to_vec(out, &payload).map_err(|e| format!("{e:?}")))
        } else {
            // An ICMP error quoting a packet of the pool (a flow's, perhaps).
            let (qs, qd) = (self.addr(&p), self.addr(&p));
            acted_on |= p.acted_on(qs) || p.acted_on(qd);
            let (qsp, qdp) = (self.port(), self.port());
            let quoted =
                build(qs, qd, |b, out| b.udp(qsp, qdp).write_to_vec(out, &[0; 8]).map_err(|e| format!("{e:?}")));
            let ip_len = if v6 { 40 } else { 20 };
            let q = quoted[14..(14 + ip_len + 8).min(quoted.len())].to_vec();
            let _ = write!(desc, " icmp error quoting {qs} -> {qd}");
            build(src, dst, |b, out| {
                if v6 {
                    b.icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(
                        etherparse::icmpv6::DestUnreachableCode::Port,
                    ))
                    .write_to_vec(out, &q)
                    .map_err(|e| format!("{e:?}"))
                } else {
                    b.icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                        etherparse::icmpv4::DestUnreachableHeader::Port,
                    ))
                    .write_to_vec(out, &q)
                    .map_err(|e| format!("{e:?}"))
                }
            })
        };
        let valid = self.damage(&mut frame, prog, v6, &mut acted_on, &mut desc);
        Case { frame, prog, acted_on, valid, description: desc }
    }

    /// Breaks `frame` in one way, or none (a `prog` frame of family `v6`): whether its checksums
    /// and lengths are still valid. `acted_on` and `desc` follow what was done.
    fn damage(&mut self, frame: &mut Vec<u8>, prog: Prog, v6: bool, acted_on: &mut bool, desc: &mut String) -> bool {
        let mut valid = true;
        // Breakage, one at a time, or none.
        match self.rng.u8(..16) {
            0 => {
                // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header, nor, for an
                // skb (TC), one whose network header is cut short (the stack would not build
                // such an skb either).
                let min = if prog == Prog::Xdp {
                    14
                } else if v6 {
                    54
                } else {
                    34
                };
                let at = self.rng.usize(min.min(frame.len() - 1)..frame.len());
                frame.truncate(at);
                valid = false;
                let _ = write!(desc, " truncated to {at}");
            }
            1 if !v6 => {
                frame[22] = self.pick(&[0, 1]); // TTL
                fix_ipv4_csum(frame);
                desc.push_str(" ttl<=1");
            }
            2 if !v6 => {
                // A fragment: MF or an offset.
                let (b0, b1) = if self.rng.bool() { (0x20, 0) } else { (0x00, self.rng.u8(1..)) };
                frame[20] = b0;
                frame[21] = b1;
                fix_ipv4_csum(frame);
                valid = false;
                desc.push_str(" fragment");
            }
            3 => {
                let at = 14 + self.rng.usize(..frame.len() - 14);
                frame[at] ^= 1 << self.rng.u8(..8);
                // The flip may have made an address one of the pool's.
                *acted_on = true;
                valid = false;
                let _ = write!(desc, " bit flip at {at}");
            }
            4 => {
                // A VLAN tag: not parsed by the datapath, which must let it pass.
                frame.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
                *acted_on = false;
                desc.push_str(" vlan");
            }
            5 if !v6 && frame[23] == 17 => {
                frame[40..42].copy_from_slice(&[0, 0]);
                desc.push_str(" udp csum 0");
            }
            6 if v6 && frame.len() > 54 => {
                // A hop-by-hop options header (8 bytes of padding) before the upper layer.
                let next = frame[20];
                frame[20] = 0;
                frame.splice(54..54, [next, 0, 1, 4, 0, 0, 0, 0]);
                let plen = u16::from_be_bytes([frame[18], frame[19]]) + 8;
                frame[18..20].copy_from_slice(&plen.to_be_bytes());
                desc.push_str(" hop-by-hop");
            }
            7 => {
                // A wrong length field.
                let at = if v6 { 18 } else { 16 };
                let len = u16::from_be_bytes([frame[at], frame[at + 1]]);
                let wrong = if self.rng.bool() { len.saturating_add(self.rng.u16(1..200)) } else { len / 2 };
                frame[at..at + 2].copy_from_slice(&wrong.to_be_bytes());
                if !v6 {
                    fix_ipv4_csum(frame);
                }
                valid = false;
                desc.push_str(" bad length");
            }
            _ => {}
        }
        valid
    }
}

fn build(
    src: IpAddr,
    dst: IpAddr,
    f: impl FnOnce(etherparse::PacketBuilderStep<etherparse::IpHeaders>, &mut Vec<u8>) -> Result<(), String>,
) -> Vec<u8> {
    let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 0x64], [2, 0, 0, 0, 0, 1]);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per case"),
    };
    let mut frame = Vec::new();
    f(b, &mut frame).expect("building a frame");
    frame
}

fn fix_ipv4_csum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let sum = !ones_sum(&frame[14..14 + ihl]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// Whether `frame`'s IP and TCP/UDP/ICMP checksums are valid (`Ok`), or which is not.
pub fn checksums(frame: &[u8]) -> Result<(), String> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| format!("unparsable: {e}"))?;
    match &p.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            if h.header_checksum != h.calc_header_checksum() {
                return Err("IPv4 header checksum".into());
            }
            match &p.transport {
                Some(TransportSlice::Tcp(t))
                    if t.checksum() != t.calc_checksum_ipv4(h.source, h.destination).map_err(|e| e.to_string())? =>
                {
                    Err("TCP checksum".into())
                }
                Some(TransportSlice::Udp(u))
                    if u.checksum() != 0
                        && u.checksum()
                            != u.to_header()
                                .calc_checksum_ipv4_raw(h.source, h.destination, u.payload())
                                .map_err(|e| e.to_string())? =>
                {
                    Err("UDP checksum".into())
                }
                Some(TransportSlice::Icmpv4(i)) if i.checksum() != i.header().icmp_type.calc_checksum(i.payload()) => {
                    Err("ICMP checksum".into())
                }
                _ => Ok(()),
            }
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            match &p.transport {
                Some(TransportSlice::Tcp(t))
                    if t.checksum() != t.calc_checksum_ipv6(h.source, h.destination).map_err(|e| e.to_string())? =>
                {
                    Err("TCP checksum".into())
                }
                Some(TransportSlice::Udp(u))
                    if u.checksum()
                        != u.to_header()
                            .calc_checksum_ipv6_raw(h.source, h.destination, u.payload())
                            .map_err(|e| e.to_string())? =>
                {
                    Err("UDP checksum".into())
                }
                Some(TransportSlice::Icmpv6(i))
                    if i.checksum()
                        != i.header()
                            .icmp_type
                            .calc_checksum(h.source, h.destination, i.payload())
                            .map_err(|e| e.to_string())? =>
                {
                    Err("ICMPv6 checksum".into())
                }
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}

/// Runs `frames` cases from `seed` through the programs of `h` (in a node namespace whose
/// external device is `ifindex`, `node_netns::enter`).
pub fn run(h: &mut Harness, ifindex: u32, seed: u64, frames: u64) -> Result<Report, Failure> {
    h.program(&desired());
    let mut g = Gen::new(seed);
    let mut report = Report::default();
    for n in 0..frames {
        let case = g.case();
        let fail = |what: String| Failure {
            frame_no: n,
            what: format!("{what}\n  frame: {}\n  bytes: {:02x?}", case.description, case.frame),
        };
        let (rc, out) = match case.prog {
            Prog::FromPod => h.run(prog_names::FROM_POD, &case.frame),
            Prog::ToPod => h.run(prog_names::TO_POD, &case.frame),
            Prog::ExtIngress => h.run_on(prog_names::EXT_INGRESS, ifindex, &case.frame),
            Prog::ExtEgress => h.run_on(prog_names::EXT_EGRESS, ifindex, &case.frame),
            Prog::Xdp => h.run_xdp(prog_names::XDP_EXT, ifindex, &case.frame),
        };
        report.frames += 1;
        report.per_prog[PROGS.iter().position(|p| *p == case.prog).unwrap_or(0)] += 1;
        let allowed: &[u32] = match case.prog {
            Prog::Xdp => &[XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT],
            _ => &[TC_PASS, TC_OK, TC_SHOT, TC_REDIRECT],
        };
        if !allowed.contains(&rc) {
            return Err(fail(format!("verdict {rc} is not one {:?} may return", case.prog)));
        }
        if matches!(rc, TC_SHOT | XDP_DROP) {
            report.dropped += 1;
        }
        if out != case.frame {
            report.changed += 1;
            if !case.acted_on {
                return Err(fail(format!("a frame for no address of the datapath changed (verdict {rc})")));
            }
            if case.valid
                && let Err(what) = checksums(&out)
            {
                return Err(fail(format!("after translation: {what} invalid\n  out: {out:02x?}")));
            }
        } else if !case.acted_on && !matches!(rc, TC_PASS | TC_OK | XDP_PASS) {
            return Err(fail(format!("a frame for no address of the datapath got verdict {rc}")));
        }
        if (n + 1) % CHECK_EVERY == 0 || n + 1 == frames {
            pairs_complete(h).map_err(|what| Failure { frame_no: n, what })?;
        }
    }
    Ok(report)
}

/// Every conntrack entry's pair is there (both families).
fn pairs_complete(h: &Harness) -> Result<(), String> {
    let v4: std::collections::HashMap<_, _> = h.maps.conntrack.iter().filter_map(Result::ok).collect();
    for (k, v) in &v4 {
        if k.dir != CT_DIR_RECLAIM && !v4.contains_key(&k.pair(v)) {
            return Err(format!("conntrack entry {k:?} -> {v:?} without its pair"));
        }
    }
    let v6: std::collections::HashMap<_, _> = h.maps.conntrack6.iter().filter_map(Result::ok).collect();
    for (k, v) in &v6 {
        if k.dir != CT_DIR_RECLAIM && !v6.contains_key(&k.pair(v)) {
            return Err(format!("conntrack entry {k:?} -> {v:?} without its pair"));
        }
    }
    Ok(())
}
