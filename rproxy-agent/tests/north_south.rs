//! Packet tests of the north-south programs (`rpx_xdp_ext`, `rpx_ext_ingress`,
//! `rpx_ext_egress`) with `BPF_PROG_TEST_RUN`.
//!
//! Each test runs in a thread that first moves into a new, anonymous network namespace and builds
//! what the FIB lookups need there (`common::node_netns`: the node's external device `nsx`, a
//! second node, a client, routes to the second node's pods and to a third node whose MAC is
//! unknown). The namespace, and the devices in it, disappear with the thread, even when an
//! assertion fails.
//!
//! Needs root; see packets.rs for the skip rule.
mod common;

use std::net::{Ipv4Addr, Ipv6Addr};

use common::{
    ACK, Harness, SERIAL, SYN, SYN_ACK, assert_icmp_error, assert_related_error, ct_key as key, ct6_key, harness,
    icmp_error_frame, macs, node_netns, ones_sum, parse_checked, parse6_checked, tcp_frame, tcp6_frame, udp_frame,
};
use rproxy_agent::{
    bpf::datapath::{XdpAttached, XdpMode},
    model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry},
    node::snat::PortRange,
};
use rproxy_common::{
    AffinityKey4, AffinityValue, CT_DIR_RECLAIM, CT_DIR_REPLY, CT_DIR_SERVICE, CT_NAT_EXTERNAL, CT_NAT_SNAT, CtKey4,
    CtState, CtValue4, RouteKey4, RouteValue, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_ETP_LOCAL, SVC_F_LOAD_BALANCER,
    SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE, Stat, prog_names, proto,
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
const LOCAL_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
const UNRESOLVED_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 31);
const CPORT: u16 = 40_000;

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

/// Runs `frame` through the external ingress as if it arrived on device `ifindex`: the XDP
/// program (`xdp`) or its TC twin.
fn run_ext(h: &mut Harness, xdp: bool, ifindex: u32, frame: &[u8]) -> (u32, Vec<u8>) {
    if xdp { h.run_xdp(prog_names::XDP_EXT, ifindex, frame) } else { h.run_on(prog_names::EXT_INGRESS, ifindex, frame) }
}

fn backend(addr: Ipv4Addr, proto: Protocol, local: bool) -> Backend {
    Backend { addr: BackendAddr { addr: addr.into(), port: 8080, proto }, state: BackendState::Active, local }
}

/// A TCP `NodePort` on the node's address whose only backend is `pod` on another node.
fn tcp_nodeport(port: u16, pod: Ipv4Addr) -> Desired {
    frontend(NODE, port, Protocol::Tcp, SVC_F_NODE_PORT, vec![backend(pod, Protocol::Tcp, false)], vec![])
}

/// One frontend `addr:port/proto` with `flags` and backends (`local_slots` for ETP Local).
fn frontend(
    addr: Ipv4Addr,
    port: u16,
    proto: Protocol,
    flags: u16,
    slots: Vec<Backend>,
    local: Vec<Backend>,
) -> Desired {
    let entry = ServiceEntry {
        service: ObjectRef { namespace: "default".into(), name: format!("np{port}") },
        port_name: String::new(),
        flags,
        affinity_timeout: 0,
        slots,
        local_slots: local,
        draining: Vec::new(),
        source_ranges: Vec::new(),
    };
    Desired {
        services: [(Frontend { addr: addr.into(), port, proto }, entry)].into_iter().collect(),
        ..Desired::default()
    }
}

/// The pod on this node gets the client's packets translated to it with the client's own source (XDP and
/// TC alike), and its reply leaves the node from the node address and port, as does its ICMP
/// error about the flow, translated back.
#[test]
fn nodeport_to_local_backend_is_dnated_and_reply_reverse_natted() {
    in_node_netns(|h, ifindex| {
        h.program(&frontend(
            NODE,
            30080,
            Protocol::Tcp,
            SVC_F_NODE_PORT,
            vec![backend(LOCAL_POD, Protocol::Tcp, true)],
            vec![],
        ));
        for (i, xdp) in [true, false].into_iter().enumerate() {
            let c = (CLIENT, CPORT + u16::try_from(i).unwrap());
            let syn = tcp_frame(c, (NODE, 30080), SYN, b"", &[]);
            let (rc, out) = run_ext(h, xdp, ifindex, &syn);
            assert_eq!(rc, if xdp { XDP_PASS } else { TC_PASS }, "xdp={xdp}");
            let seen = parse_checked(&out);
            assert_eq!((seen.src, seen.dst), (c, (LOCAL_POD, 8080)), "xdp={xdp}");
            assert_eq!(macs(&out), macs(&syn), "handed to the stack with its Ethernet header unchanged");
            let translated = out;
            let ct = h.ct(&key(c, (NODE, 30080), proto::TCP, CT_DIR_SERVICE)).expect("service entry");
            assert_eq!(ct.nat_flags, CT_NAT_EXTERNAL);

            let (rc, out) =
                h.run_on(prog_names::EXT_EGRESS, ifindex, &tcp_frame((LOCAL_POD, 8080), c, SYN_ACK, b"", &[]));
            assert_eq!(rc, TC_PASS);
            let seen = parse_checked(&out);
            assert_eq!((seen.src, seen.dst), ((NODE, 30080), c), "reply from the NodePort");

            // An ICMP error of the backend about the flow leaves from the node address, quoting
            // the packet as the client sent it (conntrack's "related").
            let error = icmp_error_frame(LOCAL_POD, c.0, 3, 4, &translated[14..42]);
            let (rc, out) = h.run_on(prog_names::EXT_EGRESS, ifindex, &error);
            assert_eq!(rc, TC_PASS);
            assert_related_error(&out, &syn, NODE);
        }
        assert_eq!(h.stat(Stat::NewFlow), 2);
        assert_eq!(h.stat(Stat::RevNat), 2);
        assert_eq!(h.stat(Stat::IcmpRelated), 2);
    });
}

