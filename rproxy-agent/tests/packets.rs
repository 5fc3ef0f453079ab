//! Packet tests: real packets through the real programs with `BPF_PROG_TEST_RUN`.
//!
//! Each test loads the embedded object with private maps, programs services through the same
//! writer the agent uses, runs a frame through `rpx_from_pod` / `rpx_to_pod`, and checks the
//! verdict and every rewritten byte, checksums recomputed independently (etherparse).
//!
//! Needs root (`CAP_BPF` + `CAP_NET_ADMIN`) and a mounted bpffs. Without them the tests print why
//! and return, unless `RPROXY_REQUIRE_KERNEL=1` (set by `cargo xtask test` and CI), where they
//! fail instead.
mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::{
    ACK, FIN, Harness, RST, SERIAL, SYN, SYN_ACK, assert_icmp_error, assert_related_error, ct_key, ct6_key, harness,
    icmp_error_frame, parse_checked, parse6_checked, tcp_frame, tcp6_frame, udp_frame, udp6_frame,
};
use etherparse::Ipv4Header;
use rproxy_agent::model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry};
use rproxy_common::{
    AffinityKey4, AffinityValue, CT_DIR_REPLY, CT_DIR_SERVICE, CT_F_RST, CtKey4, CtState, SVC_F_AFFINITY,
    SVC_F_CLUSTER_IP, Stat, prog_names, proto,
};

const PASS: u32 = u32::MAX; // TC_ACT_UNSPEC (-1)
const DROP: u32 = 2; // TC_ACT_SHOT
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 100);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 244, 1, 11), Ipv4Addr::new(10, 244, 1, 12), Ipv4Addr::new(10, 244, 1, 13)];
const CPORT: u16 = 40_000;

fn service(proto: Protocol, backends: &[Ipv4Addr]) -> Desired {
    let backends: Vec<IpAddr> = backends.iter().map(|a| IpAddr::from(*a)).collect();
    service_at(VIP.into(), proto, &backends)
}

/// A `ClusterIP` Service at `vip`:80 with `backends`:8080 (one family).
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

fn svc_key(client: (Ipv4Addr, u16), p: u8) -> CtKey4 {
    ct_key(client, (VIP, 80), p, CT_DIR_SERVICE)
}

fn reply_key(backend: (Ipv4Addr, u16), client: (Ipv4Addr, u16), p: u8) -> CtKey4 {
    ct_key(backend, client, p, CT_DIR_REPLY)
}

macro_rules! kernel_test {
    ($h:ident) => {
        let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(mut $h) = harness() else { return };
    };
}

#[test]
fn syn_to_vip_is_dnated_and_reply_is_reverse_natted() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS));
    let syn = tcp_frame((CLIENT, CPORT), (VIP, 80), SYN, b"", &[]);
    let (rc, out) = h.run(prog_names::FROM_POD, &syn);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!(seen.src, (CLIENT, CPORT), "source untouched");
    assert!(BACKENDS.contains(&seen.dst.0) && seen.dst.1 == 8080, "DNAT to a backend: {seen:?}");
    // Only the addresses, ports and checksums changed.
    assert_eq!(out.len(), syn.len());
    let differing: Vec<usize> = (0..out.len()).filter(|i| out[*i] != syn[*i]).collect();
    let allowed = [14 + 10, 14 + 11, 14 + 16, 14 + 17, 14 + 18, 14 + 19, 34 + 2, 34 + 3, 34 + 16, 34 + 17];
    assert!(differing.iter().all(|i| allowed.contains(i)), "unexpected bytes changed: {differing:?}");

    // Conntrack: a service entry and a reply entry, state SYN sent.
    let backend = seen.dst;
    let fwd = h.ct(&svc_key((CLIENT, CPORT), proto::TCP)).expect("service entry");
    let rev = h.ct(&reply_key(backend, (CLIENT, CPORT), proto::TCP)).expect("reply entry");
    assert_eq!(fwd.backend_id, rev.backend_id);
    assert_eq!(fwd.state, CtState::SynSent as u8);

    // SYN-ACK from the backend, on its way into the client pod: source becomes the VIP.
    let synack = tcp_frame(backend, (CLIENT, CPORT), SYN_ACK, b"", &[]);
    let (rc, out) = h.run(prog_names::TO_POD, &synack);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!(seen.src, (VIP, 80));
    assert_eq!(seen.dst, (CLIENT, CPORT));
    let fwd = h.ct(&svc_key((CLIENT, CPORT), proto::TCP)).unwrap();
    assert_eq!(fwd.state, CtState::Established as u8, "SYN-ACK moves both entries to established");

    // Data on the established flow goes to the same backend, payload intact.
    for i in 0..20u8 {
        let data = tcp_frame((CLIENT, CPORT), (VIP, 80), ACK, &[i; 100], &[]);
        let (rc, out) = h.run(prog_names::FROM_POD, &data);
        assert_eq!(rc, PASS);
        let seen = parse_checked(&out);
        assert_eq!(seen.dst, backend, "established flow keeps its backend");
        assert_eq!(seen.payload, vec![i; 100]);
    }
    assert_eq!(h.stat(Stat::NewFlow), 1);
    assert_eq!(h.stat(Stat::Established), 20);
    assert_eq!(h.stat(Stat::RevNat), 1);
}

