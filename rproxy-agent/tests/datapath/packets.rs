//! Packet tests: real packets through the real programs with `BPF_PROG_TEST_RUN`.
//!
//! Each test loads the embedded object with private maps, programs services through the same
//! writer the agent uses, runs a frame through `rpx_from_pod` / `rpx_to_pod`, and checks the
//! verdict and every rewritten byte, checksums recomputed independently (etherparse).
//!
//! Each behaviour is written once, over `IpAddr`s, and runs for both families
//! (`both_families!`: tests `<behaviour>::ipv4` and `<behaviour>::ipv6`); what only one family
//! has (IPv4 options, UDP without a checksum, IPv6 extension headers) has tests of its own.
//!
//! Needs root (`CAP_BPF` + `CAP_NET_ADMIN`) and a mounted bpffs. Without them the tests print why
//! and return, unless `RPROXY_REQUIRE_KERNEL=1` (set by `cargo xtask test` and CI), where they
//! fail instead.
use std::net::{IpAddr, Ipv4Addr};

use crate::common::{
    ACK, FIN, Fam, Harness, IcmpKind, RST, SERIAL, SYN, SYN_ACK, assert_port_unreachable, assert_related, harness,
    icmp_error, icmp_error_frame, parse, parse_checked, tcp, tcp_frame, udp, udp_frame,
};
use etherparse::Ipv4Header;
use rproxy_agent::model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry};
use rproxy_common::{
    AffinityValue, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_RST, CT_NAT_DIRECT, CtState, SVC_F_AFFINITY, SVC_F_CLUSTER_IP,
    SVC_F_ITP_LOCAL, SVC_F_NO_LOCAL_ENDPOINTS, Stat, prog_names, proto,
};

const PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
const DROP: u32 = 2; // TC_ACT_SHOT
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

const CPORT: u16 = 40_000;

/// The client pod of every case.
fn client(fam: Fam) -> IpAddr {
    fam.pod(100)
}

/// The Service's address.
fn vip(fam: Fam) -> IpAddr {
    fam.svc(10)
}

/// Three backend pods.
fn backends(fam: Fam) -> [IpAddr; 3] {
    [fam.pod(11), fam.pod(12), fam.pod(13)]
}

/// A `ClusterIP` Service at `vip`:80 with `backends`:8080.
fn service_at(vip: IpAddr, proto: Protocol, backends: &[IpAddr]) -> Desired {
    let fe = Frontend { addr: vip, port: 80, proto };
    let entry = ServiceEntry {
        service: ObjectRef { namespace: "default".into(), name: "demo".into() },
        port_name: String::new(),
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        slots: backends
            .iter()
            .map(|a| Backend {
                addr: BackendAddr { addr: *a, port: 8080, proto },
                state: BackendState::Active,
                local: true,
            })
            .collect(),
        local_slots: Vec::new(),
        draining: Vec::new(),
        source_ranges: Vec::new(),
    };
    Desired { services: [(fe, entry)].into_iter().collect(), ..Desired::default() }
}

/// The Service at the family's VIP.
fn service(fam: Fam, proto: Protocol, backends: &[IpAddr]) -> Desired {
    service_at(vip(fam), proto, backends)
}

/// Two services (TCP and UDP, same backends) at the family's VIP.
fn tcp_and_udp(fam: Fam, backends: &[IpAddr]) -> Desired {
    let mut d = service(fam, Protocol::Tcp, backends);
    d.services.extend(service(fam, Protocol::Udp, backends).services);
    d
}

/// The service-direction conntrack entry of `client`'s flow to the VIP.
fn svc_ct(h: &Harness, fam: Fam, client: (IpAddr, u16), p: u8) -> Option<crate::common::Ct> {
    h.ct_of(client, (vip(fam), 80), p, CT_DIR_SERVICE)
}

/// The reply-direction conntrack entry of a backend's replies to `client`.
fn reply_ct(h: &Harness, backend: (IpAddr, u16), client: (IpAddr, u16), p: u8) -> Option<crate::common::Ct> {
    h.ct_of(backend, client, p, CT_DIR_REPLY)
}

/// Runs a pod's SYN `c → to` through `rpx_from_pod`: the source the backend sees (the pod's
/// address, with a port of the SNAT range) and where it goes.
fn open_tcp(h: &mut Harness, c: (IpAddr, u16), to: (IpAddr, u16)) -> ((IpAddr, u16), (IpAddr, u16)) {
    let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, to, SYN, b""));
    assert_eq!(rc, PASS);
    let seen = parse(&out);
    assert_eq!(seen.src.0, c.0);
    (seen.src, seen.dst)
}

/// Runs `frame` of client `c` through `rpx_from_pod`: it must go to `b` from the client's address
/// with a port of the SNAT range other than its own, which is returned.
fn to_snat_port(h: &mut Harness, frame: &[u8], c: (IpAddr, u16), b: (IpAddr, u16)) -> u16 {
    let (rc, out) = h.run(prog_names::FROM_POD, frame);
    let seen = parse(&out);
    assert_eq!((rc, seen.src.0, seen.dst), (PASS, c.0, b));
    let port = seen.src.1;
    assert!(port != c.1 && (1024..=29_999).contains(&port), "another port of the SNAT range: {port}");
    port
}

macro_rules! kernel_test {
    ($h:ident) => {
        let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut $h) = harness() else { return };
    };
}

/// Runs `case` for `fam` on a fresh harness (none without root, see the module doc).
fn run_case(case: fn(&mut Harness, Fam), fam: Fam) {
    kernel_test!(h);
    case(&mut h, fam);
}

/// A behaviour written once over `IpAddr`s (`fn name(h, fam) { … }`), as a module `name` with
/// the tests `ipv4` and `ipv6`.
macro_rules! both_families {
    ($(#[$meta:meta])* fn $name:ident($h:ident, $fam:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            fn case($h: &mut Harness, $fam: Fam) $body

            #[test]
            fn ipv4() {
                run_case(case, Fam::V4);
            }

            #[test]
            fn ipv6() {
                run_case(case, Fam::V6);
            }
        }
    };
}