/// A backend on another node: DNAT + SNAT to the node address with a port from the SNAT range,
/// Ethernet addresses from the FIB, transmitted back out of the device; the reply is translated
/// back to the client and transmitted to it; later packets of the flow keep the port.
#[test]
fn nodeport_to_remote_backend_is_snated_and_forwarded() {
    in_node_netns(|h, ifindex| {
        let remote = vec![backend(REMOTE_POD, Protocol::Tcp, false)];
        h.program(&frontend(NODE, 30081, Protocol::Tcp, SVC_F_NODE_PORT, remote, vec![]));
        for xdp in [true, false] {
            let (ok, c) = if xdp { (XDP_TX, (CLIENT, CPORT)) } else { (TC_REDIRECT, (CLIENT, CPORT + 1)) };
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            let (rc, out) = run(h, &tcp_frame(c, (NODE, 30081), SYN, b"", &[]));
            assert_eq!(rc, ok, "xdp={xdp}");
            let seen = parse_checked(&out);
            assert_eq!(seen.dst, (REMOTE_POD, 8080));
            assert_eq!(seen.src.0, NODE, "SNAT to the node address towards the backend");
            let port = seen.src.1;
            assert!(PortRange::DEFAULT.ports().contains(&port), "SNAT port {port}");
            assert_eq!(macs(&out), (NODE2_MAC, NODE_MAC), "to the other node's MAC from ours");
            assert_eq!(seen.ttl, 63, "forwarded: TTL decremented (checksums checked by parse_checked)");
            let reply = h.ct(&key((REMOTE_POD, 8080), (NODE, port), proto::TCP, CT_DIR_REPLY)).expect("reply entry");
            assert_eq!(reply.nat_flags, CT_NAT_EXTERNAL | CT_NAT_SNAT);

            let (rc, out) = run(h, &tcp_frame((REMOTE_POD, 8080), (NODE, port), SYN_ACK, b"", &[]));
            assert_eq!(rc, ok, "reply forwarded, xdp={xdp}");
            let seen = parse_checked(&out);
            assert_eq!((seen.src, seen.dst), ((NODE, 30081), c));
            assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));
            assert_eq!(seen.ttl, 63);

            let (rc, out) = run(h, &tcp_frame(c, (NODE, 30081), ACK, b"data", &[]));
            assert_eq!(rc, ok);
            let seen = parse_checked(&out);
            assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((NODE, port), (REMOTE_POD, 8080), &b"data"[..]));
        }
        assert_eq!(h.stat(Stat::Forwarded), 6);

        // A packet that forwarding would take to TTL 0 is answered with ICMP time exceeded,
        // before any state is made: back out of the device it came in on (XDP_TX, TC redirect).
        for (i, xdp) in [(2u16, true), (3, false)] {
            let mut syn = tcp_frame((CLIENT, CPORT + i), (NODE, 30081), SYN, b"", &[]);
            syn[14 + 8] = 1;
            fix_ip_checksum(&mut syn);
            let (rc, out) = run_ext(h, xdp, ifindex, &syn);
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "xdp={xdp}");
            assert_icmp_error(&out, &syn, 11, 0, 0);
            assert!(h.ct(&key((CLIENT, CPORT + i), (NODE, 30081), proto::TCP, CT_DIR_SERVICE)).is_none());
        }
        assert_eq!((h.stat(Stat::TtlExceeded), h.stat(Stat::IcmpSent)), (2, 2));
    });
}