#[test]
fn tcp_state_follows_fin_and_rst() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS[..1]));
    let be = (BACKENDS[0], 8080);
    let c = (CLIENT, CPORT + 1);
    h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), SYN, b"", &[]));
    h.run(prog_names::TO_POD, &tcp_frame(be, c, SYN_ACK, b"", &[]));
    h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), FIN, b"", &[]));
    let state = |h: &Harness| h.ct(&svc_key(c, proto::TCP)).unwrap().state;
    assert_eq!(state(&h), CtState::Established as u8, "half-closed stays established");
    h.run(prog_names::TO_POD, &tcp_frame(be, c, FIN, b"", &[]));
    assert_eq!(state(&h), CtState::Closing as u8);
    let rev = h.ct(&reply_key(be, c, proto::TCP)).unwrap();
    assert_eq!(rev.state, CtState::Closing as u8, "state mirrored into the reply entry");
    // Port reuse: a new SYN on a closing flow reopens it.
    h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), SYN, b"", &[]));
    assert_eq!(state(&h), CtState::SynSent as u8);
    // RST closes.
    h.run(prog_names::TO_POD, &tcp_frame(be, c, RST, b"", &[]));
    let v = h.ct(&svc_key(c, proto::TCP)).unwrap();
    assert_eq!(v.state, CtState::Closing as u8);
    assert_ne!(v.flags & CT_F_RST, 0);
}

#[test]
fn udp_both_ways() {
    kernel_test!(h);
    h.program(&service(Protocol::Udp, &BACKENDS));
    let c = (CLIENT, 5353);
    let req = udp_frame(c, (VIP, 80), b"question");
    let (rc, out) = h.run(prog_names::FROM_POD, &req);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert!(BACKENDS.contains(&seen.dst.0) && seen.dst.1 == 8080);
    assert_eq!(seen.payload, b"question");
    let be = seen.dst;
    let ct = h.ct(&svc_key(c, proto::UDP)).expect("udp entry");
    assert_eq!(ct.state, CtState::Datagram as u8);

    let (rc, out) = h.run(prog_names::TO_POD, &udp_frame(be, c, b"answer"));
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!((seen.src, seen.dst), ((VIP, 80), c));
    assert_eq!(seen.payload, b"answer");
}

#[test]
fn udp_zero_checksum_stays_zero() {
    kernel_test!(h);
    h.program(&service(Protocol::Udp, &BACKENDS[..1]));
    let mut req = udp_frame((CLIENT, 5354), (VIP, 80), b"no checksum");
    req[14 + 20 + 6] = 0;
    req[14 + 20 + 7] = 0;
    let (rc, out) = h.run(prog_names::FROM_POD, &req);
    assert_eq!(rc, PASS);
    assert_eq!(&out[40..42], &[0, 0], "UDP checksum 0 means none and must stay 0");
    let seen = parse_checked(&out);
    assert_eq!(seen.dst, (BACKENDS[0], 8080));
}

#[test]
fn ipv4_options_are_honoured() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS[..1]));
    // Two NOPs, a record-route-like option padded to 8 bytes: IHL = 7.
    let options = [1, 1, 7, 3, 4, 0, 0, 0];
    let syn = tcp_frame((CLIENT, CPORT + 2), (VIP, 80), SYN, b"", &options);
    assert_eq!(syn[14] & 0x0f, 7);
    let (rc, out) = h.run(prog_names::FROM_POD, &syn);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!(seen.dst, (BACKENDS[0], 8080), "ports found after the options");
    assert_eq!(seen.options, options, "options untouched");
}

#[test]
fn truncated_and_non_ip_frames_pass_untouched() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS));
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
        ("ICMP error cut in its quote", icmp_error_frame(BACKENDS[0], CLIENT, 3, 3, &syn[14..42])[..60].to_vec()),
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