both_families! {
    /// A SYN to the VIP is translated to a backend (only the destination address and port, the
    /// source port, one of the SNAT range, and the checksums change), both conntrack entries
    /// are made, the SYN-ACK comes back from the VIP to the client's own port and moves the
    /// flow to established, and data keeps its backend, payload intact.
    fn syn_to_vip_is_dnated_and_reply_is_reverse_natted(h, fam) {
        h.program(&service(fam, Protocol::Tcp, &backends(fam)));
        let c = (client(fam), CPORT);
        let syn = tcp(c, (vip(fam), 80), SYN, b"");
        let (rc, out) = h.run(prog_names::FROM_POD, &syn);
        assert_eq!(rc, PASS);
        let seen = parse(&out);
        let translated = seen.src;
        assert_eq!(translated.0, c.0, "source address untouched");
        assert!((1024..=29_999).contains(&translated.1), "source port of the SNAT range: {}", translated.1);
        assert!(backends(fam).contains(&seen.dst.0) && seen.dst.1 == 8080, "DNAT to a backend: {seen:?}");
        // Only the destination address, the ports and the checksums changed.
        assert_eq!(out.len(), syn.len());
        let l4 = 14 + fam.ip_len();
        let daddr = if fam == Fam::V4 { 30..34 } else { 38..54 };
        let ip_csum: &[usize] = if fam == Fam::V4 { &[24, 25] } else { &[] };
        let allowed = |i: usize| {
            daddr.contains(&i) || ip_csum.contains(&i) || [l4, l4 + 1, l4 + 2, l4 + 3, l4 + 16, l4 + 17].contains(&i)
        };
        let differing: Vec<usize> = (0..out.len()).filter(|i| out[*i] != syn[*i]).collect();
        assert!(differing.iter().all(|i| allowed(*i)), "unexpected bytes changed: {differing:?}");

        // Conntrack: a service entry and a reply entry, state SYN sent.
        let backend = seen.dst;
        let fwd = svc_ct(h, fam, c, proto::TCP).expect("service entry");
        let rev = reply_ct(h, backend, translated, proto::TCP).expect("reply entry");
        assert_eq!((fwd.backend_id, fwd.state), (rev.backend_id, CtState::SynSent as u8));

        // SYN-ACK from the backend, on its way into the client pod: source becomes the VIP.
        let (rc, out) = h.run(prog_names::TO_POD, &tcp(backend, translated, SYN_ACK, b""));
        assert_eq!(rc, PASS);
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst), ((vip(fam), 80), c));
        let fwd = svc_ct(h, fam, c, proto::TCP).expect("service entry");
        assert_eq!(fwd.state, CtState::Established as u8, "SYN-ACK moves both entries to established");

        // Data on the established flow goes to the same backend, payload intact.
        for i in 0..20u8 {
            let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, (vip(fam), 80), ACK, &[i; 100]));
            assert_eq!(rc, PASS);
            let seen = parse(&out);
            assert_eq!((seen.dst, seen.payload), (backend, vec![i; 100]), "established flow keeps its backend");
        }
        assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::Established), h.stat(Stat::RevNat)), (1, 20, 1));
        assert_eq!(h.stat(Stat::TailCallFail), 0);
    }
}

both_families! {
    /// TCP state: half-closed stays established, FIN both ways is closing (mirrored into the
    /// reply entry), a new SYN on a closing flow reopens it, RST closes and is flagged.
    fn tcp_state_follows_fin_and_rst(h, fam) {
        h.program(&service(fam, Protocol::Tcp, &backends(fam)[..1]));
        let be = (backends(fam)[0], 8080);
        let c = (client(fam), CPORT + 1);
        let to_vip = (vip(fam), 80);
        let (seen, _) = open_tcp(h, c, to_vip);
        h.run(prog_names::TO_POD, &tcp(be, seen, SYN_ACK, b""));
        h.run(prog_names::FROM_POD, &tcp(c, to_vip, FIN, b""));
        let state = |h: &Harness| svc_ct(h, fam, c, proto::TCP).expect("entry").state;
        assert_eq!(state(h), CtState::Established as u8, "half-closed stays established");
        h.run(prog_names::TO_POD, &tcp(be, seen, FIN, b""));
        assert_eq!(state(h), CtState::Closing as u8);
        assert_eq!(reply_ct(h, be, seen, proto::TCP).expect("reply").state, CtState::Closing as u8, "mirrored");
        // Port reuse: a new SYN on a closing flow reopens it (with its port).
        assert_eq!(open_tcp(h, c, to_vip).0, seen);
        assert_eq!(state(h), CtState::SynSent as u8);
        // RST closes.
        h.run(prog_names::TO_POD, &tcp(be, seen, RST, b""));
        let v = svc_ct(h, fam, c, proto::TCP).expect("entry");
        assert_eq!(v.state, CtState::Closing as u8);
        assert_ne!(v.flags & CT_F_RST, 0);
    }
}

both_families! {
    /// A UDP request goes to a backend (a datagram entry) and the answer comes back from the
    /// VIP, payloads intact.
    fn udp_both_ways(h, fam) {
        h.program(&service(fam, Protocol::Udp, &backends(fam)));
        let c = (client(fam), 5353);
        let (rc, out) = h.run(prog_names::FROM_POD, &udp(c, (vip(fam), 80), b"question"));
        assert_eq!(rc, PASS);
        let seen = parse(&out);
        assert!(backends(fam).contains(&seen.dst.0) && seen.dst.1 == 8080);
        assert_eq!(seen.payload, b"question");
        let be = seen.dst;
        assert_eq!(svc_ct(h, fam, c, proto::UDP).expect("udp entry").state, CtState::Datagram as u8);
        let (rc, out) = h.run(prog_names::TO_POD, &udp(be, c, b"answer"));
        assert_eq!(rc, PASS);
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst, seen.payload), ((vip(fam), 80), c, b"answer".to_vec()));
    }
}

both_families! {
    /// Packets that are not for a service (a backend directly, another port, another protocol)
    /// and not a backend's reply pass byte for byte, both ways.
    fn non_service_packets_are_unchanged_byte_for_byte(h, fam) {
        h.program(&service(fam, Protocol::Tcp, &backends(fam)));
        let c = (client(fam), CPORT);
        let frames = [
            tcp(c, (backends(fam)[0], 8080), SYN, b"direct"),
            tcp(c, (vip(fam), 81), SYN, b"other port"),
            udp(c, (vip(fam), 80), b"other protocol"),
        ];
        for f in &frames {
            for prog in [prog_names::FROM_POD, prog_names::TO_POD, prog_names::EXT_EGRESS] {
                assert_eq!(h.run(prog, f), (PASS, f.clone()), "via {prog}");
            }
        }
        assert_eq!(h.stat(Stat::NewFlow), 0);
    }
}

/// `frame` (Ethernet + IP + UDP, no options) as a first fragment: "more fragments" set (IPv4),
/// or a fragment header (IPv6), with valid header checksums.
fn first_fragment(fam: Fam, frame: &[u8]) -> Vec<u8> {
    let mut frag = frame.to_vec();
    match fam {
        Fam::V4 => {
            frag[14 + 6] |= 0x20;
            let mut h4 = Ipv4Header::from_slice(&frag[14..]).expect("IPv4").0;
            h4.header_checksum = h4.calc_header_checksum();
            frag[14 + 10..14 + 12].copy_from_slice(&h4.header_checksum.to_be_bytes());
        }
        Fam::V6 => {
            let next = frag[14 + 6];
            frag[14 + 6] = 44;
            let len = u16::from_be_bytes([frag[18], frag[19]]) + 8;
            frag[18..20].copy_from_slice(&len.to_be_bytes());
            // Next header, reserved, offset 0 with "more fragments", identification.
            let header = [next, 0, 0, 1, 0, 0, 0x12, 0x34];
            frag.splice(54..54, header);
        }
    }
    frag
}