/// An established north-south flow is translated from its conntrack entry only while its
/// frontend exists (XDP and TC): once the Service is gone its packets pass untouched, and a
/// frontend re-created at the node port takes them as a new flow.
#[test]
fn removed_nodeport_stops_established_flows() {
    in_node_netns(|h, ifindex| {
        let remote = || vec![backend(REMOTE_POD, Protocol::Tcp, false)];
        for xdp in [true, false] {
            let (ok, c) = if xdp { (XDP_TX, (CLIENT, CPORT)) } else { (TC_REDIRECT, (CLIENT, CPORT + 1)) };
            let pass = if xdp { XDP_PASS } else { TC_PASS };
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            h.program(&frontend(NODE, 30081, Protocol::Tcp, SVC_F_NODE_PORT, remote(), vec![]));
            let established = h.stat(Stat::Established);
            let (rc, out) = run(h, &tcp_frame(c, (NODE, 30081), SYN, b"", &[]));
            assert_eq!((rc, parse_checked(&out).dst), (ok, (REMOTE_POD, 8080)), "xdp={xdp}");
            let ack = tcp_frame(c, (NODE, 30081), ACK, b"x", &[]);
            let (rc, out) = run(h, &ack);
            assert_eq!((rc, parse_checked(&out).dst), (ok, (REMOTE_POD, 8080)), "xdp={xdp}");
            assert_eq!(h.stat(Stat::Established), established + 1);

            h.program(&Desired::default());
            assert!(h.ct(&key(c, (NODE, 30081), proto::TCP, CT_DIR_SERVICE)).is_some(), "entry outlives the Service");
            let (rc, out) = run(h, &ack);
            assert_eq!((rc, out.as_slice()), (pass, ack.as_slice()), "untouched once the Service is gone, xdp={xdp}");
            assert_eq!(h.stat(Stat::Established), established + 1, "not counted as established");

            // The node port again (a new rev-NAT id): the flow's next packet is a new flow.
            let new_flows = h.stat(Stat::NewFlow);
            h.program(&frontend(NODE, 30081, Protocol::Tcp, SVC_F_NODE_PORT, remote(), vec![]));
            let (rc, out) = run(h, &ack);
            assert_eq!((rc, parse_checked(&out).dst), (ok, (REMOTE_POD, 8080)), "xdp={xdp}");
            assert_eq!(h.stat(Stat::NewFlow), new_flows + 1, "xdp={xdp}");
            h.program(&Desired::default());
        }
    });
}

/// Recomputes the IPv4 header checksum of an Ethernet frame (no options).
fn fix_ip_checksum(frame: &mut [u8]) {
    frame[24..26].fill(0);
    let sum = !ones_sum(&frame[14..34]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// A packet too big for the route to a remote backend (a locked route MTU, which the kernel's
/// forwarding honours too; an unlocked one only with `ip_forward_use_pmtu`): with "don't
/// fragment" the client gets
/// ICMP fragmentation needed with the route's MTU (path MTU discovery), without it the packet
/// is dropped; no state either way. XDP and TC alike; counted.
#[test]
fn too_big_for_the_route_gets_fragmentation_needed() {
    in_node_netns(|h, ifindex| {
        node_netns::ip("route add 10.244.4.0/24 via 172.31.0.2 dev nsx mtu lock 1400");
        let far = Ipv4Addr::new(10, 244, 4, 41);
        h.program(&tcp_nodeport(30084, far));
        let mut sent = 0;
        for (i, xdp) in [(0u16, true), (1, false)] {
            let c = (CLIENT, CPORT + 10 + i);
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            // 1360 bytes of payload: 1400 with the headers, the route's MTU, goes through.
            let (rc, _) = run(h, &tcp_frame(c, (NODE, 30084), SYN, &[7; 1360], &[]));
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "fits, xdp={xdp}");
            let big = tcp_frame((CLIENT, CPORT + 20 + i), (NODE, 30084), SYN, &[7; 1361], &[]);
            let (rc, out) = run(h, &big);
            assert_eq!(rc, if xdp { XDP_TX } else { TC_REDIRECT }, "ICMP back, xdp={xdp}");
            assert_icmp_error(&out, &big, 3, 4, 1400);
            sent += 1;
            assert!(h.ct(&key((CLIENT, CPORT + 20 + i), (NODE, 30084), proto::TCP, CT_DIR_SERVICE)).is_none());
            // Without "don't fragment" (flags byte 20 of the frame): dropped, no message.
            let mut no_df = big.clone();
            no_df[20] &= !0x40;
            fix_ip_checksum(&mut no_df);
            let (rc, _) = run(h, &no_df);
            assert_eq!(rc, if xdp { XDP_DROP } else { TC_DROP }, "no DF, xdp={xdp}");
        }
        assert_eq!((h.stat(Stat::FragNeeded), h.stat(Stat::IcmpSent)), (4, sent));
    });
}

#[test]
fn udp_to_remote_backend_both_ways_with_checksums() {
    in_node_netns(|h, ifindex| {
        let remote = vec![backend(REMOTE_POD, Protocol::Udp, false)];
        h.program(&frontend(NODE, 30082, Protocol::Udp, SVC_F_NODE_PORT, remote, vec![]));
        let c = (CLIENT, 5353);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &udp_frame(c, (NODE, 30082), b"question"));
        assert_eq!(rc, XDP_TX);
        let seen = parse_checked(&out);
        assert_eq!((seen.src.0, seen.dst, seen.payload.as_slice()), (NODE, (REMOTE_POD, 8080), &b"question"[..]));
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &udp_frame((REMOTE_POD, 8080), seen.src, b"answer"));
        assert_eq!(rc, XDP_TX);
        let seen = parse_checked(&out);
        assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((NODE, 30082), c, &b"answer"[..]));
    });
}