#[test]
fn non_service_packets_are_unchanged_byte_for_byte() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS));
    let frames = [
        tcp_frame((CLIENT, CPORT), (BACKENDS[0], 8080), SYN, b"direct", &[]),
        tcp_frame((CLIENT, CPORT), (VIP, 81), SYN, b"other port", &[]),
        udp_frame((CLIENT, CPORT), (VIP, 80), b"other protocol"),
    ];
    for f in &frames {
        let (rc, out) = h.run(prog_names::FROM_POD, f);
        assert_eq!(rc, PASS);
        assert_eq!(&out, f);
        let (rc, out) = h.run(prog_names::TO_POD, f);
        assert_eq!(rc, PASS);
        assert_eq!(&out, f);
    }
}

#[test]
fn fragments_are_passed_and_counted() {
    kernel_test!(h);
    h.program(&service(Protocol::Udp, &BACKENDS));
    let mut frag = udp_frame((CLIENT, 5355), (VIP, 80), b"fragmented");
    frag[14 + 6] |= 0x20; // more fragments
    // Fix the IPv4 header checksum for the changed flags so only the fragment bit differs.
    let mut h4 = Ipv4Header::from_slice(&frag[14..]).unwrap().0;
    h4.header_checksum = h4.calc_header_checksum();
    frag[14 + 10..14 + 12].copy_from_slice(&h4.header_checksum.to_be_bytes());
    let (rc, out) = h.run(prog_names::FROM_POD, &frag);
    assert_eq!((rc, &out), (PASS, &frag));
    assert_eq!(h.stat(Stat::Fragment), 1);
}

/// A service without endpoints rejects new flows as kube-proxy does: ICMP port unreachable
/// from the service address, back into the pod (TCP and UDP); no state is made. A header with
/// options gets no message and is dropped.
#[test]
fn service_without_backends_rejects() {
    kernel_test!(h);
    let mut desired = service(Protocol::Tcp, &[]);
    desired.services.extend(service(Protocol::Udp, &[]).services);
    h.program(&desired);
    let syn = tcp_frame((CLIENT, CPORT), (VIP, 80), SYN, b"", &[]);
    let datagram = udp_frame((CLIENT, CPORT), (VIP, 80), b"question");
    for (i, frame) in [syn.clone(), datagram].iter().enumerate() {
        let (rc, out) = h.run(prog_names::FROM_POD, frame);
        assert_eq!(rc, REDIRECT, "frame {i}: back out of the pod's device");
        assert_icmp_error(&out, frame, 3, 3, 0);
    }
    assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (2, 2));
    assert!(h.ct(&ct_key((CLIENT, CPORT), (VIP, 80), proto::TCP, CT_DIR_SERVICE)).is_none());
    let with_options = tcp_frame((CLIENT, CPORT), (VIP, 80), SYN, b"", &[1, 1, 1, 0]);
    assert_eq!(h.run(prog_names::FROM_POD, &with_options).0, DROP);
    assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (3, 2));
}

/// ICMP errors about a translated flow reach the client translated back (conntrack's
/// "related"): a backend's port unreachable for a UDP datagram and a router's fragmentation
/// needed for a TCP segment quote the packet as the backend got it; on the way into the pod the
/// quote becomes the packet the client sent again (destination, checksums), and the backend's
/// own error comes from the service address. Errors about no known flow pass untouched.
#[test]
fn icmp_errors_about_translated_flows_are_reverse_translated() {
    kernel_test!(h);
    let mut desired = service(Protocol::Udp, &BACKENDS[..1]);
    desired.services.extend(service(Protocol::Tcp, &BACKENDS[..1]).services);
    h.program(&desired);
    let router = Ipv4Addr::new(10, 0, 0, 1);
    let datagram = udp_frame((CLIENT, CPORT), (VIP, 80), b"question");
    let syn = tcp_frame((CLIENT, CPORT), (VIP, 80), SYN, b"", &[]);
    for (sent, from, typ, code) in [(&datagram, BACKENDS[0], 3, 3), (&syn, router, 3, 4)] {
        let (_, translated) = h.run(prog_names::FROM_POD, sent);
        assert_eq!(parse_checked(&translated).dst, (BACKENDS[0], 8080));
        let error = icmp_error_frame(from, CLIENT, typ, code, &translated[14..42]);
        let (rc, out) = h.run(prog_names::TO_POD, &error);
        assert_eq!(rc, PASS);
        let src = if from == BACKENDS[0] { VIP } else { router };
        assert_related_error(&out, sent, src);
    }
    assert_eq!(h.stat(Stat::IcmpRelated), 2);
    // No flow of this client port: untouched.
    let (_, other) = h.run(prog_names::FROM_POD, &udp_frame((CLIENT, CPORT + 1), (VIP, 80), b"x"));
    let mut quote = other[14..42].to_vec();
    quote[20..22].copy_from_slice(&(CPORT + 2).to_be_bytes());
    let error = icmp_error_frame(BACKENDS[0], CLIENT, 3, 3, &quote);
    assert_eq!(h.run(prog_names::TO_POD, &error), (PASS, error.clone()));
    assert_eq!(h.stat(Stat::IcmpRelated), 2);
}

