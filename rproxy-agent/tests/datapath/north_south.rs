//! Packet tests of the north-south programs (`rpx_xdp_ext`, `rpx_ext_ingress`,
//! `rpx_ext_egress`) with `BPF_PROG_TEST_RUN`.
//!
//! Each test runs in a thread that first moves into a new, anonymous network namespace and builds
//! what the FIB lookups need there (`common::node_netns`: the node's external device `nsx`, a
//! second node, a client, routes to the second node's pods and to a third node whose MAC is
//! unknown, over IPv4 and IPv6). The namespace, and the devices in it, disappear with the
//! thread, even when an assertion fails.
//!
//! As in `packets.rs`, each behaviour is written once (over [`Net`], a family's addresses) and
//! runs for both families (`both_families!`: `<behaviour>::ipv4`, `<behaviour>::ipv6`); the
//! SNAT port allocator's and the route cache's internals are tested over IPv4.
//!
//! Needs root; see packets.rs for the skip rule.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::common::{
    ACK, Fam, Harness, IcmpKind, SERIAL, SYN, SYN_ACK, assert_icmp_error, assert_icmp_reply, assert_port_unreachable,
    assert_related, ct_key as key, harness, icmp_error, ip_dst, ip_ttl, macs, node_netns, parse, parse_checked,
    set_ttl, tcp, tcp_frame, udp,
};
use rproxy_agent::{
    bpf::datapath::{XdpAttached, XdpMode},
    model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry},
    node::{pods::PodSockets, snat::PortRange},
};
use rproxy_common::{
    AffinityValue, CT_DIR_RECLAIM, CT_DIR_REPLY, CT_DIR_SERVICE, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtKey4, CtState,
    CtValue4, CtValue6, RouteKey4, RouteValue, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_ITP_LOCAL,
    SVC_F_LOAD_BALANCER, SVC_F_NO_LOCAL_ENDPOINTS, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE, Stat, prog_names, proto,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_PASS: u32 = u32::MAX; // TC_ACT_UNSPEC
const TC_DROP: u32 = 2;
const TC_REDIRECT: u32 = 7;

const NODE: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const NODE2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const CLIENT: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 100);
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x64];
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
const CPORT: u16 = 40_000;

/// A family's addresses in the node's namespace (`common::node_netns`).
#[derive(Clone, Copy, Debug)]
struct Net {
    fam: Fam,
    /// The node's address on `nsx`.
    node: IpAddr,
    /// The second node.
    node2: IpAddr,
    /// The client, a neighbour on `nsx`.
    client: IpAddr,
    /// A pod of this node.
    local_pod: IpAddr,
    /// A pod of the second node.
    remote_pod: IpAddr,
    /// A pod of a third node, whose MAC is not known.
    unresolved_pod: IpAddr,
}

fn net(fam: Fam) -> Net {
    let v6 = |a: u16, b: u16, c: u16| IpAddr::from(Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, c));
    match fam {
        Fam::V4 => Net {
            fam,
            node: NODE.into(),
            node2: Ipv4Addr::new(172, 31, 0, 2).into(),
            client: CLIENT.into(),
            local_pod: Ipv4Addr::new(10, 244, 1, 11).into(),
            remote_pod: REMOTE_POD.into(),
            unresolved_pod: Ipv4Addr::new(10, 244, 3, 31).into(),
        },
        Fam::V6 => Net {
            fam,
            node: v6(0x31, 0, 1),
            node2: v6(0x31, 0, 2),
            client: v6(0x31, 0, 0x64),
            local_pod: v6(0x244, 1, 0x11),
            remote_pod: v6(0x244, 2, 0x21),
            unresolved_pod: v6(0x244, 3, 0x31),
        },
    }
}

impl Net {
    /// Another address of the client's segment: `172.31.0.n`, `fd00:31::n`.
    fn segment(self, n: u8) -> IpAddr {
        match self.fam {
            Fam::V4 => Ipv4Addr::new(172, 31, 0, n).into(),
            Fam::V6 => Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, u16::from(n)).into(),
        }
    }
}

/// Runs `f` in a thread inside a fresh network namespace set up as the module doc says, with
/// the index of `nsx`.
fn in_node_netns(f: impl FnOnce(&mut Harness, u32) + Send + 'static) {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(mut h) = harness() else { return };
    let r = std::thread::spawn(move || {
        let ifindex = node_netns::enter("nsx", "nsy");
        f(&mut h, ifindex);
    })
    .join();
    if let Err(panic) = r {
        std::panic::resume_unwind(panic);
    }
}

/// A behaviour written once (`fn name(h, ifindex, n) { … }`, `n` the family's [`Net`]), as a
/// module `name` with the tests `ipv4` and `ipv6`, each in its own node namespace.
macro_rules! both_families {
    ($(#[$meta:meta])* fn $name:ident($h:ident, $ifindex:ident, $n:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            use super::*;

            fn case($h: &mut Harness, $ifindex: u32, $n: Net) $body

            #[test]
            fn ipv4() {
                in_node_netns(|h, ifindex| case(h, ifindex, net(Fam::V4)));
            }

            #[test]
            fn ipv6() {
                in_node_netns(|h, ifindex| case(h, ifindex, net(Fam::V6)));
            }
        }
    };
}

/// Runs `frame` through the external ingress as if it arrived on device `ifindex`: the XDP
/// program (`xdp`) or its TC twin.
fn run_ext(h: &mut Harness, xdp: bool, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    if xdp { h.run_xdp(prog_names::XDP_EXT, ifindex, frame) } else { h.run_on(prog_names::EXT_INGRESS, ifindex, frame) }
}

fn backend(addr: IpAddr, proto: Protocol, local: bool) -> Backend {
    Backend { addr: BackendAddr { addr, port: 8080, proto }, state: BackendState::Active, local }
}

/// A TCP `NodePort` on the node's address whose only backend is `pod` on another node.
fn tcp_nodeport(node: IpAddr, port: u16, pod: IpAddr) -> Desired {
    frontend(node, port, Protocol::Tcp, SVC_F_NODE_PORT, vec![backend(pod, Protocol::Tcp, false)], vec![])
}

/// One frontend `addr:port/proto` with `flags` and backends (`local_slots` for ETP Local).
fn frontend(addr: IpAddr, port: u16, proto: Protocol, flags: u16, slots: Vec<Backend>, local: Vec<Backend>) -> Desired {
    let entry = ServiceEntry {
        service: ObjectRef::new("default", &format!("np{port}")),
        port_name: String::new(),
        flags,
        affinity_timeout: 0,
        slots,
        local_slots: local,
        draining: Vec::new(),
        source_ranges: Vec::new(),
    };
    Desired { services: [(Frontend { addr, port, proto }, entry)].into_iter().collect(), ..Desired::default() }
}