/// externalTrafficPolicy Local: outside clients only reach this node's endpoints, keep their
/// address, and a node without local endpoints drops.
#[test]
fn etp_local_serves_local_endpoints_only() {
    in_node_netns(|h, ifindex| {
        let flags = SVC_F_NODE_PORT | SVC_F_ETP_LOCAL;
        let slots = vec![backend(LOCAL_POD, Protocol::Tcp, true), backend(REMOTE_POD, Protocol::Tcp, false)];
        let mut d = frontend(NODE, 30083, Protocol::Tcp, flags, slots.clone(), vec![slots[0]]);
        d.services.extend(frontend(NODE, 30084, Protocol::Tcp, flags, vec![slots[1]], vec![]).services);
        h.program(&d);
        for i in 0..8 {
            let c = (CLIENT, CPORT + i);
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp_frame(c, (NODE, 30083), SYN, b"", &[]));
            assert_eq!(rc, XDP_PASS);
            let seen = parse_checked(&out);
            assert_eq!((seen.src, seen.dst), (c, (LOCAL_POD, 8080)), "never the remote endpoint, never SNAT");
        }
        let syn = tcp_frame((CLIENT, CPORT), (NODE, 30084), SYN, b"", &[]);
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &syn).0, XDP_DROP);
        assert_eq!(h.run_on(prog_names::EXT_INGRESS, ifindex, &syn).0, TC_DROP);
        assert_eq!(h.stat(Stat::NoBackend), 2);
    });
}

/// `ClientIP` affinity under externalTrafficPolicy Local: a client remembered with a backend
/// on another node (from the pod path, which uses every endpoint) is served by a local one from
/// outside, and that one is remembered.
#[test]
fn affinity_under_etp_local_stays_local() {
    in_node_netns(|h, ifindex| {
        let flags = SVC_F_NODE_PORT | SVC_F_ETP_LOCAL | SVC_F_AFFINITY;
        let slots = vec![backend(LOCAL_POD, Protocol::Tcp, true), backend(REMOTE_POD, Protocol::Tcp, false)];
        let mut d = frontend(NODE, 30092, Protocol::Tcp, flags, slots.clone(), vec![slots[0]]);
        for e in d.services.values_mut() {
            e.affinity_timeout = 600;
        }
        h.program(&d);
        let id_of = |h: &Harness, addr: Ipv4Addr| {
            let entries = rproxy_agent::bpf::datapath::used_entries(&h.maps.backends);
            entries.into_iter().find(|(_, b)| b.ip() == addr).map(|(id, _)| id).expect("backend")
        };
        let key = AffinityKey4 { client: u32::from(CLIENT).to_be(), rev_nat_id: 1, _pad: 0 };
        let now = rproxy_agent::bpf::gc::monotonic_ns();
        let remote = AffinityValue { last_used_ns: now, backend_id: id_of(h, REMOTE_POD), _pad: 0 };
        h.maps.affinity.insert(key, remote, 0).unwrap();
        let syn = tcp_frame((CLIENT, CPORT), (NODE, 30092), SYN, b"", &[]);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn);
        assert_eq!((rc, parse_checked(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)), "never the remote one");
        assert_eq!(h.maps.affinity.get(&key, 0).unwrap().backend_id, id_of(h, LOCAL_POD));
    });
}

/// A `NodePort` without any endpoint rejects new flows as kube-proxy does, whatever the traffic
/// policy: ICMP port unreachable from the node address, back out of the device (XDP and TC);
/// no state is made. (Under externalTrafficPolicy Local, endpoints on other nodes only mean a
/// drop: `etp_local_serves_local_endpoints_only`.)
#[test]
fn nodeport_without_endpoints_rejects() {
    in_node_netns(|h, ifindex| {
        let mut d = frontend(NODE, 30089, Protocol::Tcp, SVC_F_NODE_PORT, vec![], vec![]);
        d.services
            .extend(frontend(NODE, 30090, Protocol::Udp, SVC_F_NODE_PORT | SVC_F_ETP_LOCAL, vec![], vec![]).services);
        h.program(&d);
        let syn = tcp_frame((CLIENT, CPORT), (NODE, 30089), SYN, b"", &[]);
        let datagram = udp_frame((CLIENT, CPORT), (NODE, 30090), b"question");
        for frame in [&syn, &datagram] {
            let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, frame);
            assert_eq!(rc, XDP_TX);
            assert_icmp_error(&out, frame, 3, 3, 0);
            let (rc, out) = h.run_on(prog_names::EXT_INGRESS, ifindex, frame);
            assert_eq!(rc, TC_REDIRECT);
            assert_icmp_error(&out, frame, 3, 3, 0);
        }
        assert_eq!((h.stat(Stat::NoBackend), h.stat(Stat::IcmpSent)), (4, 4));
        assert!(h.ct(&key((CLIENT, CPORT), (NODE, 30089), proto::TCP, CT_DIR_SERVICE)).is_none());
    });
}