/// Hairpin: a pod whose connection to its Service is translated to itself gets the source
/// translated too, to the hairpin address (else its own stack would drop a packet from itself);
/// its replies, which go to its gateway, are translated back to come from the service. Later
/// packets keep both translations.
#[test]
fn a_pod_reaching_itself_is_translated_both_ways() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &[CLIENT]));
    let hairpin = Ipv4Addr::from(u32::from_be(rproxy_common::hairpin::ADDR));
    assert_eq!(hairpin, Ipv4Addr::new(169, 254, 42, 1));
    let c = (CLIENT, CPORT);
    for (i, flags) in [SYN, ACK].into_iter().enumerate() {
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), flags, b"", &[]));
        assert_eq!(rc, PASS);
        let seen = parse_checked(&out);
        assert_eq!((seen.src, seen.dst), ((hairpin, CPORT), (CLIENT, 8080)), "packet {i}");
    }
    let reply = tcp_frame((CLIENT, 8080), (hairpin, CPORT), SYN_ACK, b"", &[]);
    let (rc, out) = h.run(prog_names::FROM_POD, &reply);
    assert_eq!(rc, PASS);
    let seen = parse_checked(&out);
    assert_eq!((seen.src, seen.dst), ((VIP, 80), c), "the reply comes from the service");
    assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::Established), h.stat(Stat::RevNat)), (1, 1, 1));
    // Another pod's flow to the same backend is not source-translated.
    let other = (Ipv4Addr::new(10, 244, 1, 101), CPORT);
    let (_, out) = h.run(prog_names::FROM_POD, &tcp_frame(other, (VIP, 80), SYN, b"", &[]));
    assert_eq!(parse_checked(&out).src, other);

    // The same source port to a second service whose backend is the pod too would need the
    // reply tuple the first flow holds: dropped rather than steal its replies.
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    let mut second = service(Protocol::Tcp, &[CLIENT]);
    second.services = second.services.into_iter().map(|(fe, e)| (Frontend { addr: vip2.into(), ..fe }, e)).collect();
    let mut both = service(Protocol::Tcp, &[CLIENT]);
    both.services.extend(second.services);
    h.program(&both);
    let (rc, _) = h.run(prog_names::FROM_POD, &tcp_frame(c, (vip2, 80), SYN, b"", &[]));
    assert_eq!((rc, h.stat(Stat::CtClash)), (DROP, 1));
    let (rc, out) = h.run(prog_names::FROM_POD, &reply);
    assert_eq!((rc, parse_checked(&out).src), (PASS, (VIP, 80)), "the first flow keeps its replies");
}