both_families! {
    /// A fragment of a packet to a service passes untouched and is counted (the datapath does
    /// not reassemble).
    fn fragments_are_passed_and_counted(h, fam) {
        h.program(&service(fam, Protocol::Udp, &backends(fam)));
        let frag = first_fragment(fam, &udp((client(fam), 5355), (vip(fam), 80), b"fragmented"));
        assert_eq!(h.run(prog_names::FROM_POD, &frag), (PASS, frag.clone()));
        assert_eq!(h.stat(Stat::Fragment), 1);
    }
}

both_families! {
    /// A service without endpoints rejects new flows as kube-proxy does: port unreachable
    /// (ICMP, ICMPv6) from the service address, back into the pod (TCP and UDP); no state is
    /// made.
    fn service_without_backends_rejects(h, fam) {
        h.program(&tcp_and_udp(fam, &[]));
        let c = (client(fam), CPORT);
        let syn = tcp(c, (vip(fam), 80), SYN, b"");
        let datagram = udp(c, (vip(fam), 80), b"question");
        for (i, frame) in [syn, datagram].iter().enumerate() {
            let (rc, out) = h.run(prog_names::FROM_POD, frame);
            assert_eq!(rc, REDIRECT, "frame {i}: back out of the pod's device");
            assert_port_unreachable(&out, frame);
        }
        assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (2, 2));
        assert!(svc_ct(h, fam, c, proto::TCP).is_none());
    }
}

both_families! {
    /// internalTrafficPolicy Local on a node without a local endpoint, the Service's endpoints
    /// being elsewhere (`SVC_F_NO_LOCAL_ENDPOINTS`): new flows are dropped without a word, as
    /// kube-proxy drops them, not rejected (TCP and UDP); no state is made.
    fn no_local_endpoint_under_internal_traffic_policy_local_drops(h, fam) {
        let mut desired = tcp_and_udp(fam, &[]);
        for entry in desired.services.values_mut() {
            entry.flags |= SVC_F_ITP_LOCAL | SVC_F_NO_LOCAL_ENDPOINTS;
        }
        h.program(&desired);
        let c = (client(fam), CPORT);
        for frame in [tcp(c, (vip(fam), 80), SYN, b""), udp(c, (vip(fam), 80), b"question")] {
            assert_eq!(h.run(prog_names::FROM_POD, &frame).0, DROP);
        }
        assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (2, 0));
        assert!(svc_ct(h, fam, c, proto::TCP).is_none());
    }
}

/// An IPv4 header with options gets no ICMP message (its quote would need them): a new flow to
/// a service without endpoints is dropped instead.
#[test]
fn a_rejected_packet_with_ipv4_options_is_dropped() {
    kernel_test!(h);
    h.program(&service(Fam::V4, Protocol::Tcp, &[]));
    let (c, to) = ((Ipv4Addr::new(10, 244, 1, 100), CPORT), (Ipv4Addr::new(10, 96, 0, 10), 80));
    let with_options = tcp_frame(c, to, SYN, b"", &[1, 1, 1, 0]);
    assert_eq!(h.run(prog_names::FROM_POD, &with_options).0, DROP);
    assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (1, 0));
}

both_families! {
    /// ICMP errors about a translated flow reach the client translated back (conntrack's
    /// "related"): a backend's port unreachable for a UDP datagram and a router's "too big" for
    /// a TCP segment quote the packet as the backend got it; on the way into the pod the quote
    /// becomes the packet the client sent again (destination, checksums), and the backend's own
    /// error comes from the service address. Errors about no known flow pass untouched.
    fn icmp_errors_about_translated_flows_are_reverse_translated(h, fam) {
        let backend = backends(fam)[0];
        h.program(&tcp_and_udp(fam, &[backend]));
        let c = (client(fam), CPORT);
        let datagram = udp(c, (vip(fam), 80), b"question");
        let syn = tcp(c, (vip(fam), 80), SYN, b"");
        let router = fam.router();
        for (sent, from, kind) in [(&datagram, backend, IcmpKind::PortUnreachable), (&syn, router, IcmpKind::TooBig(1280))] {
            let (_, translated) = h.run(prog_names::FROM_POD, sent);
            assert_eq!(parse(&translated).dst, (backend, 8080));
            let error = icmp_error(kind, from, c.0, &fam.quote(&translated));
            let (rc, out) = h.run(prog_names::TO_POD, &error);
            assert_eq!(rc, PASS);
            let src = if from == backend { vip(fam) } else { router };
            assert_related(&out, sent, src);
        }
        assert_eq!(h.stat(Stat::IcmpRelated), 2);
        // No flow of this client port: untouched.
        let (_, other) = h.run(prog_names::FROM_POD, &udp((c.0, CPORT + 1), (vip(fam), 80), b"x"));
        let mut quote = fam.quote(&other);
        let sport = fam.ip_len();
        quote[sport..sport + 2].copy_from_slice(&(CPORT + 2).to_be_bytes());
        let error = icmp_error(IcmpKind::PortUnreachable, backend, c.0, &quote);
        assert_eq!(h.run(prog_names::TO_POD, &error), (PASS, error.clone()));
        assert_eq!(h.stat(Stat::IcmpRelated), 2);
    }
}

both_families! {
    /// Hairpin: a pod whose connection to its Service is translated to itself gets the source
    /// translated too, to the hairpin address (else its own stack would drop a packet from
    /// itself); its replies, which go to its gateway, are translated back to come from the
    /// service. Later packets keep both translations. A second service with the same backend
    /// cannot take the reply tuple the first flow holds: its flow gets another source port.
    fn a_pod_reaching_itself_is_translated_both_ways(h, fam) {
        let me = client(fam);
        h.program(&service(fam, Protocol::Tcp, &[me]));
        let hairpin = fam.hairpin();
        let c = (me, CPORT);
        for (i, flags) in [SYN, ACK].into_iter().enumerate() {
            let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, (vip(fam), 80), flags, b""));
            assert_eq!(rc, PASS);
            let seen = parse(&out);
            assert_eq!((seen.src, seen.dst), ((hairpin, CPORT), (me, 8080)), "packet {i}");
        }
        let reply = tcp((me, 8080), (hairpin, CPORT), SYN_ACK, b"");
        let (rc, out) = h.run(prog_names::FROM_POD, &reply);
        assert_eq!(rc, PASS);
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst), ((vip(fam), 80), c), "the reply comes from the service");
        assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::Established), h.stat(Stat::RevNat)), (1, 1, 1));
        // Another pod's flow to the same backend keeps its address (its port is one of the
        // SNAT range, as for every pod's TCP flow).
        let other = (fam.pod(101), CPORT);
        let (_, out) = h.run(prog_names::FROM_POD, &tcp(other, (vip(fam), 80), SYN, b""));
        assert_eq!(parse(&out).src.0, other.0);

        // The same source port to a second service whose backend is the pod too would need the
        // reply tuple the first flow holds: the second flow gets another hairpin source port.
        let vip2 = fam.svc(11);
        let mut both = service(fam, Protocol::Tcp, &[me]);
        both.services.extend(service_at(vip2, Protocol::Tcp, &[me]).services);
        h.program(&both);
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, (vip2, 80), SYN, b""));
        let seen = parse(&out);
        assert_eq!((rc, seen.src.0, seen.dst), (PASS, hairpin, (me, 8080)));
        let port = seen.src.1;
        assert!(port != CPORT && (1024..=29_999).contains(&port), "another port of the SNAT range: {port}");
        assert_eq!((h.stat(Stat::PortRemapped), h.stat(Stat::CtClash)), (1, 0));
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp((me, 8080), (hairpin, port), SYN_ACK, b""));
        let seen = parse(&out);
        assert_eq!((rc, seen.src, seen.dst), (PASS, (vip2, 80), c), "its reply, from the second service");
        let (rc, out) = h.run(prog_names::FROM_POD, &reply);
        assert_eq!((rc, parse(&out).src), (PASS, (vip(fam), 80)), "the first flow keeps its replies");
    }
}