/// `loadBalancerSourceRanges`: a new flow to the ingress IP opens only from a source inside the
/// ranges, from outside (XDP and TC) as from a pod; others are dropped and counted, with no
/// state. A flow opened while allowed keeps going (kube-proxy filters new connections only).
#[test]
fn load_balancer_source_ranges_admit_only_their_sources() {
    in_node_netns(|h, ifindex| {
        let lb_ip = Ipv4Addr::new(172, 31, 0, 60);
        let flags = SVC_F_LOAD_BALANCER | SVC_F_SOURCE_RANGE;
        let mut d = frontend(lb_ip, 80, Protocol::Tcp, flags, vec![backend(LOCAL_POD, Protocol::Tcp, true)], vec![]);
        let with_ranges = |d: &mut Desired, ranges: &[&str]| {
            for e in d.services.values_mut() {
                e.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
            }
        };
        with_ranges(&mut d, &["172.31.0.64/26"]);
        h.program(&d);
        let outsider = (Ipv4Addr::new(172, 31, 0, 20), CPORT);
        let pod = (Ipv4Addr::new(10, 244, 1, 50), CPORT);
        for (i, xdp) in [(0u16, true), (1, false)] {
            let inside = (CLIENT, CPORT + i);
            let syn = tcp_frame(inside, (lb_ip, 80), SYN, b"", &[]);
            let (rc, out) = run_ext(h, xdp, ifindex, &syn);
            assert_eq!(rc, if xdp { XDP_PASS } else { TC_PASS }, "xdp={xdp}");
            assert_eq!(parse_checked(&out).dst, (LOCAL_POD, 8080), "inside the range: translated");
            let syn = tcp_frame(outsider, (lb_ip, 80), SYN, b"", &[]);
            let rc = run_ext(h, xdp, ifindex, &syn).0;
            assert_eq!(rc, if xdp { XDP_DROP } else { TC_DROP }, "outside the range: dropped, xdp={xdp}");
        }
        let (rc, _) = h.run(prog_names::FROM_POD, &tcp_frame(pod, (lb_ip, 80), SYN, b"", &[]));
        assert_eq!(rc, TC_DROP, "a pod outside the range too");
        assert_eq!(h.stat(Stat::SourceRangeDrop), 3);
        assert!(h.ct(&key(outsider, (lb_ip, 80), proto::TCP, CT_DIR_SERVICE)).is_none());

        // The ranges change: the pod's network comes in, the client's goes out; the client's
        // open flow keeps going.
        with_ranges(&mut d, &["10.244.0.0/16"]);
        h.program(&d);
        let (rc, out) = h.run(prog_names::FROM_POD, &tcp_frame(pod, (lb_ip, 80), SYN, b"", &[]));
        assert_eq!((rc, parse_checked(&out).dst), (TC_PASS, (LOCAL_POD, 8080)));
        let ack = tcp_frame((CLIENT, CPORT), (lb_ip, 80), ACK, b"more", &[]);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &ack);
        assert_eq!((rc, parse_checked(&out).dst), (XDP_PASS, (LOCAL_POD, 8080)));
        let syn = tcp_frame((CLIENT, CPORT + 5), (lb_ip, 80), SYN, b"", &[]);
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &syn).0, XDP_DROP);
        assert_eq!(h.stat(Stat::SourceRangeDrop), 4);
    });
}

/// An ICMP error about a flow source-translated to another node's backend comes back to the node's
/// address and SNAT port: it is translated for the client (its quote the datagram the client
/// sent, from the `NodePort` when the backend sent it, a router's address kept) and forwarded to
/// the client, from XDP and TC. Errors about no such flow pass.
#[test]
fn icmp_errors_about_snated_flows_reach_the_client() {
    in_node_netns(|h, ifindex| {
        let remote = vec![backend(REMOTE_POD, Protocol::Udp, false)];
        h.program(&frontend(NODE, 30091, Protocol::Udp, SVC_F_NODE_PORT, remote, vec![]));
        let node2 = Ipv4Addr::new(172, 31, 0, 2);
        for (i, xdp) in [(0u16, true), (1, false)] {
            let ok = if xdp { XDP_TX } else { TC_REDIRECT };
            let sent = udp_frame((CLIENT, CPORT + i), (NODE, 30091), b"question");
            let (rc, translated) = run_ext(h, xdp, ifindex, &sent);
            assert_eq!(rc, ok);
            assert_eq!(parse_checked(&translated).dst, (REMOTE_POD, 8080));
            // The quote carries the TTL the datagram left this node with.
            let mut as_forwarded = sent.clone();
            as_forwarded[14 + 8] -= 1;
            fix_ip_checksum(&mut as_forwarded);
            for (from, code) in [(REMOTE_POD, 3), (node2, 4)] {
                let error = icmp_error_frame(from, NODE, 3, code, &translated[14..42]);
                let (rc, out) = run_ext(h, xdp, ifindex, &error);
                assert_eq!(rc, ok, "xdp={xdp}, from {from}");
                assert_related_error(&out, &as_forwarded, if from == REMOTE_POD { NODE } else { node2 });
                assert_eq!(&out[30..34], &CLIENT.octets(), "to the client");
                assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));
                assert_eq!(out[14 + 8], 63, "forwarded: TTL decremented");
            }
        }
        assert_eq!(h.stat(Stat::IcmpRelated), 4);
        // About a flow the node never SNATed: passes untouched.
        let quote = udp_frame((NODE, 40_999), (REMOTE_POD, 8080), b"question")[14..42].to_vec();
        let error = icmp_error_frame(REMOTE_POD, NODE, 3, 3, &quote);
        assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &error), (XDP_PASS, error.clone()));
        assert_eq!(h.stat(Stat::IcmpRelated), 4);
    });
}

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