/// Two connections never share a reply tuple. One backend behind two frontends, and a pod that
/// reuses its source port towards it: while the first flow is live, a new flow through the
/// second frontend, or straight to the backend's own address, is dropped (and counted) rather
/// than steal its replies; once the first flow is over (closing), the new connection takes the
/// tuple, the old flow's entries go, and the replies are the new connection's.
#[test]
fn a_reply_tuple_is_never_shared_and_a_closed_flow_gives_it_up() {
    kernel_test!(h);
    let vip2 = Ipv4Addr::new(10, 96, 0, 11);
    let mut both = service(Protocol::Tcp, &BACKENDS[..1]);
    let second = service(Protocol::Tcp, &BACKENDS[..1])
        .services
        .into_iter()
        .map(|(fe, e)| (Frontend { addr: vip2.into(), ..fe }, e));
    both.services.extend(second.collect::<Vec<_>>());
    h.program(&both);
    let c = (CLIENT, 41_000);
    let b = (BACKENDS[0], 8080);
    let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), SYN, b"", &[]));
    assert_eq!((rc, parse_checked(&out).dst), (PASS, b));
    h.run(prog_names::TO_POD, &tcp_frame(b, c, SYN_ACK, b"", &[]));
    assert_eq!(h.ct(&svc_key(c, proto::TCP)).unwrap().state, CtState::Established as u8);

    // Live: the second frontend's flow and a direct connection are dropped, the first flow's
    // replies stay its own.
    let (rc, _) = h.run(prog_names::FROM_POD, &tcp_frame(c, (vip2, 80), SYN, b"", &[]));
    assert_eq!((rc, h.stat(Stat::CtClash)), (DROP, 1));
    let direct = tcp_frame(c, b, SYN, b"", &[]);
    let (rc, _) = h.run(prog_names::FROM_POD, &direct);
    assert_eq!((rc, h.stat(Stat::CtClash)), (DROP, 2));
    let (_, out) = h.run(prog_names::TO_POD, &tcp_frame(b, c, ACK, b"data", &[]));
    assert_eq!(parse_checked(&out).src, (VIP, 80), "the live flow keeps its replies");
    // A direct connection from another port, or to another port, is none of its business.
    let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame((CLIENT, 41_001), b, SYN, b"", &[]));
    assert_eq!((rc, parse_checked(&out).dst), (PASS, b));

    // The first flow closes (FIN both ways): a direct connection from the same port takes the
    // tuple; the SYN passes untouched, and the SYN-ACK reaches the pod from the backend itself.
    h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), FIN, b"", &[]));
    h.run(prog_names::TO_POD, &tcp_frame(b, c, FIN, b"", &[]));
    assert_eq!(h.ct(&svc_key(c, proto::TCP)).unwrap().state, CtState::Closing as u8);
    let (rc, out) = h.run(prog_names::FROM_POD, &direct);
    assert_eq!((rc, out.as_slice()), (PASS, direct.as_slice()));
    assert!(h.ct(&svc_key(c, proto::TCP)).is_none() && h.ct(&reply_key(b, c, proto::TCP)).is_none());
    let synack = tcp_frame(b, c, SYN_ACK, b"", &[]);
    let (rc, out) = h.run(prog_names::TO_POD, &synack);
    assert_eq!((rc, out.as_slice()), (PASS, synack.as_slice()), "the backend's own SYN-ACK, untranslated");

    // Likewise a closed flow gives the tuple up to a new flow through the other frontend: its
    // client-side entry goes, the new flow's replies come from the second frontend.
    let c2 = (CLIENT, 41_002);
    h.run(prog_names::FROM_POD, &tcp_frame(c2, (VIP, 80), SYN, b"", &[]));
    h.run(prog_names::TO_POD, &tcp_frame(b, c2, RST, b"", &[]));
    let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(c2, (vip2, 80), SYN, b"", &[]));
    assert_eq!((rc, parse_checked(&out).dst), (PASS, b));
    assert!(h.ct(&svc_key(c2, proto::TCP)).is_none(), "the closed flow's client side is gone");
    let (_, out) = h.run(prog_names::TO_POD, &tcp_frame(b, c2, SYN_ACK, b"", &[]));
    assert_eq!(parse_checked(&out).src, (vip2, 80));
    assert_eq!(h.stat(Stat::CtClash), 2);
}

/// The service with `ClientIP` session affinity (`timeout` seconds).
fn affine_service(backends: &[Ipv4Addr], timeout: u32) -> Desired {
    let mut d = service(Protocol::Tcp, backends);
    for e in d.services.values_mut() {
        e.flags |= SVC_F_AFFINITY;
        e.affinity_timeout = timeout;
    }
    d
}

/// `sessionAffinity: ClientIP`: every new flow of a client goes to the backend its last new
/// flow got, while that was within the timeout and the backend still serves the Service; then
/// it picks afresh (and is remembered again). Affinity is per client.
#[test]
fn client_ip_affinity_keeps_a_client_on_its_backend() {
    kernel_test!(h);
    h.program(&affine_service(&BACKENDS, 60));
    let new_flow = |h: &mut Harness, client: Ipv4Addr, port: u16| {
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame((client, port), (VIP, 80), SYN, b"", &[]));
        assert_eq!(rc, PASS);
        parse_checked(&out).dst.0
    };
    let first = new_flow(&mut h, CLIENT, CPORT);
    for i in 1..24 {
        assert_eq!(new_flow(&mut h, CLIENT, CPORT + i), first, "flow {i} of the same client");
    }
    let other = Ipv4Addr::new(10, 244, 1, 101);
    let theirs = new_flow(&mut h, other, CPORT);
    for i in 1..8 {
        assert_eq!(new_flow(&mut h, other, CPORT + i), theirs, "the other client keeps its own");
    }

    // What the map remembers decides: a fresh entry for another backend is followed ...
    let key = AffinityKey4 { client: u32::from(CLIENT).to_be(), rev_nat_id: 1, _pad: 0 };
    let remembered = h.maps.affinity.get(&key, 0).expect("the client is remembered");
    let id_of = |h: &Harness, addr: Ipv4Addr| {
        let entries = rproxy_agent::bpf::datapath::used_entries(&h.maps.backends);
        entries.into_iter().find(|(_, b)| b.ip() == addr).map(|(id, _)| id).expect("backend")
    };
    let now = rproxy_agent::bpf::gc::monotonic_ns();
    let target = BACKENDS.iter().copied().find(|b| *b != first).unwrap();
    let fresh = AffinityValue { last_used_ns: now, backend_id: id_of(&h, target), _pad: 0 };
    h.maps.affinity.insert(key, fresh, 0).unwrap();
    assert_eq!(new_flow(&mut h, CLIENT, CPORT + 100), target);
    // ... an expired one is not (the pick is remembered afresh) ...
    let expired = AffinityValue { last_used_ns: now.saturating_sub(61_000_000_000), ..fresh };
    h.maps.affinity.insert(key, expired, 0).unwrap();
    let picked = new_flow(&mut h, CLIENT, CPORT + 101);
    let after = h.maps.affinity.get(&key, 0).unwrap();
    assert!(after.last_used_ns >= now && after.backend_id == id_of(&h, picked), "{after:?}");
    assert!(remembered.last_used_ns <= after.last_used_ns);
    // ... and neither is a backend that no longer serves the Service.
    let kept: Vec<Ipv4Addr> = BACKENDS.iter().copied().filter(|b| *b != picked).collect();
    h.program(&affine_service(&kept, 60));
    for i in 0..8 {
        assert_ne!(new_flow(&mut h, CLIENT, CPORT + 200 + i), picked, "a backend the Service lost");
    }
}