both_families! {
    /// The pod on this node gets the client's packets translated to it with the client's own
    /// source (XDP and TC alike), and its reply leaves the node from the node address and port,
    /// as does its ICMP error about the flow, translated back.
    fn nodeport_to_local_backend_is_dnated_and_reply_reverse_natted(h, ifindex, n) {
        h.program(&frontend(n.node, 30080, Protocol::Tcp, SVC_F_NODE_PORT, vec![backend(n.local_pod, Protocol::Tcp, true)], vec![]));
        for (i, xdp) in [true, false].into_iter().enumerate() {
            let c = (n.client, CPORT + u16::try_from(i).unwrap());
            let syn = tcp(c, (n.node, 30080), SYN, b"");
            let (rc, out) = run_ext(h, xdp, ifindex, &syn);
            assert_eq!(rc, if xdp { XDP_PASS } else { TC_PASS }, "xdp={xdp}");
            let seen = parse(&out);
            assert_eq!((seen.src, seen.dst), (c, (n.local_pod, 8080)), "xdp={xdp}");
            assert_eq!(macs(&out), macs(&syn), "handed to the stack with its Ethernet header unchanged");
            let translated = out;
            let ct = h.ct_of(c, (n.node, 30080), proto::TCP, CT_DIR_SERVICE).expect("service entry");
            assert_eq!(ct.nat_flags, CT_NAT_EXTERNAL);

            let (rc, out) = h.run_on(prog_names::EXT_EGRESS, ifindex, &tcp((n.local_pod, 8080), c, SYN_ACK, b""));
            assert_eq!(rc, TC_PASS);
            let seen = parse(&out);
            assert_eq!((seen.src, seen.dst), ((n.node, 30080), c), "reply from the NodePort");

            // An ICMP error of the backend about the flow leaves from the node address, quoting
            // the packet as the client sent it (conntrack's "related").
            let error = icmp_error(IcmpKind::TooBig(1280), n.local_pod, c.0, &n.fam.quote(&translated));
            let (rc, out) = h.run_on(prog_names::EXT_EGRESS, ifindex, &error);
            assert_eq!(rc, TC_PASS);
            assert_related(&out, &syn, n.node);
        }
        assert_eq!((h.stat(Stat::NewFlow), h.stat(Stat::RevNat), h.stat(Stat::IcmpRelated)), (2, 2, 2));
    }
}

both_families! {
    /// A backend on another node: DNAT + SNAT to the node address with a port from the SNAT
    /// range, Ethernet addresses from the FIB, transmitted back out of the device with the TTL
    /// (hop limit) decremented; the reply is translated back to the client and transmitted to
    /// it; later packets of the flow keep the port, both ways (at XDP the later ones take the
    /// route cache). A packet that forwarding would take to TTL 0 is answered with time
    /// exceeded, before any state is made.
    fn nodeport_to_remote_backend_is_snated_and_forwarded(h, ifindex, n) {
        h.program(&tcp_nodeport(n.node, 30081, n.remote_pod));
        for xdp in [true, false] {
            let (ok, c) = if xdp { (XDP_TX, (n.client, CPORT)) } else { (TC_REDIRECT, (n.client, CPORT + 1)) };
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            let (rc, out) = run(h, &tcp(c, (n.node, 30081), SYN, b""));
            assert_eq!(rc, ok, "xdp={xdp}");
            let seen = parse(&out);
            assert_eq!(seen.dst, (n.remote_pod, 8080));
            assert_eq!(seen.src.0, n.node, "SNAT to the node address towards the backend");
            let port = seen.src.1;
            assert!(PortRange::DEFAULT.ports().contains(&port), "SNAT port {port}");
            assert_eq!(macs(&out), (NODE2_MAC, NODE_MAC), "to the other node's MAC from ours");
            assert_eq!(seen.ttl, 63, "forwarded: TTL decremented (checksums checked by parse)");
            let reply = h.ct_of((n.remote_pod, 8080), (n.node, port), proto::TCP, CT_DIR_REPLY).expect("reply entry");
            assert_eq!(reply.nat_flags, CT_NAT_EXTERNAL | CT_NAT_SNAT);

            let (rc, out) = run(h, &tcp((n.remote_pod, 8080), (n.node, port), SYN_ACK, b""));
            assert_eq!(rc, ok, "reply forwarded, xdp={xdp}");
            let seen = parse(&out);
            assert_eq!((seen.src, seen.dst, seen.ttl), ((n.node, 30081), c, 63));
            assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));

            for round in 0..2 {
                let (rc, out) = run(h, &tcp(c, (n.node, 30081), ACK, b"data"));
                assert_eq!(rc, ok, "round {round}, xdp={xdp}");
                let seen = parse(&out);
                assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((n.node, port), (n.remote_pod, 8080), &b"data"[..]));
                assert_eq!((macs(&out), seen.ttl), ((NODE2_MAC, NODE_MAC), 63));
                let (rc, out) = run(h, &tcp((n.remote_pod, 8080), (n.node, port), ACK, b"back"));
                assert_eq!(rc, ok, "round {round}, xdp={xdp}");
                let seen = parse(&out);
                assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((n.node, 30081), c, &b"back"[..]));
                assert_eq!((macs(&out), seen.ttl), ((CLIENT_MAC, NODE_MAC), 63));
            }
        }
        assert_eq!((h.stat(Stat::Forwarded), h.stat(Stat::NewFlow), h.stat(Stat::TailCallFail)), (12, 2, 0));

        for (i, xdp) in [(2u16, true), (3, false)] {
            let mut syn = tcp((n.client, CPORT + i), (n.node, 30081), SYN, b"");
            set_ttl(&mut syn, 1);
            let (rc, out) = run_ext(h, xdp, ifindex, &syn);
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "xdp={xdp}");
            assert_icmp_reply(&out, &syn, IcmpKind::TimeExceeded);
            assert!(h.ct_of((n.client, CPORT + i), (n.node, 30081), proto::TCP, CT_DIR_SERVICE).is_none());
        }
        assert_eq!((h.stat(Stat::TtlExceeded), h.stat(Stat::IcmpSent)), (2, 2));
    }
}

both_families! {
    /// An established north-south flow is translated from its conntrack entry only while its
    /// frontend exists (XDP and TC): once the Service is gone its packets pass untouched, and a
    /// frontend re-created at the node port takes them as a new flow.
    fn removed_nodeport_stops_established_flows(h, ifindex, n) {
        for xdp in [true, false] {
            let (ok, c) = if xdp { (XDP_TX, (n.client, CPORT)) } else { (TC_REDIRECT, (n.client, CPORT + 1)) };
            let pass = if xdp { XDP_PASS } else { TC_PASS };
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            h.program(&tcp_nodeport(n.node, 30081, n.remote_pod));
            let established = h.stat(Stat::Established);
            let (rc, out) = run(h, &tcp(c, (n.node, 30081), SYN, b""));
            assert_eq!((rc, parse(&out).dst), (ok, (n.remote_pod, 8080)), "xdp={xdp}");
            let ack = tcp(c, (n.node, 30081), ACK, b"x");
            let (rc, out) = run(h, &ack);
            assert_eq!((rc, parse(&out).dst), (ok, (n.remote_pod, 8080)), "xdp={xdp}");
            assert_eq!(h.stat(Stat::Established), established + 1);

            h.program(&Desired::default());
            assert!(h.ct_of(c, (n.node, 30081), proto::TCP, CT_DIR_SERVICE).is_some(), "entry outlives the Service");
            assert_eq!(run(h, &ack), (pass, ack.clone()), "untouched once the Service is gone, xdp={xdp}");
            assert_eq!(h.stat(Stat::Established), established + 1, "not counted as established");

            // The node port again (a new rev-NAT id): the flow's next packet is a new flow.
            let new_flows = h.stat(Stat::NewFlow);
            h.program(&tcp_nodeport(n.node, 30081, n.remote_pod));
            let (rc, out) = run(h, &ack);
            assert_eq!((rc, parse(&out).dst), (ok, (n.remote_pod, 8080)), "xdp={xdp}");
            assert_eq!(h.stat(Stat::NewFlow), new_flows + 1, "xdp={xdp}");
            h.program(&Desired::default());
        }
    }
}