/// Every SNAT port towards a backend taken: the new flow is dropped and counted, the packet
/// is not touched, no entry is left behind.
#[test]
fn snat_port_exhaustion_is_counted_and_dropped() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(30085, REMOTE_POD));
        h.dp.set_snat_ports(SMALL_RANGE).expect("SNAT range");
        let taken = CtValue4 { nat_flags: CT_NAT_EXTERNAL | CT_NAT_SNAT, ..CtValue4::default() };
        for port in SMALL_RANGE.ports() {
            let k = key((REMOTE_POD, 8080), (NODE, port), proto::TCP, CT_DIR_REPLY);
            h.maps.conntrack.insert(k, taken, 0).expect("prefill");
        }
        let c = (CLIENT, CPORT);
        let (rc, _) = h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp_frame(c, (NODE, 30085), SYN, b"", &[]));
        assert_eq!(rc, XDP_DROP);
        assert_eq!(h.stat(Stat::SnatExhausted), 1);
        assert!(h.ct(&key(c, (NODE, 30085), proto::TCP, CT_DIR_SERVICE)).is_none());
    });
}

/// Ports come from the configured range (`--snat-port-range`), one flow per port and backend;
/// a flow allocated before the range changed (an agent restarted with another range) keeps
/// working, since replies are recognised by their source, a backend, not by their port. With no
/// range at all (before the agent writes one) no flow is source-translated.
#[test]
fn snat_ports_come_from_the_configured_range() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(30088, REMOTE_POD));
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
        h.program(&tcp_nodeport(30087, REMOTE_POD));
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
        h.program(&tcp_nodeport(30087, REMOTE_POD));
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

/// The next hop's MAC unknown: XDP hands the packet up untouched, TC translates it and lets the
/// kernel resolve the neighbour (`bpf_redirect_neigh`).
#[test]
fn unresolved_next_hop_goes_from_xdp_to_tc() {
    in_node_netns(|h, ifindex| {
        h.program(&tcp_nodeport(30086, UNRESOLVED_POD));
        let syn = tcp_frame((CLIENT, CPORT), (NODE, 30086), SYN, b"", &[]);
        let (rc, out) = h.run_xdp(prog_names::XDP_EXT, ifindex, &syn);
        assert_eq!((rc, &out), (XDP_PASS, &syn));
        let (rc, out) = h.run_on(prog_names::EXT_INGRESS, ifindex, &syn);
        assert_eq!(rc, TC_REDIRECT);
        let seen = parse_checked(&out);
        assert_eq!((seen.src.0, seen.dst), (NODE, (UNRESOLVED_POD, 8080)));
    });
}

/// With `--external-cluster-ip false`, outside clients do not reach `ClusterIP` frontends; other
/// traffic to the node passes byte for byte either way.
#[test]
fn cluster_ip_and_other_traffic_pass_untouched() {
    in_node_netns(|h, ifindex| {
        h.dp.set_external_cluster_ip(false).unwrap();
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        h.program(&frontend(
            vip,
            80,
            Protocol::Tcp,
            SVC_F_CLUSTER_IP,
            vec![backend(REMOTE_POD, Protocol::Tcp, false)],
            vec![],
        ));
        for frame in [
            tcp_frame((CLIENT, CPORT), (vip, 80), SYN, b"", &[]),
            tcp_frame((CLIENT, CPORT), (NODE, 22), SYN, b"", &[]),
            udp_frame((CLIENT, CPORT), (NODE, 61_234), b"not ours"),
        ] {
            assert_eq!(h.run_xdp(prog_names::XDP_EXT, ifindex, &frame), (XDP_PASS, frame.clone()));
            assert_eq!(h.run_on(prog_names::EXT_INGRESS, ifindex, &frame), (TC_PASS, frame.clone()));
            assert_eq!(h.run_on(prog_names::EXT_EGRESS, ifindex, &frame), (TC_PASS, frame.clone()));
        }
        assert_eq!(h.stat(Stat::NewFlow), 0);
    });
}

/// By default (`--external-cluster-ip`), a `ClusterIP` routed to the node from outside is served
/// as kube-proxy's rules serve it: to a backend on another node with DNAT and SNAT, forwarded
/// from the hook; to one on this node with DNAT only (the pod sees the client).
#[test]
fn cluster_ip_from_outside_is_served_like_kube_proxy() {
    in_node_netns(|h, ifindex| {
        h.dp.set_external_cluster_ip(true).unwrap();
        let (remote_vip, local_vip) = (Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(10, 96, 0, 11));
        let mut desired = frontend(
            remote_vip,
            80,
            Protocol::Tcp,
            SVC_F_CLUSTER_IP,
            vec![backend(REMOTE_POD, Protocol::Tcp, false)],
            vec![],
        );
        let local = frontend(
            local_vip,
            80,
            Protocol::Tcp,
            SVC_F_CLUSTER_IP,
            vec![backend(LOCAL_POD, Protocol::Tcp, true)],
            vec![],
        );
        desired.services.extend(local.services);
        h.program(&desired);
        let (rc, out) =
            h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp_frame((CLIENT, CPORT), (remote_vip, 80), SYN, b"", &[]));
        assert_eq!(rc, XDP_TX);
        let seen = parse_checked(&out);
        assert_eq!((seen.src.0, seen.dst), (NODE, (REMOTE_POD, 8080)), "DNAT and SNAT to the node");
        let (rc, out) =
            h.run_xdp(prog_names::XDP_EXT, ifindex, &tcp_frame((CLIENT, CPORT), (local_vip, 80), SYN, b"", &[]));
        assert_eq!(rc, XDP_PASS);
        let seen = parse_checked(&out);
        assert_eq!((seen.src, seen.dst), ((CLIENT, CPORT), (LOCAL_POD, 8080)), "DNAT only: the pod sees the client");
        let (rc, out) = h.run_on(
            prog_names::EXT_EGRESS,
            ifindex,
            &tcp_frame((LOCAL_POD, 8080), (CLIENT, CPORT), SYN_ACK, b"", &[]),
        );
        assert_eq!((rc, parse_checked(&out).src), (TC_PASS, (local_vip, 80)), "the reply from the ClusterIP");
        assert_eq!(h.stat(Stat::NewFlow), 2);
    });
}