both_families! {
    /// A pod's TCP flow through a frontend takes its port folded into the SNAT range (`first +
    /// port % count`): the pod's connections straight to a backend (to a pod's address, or
    /// made at `connect()` by the socket hooks) take the kernel's ephemeral ports and are not
    /// in conntrack, so a flow with the pod's own port could land on one's tuple. Two frontends
    /// of one backend from one source port get two ports (the second, whose folded port the
    /// first holds, another one: `port_remapped`); the replies reach the pod at its own port from their own
    /// frontend, ICMP errors about a flow quote the pod's port, a connection straight to the
    /// backend from that port passes untouched both ways. UDP and a pod reaching itself (whose
    /// source is the hairpin address, never a socket's) keep their ports.
    fn a_pods_tcp_flows_take_ports_of_the_snat_range(h, fam) {
        let (vip1, vip2) = ((vip(fam), 80), (fam.svc(11), 80));
        let b = (backends(fam)[0], 8080);
        let mut d = tcp_and_udp(fam, &[b.0]);
        d.services.extend(service_at(vip2.0, Protocol::Tcp, &[b.0]).services);
        h.program(&d);
        let c = (client(fam), 41_000);
        let opened = |h: &mut Harness, frame: &[u8]| to_snat_port(h, frame, c, b);
        let p1 = opened(h, &tcp(c, vip1, SYN, b""));
        assert_eq!(p1, 1024 + 41_000 % 28_976, "the pod's port, folded into the default range");
        let p2 = opened(h, &tcp(c, vip2, SYN, b""));
        assert_ne!(p1, p2);
        assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::PortRemapped), h.stat(Stat::CtClash)), (2, 1, 0));
        for (port, frontend) in [(p1, vip1), (p2, vip2)] {
            let (rc, out) = h.run(prog_names::TO_POD, &tcp(b, (c.0, port), SYN_ACK, b""));
            let seen = parse(&out);
            assert_eq!((rc, seen.src, seen.dst), (PASS, frontend, c), "the reply to port {port}");
        }
        let sent = tcp(c, vip1, ACK, b"x");
        assert_eq!(opened(h, &sent), p1, "the next packet keeps the port");
        let (_, translated) = h.run(prog_names::FROM_POD, &sent);
        let router = fam.router();
        let (rc, out) = h.run(prog_names::TO_POD, &icmp_error(IcmpKind::TooBig(1280), router, c.0, &fam.quote(&translated)));
        assert_eq!(rc, PASS);
        assert_related(&out, &sent, router);
        // A connection straight to the backend from the same port.
        let direct = tcp(c, b, SYN, b"");
        assert_eq!(h.run(prog_names::FROM_POD, &direct), (PASS, direct.clone()));
        let answer = tcp(b, c, SYN_ACK, b"");
        assert_eq!(h.run(prog_names::TO_POD, &answer), (PASS, answer.clone()));

        let (_, out) = h.run(prog_names::FROM_POD, &udp(c, vip1, b"q"));
        assert_eq!(parse(&out).src, c, "UDP keeps its port");
        let me = backends(fam)[1];
        h.program(&service(fam, Protocol::Tcp, &[me]));
        let (_, out) = h.run(prog_names::FROM_POD, &tcp((me, CPORT), vip1, SYN, b""));
        assert_eq!(parse(&out).src, (fam.hairpin(), CPORT), "a pod reaching itself keeps its port");
        assert_eq!(h.stat(Stat::PortRemapped), 1);
    }
}