/// A UDP flow whose backend leaves the Service moves at once: the agent removes its conntrack
/// entries with the write, and the next datagram picks a live backend.
#[test]
fn udp_flow_moves_off_a_backend_that_leaves() {
    kernel_test!(h);
    h.program(&service(Protocol::Udp, &BACKENDS[..1]));
    let c = (CLIENT, 5356);
    let (_, out) = h.run(prog_names::FROM_POD, &udp_frame(c, (VIP, 80), b"1"));
    assert_eq!(parse_checked(&out).dst.0, BACKENDS[0]);
    h.program(&service(Protocol::Udp, &BACKENDS[1..2]));
    let (rc, out) = h.run(prog_names::FROM_POD, &udp_frame(c, (VIP, 80), b"2"));
    assert_eq!(rc, PASS);
    assert_eq!(parse_checked(&out).dst.0, BACKENDS[1], "next datagram picks a live backend");
    assert_eq!(h.stat(Stat::NewFlow), 2);
}

/// An established TCP flow keeps its backend when the backend leaves the Service (unready,
/// gone from its slice), as under kube-proxy: the backend stays in the map while the flow names
/// it, GC passes included, and replies are still translated. Once the flow's entries are gone the
/// GC deletes it. Should a flow's backend entry be gone anyway, its next packet picks a live
/// backend and is counted.
#[test]
fn established_tcp_flow_keeps_a_backend_that_leaves() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS[..1]));
    let c = (CLIENT, 5357);
    let b = (BACKENDS[0], 8080);
    h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), SYN, b"", &[]));
    h.run(prog_names::TO_POD, &tcp_frame(b, c, SYN_ACK, b"", &[]));
    h.program(&service(Protocol::Tcp, &BACKENDS[1..2]));
    assert_eq!(h.gc(), 0, "the flow still names the backend");
    for i in 0..3u8 {
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), ACK, &[i], &[]));
        assert_eq!((rc, parse_checked(&out).dst), (PASS, b), "packet {i} of the open connection");
        let (_, out) = h.run(prog_names::TO_POD, &tcp_frame(b, c, ACK, &[i], &[]));
        assert_eq!(parse_checked(&out).src, (VIP, 80));
    }
    // New connections go to the current backend only.
    let (_, out) = h.run(prog_names::FROM_POD, &tcp_frame((CLIENT, 5358), (VIP, 80), SYN, b"", &[]));
    assert_eq!(parse_checked(&out).dst.0, BACKENDS[1]);
    assert_eq!(h.stat(Stat::BackendGone), 0);

    // The flow's entries gone (as when they expire): the next pass deletes the backend.
    let _ = h.maps.conntrack.remove(&svc_key(c, proto::TCP));
    let _ = h.maps.conntrack.remove(&reply_key(b, c, proto::TCP));
    assert_eq!(h.gc(), 1);
    assert!(!h.writer.has_backend(1));

    // A flow whose backend entry is gone picks a live one (the peer answers with RST).
    let c3 = (CLIENT, 5359);
    h.run(prog_names::FROM_POD, &tcp_frame(c3, (VIP, 80), SYN, b"", &[]));
    h.program(&service(Protocol::Tcp, &BACKENDS[2..3]));
    let (released, _) = h.writer.release_orphans(|_| false, &mut h.maps);
    assert_eq!(released, 1);
    let (_, out) = h.run(prog_names::FROM_POD, &tcp_frame(c3, (VIP, 80), ACK, b"x", &[]));
    assert_eq!(parse_checked(&out).dst.0, BACKENDS[2]);
    assert_eq!(h.stat(Stat::BackendGone), 1);
}