both_families! {
    /// A packet too big for the route to a remote backend (a locked route MTU, which the
    /// kernel's forwarding honours too; an unlocked one only with `ip_forward_use_pmtu`): the
    /// client gets fragmentation needed (ICMPv6 packet too big) with the route's MTU (path MTU
    /// discovery); no state. An IPv4 packet without "don't fragment" is dropped, no message.
    /// XDP and TC alike; counted.
    fn too_big_for_the_route_gets_an_icmp_error_with_its_mtu(h, ifindex, n) {
        let far = match n.fam {
            Fam::V4 => {
                node_netns::ip("route add 10.244.4.0/24 via 172.31.0.2 dev nsx mtu lock 1400");
                IpAddr::from(Ipv4Addr::new(10, 244, 4, 41))
            }
            Fam::V6 => {
                node_netns::ip("-6 route add fd00:244:4::/64 via fd00:31::2 dev nsx mtu lock 1400");
                IpAddr::from(Ipv6Addr::new(0xfd00, 0x244, 4, 0, 0, 0, 0, 0x41))
            }
        };
        h.program(&tcp_nodeport(n.node, 30084, far));
        // Payload that fills the route's MTU exactly with the IP and TCP headers.
        let fits = 1400 - n.fam.ip_len() - 20;
        for (i, xdp) in [(0u16, true), (1, false)] {
            let c = (n.client, CPORT + 10 + i);
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            let (rc, _) = run(h, &tcp(c, (n.node, 30084), SYN, &vec![7; fits]));
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "fits, xdp={xdp}");
            let big = tcp((n.client, CPORT + 20 + i), (n.node, 30084), SYN, &vec![7; fits + 1]);
            let (rc, out) = run(h, &big);
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "ICMP back, xdp={xdp}");
            assert_icmp_reply(&out, &big, IcmpKind::TooBig(1400));
            assert!(h.ct_of((n.client, CPORT + 20 + i), (n.node, 30084), proto::TCP, CT_DIR_SERVICE).is_none());
            if n.fam == Fam::V4 {
                // Without "don't fragment" (flags byte 20 of the frame): dropped, no message.
                let mut no_df = big.clone();
                no_df[20] &= !0x40;
                set_ttl(&mut no_df, 64);
                let (rc, _) = run(h, &no_df);
                assert_eq!(rc, if xdp { XDP_DROP } else { TC_DROP }, "no DF, xdp={xdp}");
            }
        }
        let dropped = if n.fam == Fam::V4 { 2 } else { 0 };
        assert_eq!((h.stat(Stat::FragNeeded), h.stat(Stat::IcmpSent)), (2 + dropped, 2));
    }
}

both_families! {
    /// UDP to a backend on another node and back at XDP, checksums made again.
    fn udp_to_remote_backend_both_ways_with_checksums(h, ifindex, n) {
        h.program(&frontend(n.node, 30082, Protocol::Udp, SVC_F_NODE_PORT, vec![backend(n.remote_pod, Protocol::Udp, false)], vec![]));
        let c = (n.client, 5353);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &udp(c, (n.node, 30082), b"question"));
        assert_eq!(rc, XDP_TX);
        let seen = parse(&out);
        assert_eq!((seen.src.0, seen.dst, seen.payload.as_slice()), (n.node, (n.remote_pod, 8080), &b"question"[..]));
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &udp((n.remote_pod, 8080), seen.src, b"answer"));
        assert_eq!(rc, XDP_TX);
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((n.node, 30082), c, &b"answer"[..]));
    }
}

both_families! {
    /// externalTrafficPolicy Local: outside clients only reach this node's endpoints, keep their
    /// address, and a node without local endpoints drops.
    fn etp_local_serves_local_endpoints_only(h, ifindex, n) {
        let flags = SVC_F_NODE_PORT | SVC_F_ETP_LOCAL;
        let slots = vec![backend(n.local_pod, Protocol::Tcp, true), backend(n.remote_pod, Protocol::Tcp, false)];
        let mut d = frontend(n.node, 30083, Protocol::Tcp, flags, slots.clone(), vec![slots[0]]);
        d.services.extend(frontend(n.node, 30084, Protocol::Tcp, flags, vec![slots[1]], vec![]).services);
        h.program(&d);
        for i in 0..8 {
            let c = (n.client, CPORT + i);
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp(c, (n.node, 30083), SYN, b""));
            assert_eq!(rc, XDP_PASS);
            let seen = parse(&out);
            assert_eq!((seen.src, seen.dst), (c, (n.local_pod, 8080)), "never the remote endpoint, never SNAT");
        }
        let syn = tcp((n.client, CPORT), (n.node, 30084), SYN, b"");
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &syn).0, XDP_DROP);
        assert_eq!(h.run_on(prog_names::EXT_INGRESS, ifindex, &syn).0, TC_DROP);
        assert_eq!(h.stat(Stat::NoBackend), 2);
    }
}

both_families! {
    /// `ClientIP` affinity under externalTrafficPolicy Local: a client remembered with a backend
    /// on another node (from the pod path, which uses every endpoint) is served by a local one
    /// from outside, and that one is remembered.
    fn affinity_under_etp_local_stays_local(h, ifindex, n) {
        let flags = SVC_F_NODE_PORT | SVC_F_ETP_LOCAL | SVC_F_AFFINITY;
        let slots = vec![backend(n.local_pod, Protocol::Tcp, true), backend(n.remote_pod, Protocol::Tcp, false)];
        let mut d = frontend(n.node, 30092, Protocol::Tcp, flags, slots.clone(), vec![slots[0]]);
        for e in d.services.values_mut() {
            e.affinity_timeout = 600;
        }
        h.program(&d);
        let now = rproxy_agent::bpf::gc::monotonic_ns();
        let remote = AffinityValue { last_used_ns: now, backend_id: h.backend_id(n.remote_pod), _pad: 0 };
        h.set_affinity(n.client, 1, remote);
        let syn = tcp((n.client, CPORT), (n.node, 30092), SYN, b"");
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn);
        assert_eq!((rc, parse(&out).dst), (XDP_PASS, (n.local_pod, 8080)), "never the remote one");
        assert_eq!(h.affinity(n.client, 1).expect("remembered").backend_id, h.backend_id(n.local_pod));
    }
}

both_families! {
    /// A `NodePort` without any endpoint rejects new flows as kube-proxy does, whatever the
    /// traffic policy: port unreachable (ICMP, ICMPv6) from the node address, back out of the
    /// device (XDP and TC); no state is made. (Under externalTrafficPolicy Local, endpoints on
    /// other nodes only mean a drop: `etp_local_serves_local_endpoints_only`.)
    fn nodeport_without_endpoints_rejects(h, ifindex, n) {
        let mut d = frontend(n.node, 30089, Protocol::Tcp, SVC_F_NODE_PORT, vec![], vec![]);
        d.services.extend(frontend(n.node, 30090, Protocol::Udp, SVC_F_NODE_PORT | SVC_F_ETP_LOCAL, vec![], vec![]).services);
        h.program(&d);
        let syn = tcp((n.client, CPORT), (n.node, 30089), SYN, b"");
        let datagram = udp((n.client, CPORT), (n.node, 30090), b"question");
        for frame in [&syn, &datagram] {
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, frame);
            assert_eq!(rc, XDP_TX);
            assert_port_unreachable(&out, frame);
            let (rc, out) = h.run_on(prog_names::EXT_INGRESS, ifindex, frame);
            assert_eq!(rc, TC_REDIRECT);
            assert_port_unreachable(&out, frame);
        }
        assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (4, 4));
        assert!(h.ct_of((n.client, CPORT), (n.node, 30089), proto::TCP, CT_DIR_SERVICE).is_none());
    }
}