both_families! {
    /// Two connections never share a reply tuple. One backend behind two frontends, and a pod
    /// that reuses its source port towards it: while the first flow is live, a new flow through
    /// the second frontend (UDP, which keeps its port), or a TCP connection straight to the
    /// backend's own address from the port of a TCP flow that kept the pod's port (opened
    /// before TCP flows took ports of the SNAT range), gets another source port (as netfilter's
    /// NAT gives a clashing connection), counted as `port_remapped`, and every packet of it both
    /// ways is translated; the first flow's replies stay its own. Once a flow is over (closing),
    /// a new connection takes its tuple as it is, and its entries go.
    fn a_clashing_reply_tuple_gets_another_source_port_and_a_closed_flow_gives_it_up(h, fam) {
        let vip1 = (vip(fam), 80);
        let vip2 = (fam.svc(11), 80);
        let b = (backends(fam)[0], 8080);
        let mut both = tcp_and_udp(fam, &[b.0]);
        both.services.extend(service_at(vip2.0, Protocol::Udp, &[b.0]).services);
        both.services.extend(service_at(vip2.0, Protocol::Tcp, &[b.0]).services);
        h.program(&both);
        let c = (client(fam), 41_000);
        let remapped = |h: &mut Harness, frame: &[u8]| to_snat_port(h, frame, c, b);

        // Live: the second frontend's flow gets another port; its replies come from the second
        // frontend to the pod's own port, the first flow's from the first.
        let (rc, out) = h.run(prog_names::FROM_POD, &udp(c, vip1, b"first"));
        assert_eq!((rc, parse(&out).src, parse(&out).dst), (PASS, c, b));
        let p2 = remapped(h, &udp(c, vip2, b"second"));
        assert_eq!((h.stat(Stat::PortRemapped), h.stat(Stat::CtClash)), (1, 0));
        let (_, out) = h.run(prog_names::TO_POD, &udp(b, (c.0, p2), b"to the second"));
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst), (vip2, c), "the second flow's reply");
        assert_eq!(remapped(h, &udp(c, vip2, b"again")), p2, "its next packet keeps the port");
        let (_, out) = h.run(prog_names::TO_POD, &udp(b, c, b"to the first"));
        assert_eq!(parse(&out).src, vip1, "the live flow keeps its replies");

        // A TCP flow that kept the pod's port, and a connection straight to the backend from
        // the same port: another port; its packets both ways are translated (the pod sees the
        // backend, at its own port).
        let p1 = remapped(h, &tcp(c, vip1, SYN, b""));
        h.keep_client_port(c, vip1, b, p1);
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, vip1, ACK, b""));
        assert_eq!((rc, parse(&out).src), (PASS, c));
        h.run(prog_names::TO_POD, &tcp(b, c, SYN_ACK, b""));
        assert_eq!(svc_ct(h, fam, c, proto::TCP).expect("entry").state, CtState::Established as u8);
        let p3 = remapped(h, &tcp(c, b, SYN, b""));
        assert_eq!(h.stat(Stat::PortRemapped), 2);
        assert_eq!(h.ct_of(c, b, proto::TCP, CT_DIR_SERVICE).expect("its entry").nat_flags, CT_NAT_DIRECT);
        let (_, out) = h.run(prog_names::TO_POD, &tcp(b, (c.0, p3), SYN_ACK, b""));
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst), (b, c), "the direct connection's reply");
        let sent = tcp(c, b, ACK, b"y");
        assert_eq!(remapped(h, &sent), p3, "its next packet keeps the port");
        let (_, out) = h.run(prog_names::TO_POD, &tcp(b, c, ACK, b"data"));
        assert_eq!(parse(&out).src, vip1, "the live flow keeps its replies");
        // An ICMP error about it reaches the pod about its own port.
        let (_, translated) = h.run(prog_names::FROM_POD, &sent);
        let (rc, out) = h.run(prog_names::TO_POD, &icmp_error(IcmpKind::TooBig(1280), b.0, c.0, &fam.quote(&translated)));
        assert_eq!(rc, PASS);
        assert_related(&out, &sent, b.0);
        // A direct connection from another port is none of its business (though the backend
        // is now looked up in conntrack).
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp((c.0, 41_001), b, SYN, b""));
        assert_eq!((rc, parse(&out).src, parse(&out).dst), (PASS, (c.0, 41_001), b));
        let (_, out) = h.run(prog_names::TO_POD, &tcp(b, (c.0, 41_001), SYN_ACK, b""));
        assert_eq!(parse(&out).src, b);

        // A flow that is over gives its tuple up: the first flow of port 41,002 (with the pod's
        // port) closes (RST); a direct connection from the same port passes untouched and its
        // SYN-ACK reaches the pod from the backend.
        let c2 = (client(fam), 41_002);
        let p = remapped(h, &tcp(c2, vip1, SYN, b""));
        h.keep_client_port(c2, vip1, b, p);
        h.run(prog_names::TO_POD, &tcp(b, c2, RST, b""));
        assert_eq!(svc_ct(h, fam, c2, proto::TCP).expect("entry").state, CtState::Closing as u8);
        let direct = tcp(c2, b, SYN, b"");
        assert_eq!(h.run(prog_names::FROM_POD, &direct), (PASS, direct.clone()));
        assert!(svc_ct(h, fam, c2, proto::TCP).is_none() && reply_ct(h, b, c2, proto::TCP).is_none());
        let synack = tcp(b, c2, SYN_ACK, b"");
        assert_eq!(h.run(prog_names::TO_POD, &synack), (PASS, synack.clone()), "the backend's own SYN-ACK");

        // Likewise a closed flow gives the tuple up to a new flow through the other frontend
        // (a pod reaching itself, whose flows keep their port): its client-side entry goes, the
        // new flow's replies come from the second frontend.
        let hairpin = fam.hairpin();
        let me = (b.0, 41_003);
        let (_, out) = h.run(prog_names::FROM_POD, &tcp(me, vip1, SYN, b""));
        assert_eq!(parse(&out).src, (hairpin, me.1));
        h.run(prog_names::FROM_POD, &tcp(b, (hairpin, me.1), RST, b""));
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp(me, vip2, SYN, b""));
        assert_eq!((rc, parse(&out).src, parse(&out).dst), (PASS, (hairpin, me.1), b));
        assert!(h.ct_of(me, vip1, proto::TCP, CT_DIR_SERVICE).is_none(), "the closed flow's client side is gone");
        let (_, out) = h.run(prog_names::FROM_POD, &tcp(b, (hairpin, me.1), SYN_ACK, b""));
        assert_eq!(parse(&out).src, vip2);
        assert_eq!((h.stat(Stat::PortRemapped), h.stat(Stat::CtClash)), (2, 0));
    }
}

/// The service with `ClientIP` session affinity (`timeout` seconds).
fn affine_service(fam: Fam, backends: &[IpAddr], timeout: u32) -> Desired {
    let mut d = service(fam, Protocol::Tcp, backends);
    for e in d.services.values_mut() {
        e.flags |= SVC_F_AFFINITY;
        e.affinity_timeout = timeout;
    }
    d
}

both_families! {
    /// `sessionAffinity: ClientIP`: every new flow of a client goes to the backend its last new
    /// flow got, while that was within the timeout and the backend still serves the Service;
    /// then it picks afresh (and is remembered again). Affinity is per client; what the map
    /// remembers decides.
    fn client_ip_affinity_keeps_a_client_on_its_backend(h, fam) {
        let all = backends(fam);
        h.program(&affine_service(fam, &all, 60));
        let new_flow = |h: &mut Harness, client: IpAddr, port: u16| {
            let (rc, out) = h.run(prog_names::FROM_POD, &tcp((client, port), (vip(fam), 80), SYN, b""));
            assert_eq!(rc, PASS);
            parse(&out).dst.0
        };
        let me = client(fam);
        let first = new_flow(h, me, CPORT);
        for i in 1..24 {
            assert_eq!(new_flow(h, me, CPORT + i), first, "flow {i} of the same client");
        }
        let other = fam.pod(101);
        let theirs = new_flow(h, other, CPORT);
        for i in 1..8 {
            assert_eq!(new_flow(h, other, CPORT + i), theirs, "the other client keeps its own");
        }

        // What the map remembers decides: a fresh entry for another backend is followed ...
        let remembered = h.affinity(me, 1).expect("the client is remembered");
        let now = rproxy_agent::bpf::gc::monotonic_ns();
        let target = all.iter().copied().find(|b| *b != first).expect("another backend");
        let fresh = AffinityValue { last_used_ns: now, backend_id: h.backend_id(target), _pad: 0 };
        h.set_affinity(me, 1, fresh);
        assert_eq!(new_flow(h, me, CPORT + 100), target);
        // ... an expired one is not (the pick is remembered afresh) ...
        h.set_affinity(me, 1, AffinityValue { last_used_ns: now.saturating_sub(61_000_000_000), ..fresh });
        let picked = new_flow(h, me, CPORT + 101);
        let after = h.affinity(me, 1).expect("remembered");
        assert!(after.last_used_ns >= now && after.backend_id == h.backend_id(picked), "{after:?}");
        assert!(remembered.last_used_ns <= after.last_used_ns);
        // ... and neither is a backend that no longer serves the Service.
        let kept: Vec<IpAddr> = all.iter().copied().filter(|b| *b != picked).collect();
        h.program(&affine_service(fam, &kept, 60));
        for i in 0..8 {
            assert_ne!(new_flow(h, me, CPORT + 200 + i), picked, "a backend the Service lost");
        }
    }
}

both_families! {
    /// A UDP flow whose backend leaves the Service moves at once: the agent removes its
    /// conntrack entries with the write, and the next datagram picks a live backend.
    fn udp_flow_moves_off_a_backend_that_leaves(h, fam) {
        let all = backends(fam);
        h.program(&service(fam, Protocol::Udp, &all[..1]));
        let c = (client(fam), 5356);
        let (_, out) = h.run(prog_names::FROM_POD, &udp(c, (vip(fam), 80), b"1"));
        assert_eq!(parse(&out).dst.0, all[0]);
        h.program(&service(fam, Protocol::Udp, &all[1..2]));
        let (rc, out) = h.run(prog_names::FROM_POD, &udp(c, (vip(fam), 80), b"2"));
        assert_eq!((rc, parse(&out).dst.0), (PASS, all[1]), "next datagram picks a live backend");
        assert_eq!(h.stat(Stat::NewFlow), 2);
    }
}