/// Host-network sockets (the node's own namespace): connecting or sending to a service address
/// reaches a backend, and the socket still sees the service address as its peer; a TCP connect
/// to a service without endpoints is refused. The programs are attached to the cgroup v2 root,
/// but translate only sockets of this test's namespace.
#[test]
fn host_sockets_reach_services_through_the_socket_hooks() {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream, UdpSocket},
        time::Duration,
    };
    let Some(cgroup) =
        rproxy_agent::bpf::datapath::cgroup2_mount(&std::fs::read_to_string("/proc/self/mountinfo").unwrap())
    else {
        assert!(std::env::var("RPROXY_REQUIRE_KERNEL").is_err(), "no cgroup2 mount: run scripts/setup.sh");
        eprintln!("skipping: no cgroup2 mount");
        return;
    };
    in_node_netns(move |h, _| {
        node_netns::ip("link set lo up");
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (tport, uport) = (tcp.local_addr().unwrap().port(), udp.local_addr().unwrap().port());
        let vip = Ipv4Addr::new(10, 96, 7, 7);
        let be = |port, proto| Backend {
            addr: BackendAddr { addr: Ipv4Addr::LOCALHOST.into(), port, proto },
            state: BackendState::Active,
            local: true,
        };
        let mut desired = frontend(vip, 80, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![be(tport, Protocol::Tcp)], vec![]);
        desired.services.extend(
            frontend(vip, 53, Protocol::Udp, SVC_F_CLUSTER_IP, vec![be(uport, Protocol::Udp)], vec![]).services,
        );
        desired.services.extend(frontend(vip, 81, Protocol::Tcp, SVC_F_CLUSTER_IP, vec![], vec![]).services);
        h.program(&desired);
        h.dp.attach_sockets(&cgroup).expect("attaching the socket hooks");

        // No endpoints: refused at once, as with kube-proxy's REJECT.
        let refused = TcpStream::connect_timeout(&(vip, 81).into(), Duration::from_secs(2)).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

        let mut conn =
            TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(2)).expect("connect to the VIP");
        assert_eq!(conn.peer_addr().unwrap(), (vip, 80).into(), "getpeername shows the service");
        let (mut s, from) = tcp.accept().unwrap();
        assert_eq!(from.ip(), Ipv4Addr::LOCALHOST);
        conn.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        let u = UdpSocket::bind("0.0.0.0:0").unwrap();
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

const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 0x64);
const REMOTE_POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 0x21);

/// IPv6 north-south through the tail-called stages: a `NodePort` on the node's IPv6 address
/// whose backend is on another node is translated by the SNAT stage (DNAT and SNAT to the node's
/// IPv6 address and a port of the SNAT range, Ethernet addresses from the FIB, hop limit
/// decremented) at XDP and at TC; the backend's reply comes back to the client from the
/// `NodePort`, and later packets keep the port.
#[test]
fn ipv6_nodeport_to_remote_backend_is_snated_and_forwarded() {
    in_node_netns(|h, ifindex| {
        let remote = vec![Backend {
            addr: BackendAddr { addr: REMOTE_POD6.into(), port: 8080, proto: Protocol::Tcp },
            state: BackendState::Active,
            local: false,
        }];
        let mut desired = frontend(NODE, 30081, Protocol::Tcp, SVC_F_NODE_PORT, remote, vec![]);
        let entry = desired.services.pop_first().expect("one").1;
        desired.services.insert(Frontend { addr: NODE6.into(), port: 30081, proto: Protocol::Tcp }, entry);
        h.program(&desired);
        for xdp in [true, false] {
            let (ok, c) = if xdp { (XDP_TX, (CLIENT6, CPORT)) } else { (TC_REDIRECT, (CLIENT6, CPORT + 1)) };
            let run = |h: &mut Harness, frame: &[u8]| run_ext(h, xdp, ifindex, frame);
            let (rc, out) = run(h, &tcp6_frame(c, (NODE6, 30081), SYN, b""));
            assert_eq!(rc, ok, "xdp={xdp}");
            let seen = parse6_checked(&out);
            assert_eq!((seen.dst, seen.src.0), ((REMOTE_POD6, 8080), NODE6), "DNAT and SNAT, xdp={xdp}");
            let port = seen.src.1;
            assert!(PortRange::DEFAULT.ports().contains(&port), "SNAT port {port}");
            assert_eq!(macs(&out), (NODE2_MAC, NODE_MAC), "to the other node's MAC from ours");
            assert_eq!(seen.hop_limit, 63, "forwarded: hop limit decremented");
            let reply = h.ct6(&ct6_key((REMOTE_POD6, 8080), (NODE6, port), proto::TCP, CT_DIR_REPLY));
            assert_eq!(reply.expect("reply entry").nat_flags, CT_NAT_EXTERNAL | CT_NAT_SNAT);

            let (rc, out) = run(h, &tcp6_frame((REMOTE_POD6, 8080), (NODE6, port), SYN_ACK, b""));
            assert_eq!(rc, ok, "reply forwarded, xdp={xdp}");
            let seen = parse6_checked(&out);
            assert_eq!((seen.src, seen.dst), ((NODE6, 30081), c));
            assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));

            // Twice each way: at XDP the second packet of each direction takes the entry
            // program's inline path (the route cache has the way), the first the IPv6 half.
            for round in 0..2 {
                let (rc, out) = run(h, &tcp6_frame(c, (NODE6, 30081), ACK, b"data"));
                assert_eq!(rc, ok, "round {round}, xdp={xdp}");
                let seen = parse6_checked(&out);
                assert_eq!(
                    (seen.src, seen.dst, seen.payload.as_slice()),
                    ((NODE6, port), (REMOTE_POD6, 8080), &b"data"[..])
                );
                assert_eq!((macs(&out), seen.hop_limit), ((NODE2_MAC, NODE_MAC), 63));
                let (rc, out) = run(h, &tcp6_frame((REMOTE_POD6, 8080), (NODE6, port), ACK, b"back"));
                assert_eq!(rc, ok, "round {round}, xdp={xdp}");
                let seen = parse6_checked(&out);
                assert_eq!((seen.src, seen.dst, seen.payload.as_slice()), ((NODE6, 30081), c, &b"back"[..]));
                assert_eq!((macs(&out), seen.hop_limit), ((CLIENT_MAC, NODE_MAC), 63));
            }
        }
        assert_eq!((h.stat(Stat::Forwarded), h.stat(Stat::NewFlow), h.stat(Stat::TailCallFail)), (12, 2, 0));
    });
}