both_families! {
    /// `loadBalancerSourceRanges`: a new flow to the ingress IP opens only from a source inside
    /// the ranges, from outside (XDP and TC) as from a pod; others are dropped and counted, with
    /// no state. A flow opened while allowed keeps going (kube-proxy filters new connections
    /// only).
    fn load_balancer_source_ranges_admit_only_their_sources(h, ifindex, n) {
        let lb_ip = n.segment(60);
        let (client_range, pods_range, pod) = match n.fam {
            Fam::V4 => ("172.31.0.64/26", "10.244.0.0/16", IpAddr::from(Ipv4Addr::new(10, 244, 1, 50))),
            Fam::V6 => ("fd00:31::40/122", "fd00:244::/32", IpAddr::from(Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 0x50))),
        };
        let flags = SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGE;
        let mut d = frontend(lb_ip, 80, Protocol::Tcp, flags, vec![backend(n.local_pod, Protocol::Tcp, true)], vec![]);
        let with_ranges = |d: &mut Desired, ranges: &[&str]| {
            for e in d.services.values_mut() {
                e.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
            }
        };
        with_ranges(&mut d, &[client_range]);
        h.program(&d);
        let outsider = (n.segment(20), CPORT);
        let pod = (pod, CPORT);
        for (i, xdp) in [(0u16, true), (1, false)] {
            let inside = (n.client, CPORT + i);
            let (rc, out) = run_ext(h, xdp, ifindex, &tcp(inside, (lb_ip, 80), SYN, b""));
            assert_eq!(rc, if xdp { XDP_PASS } else { TC_PASS }, "xdp={xdp}");
            assert_eq!(parse(&out).dst, (n.local_pod, 8080), "inside the range: translated");
            let rc = run_ext(h, xdp, ifindex, &tcp(outsider, (lb_ip, 80), SYN, b"")).0;
            assert_eq!(rc, if xdp { XDP_DROP } else { TC_DROP }, "outside the range: dropped, xdp={xdp}");
        }
        let (rc, _) = h.run(prog_names::FROM_POD, &tcp(pod, (lb_ip, 80), SYN, b""));
        assert_eq!(rc, TC_DROP, "a pod outside the range too");
        assert_eq!(h.stat(Stat::SourceRangeDrop), 3);
        assert!(h.ct_of(outsider, (lb_ip, 80), proto::TCP, CT_DIR_SERVICE).is_none());

        // The ranges change: the pod's network comes in, the client's goes out; the client's
        // open flow keeps going.
        with_ranges(&mut d, &[pods_range]);
        h.program(&d);
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp(pod, (lb_ip, 80), SYN, b""));
        assert_eq!((rc, parse(&out).dst), (TC_PASS, (n.local_pod, 8080)));
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp((n.client, CPORT), (lb_ip, 80), ACK, b"more"));
        assert_eq!((rc, parse(&out).dst), (XDP_PASS, (n.local_pod, 8080)));
        let syn = tcp((n.client, CPORT + 5), (lb_ip, 80), SYN, b"");
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &syn).0, XDP_DROP);
        assert_eq!(h.stat(Stat::SourceRangeDrop), 4);
    }
}

both_families! {
    /// An ICMP error about a flow source-translated to another node's backend comes back to the
    /// node's address and SNAT port: it is translated for the client (its quote the datagram the
    /// client sent, from the `NodePort` when the backend sent it, a router's address kept) and
    /// forwarded to the client, from XDP and TC. Errors about no such flow pass.
    fn icmp_errors_about_snated_flows_reach_the_client(h, ifindex, n) {
        h.program(&frontend(n.node, 30091, Protocol::Udp, SVC_F_NODE_PORT, vec![backend(n.remote_pod, Protocol::Udp, false)], vec![]));
        for (i, xdp) in [(0u16, true), (1, false)] {
            let ok = if xdp { XDP_TX } else { TC_REDIRECT };
            let sent = udp((n.client, CPORT + i), (n.node, 30091), b"question");
            let (rc, translated) = run_ext(h, xdp, ifindex, &sent);
            assert_eq!(rc, ok);
            assert_eq!(parse(&translated).dst, (n.remote_pod, 8080));
            // The quote carries the TTL the datagram left this node with.
            let mut as_forwarded = sent.clone();
            set_ttl(&mut as_forwarded, ip_ttl(&sent) - 1);
            for (from, kind) in [(n.remote_pod, IcmpKind::PortUnreachable), (n.node2, IcmpKind::TooBig(1280))] {
                let error = icmp_error(kind, from, n.node, &n.fam.quote(&translated));
                let (rc, out) = run_ext(h, xdp, ifindex, &error);
                assert_eq!(rc, ok, "xdp={xdp}, from {from}");
                assert_related(&out, &as_forwarded, if from == n.remote_pod { n.node } else { n.node2 });
                assert_eq!(ip_dst(&out), n.client, "to the client");
                assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));
                assert_eq!(ip_ttl(&out), 63, "forwarded: TTL decremented");
            }
        }
        assert_eq!(h.stat(Stat::IcmpRelated), 4);
        // About a flow the node never SNATed: passes untouched.
        let quote = n.fam.quote(&udp((n.node, 40_999), (n.remote_pod, 8080), b"question"));
        let error = icmp_error(IcmpKind::PortUnreachable, n.remote_pod, n.node, &quote);
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &error), (XDP_PASS, error.clone()));
        assert_eq!(h.stat(Stat::IcmpRelated), 4);
    }
}

both_families! {
    /// Every SNAT port towards a backend taken: the new flow is dropped and counted, the packet
    /// is not touched, no entry is left behind.
    fn snat_port_exhaustion_is_counted_and_dropped(h, ifindex, n) {
        h.program(&tcp_nodeport(n.node, 30085, n.remote_pod));
        h.dp.set_snat_ports(SMALL_RANGE).expect("SNAT range");
        for port in SMALL_RANGE.ports() {
            match (n.remote_pod, n.node) {
                (IpAddr::V4(b), IpAddr::V4(node)) => {
                    let taken = CtValue4 { nat_flags: CT_NAT_EXTERNAL | CT_NAT_SNAT, ..CtValue4::default() };
                    h.maps.conntrack.insert(key((b, 8080), (node, port), proto::TCP, CT_DIR_REPLY), taken, 0).expect("prefill");
                }
                (IpAddr::V6(b), IpAddr::V6(node)) => {
                    let taken = CtValue6 { nat_flags: CT_NAT_EXTERNAL | CT_NAT_SNAT, ..CtValue6::default() };
                    let k = crate::common::ct6_key((b, 8080), (node, port), proto::TCP, CT_DIR_REPLY);
                    h.maps.conntrack6.insert(k, taken, 0).expect("prefill");
                }
                _ => unreachable!("one family"),
            }
        }
        let c = (n.client, CPORT);
        let (rc, _) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp(c, (n.node, 30085), SYN, b""));
        assert_eq!(rc, XDP_DROP);
        assert_eq!(h.stat(Stat::SnatExhausted), 1);
        assert!(h.ct_of(c, (n.node, 30085), proto::TCP, CT_DIR_SERVICE).is_none());
    }
}