/// An established flow is translated from its conntrack entry only while its frontend exists
/// (and its replies only while its backend does):
/// once the Service is removed its packets pass untouched, even with the conntrack entry still
/// there, and a frontend created again at the address starts the flow afresh. With the
/// service filter clear for the address, nothing is looked up: no counter moves.
#[test]
fn removed_frontend_stops_established_flows() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS[..1]));
    let c = (CLIENT, 5400);
    let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), SYN, b"", &[]));
    assert_eq!((rc, parse_checked(&out).dst.0), (PASS, BACKENDS[0]));
    let (_, out) = h.run(prog_names::FROM_POD, &tcp_frame(c, (VIP, 80), ACK, b"x", &[]));
    assert_eq!(parse_checked(&out).dst.0, BACKENDS[0]);
    assert_eq!(h.stat(Stat::Established), 1);

    h.program(&Desired::default());
    assert!(h.ct(&svc_key(c, proto::TCP)).is_some(), "the conntrack entry outlives the Service");
    let ack = tcp_frame(c, (VIP, 80), ACK, b"y", &[]);
    let (rc, out) = h.run(prog_names::FROM_POD, &ack);
    assert_eq!((rc, out.as_slice()), (PASS, ack.as_slice()), "untouched once the Service is gone");
    assert_eq!(h.stat(Stat::Established), 1, "not counted as established");
    // Its backend is gone from the maps too (and from the backend filter): a late reply from it
    // passes untouched, with no lookup.
    let reply = tcp_frame((BACKENDS[0], 8080), c, ACK, b"z", &[]);
    let (rc, out) = h.run(prog_names::TO_POD, &reply);
    assert_eq!((rc, out.as_slice()), (PASS, reply.as_slice()));
    assert_eq!(h.stat(Stat::RevNat), 0);

    // The same frontend again (a new rev-NAT id): the old flow starts afresh as a new one.
    h.program(&service(Protocol::Tcp, &BACKENDS[1..2]));
    let (rc, out) = h.run(prog_names::FROM_POD, &ack);
    assert_eq!((rc, parse_checked(&out).dst.0), (PASS, BACKENDS[1]));
    assert_eq!((h.stat(Stat::Established), h.stat(Stat::NewFlow)), (1, 2));
}

#[test]
fn backends_are_chosen_among_all() {
    kernel_test!(h);
    h.program(&service(Protocol::Tcp, &BACKENDS));
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..200u16 {
        let (_, out) = h.run(prog_names::FROM_POD, &tcp_frame((CLIENT, 20_000 + i), (VIP, 80), SYN, b"", &[]));
        seen.insert(parse_checked(&out).dst.0);
        if seen.len() == BACKENDS.len() {
            break;
        }
    }
    assert_eq!(seen.len(), BACKENDS.len(), "200 new flows should reach all 3 backends");
}

/// Removes a test's pin dir, also when the test fails.
struct PinDirCleanup(std::path::PathBuf);

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
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/rpxtest-pinned-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("pin dir");
    let _cleanup = PinDirCleanup(dir.clone());
    let pin = dir.join(rproxy_common::map_names::CT4);
    bpftool_map_create(&pin, &["type", "lru_hash", "key", "16", "value", "24", "entries", "1024", "name", "RPX_CT4"]);
    let err = rproxy_agent::bpf::datapath::Datapath::load(Some(&dir)).err().expect("load must refuse the old map");
    let msg = err.to_string();
    assert!(msg.contains("RPX_CT4") && msg.contains("value size 24, needs 32") && msg.contains("cleanup"), "{msg}");
    assert!(pin.exists(), "the pinned map is left alone");

    // The right layout with the other LRU flavour (per-CPU lists, an older agent's) is reused.
    std::fs::remove_file(&pin).expect("unpin");
    let entries = rproxy_common::limits::CT_MAX.to_string();
    let lru = ["type", "lru_hash", "key", "16", "value", "32", "entries", &entries, "name", "RPX_CT4", "flags", "2"];
    bpftool_map_create(&pin, &lru);
    rproxy_agent::bpf::datapath::Datapath::load(Some(&dir)).expect("a map differing only in LRU flavour is reused");

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

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const BACKENDS6: [Ipv6Addr; 2] =
    [Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x11), Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x12)];