both_families! {
    /// An established TCP flow keeps its backend when the backend leaves the Service (unready,
    /// gone from its slice), as under kube-proxy: the backend stays in the map while the flow
    /// names it, GC passes included, and replies are still translated. Once the flow's entries
    /// are gone the GC deletes it. Should a flow's backend entry be gone anyway, its next
    /// packet picks a live backend and is counted.
    fn established_tcp_flow_keeps_a_backend_that_leaves(h, fam) {
        let all = backends(fam);
        let to_vip = (vip(fam), 80);
        h.program(&service(fam, Protocol::Tcp, &all[..1]));
        let c = (client(fam), 5357);
        let b = (all[0], 8080);
        let (seen, _) = open_tcp(h, c, to_vip);
        h.run(prog_names::TO_POD, &tcp(b, seen, SYN_ACK, b""));
        h.program(&service(fam, Protocol::Tcp, &all[1..2]));
        assert_eq!(h.gc(), 0, "the flow still names the backend");
        for i in 0..3u8 {
            let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, to_vip, ACK, &[i]));
            assert_eq!((rc, parse(&out).dst), (PASS, b), "packet {i} of the open connection");
            let (_, out) = h.run(prog_names::TO_POD, &tcp(b, seen, ACK, &[i]));
            assert_eq!(parse(&out).src, to_vip);
        }
        // New connections go to the current backend only.
        let (_, out) = h.run(prog_names::FROM_POD, &tcp((c.0, 5358), to_vip, SYN, b""));
        assert_eq!(parse(&out).dst.0, all[1]);
        assert_eq!(h.stat(Stat::BackendGone), 0);

        // The flow's entries gone (as when they expire): the next pass deletes the backend.
        h.remove_ct(c, to_vip, proto::TCP, CT_DIR_SERVICE);
        h.remove_ct(b, seen, proto::TCP, CT_DIR_REPLY);
        assert_eq!(h.gc(), 1);
        assert!(!h.writer.has_backend(1));

        // A flow whose backend entry is gone picks a live one (the peer answers with RST).
        let c3 = (c.0, 5359);
        h.run(prog_names::FROM_POD, &tcp(c3, to_vip, SYN, b""));
        h.program(&service(fam, Protocol::Tcp, &all[2..3]));
        let (released, _) = h.writer.release_orphans(|_| false, &mut h.maps);
        assert_eq!(released, 1);
        let (_, out) = h.run(prog_names::FROM_POD, &tcp(c3, to_vip, ACK, b"x"));
        assert_eq!(parse(&out).dst.0, all[2]);
        assert_eq!(h.stat(Stat::BackendGone), 1);
    }
}

both_families! {
    /// An established flow is translated from its conntrack entry only while its frontend
    /// exists (and its replies only while its backend does): once the Service is removed its
    /// packets pass untouched, even with the conntrack entry still there, and a frontend created
    /// again at the address starts the flow afresh. With the service filter clear for the
    /// address, nothing is looked up: no counter moves.
    fn removed_frontend_stops_established_flows(h, fam) {
        let all = backends(fam);
        let to_vip = (vip(fam), 80);
        h.program(&service(fam, Protocol::Tcp, &all[..1]));
        let c = (client(fam), 5400);
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp(c, to_vip, SYN, b""));
        assert_eq!((rc, parse(&out).dst.0), (PASS, all[0]));
        let (_, out) = h.run(prog_names::FROM_POD, &tcp(c, to_vip, ACK, b"x"));
        assert_eq!(parse(&out).dst.0, all[0]);
        assert_eq!(h.stat(Stat::Established), 1);

        h.program(&Desired::default());
        assert!(svc_ct(h, fam, c, proto::TCP).is_some(), "the conntrack entry outlives the Service");
        let ack = tcp(c, to_vip, ACK, b"y");
        assert_eq!(h.run(prog_names::FROM_POD, &ack), (PASS, ack.clone()), "untouched once the Service is gone");
        assert_eq!(h.stat(Stat::Established), 1, "not counted as established");
        // Its backend is gone from the maps too (and from the backend filter): a late reply
        // from it passes untouched, with no lookup.
        let reply = tcp((all[0], 8080), c, ACK, b"z");
        assert_eq!(h.run(prog_names::TO_POD, &reply), (PASS, reply.clone()));
        assert_eq!(h.stat(Stat::RevNat), 0);

        // The same frontend again (a new rev-NAT id): the old flow starts afresh as a new one.
        h.program(&service(fam, Protocol::Tcp, &all[1..2]));
        let (rc, out) = h.run(prog_names::FROM_POD, &ack);
        assert_eq!((rc, parse(&out).dst.0), (PASS, all[1]));
        assert_eq!((h.stat(Stat::Established), h.stat(Stat::NewFlow)), (1, 2));
    }
}

both_families! {
    /// New flows are spread over every backend.
    fn backends_are_chosen_among_all(h, fam) {
        let all = backends(fam);
        h.program(&service(fam, Protocol::Tcp, &all));
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200u16 {
            let (_, out) = h.run(prog_names::FROM_POD, &tcp((client(fam), 20_000 + i), (vip(fam), 80), SYN, b""));
            seen.insert(parse(&out).dst.0);
            if seen.len() == all.len() {
                break;
            }
        }
        assert_eq!(seen.len(), all.len(), "200 new flows should reach all 3 backends");
    }
}

// IPv4 only.

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKEND: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);

/// UDP's checksum 0 means "none" over IPv4 and stays 0 through DNAT. (IPv6 has no such thing.)
#[test]
fn udp_zero_checksum_stays_zero() {
    kernel_test!(h);
    h.program(&service(Fam::V4, Protocol::Udp, &[BACKEND.into()]));
    let mut req = udp_frame((CLIENT, 5354), (VIP, 80), b"no checksum");
    req[14 + 20 + 6] = 0;
    req[14 + 20 + 7] = 0;
    let (rc, out) = h.run(prog_names::FROM_POD, &req);
    assert_eq!(rc, PASS);
    assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0 means none and must stay 0");
    assert_eq!(parse_checked(&out).dst, (BACKEND, 8080));
}

/// IPv4 options are skipped to find the ports, and left as they are.
#[test]
fn ipv4_options_are_honoured() {
    kernel_test!(h);
    h.program(&service(Fam::V4, Protocol::Tcp, &[BACKEND.into()]));
    // Two NOPs, a record-route-like option padded to 8 bytes: IHL = 7.
    let options = [1, 1, 7, 3, 4, 0, 0, 0];
    let syn = tcp_frame((CLIENT, CPORT + 2), (VIP, 80), SYN, b"", &options);
    assert_eq!(syn[14] & 0x0f, 7);
    let (rc, out) = h.run(prog_names::FROM_POD, &syn);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!(seen.dst, (BACKEND, 8080), "ports found after the options");
    assert_eq!(seen.options, options, "options untouched");
}