both_families! {
    /// The next hop's MAC unknown: XDP hands the packet up untouched, TC translates it and lets
    /// the kernel resolve the neighbour (`bpf_redirect_neigh`).
    fn unresolved_next_hop_goes_from_xdp_to_tc(h, ifindex, n) {
        h.program(&tcp_nodeport(n.node, 30086, n.unresolved_pod));
        let syn = tcp((n.client, CPORT), (n.node, 30086), SYN, b"");
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &syn), (XDP_PASS, syn.clone()));
        let (rc, out) = h.run_on(prog_names::EXT_INGRESS, ifindex, &syn);
        assert_eq!(rc, TC_REDIRECT);
        let seen = parse(&out);
        assert_eq!((seen.src.0, seen.dst), (n.node, (n.unresolved_pod, 8080)));
    }
}

/// A `ClusterIP` of the family: `10.96.0.n`, `fd00:96::n`.
fn cluster_ip(fam: Fam, n: u8) -> IpAddr {
    fam.svc(n)
}

both_families! {
    /// With `--external-cluster-ip false`, outside clients do not reach `ClusterIP` frontends;
    /// other traffic to the node passes byte for byte either way.
    fn cluster_ip_and_other_traffic_pass_untouched(h, ifindex, n) {
        h.dp.set_external_cluster_ip(false).unwrap();
        let vip = cluster_ip(n.fam, 10);
        h.program(&frontend(vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![backend(n.remote_pod, Protocol::Tcp, false)], vec![]));
        for frame in [
            tcp((n.client, CPORT), (vip, 80), SYN, b""),
            tcp((n.client, CPORT), (n.node, 22), SYN, b""),
            udp((n.client, CPORT), (n.node, 61_234), b"not ours"),
        ] {
            assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &frame), (XDP_PASS, frame.clone()));
            assert_eq!(h.run_on(prog_names::EXT_INGRESS, ifindex, &frame), (TC_PASS, frame.clone()));
            assert_eq!(h.run_on(prog_names::EXT_EGRESS, ifindex, &frame), (TC_PASS, frame.clone()));
        }
        assert_eq!(h.stat(Stat::NewFlow), 0);
    }
}

both_families! {
    /// By default (`--external-cluster-ip`), a `ClusterIP` routed to the node from outside is
    /// served as kube-proxy's rules serve it: to a backend on another node with DNAT and SNAT,
    /// forwarded from the hook; to one on this node with DNAT only (the pod sees the client).
    fn cluster_ip_from_outside_is_served_like_kube_proxy(h, ifindex, n) {
        h.dp.set_external_cluster_ip(true).unwrap();
        let (remote_vip, local_vip) = (cluster_ip(n.fam, 10), cluster_ip(n.fam, 11));
        let mut desired = frontend(remote_vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![backend(n.remote_pod, Protocol::Tcp, false)], vec![]);
        desired.services.extend(frontend(local_vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![backend(n.local_pod, Protocol::Tcp, true)], vec![]).services);
        h.program(&desired);
        let c = (n.client, CPORT);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp(c, (remote_vip, 80), SYN, b""));
        assert_eq!(rc, XDP_TX);
        let seen = parse(&out);
        assert_eq!((seen.src.0, seen.dst), (n.node, (n.remote_pod, 8080)), "DNAT and SNAT to the node");
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp(c, (local_vip, 80), SYN, b""));
        assert_eq!(rc, XDP_PASS);
        let seen = parse(&out);
        assert_eq!((seen.src, seen.dst), (c, (n.local_pod, 8080)), "DNAT only: the pod sees the client");
        let (rc, out) = h.run_on(prog_names::EXT_EGRESS, ifindex, &tcp((n.local_pod, 8080), c, SYN_ACK, b""));
        assert_eq!((rc, parse(&out).src), (TC_PASS, (local_vip, 80)), "the reply from the ClusterIP");
        assert_eq!(h.stat(Stat::NewFlow), 2);
    }
}

/// The cgroup v2 mount the socket hooks attach to; `None` (the test skipped) without one.
fn cgroup_or_skip() -> Option<std::path::PathBuf> {
    let found = rproxy_agent::bpf::datapath::cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").unwrap());
    if found.is_none() {
        assert!(std::env::var("RPROXY_REQUIRE_KERNEL").is_err(), "no cgroup2 mount: run scripts/setup.sh");
        eprintln!("skipping: no cgroup2 mount");
    }
    found
}

/// The loopback and wildcard addresses of family `fam`.
fn loopback_and_any(fam: Fam) -> (IpAddr, IpAddr) {
    match fam {
        Fam::V4 => (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::UNSPECIFIED.into()),
        Fam::V6 => (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::UNSPECIFIED.into()),
    }
}

/// Host-network sockets of family `fam` (the node's own namespace): connecting or sending to a
/// service address reaches a backend on loopback, and the socket still sees the service address
/// as its peer; a TCP connect to a service without endpoints is refused. The programs are
/// attached to the cgroup v2 root, but translate only sockets of this test's namespace.
fn host_sockets_case(fam: Fam) {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream, UdpSocket},
        time::Duration,
    };
    let Some(cgroup) = cgroup_or_skip() else { return };
    in_node_netns(move |h, _| {
        node_netns::ip("link set lo up");
        let (lo, any) = loopback_and_any(fam);
        let tcp = TcpListener::bind((lo, 0)).unwrap();
        let udp = UdpSocket::bind((lo, 0)).unwrap();
        let (tport, uport) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
        let vip = match fam {
            Fam::V4 => IpAddr::from(Ipv4Addr::new(10, 96, 7, 7)),
            Fam::V6 => IpAddr::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 7, 7)),
        };
        let be = |port, proto| Backend {
            addr: BackendAddr { addr: lo, port, proto },
            state: BackendState::Active,
            local: true,
        };
        let mut desired = frontend(vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![be(tport, Protocol::Tcp)], vec![]);
        desired.services.extend(
            frontend(vip, 53, Protocol::Udp, SVC_F_CLUSTER_IP, vec![be(uport, Protocol::Udp)], vec![]).services,
        );
        desired.services.extend(frontend(vip, 81, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![], vec![]).services);
        h.program(&desired);
        h.dp.attach_sockets(&cgroup, &PodSockets::Off).expect("attaching the socket hooks");

        // No endpoints: refused at once, as with kube-proxy's REJECT.
        let refused = TcpStream::connect_timeout(&(vip, 81).into(), Duration::from_secs(2)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

        let mut conn =
            TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(2)).expect("connect to the VIP");
        assert_eq!(conn.peer_addr().unwrap(), (vip, 80).into(), "getpeername shows the service");
        let (mut s, from) = tcp.accept().unwrap();
        assert_eq!(from.ip(), lo);
        conn.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        let u = UdpSocket::bind((any, 0)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        u.send_to(b"question", (vip, 53)).unwrap();
        let mut buf = [0u8; 64];
        let (n, client) = udp.recv_from(&mut buf).expect("the backend gets the datagram");
        assert_eq!(&buf[..n], b"question");
        udp.send_to(b"answer", client).unwrap();
        let (n, from) = u.recv_from(&mut buf).expect("the answer comes back");
        assert_eq!((&buf[..n], from), (&b"answer"[..], (vip, 53).into()), "recvmsg shows the service");
    });
}

