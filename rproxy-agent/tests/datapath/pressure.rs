//! Conntrack pressure: a flood of new flows into a full `RPX_CT4` (the smallest size
//! `--ct-max` allows). The LRU table makes room by evicting the least recently used entries:
//! flows that keep sending keep their entries (a lookup marks them used), idle ones go first.
use std::net::IpAddr;

use rproxy_agent::{
    bpf::datapath::{Datapath, MapSizes},
    model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry},
    node::snat::PortRange,
    writer::Writer,
};
use rproxy_common::{CT_DIR_REPLY, CT_DIR_SERVICE, SVC_F_CLUSTER_IP, prog_names, proto};

use crate::common::{ACK, Fam, Harness, SERIAL, SYN, harness, parse, tcp, test_run, udp};

const TABLE: u32 = MapSizes::MIN;

fn service(vip: IpAddr, proto: Protocol, backend: IpAddr) -> (Frontend, ServiceEntry) {
    let be =
        Backend { addr: BackendAddr { addr: backend, port: 8080, proto }, state: BackendState::Active, local: true };
    let entry = ServiceEntry {
        service: ObjectRef { namespace: "default".into(), name: "flood".into() },
        port_name: String::new(),
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        slots: vec![be],
        local_slots: Vec::new(),
        draining: Vec::new(),
        source_ranges: Vec::new(),
    };
    (Frontend { addr: vip, port: 80, proto }, entry)
}

#[test]
fn a_flood_of_new_flows_evicts_idle_flows_and_keeps_active_ones() {
    let _serial = SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if harness().is_none() {
        return;
    }
    let mut dp = Datapath::load_sized(None, MapSizes { ct4: TABLE, ..MapSizes::DEFAULT }).expect("load");
    dp.set_snat_ports(PortRange::DEFAULT).expect("SNAT ports");
    let maps = dp.take_maps().expect("maps");
    let mut h = Harness { dp, maps, writer: Writer::new() };
    let fam = Fam::V4;
    let (vip, backend, client) = (fam.svc(10), fam.pod(11), fam.pod(100));
    let desired = Desired {
        services: [service(vip, Protocol::Tcp, backend), service(vip, Protocol::Udp, backend)].into_iter().collect(),
        ..Desired::default()
    };
    h.program(&desired);
    let send = |h: &mut Harness, frame: &[u8]| {
        test_run(h.dp.program(prog_names::FROM_POD).expect("program"), prog_names::FROM_POD, frame, None)
    };
    let answer = |h: &mut Harness, frame: &[u8]| {
        test_run(h.dp.program(prog_names::TO_POD).expect("program"), prog_names::TO_POD, frame, None)
    };
    let (active, idle) = ((client, 1000), (client, 1001));
    // The source ports the backend sees (the pod path gives TCP flows ports of the SNAT range).
    let seen = |(_, out): (u32, Vec<u8>)| parse(&out).src;
    let active_seen = seen(send(&mut h, &tcp(active, (vip, 80), SYN, b"")));
    let idle_seen = seen(send(&mut h, &tcp(idle, (vip, 80), SYN, b"")));
    // Four tables' worth of entries in new UDP flows (two entries each), the active connection
    // sending and answered now and then.
    let flood = 2 * TABLE;
    for i in 0..flood {
        let src = (
            fam.pod(u8::try_from(101 + i / 60_000).expect("few sources")),
            u16::try_from(2000 + i % 60_000).expect("port"),
        );
        send(&mut h, &udp(src, (vip, 80), b"x"));
        if i % 256 == 0 {
            send(&mut h, &tcp(active, (vip, 80), ACK, b"still here"));
            answer(&mut h, &tcp((backend, 8080), active_seen, ACK, b"so am I"));
        }
    }
    let has = |h: &Harness, c: (IpAddr, u16), seen: (IpAddr, u16)| {
        (
            h.ct_of(c, (vip, 80), proto::TCP, CT_DIR_SERVICE).is_some(),
            h.ct_of((backend, 8080), seen, proto::TCP, CT_DIR_REPLY).is_some(),
        )
    };
    let (a, i) = (has(&h, active, active_seen), has(&h, idle, idle_seen));
    eprintln!("after {flood} new flows into a table of {TABLE}: active {a:?}, idle {i:?}");
    assert_eq!(a, (true, true), "the active flow keeps both entries through the flood");
    assert_eq!(i, (false, false), "the idle flow is evicted");
}