/// Frames cut short, malformed IPv4 headers and frames that are not IP pass every pod-side
/// program untouched.
#[test]
fn truncated_and_non_ip_frames_pass_untouched() {
    kernel_test!(h);
    h.program(&service(Fam::V4, Protocol::Tcp, &backends(Fam::V4)));
    let syn = tcp_frame((CLIENT, CPORT + 3), (VIP, 80), SYN, b"", &[]);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 244, 1, 100, 0, 0, 0, 0, 0, 0, 10, 96, 0, 10,
    ]);
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44; // IHL 4 (< 5)
    let mut ipv6_version = syn.clone();
    ipv6_version[14] = 0x65;
    let mut ihl_beyond_end = syn.clone();
    ihl_beyond_end[14] = 0x4f; // IHL 15: 60 bytes of header claimed, 40 present
    // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than Ethernet + 20 bytes, so the
    // shortest truncations fed here start at a complete IPv4 header.
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("IPv4 header without L4", syn[..14 + 20].to_vec()),
        ("IHL beyond the end", ihl_beyond_end),
        ("TCP header cut", syn[..14 + 20 + 10].to_vec()),
        ("ARP", arp),
        ("IHL < 5", bad_ihl),
        ("version 6 in an IPv4 frame", ipv6_version),
        ("ICMP error cut in its quote", icmp_error_frame(BACKEND, CLIENT, 3, 3, &syn[14..42])[..60].to_vec()),
    ];
    for (what, frame) in frames {
        for prog in [prog_names::FROM_POD, prog_names::TO_POD, prog_names::EXT_EGRESS] {
            let (rc, out) = h.run(prog, &frame);
            assert_eq!(rc, PASS, "{what} via {prog}");
            assert_eq!(out, frame, "{what} via {prog}: changed");
        }
    }
    assert_eq!(h.stat(Stat::NewFlow), 0);
}

// IPv6 only.

/// `frame` (Ethernet + IPv6 + L4) with extension headers `headers` (each: next header, length
/// in 8-byte units beyond the first 8, padding) inserted after the IPv6 header, the chain
/// ending in the original next header.
fn with_extension_headers(frame: &[u8], headers: &[u8]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let l4 = out[14 + 6];
    let mut chain = Vec::new();
    for (i, kind) in headers.iter().enumerate() {
        let next = headers.get(i + 1).copied().unwrap_or(l4);
        // Next header, length 0 (8 bytes), a PadN option filling the rest.
        chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        if i == 0 {
            out[14 + 6] = *kind;
        }
    }
    let len = u16::from_be_bytes([out[18], out[19]]) + u16::try_from(chain.len()).expect("short chain");
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out.splice(54..54, chain);
    out
}

const HOP_BY_HOP: u8 = 0;
const DEST_OPTIONS: u8 = 60;

/// IPv6 extension headers (hop-by-hop, destination options) are walked to find TCP or UDP, and
/// the packet is translated with them left as they are; a chain longer than the datapath walks
/// (4), or a header it does not know, passes untouched.
#[test]
fn ipv6_extension_headers_are_walked() {
    kernel_test!(h);
    let fam = Fam::V6;
    h.program(&service(fam, Protocol::Tcp, &backends(fam)[..1]));
    let syn = tcp((client(fam), CPORT), (vip(fam), 80), SYN, b"");
    let walked = with_extension_headers(&syn, &[HOP_BY_HOP, DEST_OPTIONS]);
    let (rc, out) = h.run(prog_names::FROM_POD, &walked);
    assert_eq!(rc, PASS);
    assert_eq!(parse(&out).dst, (backends(fam)[0], 8080), "ports found after two extension headers");
    assert_eq!(&out[54..70], &walked[54..70], "extension headers untouched");
    assert_eq!(h.stat(Stat::NewFlow), 1);

    let long = with_extension_headers(
        &tcp((client(fam), CPORT + 1), (vip(fam), 80), SYN, b""),
        &[HOP_BY_HOP, DEST_OPTIONS, DEST_OPTIONS, DEST_OPTIONS, DEST_OPTIONS],
    );
    let mut unknown = tcp((client(fam), CPORT + 2), (vip(fam), 80), SYN, b"");
    unknown[14 + 6] = 253; // experimental
    for (what, frame) in [("five extension headers", long), ("an unknown next header", unknown)] {
        for prog in [prog_names::FROM_POD, prog_names::TO_POD, prog_names::EXT_EGRESS] {
            assert_eq!(h.run(prog, &frame), (PASS, frame.clone()), "{what} via {prog}");
        }
    }
    assert_eq!(h.stat(Stat::NewFlow), 1);
}

/// An ICMPv6 message of type `typ`, code 0, 4 bytes of zeros and `body`, from `src` to `dst`,
/// checksum valid.
fn icmp6_message(src: IpAddr, dst: IpAddr, typ: u8, body: &[u8]) -> Vec<u8> {
    // An "error" built by the helper with the type and code changed, the checksum made again.
    let mut frame = icmp_error(IcmpKind::PortUnreachable, src, dst, body);
    frame[54..56].copy_from_slice(&[typ, 0]);
    frame[56..58].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&frame[22..54]);
    pseudo.extend_from_slice(&u32::try_from(frame.len() - 54).expect("small").to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&frame[54..]);
    let sum = !crate::common::ones_sum(&pseudo);
    frame[56..58].copy_from_slice(&sum.to_be_bytes());
    frame
}

/// Neighbour discovery and other ICMPv6 control traffic is never touched, not even when it
/// names a service address: a neighbour solicitation for the VIP, an echo request to it.
/// Truncated IPv6 frames and an IPv4 header in an IPv6 frame pass untouched too.
#[test]
fn ipv6_control_traffic_and_truncated_frames_pass_untouched() {
    kernel_test!(h);
    let fam = Fam::V6;
    h.program(&tcp_and_udp(fam, &backends(fam)));
    let (c, to) = ((client(fam), CPORT + 4), (vip(fam), 80));
    let solicited: IpAddr = "ff02::1:ff00:10".parse().expect("address");
    let IpAddr::V6(target) = vip(fam) else { unreachable!() };
    let solicitation = icmp6_message(c.0, solicited, 135, &target.octets());
    let echo = icmp6_message(c.0, to.0, 128, b"ping");
    let syn = tcp(c, to, SYN, b"");
    let mut v4_header = syn.clone();
    v4_header[14] = 0x45;
    let mut hop_cut = with_extension_headers(&syn, &[HOP_BY_HOP]);
    hop_cut[55] = 200; // the hop-by-hop header claims 1,608 bytes
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("neighbour solicitation for the VIP", solicitation),
        ("echo request to the VIP", echo),
        ("IPv6 header without L4", syn[..54].to_vec()),
        ("TCP header cut", syn[..54 + 10].to_vec()),
        ("extension header beyond the end", hop_cut),
        ("version 4 in an IPv6 frame", v4_header),
        (
            "ICMPv6 error cut in its quote",
            icmp_error(IcmpKind::PortUnreachable, backends(fam)[0], c.0, &fam.quote(&syn))[..90].to_vec(),
        ),
    ];
    for (what, frame) in frames {
        for prog in [prog_names::FROM_POD, prog_names::TO_POD, prog_names::EXT_EGRESS] {
            assert_eq!(h.run(prog, &frame), (PASS, frame.clone()), "{what} via {prog}");
        }
    }
    assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::IcmpRelated), h.stat(Stat::TailCallFail)), (0, 0, 0));
}