/// Pods' TCP sockets of family `fam` (`--pod-sockets GLOB`: listed network namespaces): a pod
/// namespace that is not listed is left alone; once listed, its TCP connect to a service address
/// reaches the backend (on the pod's own loopback) with the service as its peer, a connect to a
/// service without endpoints is refused, a frontend with `ClientIP` affinity is left to the pod's
/// device, and its UDP is not translated (it stays on the device path). The pod has no route off
/// its loopback: whatever is not translated cannot be delivered.
fn pod_sockets_case(fam: Fam) {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream, UdpSocket},
        sync::mpsc,
        time::Duration,
    };
    let Some(cgroup) = cgroup_or_skip() else { return };
    in_node_netns(move |h, _| {
        let (lo, any) = loopback_and_any(fam);
        let vip = match fam {
            Fam::V4 => IpAddr::from(Ipv4Addr::new(10, 96, 7, 8)),
            Fam::V6 => IpAddr::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 7, 8)),
        };
        let connect = |port| TcpStream::connect_timeout(&(vip, port).into(), Duration::from_secs(2));
        std::thread::scope(|s| {
            let (ready_tx, ready) = mpsc::channel();
            let (step_tx, step) = mpsc::channel::<u8>();
            let (done_tx, done) = mpsc::channel::<()>();
            s.spawn(move || {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("a pod namespace");
                node_netns::ip("link set lo up");
                let tcp = TcpListener::bind((lo, 0)).unwrap();
                let cookie = rproxy_agent::bpf::datapath::netns_cookie().expect("the pod's netns cookie");
                ready_tx.send((tcp.local_addr().unwrap().port(), cookie)).unwrap();
                // Not listed: left alone, and the pod has no route to the service.
                assert_eq!(step.recv().unwrap(), 1);
                let err = connect(80).expect_err("an unlisted pod's connect is translated");
                assert_ne!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
                done_tx.send(()).unwrap();
                // Listed.
                assert_eq!(step.recv().unwrap(), 2);
                let refused = connect(81).unwrap_err();
                assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
                let mut conn = connect(80).expect("a listed pod's connect to the VIP");
                assert_eq!(conn.peer_addr().unwrap(), (vip, 80).into(), "getpeername shows the service");
                let (mut server, from) = tcp.accept().unwrap();
                assert_eq!(from.ip(), lo, "no NAT: the backend sees the socket's own address");
                conn.write_all(b"ping").unwrap();
                let mut buf = [0u8; 4];
                server.read_exact(&mut buf).unwrap();
                assert_eq!(&buf, b"ping");
                connect(82).expect_err("a frontend with affinity is left to the pod's device");
                let dropped = connect(83).expect_err("no local endpoint: left to the device, which drops");
                assert_ne!(dropped.kind(), std::io::ErrorKind::ConnectionRefused, "not refused: {dropped}");
                let u = UdpSocket::bind((any, 0)).unwrap();
                assert!(u.send_to(b"question", (vip, 53)).is_err(), "a pod's UDP is left to its device");
                done_tx.send(()).unwrap();
            });
            let (tport, cookie) = ready.recv().unwrap();
            let be = |port, proto| Backend {
                addr: BackendAddr { addr: lo, port, proto },
                state: BackendState::Active,
                local: true,
            };
            let mut desired =
                frontend(vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![be(tport, Protocol::Tcp)], vec![]);
            desired.services.extend(
                frontend(vip, 53, Protocol::Udp, SVC_F_CLUSTER_IP, vec![be(tport, Protocol::Udp)], vec![]).services,
            );
            desired.services.extend(frontend(vip, 81, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![], vec![]).services);
            desired.services.extend(
                frontend(
                    vip,
                    82,
                    Protocol::Tcp,
                    SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
                    vec![be(tport, Protocol::Tcp)],
                    vec![],
                )
                .services,
            );
            let no_local = SVC_F_CLUSTER_IP | SVC_F_ITP_LOCAL | SVC_F_NO_LOCAL_ENDPOINTS;
            desired.services.extend(frontend(vip, 83, Protocol::Tcp, no_local, vec![], vec![]).services);
            h.program(&desired);
            let listed = PodSockets::parse("/run/netns/rpx-datapath-test-*").expect("a glob");
            h.dp.attach_sockets(&cgroup, &listed).expect("attaching the socket hooks");
            h.dp.set_pod_netns(&std::collections::BTreeSet::new()).expect("no pod listed");
            step_tx.send(1).unwrap();
            done.recv().expect("the unlisted pod's checks");
            assert_eq!(h.dp.set_pod_netns(&[cookie].into()).expect("listing the pod"), (1, 0));
            step_tx.send(2).unwrap();
            done.recv().expect("the listed pod's checks");
            assert_eq!(h.dp.set_pod_netns(&std::collections::BTreeSet::new()).expect("unlisting"), (0, 1));
        });
    });
}

/// The socket hooks for pods' TCP, each family.
mod pod_sockets_connect_to_backends_when_listed {
    use super::{Fam, pod_sockets_case};

    #[test]
    fn ipv4() {
        pod_sockets_case(Fam::V4);
    }

    #[test]
    fn ipv6() {
        pod_sockets_case(Fam::V6);
    }
}

/// The socket hooks for each family: `connect4`/`sendmsg4`/`recvmsg4`/`getpeername4`, and
/// their IPv6 twins.
mod host_sockets_reach_services_through_the_socket_hooks {
    use super::{Fam, host_sockets_case};

    #[test]
    fn ipv4() {
        host_sockets_case(Fam::V4);
    }

    #[test]
    fn ipv6() {
        host_sockets_case(Fam::V6);
    }
}

// IPv4 only: the SNAT port allocator's and the route cache's internals, the XDP mode choice.

/// `--xdp-mode auto` on a veth: generic XDP, since native `XDP_TX` from a veth needs an XDP
/// program on its peer, which the agent cannot see to (a kind node's eth0). The device's driver
/// is read with ethtool's ioctl.
#[test]
fn auto_xdp_mode_picks_generic_on_a_veth() {
    in_node_netns(|h, _| {
        assert_eq!(rproxy_agent::node::devices::driver("nsx").as_deref(), Some("veth"));
        let attached = h.dp.attach_external("nsx", XdpMode::Auto).expect("attaching");
        assert_eq!(attached, XdpAttached::Generic);
    });
}

/// A SNAT range (`--snat-port-range`) small enough to fill in a test.
const SMALL_RANGE: PortRange = PortRange { first: 40_000, last: 40_011 };