/// An ICMPv6 error about an IPv6 flow this node source-translated, arriving on the external
/// device (the backend's port unreachable, a router's packet too big), goes through the ICMP
/// stage (a tail call) at XDP and TC: forwarded to the client with the quote turned back into
/// the packet the client sent (and its UDP checksum), from the `NodePort` when the backend sent
/// it, with a valid ICMPv6 checksum.
#[test]
fn ipv6_icmp_errors_about_snated_flows_reach_the_client() {
    use etherparse::{Icmpv6Type, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    in_node_netns(|h, ifindex| {
        let remote = vec![Backend {
            addr: BackendAddr { addr: REMOTE_POD6.into(), port: 8080, proto: Protocol::Udp },
            state: BackendState::Active,
            local: false,
        }];
        let mut desired = frontend(NODE, 30091, Protocol::Udp, SVC_F_NODE_PORT, remote, vec![]);
        let entry = desired.services.pop_first().expect("one").1;
        desired.services.insert(Frontend { addr: NODE6.into(), port: 30091, proto: Protocol::Udp }, entry);
        h.program(&desired);
        let node2 = Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 2);
        for (i, xdp) in [(0u16, true), (1, false)] {
            let ok = if xdp { XDP_TX } else { TC_REDIRECT };
            let c = (CLIENT6, CPORT + i);
            let sent = common::udp6_frame(c, (NODE6, 30091), b"question");
            let (rc, translated) = run_ext(h, xdp, ifindex, &sent);
            assert_eq!(rc, ok);
            assert_eq!(parse6_checked(&translated).dst, (REMOTE_POD6, 8080));
            for (from, typ) in [
                (REMOTE_POD6, Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port)),
                (node2, Icmpv6Type::PacketTooBig { mtu: 1280 }),
            ] {
                let mut error = Vec::new();
                PacketBuilder::ethernet2(NODE2_MAC, NODE_MAC)
                    .ipv6(from.octets(), NODE6.octets(), 64)
                    .icmpv6(typ)
                    .write(&mut error, &translated[14..62])
                    .expect("ICMPv6 error");
                let (rc, out) = run_ext(h, xdp, ifindex, &error);
                assert_eq!(rc, ok, "xdp={xdp}, from {from}");
                assert_eq!(macs(&out), (CLIENT_MAC, NODE_MAC));
                let p = SlicedPacket::from_ethernet(&out).expect("parses");
                let Some(NetSlice::Ipv6(ip)) = &p.net else { panic!("not IPv6") };
                let hdr = ip.header().to_header();
                let want_src = if from == REMOTE_POD6 { NODE6 } else { node2 };
                assert_eq!((Ipv6Addr::from(hdr.source), Ipv6Addr::from(hdr.destination)), (want_src, CLIENT6));
                assert_eq!(hdr.hop_limit, 63, "forwarded: hop limit decremented");
                let Some(TransportSlice::Icmpv6(icmp)) = &p.transport else { panic!("not ICMPv6") };
                let want = icmp.header().icmp_type.calc_checksum(hdr.source, hdr.destination, icmp.payload());
                assert_eq!(icmp.checksum(), want.expect("length"), "ICMPv6 checksum");
                // The quote is the client's datagram as it left this node (hop limit 63).
                let mut as_forwarded = sent[14..62].to_vec();
                as_forwarded[7] = 63;
                assert_eq!(icmp.payload(), &as_forwarded[..], "the quote turned back, xdp={xdp}, from {from}");
            }
        }
        assert_eq!((h.stat(Stat::IcmpRelated), h.stat(Stat::TailCallFail)), (4, 0));
    });
}