/// A test's pin dir (`/sys/fs/bpf/rpxtest-<name>-<pid>`), made empty; removed when dropped, also
/// when the test fails.
struct PinDirCleanup(std::path::PathBuf);

impl PinDirCleanup {
    fn new(name: &str) -> Self {
        let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/rpxtest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("pin dir");
        Self(dir)
    }
}

impl Drop for PinDirCleanup {
    fn drop(&mut self) {
        let _ = rproxy_agent::bpf::datapath::cleanup(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Pins a new map at `pin` with `bpftool map create PIN ARGS…`, as another program would.
fn bpftool_map_create(pin: &std::path::Path, args: &[&str]) {
    let status = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(pin)
        .args(args)
        .status()
        .expect("bpftool (scripts/setup.sh installs it)");
    assert!(status.success(), "bpftool map create {} {args:?}", pin.display());
}

/// A map pinned by another rproxy version with a different layout (here the 24-byte conntrack
/// value of earlier agents) stops the load with an error that names the map and the way out,
/// and leaves the pinned map alone; one that differs only in its LRU flavour is reused.
#[test]
fn pinned_map_of_another_layout_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if harness().is_none() {
        return;
    }
    let pins = PinDirCleanup::new("pinned");
    let dir = pins.0.clone();
    let pin = dir.join(rproxy_common::map_names::CT4);
    bpftool_map_create(&pin, &["type", "lru_hash", "key", "16", "value", "24", "entries", "1024", "name", "RPX_CT4"]);
    let err = rproxy_agent::bpf::datapath::Datapath::load(Some(&dir)).err().expect("load must refuse the old map");
    let msg = err.to_string();
    assert!(msg.contains("RPX_CT4") && msg.contains("value size 24, needs 32") && msg.contains("cleanup"), "{msg}");
    assert!(pin.exists(), "the pinned map is left alone");

    // The right layout with the other LRU flavour (per-CPU lists, an older agent's) is accepted
    // (and, having no BTF, its entries move to a new map: `migrate`).
    std::fs::remove_file(&pin).expect("unpin");
    let entries = rproxy_common::limits::CT_MAX.to_string();
    let lru = ["type", "lru_hash", "key", "16", "value", "32", "entries", &entries, "name", "RPX_CT4", "flags", "2"];
    bpftool_map_create(&pin, &lru);
    rproxy_agent::bpf::datapath::Datapath::load(Some(&dir)).expect("a map differing only in LRU flavour is accepted");

    // Counters of an older agent (fewer of them) are replaced, not refused.
    let counters = dir.join(rproxy_common::map_names::STATS);
    std::fs::remove_file(&counters).expect("unpin the loaded counters");
    bpftool_map_create(
        &counters,
        &["type", "percpu_array", "key", "4", "value", "8", "entries", "12", "name", "RPX_STATS"],
    );
    let mut dp = rproxy_agent::bpf::datapath::Datapath::load(Some(&dir)).expect("old counters are replaced");
    let maps = dp.take_maps().expect("maps");
    assert_eq!(maps.stats.len(), rproxy_common::Stat::COUNT, "a map of this agent's size");
}

/// A pinned table of another size than asked for (`--ct-max`, `--service-map-max`,
/// `--backend-map-max`) moves to a new table of the new size with its entries; a backend array
/// too small for an id in use is refused, naming the map and the id, and nothing moves.
#[test]
fn pinned_tables_move_to_their_new_size_and_a_shrink_that_does_not_fit_is_refused() {
    use rproxy_agent::bpf::datapath::{Datapath, MapSizes};
    use rproxy_common::{Backend4, CtKey4, CtValue4, ServiceKey4, ServiceValue, map_names};
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if harness().is_none() {
        return;
    }
    let pins = PinDirCleanup::new("resize");
    let dir = pins.0.clone();
    let size = |name: &str| {
        aya::maps::MapData::from_pin(dir.join(name)).and_then(|m| m.info()).expect("pinned map").max_entries()
    };
    let small = MapSizes { ct4: 8192, services: 8192, backends: 8192, ..MapSizes::DEFAULT };
    let service = ServiceKey4::new(Ipv4Addr::new(10, 96, 0, 1), 80, proto::TCP, 0);
    let flow = CtKey4 { saddr: 1, daddr: 2, sport: 3, dport: 4, proto: proto::TCP, ..CtKey4::default() };
    let backend = Backend4::new(Ipv4Addr::new(10, 244, 0, 9), 8080, proto::TCP, 1);
    {
        let mut dp = Datapath::load_sized(Some(&dir), small).expect("load");
        let mut maps = dp.take_maps().expect("maps");
        maps.backends.set(5000, backend, 0).expect("backend");
        maps.services
            .insert(service, ServiceValue { backend_id: 5000, ..ServiceValue::default() }, 0)
            .expect("service");
        maps.conntrack.insert(flow, CtValue4 { backend_id: 5000, ..CtValue4::default() }, 0).expect("flow");
    }
    assert_eq!((size(map_names::BACKENDS4), size(map_names::SERVICES4), size(map_names::CT4)), (8192, 8192, 8192));

    let err = Datapath::load_sized(Some(&dir), MapSizes { backends: 4096, ..small }).err().expect("must refuse");
    let msg = err.to_string();
    assert!(msg.contains("RPX_BE4") && msg.contains("backend id 5000") && msg.contains("--backend-map-max"), "{msg}");
    assert!(!dir.join("legacy").exists(), "nothing moved aside");
    assert_eq!(size(map_names::BACKENDS4), 8192);

    let grown = MapSizes { ct4: 16384, services: 4096, backends: 16384, ..MapSizes::DEFAULT };
    let mut dp = Datapath::load_sized(Some(&dir), grown).expect("resizing load");
    let maps = dp.take_maps().expect("maps");
    assert_eq!(maps.backends.get(&5000, 0).expect("backend 5000"), backend);
    assert_eq!(maps.services.get(&service, 0).expect("service").backend_id, 5000);
    assert_eq!(maps.conntrack.get(&flow, 0).expect("flow").backend_id, 5000);
    assert_eq!(maps.backends.len(), 16384);
    drop(maps);
    dp.finish_migration().expect("finish");
    assert!(!dir.join("legacy").exists(), "the old tables are released");
    assert_eq!((size(map_names::BACKENDS4), size(map_names::SERVICES4), size(map_names::CT4)), (16384, 4096, 16384));
    assert_eq!((size(map_names::BACKENDS6), size(map_names::SERVICES6)), (16384, 4096));
}