/// Ports come from the configured range (`--snat-port-range`), one flow per port and backend;
/// a flow allocated before the range changed (an agent restarted with another range) keeps
/// working, since replies are recognised by their source, a backend, not by their port. With no
/// range at all (before the agent writes one) no flow is source-translated.
#[test]
fn snat_ports_come_from_the_configured_range() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(NODE.into(), 30088, REMOTE_POD.into()));
        let syn = |cport: u16| tcp_frame((CLIENT, cport), (NODE, 30088), SYN, b"", &[]);
        let mut ports = Vec::new();
        for (i, first) in [(0u16, 45_000u16), (1, 46_000)] {
            h.dp.set_snat_ports(PortRange { first, last: first }).expect("SNAT range");
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn(CPORT + i));
            assert_eq!(rc, XDP_TX);
            let seen = parse_checked(&out);
            assert_eq!(seen.src, (NODE, first), "the range's only port");
            ports.push(first);
        }
        // The one port is taken towards this backend: the next flow finds none.
        let (rc, _) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn(CPORT + 2));
        assert_eq!((rc, h.stat(Stat::SnatExhausted)), (XDP_DROP, 1));
        // The backend's replies reach both clients, the one of the old range too.
        for (i, port) in (0u16..).zip(ports) {
            let reply = tcp_frame((REMOTE_POD, 8080), (NODE, port), SYN_ACK, b"", &[]);
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &reply);
            assert_eq!(rc, XDP_TX, "reply to port {port}");
            assert_eq!(parse_checked(&out).dst, (CLIENT, CPORT + i));
        }
        // No range: dropped and counted, no state.
        h.dp.set_snat_ports(PortRange { first: 0, last: 0 }).expect("SNAT range");
        let (rc, _) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn(CPORT + 3));
        assert_eq!((rc, h.stat(Stat::SnatExhausted)), (XDP_DROP, 2));
        assert!(h.ct(&key((CLIENT, CPORT + 3), (NODE, 30088), proto::TCP, CT_DIR_SERVICE)).is_none());
    });
}

/// The SNAT range held by closed flows: a new flow takes over the port of one that closed more
/// than `snat::REUSE_AFTER_NS` ago, and that old flow's client-side entry goes. Ports of flows
/// closed just now, or still open, are never taken.
#[test]
fn closed_flow_snat_port_is_taken_over() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(NODE.into(), 30087, REMOTE_POD.into()));
        h.dp.set_snat_ports(SMALL_RANGE).expect("SNAT range");
        let old_client = |port: u16| (Ipv4Addr::new(172, 31, 0, 200), port);
        // Every port held by a flow in `state` whose last packet was `ago_ns` ago.
        let fill = |h: &mut Harness, state: CtState, ago_ns: u64| {
            let expires = rproxy_agent::bpf::gc::monotonic_ns() + state.lifetime_ns() - ago_ns;
            for port in SMALL_RANGE.ports() {
                let c = old_client(port);
                let reply = CtValue4 {
                    expires_ns: expires,
                    state: state as u8,
                    nat_flags: CT_NAT_EXTERNAL | CT_NAT_SNAT,
                    pair_addr: u32::from(NODE).to_be(),
                    pair_port: 30087u16.to_be(),
                    nat_addr: u32::from(c.0).to_be(),
                    nat_port: c.1.to_be(),
                    ..CtValue4::default()
                };
                let service = CtValue4 {
                    pair_addr: u32::from(REMOTE_POD).to_be(),
                    pair_port: 8080u16.to_be(),
                    nat_addr: u32::from(NODE).to_be(),
                    nat_port: port.to_be(),
                    ..reply
                };
                let reply_key = key((REMOTE_POD, 8080), (NODE, port), proto::TCP, CT_DIR_REPLY);
                h.maps.conntrack.insert(reply_key, reply, 0).expect("prefill");
                h.maps
                    .conntrack
                    .insert(key(c, (NODE, 30087), proto::TCP, CT_DIR_SERVICE), service, 0)
                    .expect("prefill");
            }
        };
        let syn = |cport: u16| tcp_frame((CLIENT, cport), (NODE, 30087), SYN, b"", &[]);

        for (state, ago_ns) in [(CtState::Established, 5_000_000_000), (CtState::Closing, 200_000_000)] {
            fill(h, state, ago_ns);
            let before = h.stat(Stat::SnatExhausted);
            let (rc, _) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn(CPORT));
            assert_eq!(rc, XDP_DROP, "{state:?}, last packet {ago_ns} ns ago: not taken");
            assert_eq!(h.stat(Stat::SnatExhausted), before + 1);
        }

        fill(h, CtState::Closing, 2_000_000_000);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn(CPORT));
        assert_eq!(rc, XDP_TX);
        let seen = parse_checked(&out);
        assert_eq!(seen.src.0, NODE);
        let port = seen.src.1;
        assert!(SMALL_RANGE.ports().contains(&port), "SNAT port {port}");
        let reply_key = key((REMOTE_POD, 8080), (NODE, port), proto::TCP, CT_DIR_REPLY);
        let reply = h.ct(&reply_key).expect("reply entry");
        assert_eq!((reply.nat_addr, reply.nat_port), (u32::from(CLIENT).to_be(), CPORT.to_be()), "the new flow's");
        assert_eq!(reply.state, CtState::SynSent as u8);
        let old = key(old_client(port), (NODE, 30087), proto::TCP, CT_DIR_SERVICE);
        assert!(h.ct(&old).is_none(), "the old flow's client-side entry is gone");
        assert!(h.ct(&CtKey4 { dir: CT_DIR_RECLAIM, ..reply_key }).is_none(), "the reclaim lock is released");

        // The reply of the backend reaches the new client.
        let (rc, out) =
            h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp_frame((REMOTE_POD, 8080), (NODE, port), SYN_ACK, b"", &[]));
        assert_eq!(rc, XDP_TX);
        assert_eq!(parse_checked(&out).dst, (CLIENT, CPORT));
    });
}

fn route_key(ifindex: u32, src: Ipv4Addr, dst: Ipv4Addr) -> RouteKey4 {
    RouteKey4 { ifindex, saddr: u32::from(src).to_be(), daddr: u32::from(dst).to_be(), proto: proto::TCP, _pad: [0; 3] }
}