/// IPv6 through the tail-called IPv6 half of the pod programs: a SYN to an IPv6 `ClusterIP` is
/// translated to a backend with a valid checksum, both conntrack entries are made in `RPX_CT6`,
/// the SYN-ACK comes back from the service address, and the flow keeps its backend; UDP too.
#[test]
fn ipv6_syn_to_vip_is_dnated_and_reply_is_reverse_natted() {
    kernel_test!(h);
    let backends: Vec<IpAddr> = BACKENDS6.iter().map(|a| IpAddr::from(*a)).collect();
    let mut desired = service_at(VIP6.into(), Protocol::Tcp, &backends);
    desired.services.extend(service_at(VIP6.into(), Protocol::Udp, &backends).services);
    h.program(&desired);
    let syn = tcp6_frame((CLIENT6, CPORT), (VIP6, 80), SYN, b"");
    let (rc, out) = h.run(prog_names::FROM_POD, &syn);
    assert_eq!(rc, PASS);
    let seen = parse6_checked(&out);
    assert_eq!(seen.src, (CLIENT6, CPORT), "source untouched");
    assert!(BACKENDS6.contains(&seen.dst.0) && seen.dst.1 == 8080, "DNAT to a backend: {seen:?}");
    assert_eq!(out.len(), syn.len());
    let backend = seen.dst;
    let fwd = h.ct6(&ct6_key((CLIENT6, CPORT), (VIP6, 80), proto::TCP, CT_DIR_SERVICE)).expect("service entry");
    let rev = h.ct6(&ct6_key(backend, (CLIENT6, CPORT), proto::TCP, CT_DIR_REPLY)).expect("reply entry");
    assert_eq!((fwd.backend_id, fwd.state), (rev.backend_id, CtState::SynSent as u8));

    let synack = tcp6_frame(backend, (CLIENT6, CPORT), SYN_ACK, b"");
    let (rc, out) = h.run(prog_names::TO_POD, &synack);
    assert_eq!(rc, PASS);
    let seen = parse6_checked(&out);
    assert_eq!((seen.src, seen.dst), ((VIP6, 80), (CLIENT6, CPORT)));
    for i in 0..5u8 {
        let data = tcp6_frame((CLIENT6, CPORT), (VIP6, 80), ACK, &[i; 100]);
        let (rc, out) = h.run(prog_names::FROM_POD, &data);
        assert_eq!(rc, PASS);
        let seen = parse6_checked(&out);
        assert_eq!((seen.dst, seen.payload), (backend, vec![i; 100]), "established flow keeps its backend");
    }

    let dgram = udp6_frame((CLIENT6, CPORT + 1), (VIP6, 80), b"ping");
    let (rc, out) = h.run(prog_names::FROM_POD, &dgram);
    assert_eq!(rc, PASS);
    let seen = parse6_checked(&out);
    assert!(BACKENDS6.contains(&seen.dst.0), "{seen:?}");
    let (rc, out) = h.run(prog_names::TO_POD, &udp6_frame(seen.dst, (CLIENT6, CPORT + 1), b"pong"));
    assert_eq!(rc, PASS);
    let back = parse6_checked(&out);
    assert_eq!((back.src, back.payload), ((VIP6, 80), b"pong".to_vec()));

    assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::Established), h.stat(Stat::RevNat)), (2, 5, 2));
    assert_eq!(h.stat(Stat::TailCallFail), 0);
}

/// An IPv6 Service without endpoints rejects as kube-proxy's rules do: an ICMPv6 destination
/// unreachable (port unreachable) back into the pod, from the service address, with a valid
/// checksum over the pseudo header, quoting the packet's IPv6 header and 8 bytes.
#[test]
fn ipv6_service_without_backends_rejects() {
    kernel_test!(h);
    h.program(&service_at(VIP6.into(), Protocol::Tcp, &[]));
    let syn = tcp6_frame((CLIENT6, CPORT), (VIP6, 80), SYN, b"");
    let (rc, out) = h.run(prog_names::FROM_POD, &syn);
    assert_eq!(rc, REDIRECT, "back out of the pod's device");
    assert_eq!(out.len(), 14 + 40 + 8 + 48, "Ethernet + IPv6 + ICMPv6 + 48 quoted bytes");
    assert_eq!((&out[0..6], &out[6..12]), (&syn[6..12], &syn[0..6]), "MACs swapped");
    let ip = &out[14..54];
    assert_eq!((ip[0] >> 4, ip[6], ip[7]), (6, 58, 64), "IPv6, ICMPv6, hop limit 64");
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 56, "payload length");
    assert_eq!((&ip[8..24], &ip[24..40]), (&VIP6.octets()[..], &CLIENT6.octets()[..]), "from the VIP to the client");
    let icmp = &out[54..];
    assert_eq!((icmp[0], icmp[1]), (1, 4), "destination unreachable, port unreachable");
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&ip[8..40]);
    pseudo.extend_from_slice(&56u32.to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(icmp);
    assert_eq!(common::ones_sum(&pseudo), 0xffff, "ICMPv6 checksum");
    assert_eq!(&icmp[8..], &syn[14..62], "quote: the header and 8 bytes as they arrived");
    assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (1, 1));
}