/// At XDP the packets of an established flow, both ways, take their route from the route cache
/// (`rproxy_common::route`): the first ones fill it with the route's MTU (not the packet's
/// length); an entry younger than `route::VALID_NS` is used as it is, its MTU included (one
/// planted with another MAC and MTU takes the flow); a changed neighbour, and a removed route,
/// are followed once the entry is older.
#[test]
fn established_flows_route_through_the_cache_and_follow_changes() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(NODE.into(), 30087, REMOTE_POD.into()));
        let c = (CLIENT, CPORT);
        let run = |h: &mut Harness, frame: &[u8]| h.run_xdp(prog_names::XDP_EXT, ifindex, frame);
        let ack = |payload: &[u8]| tcp_frame(c, (NODE, 30087), ACK, payload, &[]);
        let (rc, out) = run(h, &tcp_frame(c, (NODE, 30087), SYN, b"", &[]));
        assert_eq!(rc, XDP_TX);
        let port = parse_checked(&out).src.1;
        let (rc, out) = run(h, &tcp_frame((REMOTE_POD, 8080), (NODE, port), SYN_ACK, b"", &[]));
        assert_eq!((rc, macs(&out)), (XDP_TX, (CLIENT_MAC, NODE_MAC)));
        let (rc, out) = run(h, &ack(b"x"));
        assert_eq!((rc, macs(&out)), (XDP_TX, (NODE2_MAC, NODE_MAC)));
        let client_side = route_key(ifindex, NODE, REMOTE_POD);
        let r = h.maps.routes.get(&client_side, 0).expect("the client side's route is cached");
        assert_eq!((r.ifindex, r.smac, r.dmac, r.mtu), (ifindex, NODE_MAC, NODE2_MAC, 1500), "the route's MTU");
        let r = h.maps.routes.get(&route_key(ifindex, NODE, CLIENT), 0).expect("the reply side's route is cached");
        assert_eq!((r.dmac, r.mtu), (CLIENT_MAC, 1500));

        // Full size fits; a byte more is answered with the MTU (cached or looked up again).
        let (rc, out) = run(h, &ack(&[7; 1460]));
        assert_eq!((rc, parse_checked(&out).payload.len()), (XDP_TX, 1460));
        let big = ack(&[7; 1461]);
        let (rc, out) = run(h, &big);
        assert_eq!(rc, XDP_TX, "ICMP back to the client");
        assert_icmp_error(&out, &big, 3, 4, 1500);

        // A recent entry is used as it is. Tried a few times: it must still be recent when the
        // packet runs, which a descheduled test thread could miss.
        let planted = [2, 0, 0, 0, 0, 0x99];
        let used = (0..5).any(|_| {
            let fresh = RouteValue {
                checked_ns: rproxy_agent::bpf::gc::monotonic_ns(),
                ifindex,
                mtu: 1000,
                smac: NODE_MAC,
                dmac: planted,
                _pad: [0; 6],
            };
            h.maps.routes.insert(client_side, fresh, 0).expect("planting a route");
            let (rc, out) = run(h, &ack(b"y"));
            let (rc2, out2) = run(h, &ack(&[7; 961]));
            rc == XDP_TX
                && macs(&out).0 == planted
                && rc2 == XDP_TX
                && out2.len() == 70
                && out2[14 + 20..14 + 22] == [3, 4]
                && out2[14 + 26..14 + 28] == 1000u16.to_be_bytes()
        });
        assert!(used, "a recent cached route (MAC and MTU) is used");

        // The neighbour's new MAC, then the route's removal, once the entry is older.
        let older = std::time::Duration::from_nanos(rproxy_common::route::VALID_NS + 50_000_000);
        node_netns::ip("neigh replace 172.31.0.2 lladdr 02:00:00:00:00:22 dev nsx nud permanent");
        std::thread::sleep(older);
        let (rc, out) = run(h, &ack(b"z"));
        assert_eq!((rc, macs(&out)), (XDP_TX, ([2, 0, 0, 0, 0, 0x22], NODE_MAC)), "the new neighbour");
        assert_eq!(h.maps.routes.get(&client_side, 0).expect("still cached").dmac, [2, 0, 0, 0, 0, 0x22]);
        node_netns::ip("route del 10.244.2.0/24");
        std::thread::sleep(older);
        let fib_fail = h.stat(Stat::FibFail);
        let (rc, _) = run(h, &ack(b"z"));
        assert_eq!((rc, h.stat(Stat::FibFail)), (XDP_DROP, fib_fail + 1), "no route any more");
    });
}

both_families! {
    /// A new north-south flow to a backend on this node never takes the tuple its replies come
    /// back on from a live flow of another frontend (the client reused its source port towards
    /// the same backend through two `NodePort`s; many clients behind one NAT do): it gets another
    /// source port of the SNAT range on the client's address, as netfilter's NAT gives it
    /// (`port_remapped`), and every packet of it both ways is translated, the replies to the
    /// client's own port from their own `NodePort`; the live flow keeps both its entries. Found
    /// by the datapath fuzzer: the new flow overwrote the live one's reply entry, and when it
    /// ended the live flow's service entry was left without its pair.
    fn a_local_flow_never_takes_a_live_flows_reply_tuple(h, ifindex, n) {
        let pod = backend(n.local_pod, Protocol::Tcp, true);
        let mut d = frontend(n.node, 30080, Protocol::Tcp, SVC_F_NODE_PORT, vec![pod], vec![]);
        d.services.extend(frontend(n.node, 30083, Protocol::Tcp, SVC_F_NODE_PORT, vec![pod], vec![]).services);
        h.program(&d);
        let c = (n.client, CPORT);
        let b = (n.local_pod, 8080);
        let (rc, _) = run_ext(h, true, ifindex, &tcp(c, (n.node, 30080), SYN, b""));
        assert_eq!(rc, XDP_PASS);
        assert!(h.ct_of(b, c, proto::TCP, CT_DIR_REPLY).is_some(), "the first flow's reply entry");
        let second = |h: &mut Harness, flags| {
            let (rc, out) = run_ext(h, true, ifindex, &tcp(c, (n.node, 30083), flags, b""));
            let seen = parse(&out);
            assert_eq!((rc, seen.src.0, seen.dst), (XDP_PASS, c.0, b));
            seen.src.1
        };
        let port = second(h, SYN);
        assert!(port != c.1 && (1024..=29_999).contains(&port), "another port of the SNAT range: {port}");
        assert_eq!((h.stat(Stat::PortRemapped), h.stat(Stat::CtClash)), (1, 0));
        assert_eq!(second(h, ACK), port, "its next packet keeps the port");
        assert!(h.ct_of(b, c, proto::TCP, CT_DIR_REPLY).is_some(), "the first flow keeps its reply entry");
        assert!(h.ct_of(c, (n.node, 30080), proto::TCP, CT_DIR_SERVICE).is_some(), "and its service entry");
        // Each flow's replies go back from its own NodePort, to the client's own port.
        for (to, from) in [(c, 30080), ((c.0, port), 30083)] {
            let (rc, out) = h.run_on(prog_names::EXT_EGRESS, ifindex, &tcp(b, to, SYN_ACK, b""));
            let seen = parse(&out);
            assert_eq!((rc, seen.src, seen.dst), (TC_PASS, (n.node, from), c), "the reply to {to:?}");
        }
    }
}

both_families! {
    /// A flow at a tuple that another origin's flow held (a pod, then a client outside, sending
    /// from the same address and port to the node's `NodePort`) replaces it whole: the old flow's
    /// reply entry goes with its service entry, instead of staying to translate replies for
    /// nobody. Found by the datapath fuzzer.
    fn a_flow_of_the_other_origin_at_the_same_tuple_goes_whole(h, ifindex, n) {
        let (a, b) = (n.local_pod, n.fam.pod(12));
        let slots = vec![backend(a, Protocol::Tcp, true), backend(b, Protocol::Tcp, true)];
        h.program(&frontend(n.node, 30080, Protocol::Tcp, SVC_F_NODE_PORT, slots, vec![]));
        let c = (n.client, CPORT);
        // From a pod's device (the pod path also serves NodePorts on the node's addresses).
        let (rc, _) = h.run(prog_names::FROM_POD, &tcp(c, (n.node, 30080), SYN, b""));
        assert_eq!(rc, TC_PASS);
        let first = h.ct_of(c, (n.node, 30080), proto::TCP, CT_DIR_SERVICE).expect("the pod path's flow");
        assert_eq!(first.nat_flags & CT_NAT_EXTERNAL, 0);
        let (old_ip, other) = if first.backend_id == h.backend_id(a) { (a, b) } else { (b, a) };
        // Only the other backend left, so the second flow's reply entry is another one.
        h.program(&frontend(n.node, 30080, Protocol::Tcp, SVC_F_NODE_PORT, vec![backend(other, Protocol::Tcp, true)], vec![]));
        let (rc, _) = run_ext(h, true, ifindex, &tcp(c, (n.node, 30080), SYN, b""));
        assert_eq!(rc, XDP_PASS);
        let second = h.ct_of(c, (n.node, 30080), proto::TCP, CT_DIR_SERVICE).expect("the external flow");
        assert_eq!(second.nat_flags & CT_NAT_EXTERNAL, CT_NAT_EXTERNAL);
        assert!(h.ct_of((other, 8080), c, proto::TCP, CT_DIR_REPLY).is_some(), "the new flow's reply entry");
        assert!(h.ct_of((old_ip, 8080), c, proto::TCP, CT_DIR_REPLY).is_none(), "the old flow's reply entry is gone");
    }
}
