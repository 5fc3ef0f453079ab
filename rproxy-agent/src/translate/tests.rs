use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{ClientIPConfig, LoadBalancerIngress, LoadBalancerStatus, ServiceStatus, SessionAffinityConfig},
    discovery::v1::{EndpointConditions, EndpointHints, ForNode, ForZone},
};
use rproxy_common::{SVC_F_ETP_LOCAL, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGE};

use super::*;
use BackendState::{Active, Terminating};
use Protocol::{Tcp, Udp};

const NODE: &str = "node-a";
/// The node address `NodePort`s answer on in most tests.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);

fn node() -> NodeContext {
    NodeContext { name: NODE.to_owned(), addresses: vec![NODE_IP.into()], zone: None }
}

// --- builders -----------------------------------------------------------------------------

/// `ns/name`, or `name` in the default namespace.
fn meta(name: &str) -> ObjectMeta {
    let (namespace, name) = name.split_once('/').unwrap_or(("default", name));
    ObjectMeta { name: Some(name.to_owned()), namespace: Some(namespace.to_owned()), ..ObjectMeta::default() }
}

fn port(name: &str, number: i32, protocol: &str) -> ServicePort {
    ServicePort {
        name: (!name.is_empty()).then(|| name.to_owned()),
        port: number,
        protocol: Some(protocol.to_owned()),
        ..ServicePort::default()
    }
}

fn service(name: &str, cluster_ip: &str, ports: Vec<ServicePort>) -> Service {
    with_spec(Service { metadata: meta(name), ..Service::default() }, |spec| {
        spec.cluster_ip = Some(cluster_ip.to_owned());
        spec.ports = Some(ports);
    })
}

fn with_spec(mut svc: Service, edit: impl FnOnce(&mut ServiceSpec)) -> Service {
    edit(svc.spec.get_or_insert_with(ServiceSpec::default));
    svc
}

fn slice(name: &str, service: &str, ports: &[(&str, i32, &str)], endpoints: Vec<Endpoint>) -> EndpointSlice {
    let mut metadata = meta(name);
    metadata.labels = Some([(SERVICE_NAME_LABEL.to_owned(), service.to_owned())].into());
    EndpointSlice {
        metadata,
        address_type: "IPv4".to_owned(),
        endpoints: Some(endpoints),
        ports: Some(
            ports
                .iter()
                .map(|&(name, number, protocol)| EndpointPort {
                    name: Some(name.to_owned()),
                    port: Some(number),
                    protocol: Some(protocol.to_owned()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
    }
}

/// An endpoint with unset conditions (ready).
fn ep(addr: &str) -> Endpoint {
    Endpoint { addresses: vec![addr.to_owned()], ..Endpoint::default() }
}

fn ep_on(addr: &str, node: &str) -> Endpoint {
    Endpoint { node_name: Some(node.to_owned()), ..ep(addr) }
}

fn ep_cond(addr: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Endpoint {
    Endpoint { conditions: Some(EndpointConditions { ready, serving, terminating }), ..ep(addr) }
}

fn be(addr: &str, port: u16, proto: Protocol, state: BackendState) -> Backend {
    Backend { addr: BackendAddr { addr: addr.parse().unwrap(), port, proto }, state, local: false }
}

fn local(backend: Backend) -> Backend {
    Backend { local: true, ..backend }
}

fn fe(addr: &str, port: u16, proto: Protocol) -> Frontend {
    Frontend { addr: addr.parse().unwrap(), port, proto }
}

fn objref(name: &str) -> ObjectRef {
    let (namespace, name) = name.split_once('/').unwrap();
    ObjectRef::new(namespace, name)
}

/// A plain cluster IP entry (no affinity, no traffic policy).
fn entry(service: &str, port_name: &str, slots: Vec<Backend>, draining: Vec<Backend>) -> ServiceEntry {
    ServiceEntry {
        service: objref(service),
        port_name: port_name.to_owned(),
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        slots,
        local_slots: Vec::new(),
        draining,
        source_ranges: Vec::new(),
    }
}

fn desired(entries: Vec<(Frontend, ServiceEntry)>) -> Desired {
    Desired { services: entries.into_iter().collect(), ..Desired::default() }
}

fn prob(kind: &'static str, object: &str, reason: &str) -> Problem {
    problem(kind, object, reason)
}

fn run(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Translation {
    translate_on(&node(), services, slices)
}

fn translate_on(node: &NodeContext, services: Vec<Service>, slices: Vec<EndpointSlice>) -> Translation {
    let out = translate(&Objects { services, slices }, node);
    check_invariants(&out.desired, node);
    out
}

/// What every translation must hold, whatever its input: the lists of each entry are sorted and
/// without duplicates, `draining` is disjoint from `slots`, `local_slots` is empty without
/// `SVC_F_ETP_LOCAL` and a subset of `slots` ∪ `draining` with it, exactly one kind flag is set,
/// `NodePort` frontends are on node addresses, and every entry of a Service that lists a backend agrees on its state and locality (the
/// backend map holds one value per address).
fn check_invariants(desired: &Desired, node: &NodeContext) {
    let kinds = [SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT];
    let mut seen: BTreeMap<(ObjectRef, BackendAddr), Backend> = BTreeMap::new();
    for (frontend, entry) in &desired.services {
        assert_eq!(kinds.iter().filter(|&&kind| entry.flags & kind != 0).count(), 1, "{frontend}: kind flags");
        if entry.flags & SVC_F_NODE_PORT != 0 {
            assert!(node.addresses.contains(&frontend.addr), "{frontend}: NodePort off the node's addresses");
        }
        for list in [&entry.slots, &entry.local_slots, &entry.draining] {
            assert!(list.windows(2).all(|w| w[0].addr < w[1].addr), "{frontend}: {list:?} not sorted/unique");
        }
        assert!(entry.draining.iter().all(|d| !entry.slots.contains(d)), "{frontend}: draining overlaps slots");
        if entry.flags & SVC_F_ETP_LOCAL == 0 {
            assert!(entry.local_slots.is_empty(), "{frontend}: local_slots without ETP Local");
        }
        if entry.flags & SVC_F_SOURCE_RANGE == 0 {
            assert!(entry.source_ranges.is_empty(), "{frontend}: source ranges without the flag");
        } else {
            assert!(entry.flags & SVC_F_LOAD_BALANCER != 0, "{frontend}: source ranges on another kind");
        }
        assert!(entry.source_ranges.windows(2).all(|w| w[0] < w[1]), "{frontend}: source ranges not sorted/unique");
        for backend in &entry.local_slots {
            assert!(backend.local, "{frontend}: remote backend in local_slots");
            assert!(entry.slots.contains(backend) || entry.draining.contains(backend), "{frontend}: {backend:?}");
        }
        for backend in entry.slots.iter().chain(&entry.draining) {
            let first = *seen.entry((entry.service.clone(), backend.addr)).or_insert(*backend);
            assert_eq!(first, *backend, "{frontend}: backend listed with two states");
        }
    }
}

// --- more builders (frontend kinds) -------------------------------------------------------

fn typed(ty: &str, svc: Service) -> Service {
    with_spec(svc, |spec| spec.type_ = Some(ty.to_owned()))
}

fn with_node_port(mut port: ServicePort, node_port: i32) -> ServicePort {
    port.node_port = Some(node_port);
    port
}

fn with_ingress(mut svc: Service, ingress: Vec<LoadBalancerIngress>) -> Service {
    let load_balancer = Some(LoadBalancerStatus { ingress: Some(ingress) });
    svc.status = Some(ServiceStatus { load_balancer, ..ServiceStatus::default() });
    svc
}

fn ingress(ip: &str, ip_mode: Option<&str>) -> LoadBalancerIngress {
    LoadBalancerIngress {
        ip: Some(ip.to_owned()),
        ip_mode: ip_mode.map(str::to_owned),
        ..LoadBalancerIngress::default()
    }
}

fn external_ips(svc: Service, ips: &[&str]) -> Service {
    with_spec(svc, |spec| spec.external_ips = Some(ips.iter().map(|&ip| ip.to_owned()).collect()))
}

/// A `NodePort` frontend on [`NODE_IP`].
fn np(node_port: u16, proto: Protocol) -> Frontend {
    Frontend { addr: NODE_IP.into(), port: node_port, proto }
}

/// The frontends of a translation with their flags.
fn flags_of(out: &Translation) -> BTreeMap<Frontend, u16> {
    out.desired.services.iter().map(|(frontend, entry)| (*frontend, entry.flags)).collect()
}

// --- endpoints ----------------------------------------------------------------------------

#[test]
fn slices_of_a_service_are_merged_without_duplicates() {
    let out = run(
        vec![service("web", "10.96.0.10", vec![port("http", 80, "TCP")])],
        vec![
            slice("web-a", "web", &[("http", 8080, "TCP")], vec![ep_on("10.0.0.2", "node-b"), ep_on("10.0.0.1", NODE)]),
            slice("web-b", "web", &[("http", 8080, "TCP")], vec![ep_on("10.0.0.2", "node-b"), ep("10.0.0.3")]),
        ],
    );
    let slots = vec![
        local(be("10.0.0.1", 8080, Tcp, Active)),
        be("10.0.0.2", 8080, Tcp, Active),
        be("10.0.0.3", 8080, Tcp, Active),
    ];
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "http", slots, vec![]))]));
}

/// (case, publishNotReadyAddresses, endpoints, expected slots, expected draining)
type Case = (&'static str, bool, Vec<Endpoint>, Vec<Backend>, Vec<Backend>);

#[test]
fn endpoint_conditions_select_slots_and_draining() {
    let (t, f) = (Some(true), Some(false));
    let cases: Vec<Case> = vec![
        ("unset conditions are ready", false, vec![ep("10.0.0.1")], vec![be("10.0.0.1", 80, Tcp, Active)], vec![]),
        (
            "not-ready endpoints are excluded",
            false,
            vec![ep_cond("10.0.0.1", t, t, f), ep_cond("10.0.0.2", f, f, f), ep_cond("10.0.0.3", f, t, f)],
            vec![be("10.0.0.1", 80, Tcp, Active)],
            vec![],
        ),
        (
            "terminating endpoints drain while ready ones exist",
            false,
            vec![ep_cond("10.0.0.3", f, f, t), ep_cond("10.0.0.1", t, t, f), ep_cond("10.0.0.2", f, t, t)],
            vec![be("10.0.0.1", 80, Tcp, Active)],
            vec![be("10.0.0.2", 80, Tcp, Terminating), be("10.0.0.3", 80, Tcp, Terminating)],
        ),
        (
            "no ready endpoint: serving+terminating ones take new connections",
            false,
            vec![ep_cond("10.0.0.1", f, t, t), ep_cond("10.0.0.2", f, f, t), ep_cond("10.0.0.3", f, f, f)],
            vec![be("10.0.0.1", 80, Tcp, Terminating)],
            vec![be("10.0.0.2", 80, Tcp, Terminating)],
        ),
        ("nothing usable", false, vec![ep_cond("10.0.0.1", f, f, f)], vec![], vec![]),
        (
            "serving unset means true",
            false,
            vec![ep_cond("10.0.0.1", f, None, t)],
            vec![be("10.0.0.1", 80, Tcp, Terminating)],
            vec![],
        ),
        (
            "publishNotReadyAddresses: every endpoint is active",
            true,
            vec![ep_cond("10.0.0.1", f, f, f), ep_cond("10.0.0.2", f, t, t), ep("10.0.0.3")],
            vec![be("10.0.0.1", 80, Tcp, Active), be("10.0.0.2", 80, Tcp, Active), be("10.0.0.3", 80, Tcp, Active)],
            vec![],
        ),
        (
            "a duplicate keeps its most available copy",
            false,
            vec![ep_cond("10.0.0.1", f, t, t), ep_cond("10.0.0.1", t, t, f)],
            vec![be("10.0.0.1", 80, Tcp, Active)],
            vec![],
        ),
    ];
    for (case, publish, endpoints, slots, draining) in cases {
        let svc = with_spec(service("web", "10.96.0.10", vec![port("", 80, "TCP")]), |spec| {
            spec.publish_not_ready_addresses = Some(publish);
        });
        let out = run(vec![svc], vec![slice("web-a", "web", &[("", 80, "TCP")], endpoints)]);
        let expected = desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", slots, draining))]);
        assert_eq!(out.desired, expected, "{case}");
        assert_eq!(out.problems, vec![], "{case}");
    }
}

#[test]
fn multiple_ports_and_the_same_port_on_tcp_and_udp() {
    let out = run(
        vec![service(
            "kube-system/dns",
            "10.96.0.10",
            vec![port("dns", 53, "UDP"), port("dns-tcp", 53, "TCP"), port("metrics", 9153, "TCP")],
        )],
        vec![slice(
            "kube-system/dns-x",
            "dns",
            &[("metrics", 9153, "TCP"), ("dns-tcp", 5353, "TCP"), ("dns", 5353, "UDP")],
            vec![ep("10.0.0.1")],
        )],
    );
    let expected = desired(vec![
        (fe("10.96.0.10", 53, Udp), entry("kube-system/dns", "dns", vec![be("10.0.0.1", 5353, Udp, Active)], vec![])),
        (
            fe("10.96.0.10", 53, Tcp),
            entry("kube-system/dns", "dns-tcp", vec![be("10.0.0.1", 5353, Tcp, Active)], vec![]),
        ),
        (
            fe("10.96.0.10", 9153, Tcp),
            entry("kube-system/dns", "metrics", vec![be("10.0.0.1", 9153, Tcp, Active)], vec![]),
        ),
    ]);
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, expected);
}

#[test]
fn named_target_port_is_resolved_per_slice() {
    // During a rollout the same port name maps to different numbers in two slices; a slice
    // without the port (or with it under another protocol) contributes nothing.
    let out = run(
        vec![service("web", "10.96.0.10", vec![port("http", 80, "TCP")])],
        vec![
            slice("web-old", "web", &[("http", 8080, "TCP")], vec![ep("10.0.0.1")]),
            slice("web-new", "web", &[("http", 9090, "TCP")], vec![ep("10.0.0.2")]),
            slice("web-other", "web", &[("admin", 7000, "TCP"), ("http", 7001, "UDP")], vec![ep("10.0.0.3")]),
        ],
    );
    let slots = vec![be("10.0.0.1", 8080, Tcp, Active), be("10.0.0.2", 9090, Tcp, Active)];
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "http", slots, vec![]))]));
}

#[test]
fn unnamed_port_matches_unnamed_or_empty_slice_port() {
    let mut unnamed = slice("web-b", "web", &[("", 8081, "TCP")], vec![ep("10.0.0.2")]);
    if let Some(ports) = unnamed.ports.as_mut() {
        ports[0].name = None;
        ports[0].protocol = None; // TCP
    }
    let out = run(
        vec![with_spec(service("web", "10.96.0.10", vec![port("", 80, "TCP")]), |spec| {
            if let Some(ports) = spec.ports.as_mut() {
                ports[0].protocol = None; // TCP
            }
        })],
        vec![slice("web-a", "web", &[("", 8080, "TCP")], vec![ep("10.0.0.1")]), unnamed],
    );
    let slots = vec![be("10.0.0.1", 8080, Tcp, Active), be("10.0.0.2", 8081, Tcp, Active)];
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", slots, vec![]))]));
}

#[test]
fn service_without_endpoints_still_has_its_frontend() {
    let out = run(vec![service("web", "10.96.0.10", vec![port("", 80, "TCP")])], vec![]);
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", vec![], vec![]))]));
}

// --- services -----------------------------------------------------------------------------

#[test]
fn malformed_objects_are_reported_and_the_rest_translated() {
    let mut nameless = service("team/x", "10.96.0.3", vec![port("", 80, "TCP")]);
    nameless.metadata.name = None;
    let mut node_port = port("np", 82, "TCP");
    node_port.node_port = Some(70_000);
    let mut unlabeled = slice("orphan", "good", &[("", 80, "TCP")], vec![ep("10.0.0.9")]);
    unlabeled.metadata.labels = None;
    let services = vec![
        service("good", "10.96.0.1", vec![port("", 80, "TCP")]),
        service("bad-ip", "10.96.0.300", vec![port("", 80, "TCP")]),
        service(
            "ports",
            "10.96.0.2",
            vec![
                port("zero", 0, "TCP"),
                port("big", 70_000, "TCP"),
                port("weird", 81, "FOO"),
                node_port,
                port("ok", 83, "TCP"),
                port("dup", 83, "TCP"),
            ],
        ),
        nameless,
    ];
    let slices = vec![
        slice(
            "good-a",
            "good",
            &[("", 80, "TCP"), ("extra", 0, "TCP")],
            vec![ep("10.0.0.1"), ep("10.0.0.x"), Endpoint::default()],
        ),
        unlabeled,
        slice("ghost-a", "ghost", &[("", 80, "TCP")], vec![ep("10.0.0.8")]),
    ];
    let out = run(services, slices);
    let expected = desired(vec![
        (fe("10.96.0.1", 80, Tcp), entry("default/good", "", vec![be("10.0.0.1", 80, Tcp, Active)], vec![])),
        (fe("10.96.0.2", 83, Tcp), entry("default/ports", "ok", vec![], vec![])),
    ]);
    assert_eq!(out.desired, expected);
    let problems = vec![
        Problem {
            transient: true,
            ..prob("EndpointSlice", "default/ghost-a", "no Service default/ghost for this slice")
        },
        prob("EndpointSlice", "default/good-a", "endpoint without address; ignored"),
        prob("EndpointSlice", "default/good-a", "invalid endpoint address \"10.0.0.x\""),
        prob("EndpointSlice", "default/good-a", "port \"extra\": invalid port number 0; ignored"),
        prob("EndpointSlice", "default/orphan", "missing label kubernetes.io/service-name"),
        prob("Service", "default/bad-ip", "invalid clusterIP \"10.96.0.300\""),
        prob("Service", "default/ports", "port 0/TCP: port 0 is out of range 1-65535"),
        prob("Service", "default/ports", "port 70000/TCP: port 70000 is out of range 1-65535"),
        prob("Service", "default/ports", "port 81/FOO: unknown protocol \"FOO\""),
        prob("Service", "default/ports", "port 82/TCP: nodePort 70000 is out of range 1-65535"),
        prob("Service", "default/ports", "port 83/TCP: duplicate of an earlier port; ignored"),
        prob("Service", "team/(no name)", "missing metadata.name"),
    ];
    assert_eq!(out.problems, problems);
}

#[test]
fn external_name_headless_and_ip_less_services_are_ignored_silently() {
    let external = with_spec(service("ext", "", vec![port("", 80, "TCP")]), |spec| {
        spec.type_ = Some("ExternalName".to_owned());
        spec.cluster_ip = None;
        spec.external_name = Some("example.com".to_owned());
    });
    let headless = with_spec(service("headless", "None", vec![port("", 80, "TCP")]), |spec| {
        spec.cluster_ips = Some(vec!["None".to_owned()]);
    });
    let no_ip = with_spec(service("no-ip", "", vec![port("", 80, "TCP")]), |spec| spec.cluster_ip = None);
    let slices = ["ext", "headless", "no-ip"]
        .iter()
        .map(|name| slice(&format!("{name}-a"), name, &[("", 80, "TCP")], vec![ep("10.0.0.1")]))
        .collect();
    let out = run(vec![external, headless, no_ip], slices);
    assert_eq!(out, Translation::default());
}

#[test]
fn service_types_and_sloppy_cluster_ip() {
    let node_port = with_spec(service("np", "10.96.0.1", vec![port("", 80, "TCP")]), |spec| {
        spec.type_ = Some("NodePort".to_owned());
    });
    let load_balancer = with_spec(service("lb", "010.096.000.002", vec![port("", 80, "TCP")]), |spec| {
        spec.type_ = Some("LoadBalancer".to_owned());
    });
    let out = run(vec![node_port, load_balancer], vec![]);
    let expected = desired(vec![
        (fe("10.96.0.1", 80, Tcp), entry("default/np", "", vec![], vec![])),
        (fe("10.96.0.2", 80, Tcp), entry("default/lb", "", vec![], vec![])),
    ]);
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, expected);
}

/// Dual-stack: each family's frontends get that family's endpoints (a slice's addressType);
/// an IPv6-only Service works like an IPv4 one; an address of the wrong family in a slice is
/// reported; FQDN slices are ignored.
#[test]
fn dual_stack_frontends_get_the_endpoints_of_their_family() {
    let dual = with_spec(service("dual", "10.96.0.5", vec![port("", 80, "TCP")]), |spec| {
        spec.cluster_ips = Some(vec!["10.96.0.5".to_owned(), "fd00::5".to_owned()]);
    });
    let v6_only = service("v6", "fd00::6", vec![port("", 80, "TCP")]);
    let mut v6_slice = slice("dual-v6", "dual", &[("", 80, "TCP")], vec![ep("fd00:1::1")]);
    v6_slice.address_type = "IPv6".to_owned();
    let mut fqdn_slice = slice("dual-fqdn", "dual", &[("", 80, "TCP")], vec![ep("example.com")]);
    fqdn_slice.address_type = "FQDN".to_owned();
    let v4_slice = slice("dual-v4", "dual", &[("", 80, "TCP")], vec![ep("10.0.0.1"), ep("fd00:1::2")]);
    let mut v6_only_slice = slice("v6-a", "v6", &[("", 8080, "TCP")], vec![ep("fd00:1::3")]);
    v6_only_slice.address_type = "IPv6".to_owned();
    let out = run(vec![dual, v6_only], vec![v6_slice, fqdn_slice, v4_slice, v6_only_slice]);
    let expected = desired(vec![
        (fe("10.96.0.5", 80, Tcp), entry("default/dual", "", vec![be("10.0.0.1", 80, Tcp, Active)], vec![])),
        (fe("fd00::5", 80, Tcp), entry("default/dual", "", vec![be("fd00:1::1", 80, Tcp, Active)], vec![])),
        (fe("fd00::6", 80, Tcp), entry("default/v6", "", vec![be("fd00:1::3", 8080, Tcp, Active)], vec![])),
    ]);
    assert_eq!(out.desired, expected);
    let problems =
        vec![prob("EndpointSlice", "default/dual-v4", "endpoint fd00:1::2: not of the slice's addressType IPv4")];
    assert_eq!(out.problems, problems);
}

#[test]
fn sctp_is_refused_for_its_port_only() {
    let out = run(
        vec![service("mixed", "10.96.0.7", vec![port("sig", 9000, "SCTP"), port("http", 80, "TCP")])],
        vec![slice("mixed-a", "mixed", &[("sig", 9000, "SCTP"), ("http", 8080, "TCP")], vec![ep("10.0.0.1")])],
    );
    let expected = desired(vec![(
        fe("10.96.0.7", 80, Tcp),
        entry("default/mixed", "http", vec![be("10.0.0.1", 8080, Tcp, Active)], vec![]),
    )]);
    assert_eq!(out.desired, expected);
    assert_eq!(
        out.problems,
        vec![prob("Service", "default/mixed", "port 9000/SCTP: SCTP is not supported by the datapath")]
    );
}

#[test]
fn frontend_conflict_goes_to_the_first_namespace_name() {
    let out = run(
        vec![
            service("b/api", "10.96.0.9", vec![port("", 80, "TCP"), port("alt", 81, "TCP")]),
            service("a/api", "10.96.0.9", vec![port("", 80, "TCP")]),
        ],
        vec![],
    );
    let expected = desired(vec![
        (fe("10.96.0.9", 80, Tcp), entry("a/api", "", vec![], vec![])),
        (fe("10.96.0.9", 81, Tcp), entry("b/api", "alt", vec![], vec![])),
    ]);
    assert_eq!(out.desired, expected);
    let reason = "frontend 10.96.0.9:80/TCP is already used by Service a/api; ignored";
    assert_eq!(out.problems, vec![prob("Service", "b/api", reason)]);
}

#[test]
fn duplicate_definitions_of_one_service() {
    let svc = service("web", "10.96.0.10", vec![port("", 80, "TCP")]);
    let out = run(vec![svc.clone(), svc.clone()], vec![]);
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", vec![], vec![]))]));

    let other = service("web", "10.96.0.11", vec![port("", 80, "TCP")]);
    let out = run(vec![svc, other], vec![slice("web-a", "web", &[("", 80, "TCP")], vec![ep("10.0.0.1")])]);
    assert_eq!(out.desired, Desired::default());
    let reason = "defined more than once with different content; all definitions ignored";
    assert_eq!(out.problems, vec![prob("Service", "default/web", reason)]);
}

#[test]
fn affinity_and_traffic_policy_flags() {
    let client_ip = |timeout: Option<i32>| {
        move |spec: &mut ServiceSpec| {
            spec.session_affinity = Some("ClientIP".to_owned());
            spec.session_affinity_config = timeout.map(|timeout_seconds| SessionAffinityConfig {
                client_ip: Some(ClientIPConfig { timeout_seconds: Some(timeout_seconds) }),
            });
        }
    };
    let services = vec![
        with_spec(service("default-timeout", "10.96.0.1", vec![port("", 80, "TCP")]), client_ip(None)),
        with_spec(service("short", "10.96.0.2", vec![port("", 80, "TCP")]), client_ip(Some(60))),
        with_spec(service("bad-timeout", "10.96.0.3", vec![port("", 80, "TCP")]), client_ip(Some(0))),
        with_spec(service("local", "10.96.0.4", vec![port("", 80, "TCP")]), |spec| {
            spec.internal_traffic_policy = Some("Local".to_owned());
        }),
    ];
    let out = run(services, vec![]);
    let with_flags = |name: &str, flags: u16, affinity_timeout: u32| ServiceEntry {
        flags,
        affinity_timeout,
        ..entry(name, "", vec![], vec![])
    };
    let affinity = SVC_F_CLUSTER_IP | SVC_F_AFFINITY;
    let expected = desired(vec![
        (fe("10.96.0.1", 80, Tcp), with_flags("default/default-timeout", affinity, DEFAULT_AFFINITY_TIMEOUT)),
        (fe("10.96.0.2", 80, Tcp), with_flags("default/short", affinity, 60)),
        (fe("10.96.0.3", 80, Tcp), with_flags("default/bad-timeout", affinity, DEFAULT_AFFINITY_TIMEOUT)),
        (fe("10.96.0.4", 80, Tcp), with_flags("default/local", SVC_F_CLUSTER_IP | SVC_F_ITP_LOCAL, 0)),
    ]);
    assert_eq!(out.desired, expected);
    let reason = "sessionAffinityConfig.clientIP.timeoutSeconds 0 is out of range 1-86400; using 10800";
    assert_eq!(out.problems, vec![prob("Service", "default/bad-timeout", reason)]);
}

#[test]
fn output_does_not_depend_on_input_order() {
    let (mut services, mut slices) = mixed_objects();
    services.extend([
        service("b/api", "10.96.0.9", vec![port("", 80, "TCP")]),
        service("a/api", "10.96.0.9", vec![port("", 80, "TCP")]),
        service("bad", "nope", vec![port("", 80, "TCP")]),
        // Claims the NodePort of `np` and the external IP of `shop/lb` under other kinds.
        typed("NodePort", service("c/np", "192.0.2.1", vec![with_node_port(port("", 80, "TCP"), 30081)])),
    ]);
    slices.extend([
        slice("a/api-a", "api", &[("", 80, "TCP")], vec![ep("10.0.1.1"), ep("10.0.1.2")]),
        slice("ghost-a", "ghost", &[("", 80, "TCP")], vec![ep("10.0.0.5")]),
    ]);
    let reference = run(services.clone(), slices.clone());
    assert!(reference.desired.services.len() > 10 && !reference.desired.health_checks.is_empty());
    let lost_to_c_np = reference.problems.iter().filter(|p| p.reason.contains("already used by Service c/np")).count();
    assert_eq!(lost_to_c_np, 2, "{:?}", reference.problems);
    for rotation in 0..services.len() {
        let mut services = services.clone();
        let mut slices = slices.clone();
        services.rotate_left(rotation);
        slices.reverse();
        let shift = rotation % slices.len();
        slices.rotate_left(shift);
        for slice in &mut slices {
            if let Some(endpoints) = slice.endpoints.as_mut() {
                endpoints.reverse();
            }
        }
        assert_eq!(run(services, slices), reference, "rotation {rotation}");
    }
}

#[test]
fn sloppy_ip_parsing() {
    assert_eq!(parse_ip("10.96.0.1"), Some(IpAddr::from([10, 96, 0, 1])));
    assert_eq!(parse_ip("010.096.000.001"), Some(IpAddr::from([10, 96, 0, 1])));
    assert_eq!(parse_ip("fd00::1"), Some("fd00::1".parse().unwrap()));
    for bad in ["", "10.96.0", "10.96.0.1.2", "10.96.0.256", "10.96.+1.1", "10..0.1", "None"] {
        assert_eq!(parse_ip(bad), None, "{bad:?}");
    }
}

// --- frontend kinds -------------------------------------------------------------------------

#[test]
fn every_frontend_kind_with_its_flags_and_backends() {
    let ports = vec![with_node_port(port("http", 80, "TCP"), 30080), with_node_port(port("dns", 53, "UDP"), 30053)];
    let svc = with_ingress(
        external_ips(
            typed("LoadBalancer", service("shop/web", "10.96.0.10", ports)),
            &["192.0.2.11", "192.0.2.10", "192.0.2.11"],
        ),
        vec![ingress("198.51.100.10", None), ingress("198.51.100.11", Some("VIP"))],
    );
    let slices = vec![slice(
        "shop/web-a",
        "web",
        &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
        vec![ep_on("10.0.0.1", NODE), ep("10.0.0.2")],
    )];
    let out = run(vec![svc], slices);
    assert_eq!(out.problems, vec![]);

    let http = vec![local(be("10.0.0.1", 8080, Tcp, Active)), be("10.0.0.2", 8080, Tcp, Active)];
    let dns = vec![local(be("10.0.0.1", 5353, Udp, Active)), be("10.0.0.2", 5353, Udp, Active)];
    let with_flags = |flags, name: &str, slots: &[Backend]| ServiceEntry {
        flags,
        ..entry("shop/web", name, slots.to_vec(), vec![])
    };
    let mut expected = Vec::new();
    for (addr, flags) in [
        ("10.96.0.10", SVC_F_CLUSTER_IP),
        ("192.0.2.10", SVC_F_EXTERNAL_IP),
        ("192.0.2.11", SVC_F_EXTERNAL_IP),
        ("198.51.100.10", SVC_F_LOAD_BALANCER),
        ("198.51.100.11", SVC_F_LOAD_BALANCER),
    ] {
        expected.push((fe(addr, 80, Tcp), with_flags(flags, "http", &http)));
        expected.push((fe(addr, 53, Udp), with_flags(flags, "dns", &dns)));
    }
    expected.push((np(30080, Tcp), with_flags(SVC_F_NODE_PORT, "http", &http)));
    expected.push((np(30053, Udp), with_flags(SVC_F_NODE_PORT, "dns", &dns)));
    assert_eq!(out.desired, desired(expected));
    assert_eq!(np(30080, Tcp).to_string(), "172.18.0.2:30080/TCP");
}

/// The `web` Service as the API server leaves it after a change to type `ty`: `ExternalName`
/// has no cluster IP, `ClusterIP` no node ports, only `LoadBalancer` an ingress status.
fn web_as(ty: &str) -> Service {
    let ports = |node_ports: bool| {
        let (http, dns) = (port("http", 80, "TCP"), port("dns", 53, "UDP"));
        if node_ports { vec![with_node_port(http, 30080), with_node_port(dns, 30053)] } else { vec![http, dns] }
    };
    let with_ips = |ty: &str, node_ports: bool| {
        external_ips(typed(ty, service("web", "10.96.0.10", ports(node_ports))), &["192.0.2.10"])
    };
    match ty {
        "ExternalName" => with_spec(typed(ty, service("web", "", ports(false))), |spec| {
            spec.cluster_ip = None;
            spec.external_name = Some("web.example.com".to_owned());
        }),
        "ClusterIP" => with_ips(ty, false),
        "NodePort" => with_ips(ty, true),
        "LoadBalancer" => with_ingress(with_ips(ty, true), vec![ingress("198.51.100.10", None)]),
        other => panic!("no such type in this test: {other}"),
    }
}

/// `loadBalancerSourceRanges` go to the ingress IPs only (as kube-proxy's firewall applies
/// them), each ingress IP those of its family, with host bits cleared, sorted and deduplicated;
/// a malformed one is reported. Ranges holding no valid CIDR of an ingress IP's family close
/// that ingress IP (fail closed), and ranges on a Service that is not a `LoadBalancer` are
/// reported and ignored.
#[test]
fn load_balancer_source_ranges_restrict_the_ingress_ips_only() {
    let with_ranges = |ty: &str, ranges: &[&str]| {
        with_spec(web_as(ty), |spec| {
            spec.load_balancer_source_ranges = Some(ranges.iter().map(|r| (*r).to_owned()).collect());
        })
    };
    let lb = fe("198.51.100.10", 80, Tcp);
    let ranges = ["10.0.0.0/8", " 192.168.1.7/24", "fd00::/8", "bogus", "10.0.0.0/8"];
    let out = run(vec![with_ranges("LoadBalancer", &ranges)], vec![]);
    let nets: Vec<IpNet> = ["10.0.0.0/8", "192.168.1.0/24"].iter().map(|n| n.parse().unwrap()).collect();
    for (frontend, entry) in &out.desired.services {
        if frontend.addr == lb.addr {
            assert!(entry.flags & SVC_F_SOURCE_RANGE != 0, "{frontend}");
            assert_eq!(entry.source_ranges, nets, "{frontend}");
        } else {
            assert_eq!((entry.flags & SVC_F_SOURCE_RANGE, entry.source_ranges.len()), (0, 0), "{frontend}");
        }
    }
    assert_eq!(out.problems.len(), 1, "{:?}", out.problems);
    assert!(out.problems[0].reason.contains("\"bogus\""), "{:?}", out.problems);

    let closed = run(vec![with_ranges("LoadBalancer", &["fd00::/8"])], vec![]);
    let entry = &closed.desired.services[&lb];
    assert!(entry.flags & SVC_F_SOURCE_RANGE != 0 && entry.source_ranges.is_empty());
    assert!(closed.problems[0].reason.contains("no valid IPv4 range"), "{:?}", closed.problems);

    // Dual-stack ingress: each family's ingress IP gets its family's ranges.
    let dual = with_ingress(
        with_ranges("LoadBalancer", &ranges),
        vec![ingress("198.51.100.10", None), ingress("2001:db8::10", None)],
    );
    let out = run(vec![dual], vec![]);
    let v6 = &out.desired.services[&fe("2001:db8::10", 80, Tcp)];
    assert!(v6.flags & SVC_F_SOURCE_RANGE != 0, "{v6:?}");
    assert_eq!(v6.source_ranges, vec!["fd00::/8".parse::<IpNet>().unwrap()]);
    assert_eq!(out.desired.services[&lb].source_ranges, nets);

    let node_port = run(vec![with_ranges("NodePort", &["10.0.0.0/8"])], vec![]);
    assert!(node_port.desired.services.values().all(|e| e.flags & SVC_F_SOURCE_RANGE == 0));
    assert!(node_port.problems[0].reason.contains("not a LoadBalancer"), "{:?}", node_port.problems);
}

/// (type before, type after, frontend groups added, frontend groups removed)
type TypeChange = (&'static str, &'static str, Vec<[Frontend; 2]>, Vec<[Frontend; 2]>);

#[test]
fn service_type_changes_add_and_remove_exactly_the_right_frontends() {
    let cluster = [fe("10.96.0.10", 80, Tcp), fe("10.96.0.10", 53, Udp)];
    let external = [fe("192.0.2.10", 80, Tcp), fe("192.0.2.10", 53, Udp)];
    let node_ports = [np(30080, Tcp), np(30053, Udp)];
    let lb = [fe("198.51.100.10", 80, Tcp), fe("198.51.100.10", 53, Udp)];
    let all = [cluster, external, node_ports, lb];
    let cases: Vec<TypeChange> = vec![
        ("ExternalName", "ClusterIP", vec![cluster, external], vec![]),
        ("ClusterIP", "ExternalName", vec![], vec![cluster, external]),
        ("ClusterIP", "NodePort", vec![node_ports], vec![]),
        ("NodePort", "ClusterIP", vec![], vec![node_ports]),
        ("NodePort", "LoadBalancer", vec![lb], vec![]),
        ("LoadBalancer", "NodePort", vec![], vec![lb]),
        ("ClusterIP", "LoadBalancer", vec![node_ports, lb], vec![]),
        ("LoadBalancer", "ClusterIP", vec![], vec![node_ports, lb]),
        ("ExternalName", "NodePort", vec![cluster, external, node_ports], vec![]),
        ("NodePort", "ExternalName", vec![], vec![cluster, external, node_ports]),
        ("ExternalName", "LoadBalancer", all.to_vec(), vec![]),
        ("LoadBalancer", "ExternalName", vec![], all.to_vec()),
    ];
    let slices = || vec![slice("web-a", "web", &[("http", 8080, "TCP"), ("dns", 5353, "UDP")], vec![ep("10.0.0.1")])];
    for (before_type, after_type, added, removed) in cases {
        let case = format!("{before_type} -> {after_type}");
        let before = run(vec![web_as(before_type)], slices());
        let after = run(vec![web_as(after_type)], slices());
        assert_eq!((&before.problems, &after.problems), (&vec![], &vec![]), "{case}");
        let (old, new) = (&before.desired.services, &after.desired.services);
        let got_added: BTreeSet<Frontend> = new.keys().filter(|fe| !old.contains_key(fe)).copied().collect();
        let got_removed: BTreeSet<Frontend> = old.keys().filter(|fe| !new.contains_key(fe)).copied().collect();
        assert_eq!(got_added, added.concat().into_iter().collect(), "{case}: added");
        assert_eq!(got_removed, removed.concat().into_iter().collect(), "{case}: removed");
        for (frontend, entry) in old.iter().filter(|(fe, _)| new.contains_key(fe)) {
            assert_eq!(Some(entry), new.get(frontend), "{case}: kept frontend {frontend} changed");
        }
    }
}

#[test]
fn unknown_service_type_is_reported() {
    let out = run(vec![typed("Weird", service("web", "10.96.0.10", vec![port("", 80, "TCP")]))], vec![]);
    assert_eq!(out.desired, Desired::default());
    assert_eq!(out.problems, vec![prob("Service", "default/web", "unknown type \"Weird\"")]);
}

/// (case, ingress, expected `LoadBalancer` frontend addresses, expected problem reasons)
type IngressCase = (&'static str, Vec<LoadBalancerIngress>, Vec<&'static str>, Vec<&'static str>);

#[test]
fn load_balancer_ingress_by_ip_mode() {
    let hostname_only = LoadBalancerIngress { hostname: Some("lb.example.com".to_owned()), ..Default::default() };
    let cases: Vec<IngressCase> = vec![
        ("unset ipMode is VIP", vec![ingress("198.51.100.1", None)], vec!["198.51.100.1"], vec![]),
        ("VIP", vec![ingress("198.51.100.1", Some("VIP"))], vec!["198.51.100.1"], vec![]),
        ("Proxy is left to the load balancer", vec![ingress("198.51.100.1", Some("Proxy"))], vec![], vec![]),
        (
            "unknown ipMode is reported and used as VIP",
            vec![ingress("198.51.100.1", Some("Router"))],
            vec!["198.51.100.1"],
            vec!["loadBalancer ingress 198.51.100.1: unknown ipMode \"Router\"; using VIP"],
        ),
        ("hostname-only ingress is ignored", vec![hostname_only], vec![], vec![]),
        (
            "dual-stack: both families",
            vec![ingress("2001:db8::1", None), ingress("198.51.100.1", Some("VIP"))],
            vec!["198.51.100.1", "2001:db8::1"],
            vec![],
        ),
        ("IPv6 Proxy ingress is skipped silently", vec![ingress("2001:db8::1", Some("Proxy"))], vec![], vec![]),
        (
            "invalid and unspecified addresses are reported, duplicates merged",
            vec![
                ingress("nope", None),
                ingress("0.0.0.0", None),
                ingress("198.51.100.2", None),
                ingress("198.51.100.2", Some("VIP")),
            ],
            vec!["198.51.100.2"],
            vec![
                "invalid loadBalancer ingress IP \"nope\"",
                "loadBalancer ingress IP 0.0.0.0: the unspecified address cannot be a Service address",
            ],
        ),
    ];
    for (case, ingress_list, addrs, reasons) in cases {
        let svc =
            with_ingress(typed("LoadBalancer", service("lb", "10.96.0.1", vec![port("", 80, "TCP")])), ingress_list);
        let out = run(vec![svc], vec![]);
        let mut expected: BTreeMap<Frontend, u16> =
            addrs.iter().map(|a| (fe(a, 80, Tcp), SVC_F_LOAD_BALANCER)).collect();
        expected.insert(fe("10.96.0.1", 80, Tcp), SVC_F_CLUSTER_IP);
        assert_eq!(flags_of(&out), expected, "{case}");
        let problems: Vec<Problem> = reasons.iter().map(|r| prob("Service", "default/lb", r)).collect();
        assert_eq!(out.problems, problems, "{case}");
    }

    // Only a LoadBalancer's status counts (the API server clears it on a type change anyway).
    for ty in ["ClusterIP", "NodePort"] {
        let svc = with_ingress(
            typed(ty, service("np", "10.96.0.2", vec![port("", 80, "TCP")])),
            vec![ingress("198.51.100.3", None)],
        );
        let out = run(vec![svc], vec![]);
        assert_eq!(flags_of(&out), [(fe("10.96.0.2", 80, Tcp), SVC_F_CLUSTER_IP)].into(), "{ty}");
        assert_eq!(out.problems, vec![], "{ty}");
    }
}

#[test]
fn external_ips_on_every_type_with_a_cluster_ip() {
    let raw = ["192.0.2.2", "192.0.2.1", "192.0.2.1", "2001:db8::2", "192.0.2.x", "0.0.0.0", "010.000.002.003"];
    for ty in ["ClusterIP", "NodePort", "LoadBalancer"] {
        let svc = external_ips(typed(ty, service("web", "10.96.0.10", vec![port("", 80, "TCP")])), &raw);
        let out = run(vec![svc], vec![]);
        let expected: BTreeMap<Frontend, u16> = [
            (fe("10.96.0.10", 80, Tcp), SVC_F_CLUSTER_IP),
            (fe("10.0.2.3", 80, Tcp), SVC_F_EXTERNAL_IP),
            (fe("192.0.2.1", 80, Tcp), SVC_F_EXTERNAL_IP),
            (fe("192.0.2.2", 80, Tcp), SVC_F_EXTERNAL_IP),
            (fe("2001:db8::2", 80, Tcp), SVC_F_EXTERNAL_IP),
        ]
        .into();
        assert_eq!(flags_of(&out), expected, "{ty}");
        let problems = vec![
            prob("Service", "default/web", "externalIP 0.0.0.0: the unspecified address cannot be a Service address"),
            prob("Service", "default/web", "invalid externalIP \"192.0.2.x\""),
        ];
        assert_eq!(out.problems, problems, "{ty}");
    }

    // Like kube-proxy, a headless Service gets no frontend at all, externalIPs included.
    let headless = external_ips(service("headless", "None", vec![port("", 80, "TCP")]), &["192.0.2.1"]);
    assert_eq!(run(vec![headless], vec![]), Translation::default());
}

#[test]
fn node_ports() {
    let cluster_ip = service("plain", "10.96.0.1", vec![with_node_port(port("http", 80, "TCP"), 30080)]);
    // allocateLoadBalancerNodePorts: false leaves nodePort unset (or 0).
    let no_node_ports = with_spec(
        typed(
            "LoadBalancer",
            service("lb", "10.96.0.2", vec![port("http", 80, "TCP"), with_node_port(port("alt", 81, "TCP"), 0)]),
        ),
        |spec| spec.allocate_load_balancer_node_ports = Some(false),
    );
    let first = typed("NodePort", service("a/first", "10.96.0.3", vec![with_node_port(port("", 80, "TCP"), 30090)]));
    let second = typed(
        "NodePort",
        service(
            "b/second",
            "10.96.0.4",
            vec![
                with_node_port(port("tcp", 80, "TCP"), 30090),
                with_node_port(port("udp", 80, "UDP"), 30090),
                with_node_port(port("sig", 9000, "SCTP"), 30091),
            ],
        ),
    );
    let out = run(vec![cluster_ip, no_node_ports, second, first], vec![]);
    let expected: BTreeMap<Frontend, u16> = [
        (fe("10.96.0.1", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.2", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.2", 81, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.3", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.4", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.4", 80, Udp), SVC_F_CLUSTER_IP),
        (np(30090, Tcp), SVC_F_NODE_PORT),
        (np(30090, Udp), SVC_F_NODE_PORT),
    ]
    .into();
    assert_eq!(flags_of(&out), expected);
    assert_eq!(out.desired.services[&np(30090, Tcp)].service, objref("a/first"));
    assert_eq!(out.desired.services[&np(30090, Udp)].service, objref("b/second"));
    let problems = vec![
        prob("Service", "b/second", "frontend 172.18.0.2:30090/TCP is already used by Service a/first; ignored"),
        prob("Service", "b/second", "port 9000/SCTP: SCTP is not supported by the datapath"),
        prob(
            "Service",
            "default/plain",
            "port 80/TCP: nodePort 30080 is only used by NodePort and LoadBalancer Services; ignored",
        ),
    ];
    assert_eq!(out.problems, problems);
}

#[test]
fn node_ports_are_served_on_every_node_address_and_without_one_nowhere() {
    let svc = typed(
        "NodePort",
        service("web", "10.96.0.10", vec![with_node_port(port("http", 80, "TCP"), 30080), port("dns", 53, "UDP")]),
    );
    let slices = vec![slice("web-a", "web", &[("http", 8080, "TCP"), ("dns", 5353, "UDP")], vec![ep("10.0.0.1")])];
    let second = Ipv4Addr::new(192, 168, 1, 5);
    let two = NodeContext { name: NODE.to_owned(), addresses: vec![NODE_IP.into(), second.into()], zone: None };
    let out = translate_on(&two, vec![svc.clone()], slices.clone());
    assert_eq!(out.problems, vec![]);
    let http = entry("default/web", "http", vec![be("10.0.0.1", 8080, Tcp, Active)], vec![]);
    let dns = entry("default/web", "dns", vec![be("10.0.0.1", 5353, Udp, Active)], vec![]);
    let node_port = ServiceEntry { flags: SVC_F_NODE_PORT, ..http.clone() };
    let cluster = [(fe("10.96.0.10", 80, Tcp), http), (fe("10.96.0.10", 53, Udp), dns)];
    let mut expected = cluster.to_vec();
    expected.push((np(30080, Tcp), node_port.clone()));
    expected.push((Frontend { addr: second.into(), port: 30080, proto: Tcp }, node_port));
    assert_eq!(out.desired, desired(expected));

    // No node address: no NodePort frontend at all, and nothing to report.
    let out = translate_on(&NodeContext::named(NODE), vec![svc], slices);
    assert_eq!(out.problems, vec![]);
    assert_eq!(out.desired, desired(cluster.to_vec()));
}

#[test]
fn a_node_address_that_is_a_service_address_is_a_frontend_conflict() {
    let node_ip = NODE_IP.to_string();
    // a/ext's externalIP is the node address, on the port that b/np uses as nodePort: a/ext
    // comes first and keeps it.
    let ext = external_ips(service("a/ext", "10.96.0.1", vec![port("", 30080, "TCP")]), &[&node_ip]);
    let node_port = typed("NodePort", service("b/np", "10.96.0.2", vec![with_node_port(port("", 80, "TCP"), 30080)]));
    // z/cip's cluster IP is the node address (a misconfiguration): c/np comes first.
    let cip = service("z/cip", &node_ip, vec![port("", 30081, "UDP")]);
    let other = typed("NodePort", service("c/np", "10.96.0.3", vec![with_node_port(port("", 81, "UDP"), 30081)]));
    let out = run(vec![cip, other, node_port, ext], vec![]);
    let expected: BTreeMap<Frontend, u16> = [
        (fe("10.96.0.1", 30080, Tcp), SVC_F_CLUSTER_IP),
        (np(30080, Tcp), SVC_F_EXTERNAL_IP),
        (fe("10.96.0.2", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.3", 81, Udp), SVC_F_CLUSTER_IP),
        (np(30081, Udp), SVC_F_NODE_PORT),
    ]
    .into();
    assert_eq!(flags_of(&out), expected);
    assert_eq!(out.desired.services[&np(30080, Tcp)].service, objref("a/ext"));
    assert_eq!(out.desired.services[&np(30081, Udp)].service, objref("c/np"));
    let problems = vec![
        prob("Service", "b/np", "frontend 172.18.0.2:30080/TCP is already used by Service a/ext; ignored"),
        prob("Service", "z/cip", "frontend 172.18.0.2:30081/UDP is already used by Service c/np; ignored"),
    ];
    assert_eq!(out.problems, problems);
}

#[test]
fn a_frontend_claimed_twice_across_kinds_goes_to_the_first_claimant() {
    let one = external_ips(service("a/one", "10.96.0.10", vec![port("", 80, "TCP")]), &["10.96.0.20"]);
    let two = service("b/two", "10.96.0.20", vec![port("", 80, "TCP")]);
    // A Service whose externalIP is its own cluster IP keeps the cluster IP frontend.
    let own = external_ips(service("c/own", "10.96.0.30", vec![port("", 80, "TCP")]), &["10.96.0.30"]);
    let out = run(vec![two, own, one], vec![]);
    let expected: BTreeMap<Frontend, u16> = [
        (fe("10.96.0.10", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("10.96.0.20", 80, Tcp), SVC_F_EXTERNAL_IP),
        (fe("10.96.0.30", 80, Tcp), SVC_F_CLUSTER_IP),
    ]
    .into();
    assert_eq!(flags_of(&out), expected);
    assert_eq!(out.desired.services[&fe("10.96.0.20", 80, Tcp)].service, objref("a/one"));
    let problems = vec![
        prob("Service", "b/two", "frontend 10.96.0.20:80/TCP is already used by Service a/one; ignored"),
        prob("Service", "c/own", "frontend 10.96.0.30:80/TCP is already used by Service c/own; ignored"),
    ];
    assert_eq!(out.problems, problems);
}

// --- policies -------------------------------------------------------------------------------

/// (case, spec edit, flags added to the cluster IP frontend, flags added to the external ones,
/// affinity timeout, problem reasons)
type FlagCase = (&'static str, fn(&mut ServiceSpec), u16, u16, u32, Vec<&'static str>);

#[test]
fn policy_and_affinity_flags_per_frontend_kind() {
    let all_kinds = |name: &str, edit: fn(&mut ServiceSpec)| {
        let svc = typed("LoadBalancer", service(name, "10.96.0.10", vec![with_node_port(port("", 80, "TCP"), 30080)]));
        with_spec(with_ingress(external_ips(svc, &["192.0.2.10"]), vec![ingress("198.51.100.10", None)]), edit)
    };
    let cases: Vec<FlagCase> = vec![
        ("defaults", |_| {}, 0, 0, 0, vec![]),
        (
            "ITP Local: cluster IP only",
            |s| s.internal_traffic_policy = Some("Local".to_owned()),
            SVC_F_ITP_LOCAL,
            0,
            0,
            vec![],
        ),
        (
            "ETP Local: external frontends only",
            |s| s.external_traffic_policy = Some("Local".to_owned()),
            0,
            SVC_F_ETP_LOCAL,
            0,
            vec!["no healthCheckNodePort for a LoadBalancer with externalTrafficPolicy Local; no health check served"],
        ),
        (
            "explicit Cluster policies",
            |s| {
                s.external_traffic_policy = Some("Cluster".to_owned());
                s.internal_traffic_policy = Some("Cluster".to_owned());
            },
            0,
            0,
            0,
            vec![],
        ),
        (
            "unknown policies are reported and read as Cluster",
            |s| {
                s.external_traffic_policy = Some("Sideways".to_owned());
                s.internal_traffic_policy = Some("Global".to_owned());
            },
            0,
            0,
            0,
            vec![
                "unknown externalTrafficPolicy \"Sideways\"; using Cluster",
                "unknown internalTrafficPolicy \"Global\"; using Cluster",
            ],
        ),
        (
            "ClientIP affinity on every frontend",
            |s| {
                s.session_affinity = Some("ClientIP".to_owned());
                s.session_affinity_config =
                    Some(SessionAffinityConfig { client_ip: Some(ClientIPConfig { timeout_seconds: Some(60) }) });
            },
            SVC_F_AFFINITY,
            SVC_F_AFFINITY,
            60,
            vec![],
        ),
    ];
    for (case, edit, cluster_flags, external_flags, timeout, reasons) in cases {
        let out = run(vec![all_kinds("web", edit)], vec![]);
        let expected: BTreeMap<Frontend, u16> = [
            (fe("10.96.0.10", 80, Tcp), SVC_F_CLUSTER_IP | cluster_flags),
            (fe("192.0.2.10", 80, Tcp), SVC_F_EXTERNAL_IP | external_flags),
            (fe("198.51.100.10", 80, Tcp), SVC_F_LOAD_BALANCER | external_flags),
            (np(30080, Tcp), SVC_F_NODE_PORT | external_flags),
        ]
        .into();
        assert_eq!(flags_of(&out), expected, "{case}");
        assert!(out.desired.services.values().all(|e| e.affinity_timeout == timeout), "{case}");
        let problems: Vec<Problem> = reasons.iter().map(|r| prob("Service", "default/web", r)).collect();
        assert_eq!(out.problems, problems, "{case}");
    }

    // kube-proxy applies externalTrafficPolicy to a ClusterIP Service's externalIPs too.
    let svc = with_spec(external_ips(service("web", "10.96.0.10", vec![port("", 80, "TCP")]), &["192.0.2.10"]), |s| {
        s.external_traffic_policy = Some("Local".to_owned());
    });
    let out = run(vec![svc], vec![]);
    let expected: BTreeMap<Frontend, u16> = [
        (fe("10.96.0.10", 80, Tcp), SVC_F_CLUSTER_IP),
        (fe("192.0.2.10", 80, Tcp), SVC_F_EXTERNAL_IP | SVC_F_ETP_LOCAL),
    ]
    .into();
    assert_eq!((flags_of(&out), out.problems), (expected, vec![]));
}

/// An endpoint on `node` with explicit conditions.
fn ep_at(addr: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    let conditions = EndpointConditions { ready: Some(ready), serving: Some(serving), terminating: Some(terminating) };
    Endpoint { conditions: Some(conditions), ..ep_on(addr, node) }
}

/// (case, endpoints, cluster endpoints, local endpoints, every terminating endpoint)
type PolicyCase = (&'static str, Vec<Endpoint>, Vec<Backend>, Vec<Backend>, Vec<Backend>);

#[test]
fn traffic_policies_select_backends_like_kube_proxy() {
    const REMOTE: &str = "node-b";
    let (l1, l2, r1, r2) = ("10.0.0.1", "10.0.0.2", "10.0.1.1", "10.0.1.2");
    let active = |addr| be(addr, 8080, Tcp, Active);
    let terminating = |addr| be(addr, 8080, Tcp, Terminating);
    let cases: Vec<PolicyCase> = vec![
        (
            "ready endpoints here and there",
            vec![
                ep_at(l1, NODE, true, true, false),
                ep_at(r1, REMOTE, true, true, false),
                ep_at(l2, NODE, false, true, true),
                ep_at(r2, REMOTE, false, true, true),
            ],
            vec![local(active(l1)), active(r1)],
            vec![local(active(l1))],
            vec![local(terminating(l2)), terminating(r2)],
        ),
        (
            // The local endpoints fall back to terminating ones on their own: the case where
            // local_slots is not the local part of slots.
            "remote ready, local only terminating",
            vec![
                ep_at(l1, NODE, false, true, true),
                ep_at(l2, NODE, false, false, true),
                ep_at(r1, REMOTE, true, true, false),
            ],
            vec![active(r1)],
            vec![local(terminating(l1))],
            vec![local(terminating(l1)), local(terminating(l2))],
        ),
        (
            "nothing ready anywhere",
            vec![
                ep_at(l1, NODE, false, true, true),
                ep_at(r1, REMOTE, false, true, true),
                ep_at(r2, REMOTE, false, false, true),
            ],
            vec![local(terminating(l1)), terminating(r1)],
            vec![local(terminating(l1))],
            vec![local(terminating(l1)), terminating(r1), terminating(r2)],
        ),
        (
            "no local endpoint",
            vec![ep_at(r1, REMOTE, true, true, false), ep_at(r2, REMOTE, false, true, true)],
            vec![active(r1)],
            vec![],
            vec![terminating(r2)],
        ),
        (
            "a starting local endpoint (serving, not ready, not terminating) is never used",
            vec![ep_at(l1, NODE, false, true, false), ep_at(r1, REMOTE, true, true, false)],
            vec![active(r1)],
            vec![],
            vec![],
        ),
    ];
    let local_policy = |local: bool| Some(if local { "Local" } else { "Cluster" }.to_owned());
    for (case, endpoints, cluster, local_eps, all_terminating) in cases {
        for (itp, etp) in [(false, false), (true, false), (false, true), (true, true)] {
            let case = format!("{case} (ITP Local: {itp}, ETP Local: {etp})");
            let svc = with_spec(
                with_ingress(
                    external_ips(
                        typed(
                            "LoadBalancer",
                            service("web", "10.96.0.10", vec![with_node_port(port("", 80, "TCP"), 30080)]),
                        ),
                        &["192.0.2.10"],
                    ),
                    vec![ingress("198.51.100.10", None)],
                ),
                |spec| {
                    spec.internal_traffic_policy = local_policy(itp);
                    spec.external_traffic_policy = local_policy(etp);
                    spec.health_check_node_port = etp.then_some(32000);
                },
            );
            let out = run(vec![svc], vec![slice("web-a", "web", &[("", 8080, "TCP")], endpoints.clone())]);
            assert_eq!(out.problems, vec![], "{case}");
            let draining =
                |slots: &[Backend]| all_terminating.iter().filter(|b| !slots.contains(b)).copied().collect::<Vec<_>>();
            let cluster_ip = &out.desired.services[&fe("10.96.0.10", 80, Tcp)];
            let slots = if itp { &local_eps } else { &cluster };
            assert_eq!(&cluster_ip.slots, slots, "{case}: cluster IP slots");
            // kube-proxy drops (not rejects) what has endpoints, none of them here.
            let dropped = itp && local_eps.is_empty() && !cluster.is_empty();
            assert_eq!(cluster_ip.flags & SVC_F_NO_LOCAL_ENDPOINTS != 0, dropped, "{case}: no local endpoints");
            assert_eq!(cluster_ip.local_slots, vec![], "{case}: cluster IP local_slots");
            assert_eq!(cluster_ip.draining, draining(slots), "{case}: cluster IP draining");
            for frontend in [fe("192.0.2.10", 80, Tcp), fe("198.51.100.10", 80, Tcp), np(30080, Tcp)] {
                let external = &out.desired.services[&frontend];
                assert_eq!(external.slots, cluster, "{case}: {frontend} slots");
                let local_slots = if etp { local_eps.clone() } else { vec![] };
                assert_eq!(external.local_slots, local_slots, "{case}: {frontend} local_slots");
                assert_eq!(external.draining, draining(&cluster), "{case}: {frontend} draining");
            }
        }
    }
}

/// (case, spec edit, endpoints, expected health check, expected problem reasons)
type HealthCase = (&'static str, fn(&mut ServiceSpec), Vec<Endpoint>, Option<HealthCheck>, Vec<&'static str>);

#[test]
fn health_check_counts_local_ready_endpoints() {
    const REMOTE: &str = "node-b";
    let check = |local_endpoints| Some(HealthCheck { node_port: 32000, local_endpoints });
    let not_needed =
        "healthCheckNodePort 32000 is only used by LoadBalancer Services with externalTrafficPolicy Local; ignored";
    let missing = "no healthCheckNodePort for a LoadBalancer with externalTrafficPolicy Local; no health check served";
    let cases: Vec<HealthCase> = vec![
        (
            "distinct local ready addresses, over every port",
            |_| {},
            vec![
                ep_at("10.0.0.1", NODE, true, true, false),
                ep_at("10.0.0.2", NODE, true, true, false),
                ep_at("10.0.1.1", REMOTE, true, true, false),
                ep_at("10.0.0.3", NODE, false, false, false),
            ],
            check(2),
            vec![],
        ),
        (
            "terminating local endpoints are not counted",
            |_| {},
            vec![ep_at("10.0.0.3", NODE, false, true, true), ep_at("10.0.1.1", REMOTE, true, true, false)],
            check(0),
            vec![],
        ),
        (
            "publishNotReadyAddresses makes every endpoint ready",
            |spec| spec.publish_not_ready_addresses = Some(true),
            vec![ep_at("10.0.0.1", NODE, false, false, false), ep_at("10.0.0.3", NODE, false, true, true)],
            check(2),
            vec![],
        ),
        ("no endpoints", |_| {}, vec![], check(0), vec![]),
        (
            "externalTrafficPolicy Cluster: none",
            |spec| spec.external_traffic_policy = Some("Cluster".to_owned()),
            vec![ep_at("10.0.0.1", NODE, true, true, false)],
            None,
            vec![not_needed],
        ),
        (
            "type NodePort: none",
            |spec| spec.type_ = Some("NodePort".to_owned()),
            vec![ep_at("10.0.0.1", NODE, true, true, false)],
            None,
            vec![not_needed],
        ),
        ("missing", |spec| spec.health_check_node_port = None, vec![], None, vec![missing]),
        ("0 means unset", |spec| spec.health_check_node_port = Some(0), vec![], None, vec![missing]),
        (
            "out of range",
            |spec| spec.health_check_node_port = Some(70_000),
            vec![],
            None,
            vec!["healthCheckNodePort 70000 is out of range 1-65535"],
        ),
    ];
    for (case, edit, endpoints, expected, reasons) in cases {
        let svc = with_spec(
            typed(
                "LoadBalancer",
                service("web", "10.96.0.10", vec![port("http", 80, "TCP"), port("https", 443, "TCP")]),
            ),
            |spec| {
                spec.external_traffic_policy = Some("Local".to_owned());
                spec.health_check_node_port = Some(32000);
                edit(spec);
            },
        );
        let slices = vec![slice("web-a", "web", &[("http", 8080, "TCP"), ("https", 8443, "TCP")], endpoints)];
        let out = run(vec![svc], slices);
        let expected: BTreeMap<ObjectRef, HealthCheck> =
            expected.into_iter().map(|check| (objref("default/web"), check)).collect();
        assert_eq!(out.desired.health_checks, expected, "{case}");
        let problems: Vec<Problem> = reasons.iter().map(|r| prob("Service", "default/web", r)).collect();
        assert_eq!(out.problems, problems, "{case}");
    }
}

// --- incremental use ------------------------------------------------------------------------

#[test]
fn translate_refs_translates_one_service_with_its_slices() {
    let (services, slices) = mixed_objects();
    let whole = run(services.clone(), slices.clone());
    let service_refs: Vec<&Service> = services.iter().collect();
    let slice_refs: Vec<&EndpointSlice> = slices.iter().collect();
    assert_eq!(translate_refs(&service_refs, &slice_refs, &node()), whole);

    // Each Service alone, with the slices labelled for it, gives exactly its part of the whole
    // (none of these Services claims another's frontend).
    let mut merged = Desired::default();
    let mut problems = Vec::new();
    for svc in &services {
        let name = svc.metadata.name.as_deref();
        let own: Vec<&EndpointSlice> = slices
            .iter()
            .filter(|slice| {
                slice.metadata.namespace == svc.metadata.namespace
                    && slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)).map(String::as_str)
                        == name
            })
            .collect();
        let part = translate_refs(&[svc], &own, &node());
        assert!(!part.desired.services.is_empty(), "{name:?}");
        for (frontend, entry) in part.desired.services {
            assert!(merged.services.insert(frontend, entry).is_none(), "{frontend} claimed twice");
        }
        merged.health_checks.extend(part.desired.health_checks);
        problems.extend(part.problems);
    }
    problems.sort_by(|a, b| (a.kind, &a.object, &a.reason).cmp(&(b.kind, &b.object, &b.reason)));
    assert_eq!(Translation { desired: merged, problems }, whole);
}

/// Services of every kind with their slices (no frontend conflicts, no orphan slices).
fn mixed_objects() -> (Vec<Service>, Vec<EndpointSlice>) {
    let (t, f) = (Some(true), Some(false));
    let lb = with_spec(
        with_ingress(
            external_ips(
                typed(
                    "LoadBalancer",
                    service(
                        "shop/lb",
                        "10.96.1.1",
                        vec![
                            with_node_port(port("http", 80, "TCP"), 30080),
                            with_node_port(port("dns", 53, "UDP"), 30053),
                            with_node_port(port("sig", 9000, "SCTP"), 30090),
                        ],
                    ),
                ),
                &["192.0.2.1", "2001:db8::1"],
            ),
            vec![ingress("198.51.100.1", None), ingress("198.51.100.2", Some("Proxy"))],
        ),
        |spec| {
            spec.external_traffic_policy = Some("Local".to_owned());
            spec.internal_traffic_policy = Some("Local".to_owned());
            spec.health_check_node_port = Some(32000);
            spec.session_affinity = Some("ClientIP".to_owned());
        },
    );
    let node_port = typed("NodePort", service("np", "10.96.1.2", vec![with_node_port(port("", 80, "TCP"), 30081)]));
    let web = service("web", "10.96.0.10", vec![port("http", 80, "TCP"), port("dns", 53, "UDP")]);
    let services = vec![lb, node_port, web];
    let slices = vec![
        slice(
            "shop/lb-a",
            "lb",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            vec![ep_on("10.0.0.1", NODE), ep_cond("10.0.0.2", f, t, t), ep_on("10.0.2.1", "node-b")],
        ),
        slice("shop/lb-b", "lb", &[("http", 8080, "TCP")], vec![ep_cond("10.0.0.2", t, t, f), ep("10.0.0.4")]),
        slice("np-a", "np", &[("", 8080, "TCP")], vec![ep_at("10.0.3.1", NODE, false, true, true), ep("10.0.3.2")]),
        slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            vec![ep_on("10.0.0.1", NODE), ep_cond("10.0.0.2", f, t, t), ep_cond("10.0.0.3", f, f, t)],
        ),
        slice("web-b", "web", &[("http", 9090, "TCP")], vec![ep_cond("10.0.0.2", t, t, f), ep("10.0.0.4")]),
    ];
    (services, slices)
}

// --- topology hints -------------------------------------------------------------------------

/// `endpoint` with zone hints `zones` and node hints `nodes` (an empty list: none of that kind).
fn hinted(endpoint: Endpoint, zones: &[&str], nodes: &[&str]) -> Endpoint {
    let hints = EndpointHints {
        for_zones: (!zones.is_empty()).then(|| zones.iter().map(|z| ForZone { name: (*z).to_owned() }).collect()),
        for_nodes: (!nodes.is_empty()).then(|| nodes.iter().map(|n| ForNode { name: (*n).to_owned() }).collect()),
    };
    Endpoint { hints: Some(hints), ..endpoint }
}

fn in_zone(zone: Option<&str>) -> NodeContext {
    NodeContext { zone: zone.map(str::to_owned), ..node() }
}

/// A case name, the node's zone, the endpoints, and the addresses of the expected slots and
/// draining backends.
type TopologyCase<'a> = (&'a str, Option<&'a str>, Vec<Endpoint>, Vec<&'a str>, Vec<&'a str>);

/// kube-proxy's `topologyModeFromHints` and `CategorizeEndpoints`: which ready endpoints take
/// new connections of a cluster IP, given the hints and the node's zone; the ready ones left out
/// drain (they keep their connections).
#[test]
fn topology_hints_narrow_the_cluster_endpoints() {
    let (t, f) = (Some(true), Some(false));
    let active = |a: &str| be(a, 80, Tcp, Active);
    let a = |addr: &str| hinted(ep(addr), &["zone-a"], &[]);
    let b = |addr: &str| hinted(ep(addr), &["zone-b"], &[]);
    let cases: Vec<TopologyCase> = vec![
        (
            "zone hints: this zone's only",
            Some("zone-a"),
            vec![a("10.0.0.1"), b("10.0.0.2"), a("10.0.0.3")],
            vec!["10.0.0.1", "10.0.0.3"],
            vec!["10.0.0.2"],
        ),
        (
            "a hint may name several zones",
            Some("zone-b"),
            vec![hinted(ep("10.0.0.1"), &["zone-a", "zone-b"], &[]), a("10.0.0.2")],
            vec!["10.0.0.1"],
            vec!["10.0.0.2"],
        ),
        (
            "no hint for this zone: all",
            Some("zone-c"),
            vec![a("10.0.0.1"), b("10.0.0.2")],
            vec!["10.0.0.1", "10.0.0.2"],
            vec![],
        ),
        (
            "node without a zone: hints ignored",
            None,
            vec![a("10.0.0.1"), b("10.0.0.2")],
            vec!["10.0.0.1", "10.0.0.2"],
            vec![],
        ),
        (
            "a ready endpoint without hints: all",
            Some("zone-a"),
            vec![a("10.0.0.1"), ep("10.0.0.2")],
            vec!["10.0.0.1", "10.0.0.2"],
            vec![],
        ),
        (
            "endpoints that are not ready do not count",
            Some("zone-a"),
            vec![a("10.0.0.1"), b("10.0.0.2"), ep_cond("10.0.0.3", f, f, f)],
            vec!["10.0.0.1"],
            vec!["10.0.0.2"],
        ),
        (
            "node hints first",
            Some("zone-a"),
            vec![hinted(ep("10.0.0.1"), &["zone-a"], &["node-b"]), hinted(ep("10.0.0.2"), &["zone-b"], &[NODE])],
            vec!["10.0.0.2"],
            vec!["10.0.0.1"],
        ),
        (
            "node hints for other nodes only: zone hints",
            Some("zone-a"),
            vec![hinted(ep("10.0.0.1"), &["zone-a"], &["node-b"]), hinted(ep("10.0.0.2"), &["zone-b"], &["node-c"])],
            vec!["10.0.0.1"],
            vec!["10.0.0.2"],
        ),
        (
            "node hints on some endpoints only: zone hints",
            Some("zone-b"),
            vec![hinted(ep("10.0.0.1"), &["zone-a"], &[NODE]), b("10.0.0.2")],
            vec!["10.0.0.2"],
            vec!["10.0.0.1"],
        ),
    ];
    for (case, zone, endpoints, slots, draining) in cases {
        let svc = service("web", "10.96.0.10", vec![port("", 80, "TCP")]);
        let out = translate_on(&in_zone(zone), vec![svc], vec![slice("web-a", "web", &[("", 80, "TCP")], endpoints)]);
        let slots = slots.into_iter().map(active).collect();
        let draining = draining.into_iter().map(active).collect();
        let expected = desired(vec![(fe("10.96.0.10", 80, Tcp), entry("default/web", "", slots, draining))]);
        assert_eq!(out.desired, expected, "{case}");
        assert_eq!(out.problems, vec![], "{case}");
    }

    // No ready endpoint at all: the serving+terminating ones, whatever their hints (kube-proxy
    // falls back without topology).
    let svc = service("web", "10.96.0.10", vec![port("", 80, "TCP")]);
    let endpoints = vec![
        hinted(ep_cond("10.0.0.1", f, t, t), &["zone-b"], &[]),
        hinted(ep_cond("10.0.0.2", f, t, t), &["zone-a"], &[]),
    ];
    let out =
        translate_on(&in_zone(Some("zone-a")), vec![svc], vec![slice("web-a", "web", &[("", 80, "TCP")], endpoints)]);
    let terminating = |a: &str| be(a, 80, Tcp, Terminating);
    let expected = vec![terminating("10.0.0.1"), terminating("10.0.0.2")];
    assert_eq!(out.desired.services.values().next().unwrap().slots, expected);
}

/// The hints narrow every frontend's cluster endpoints (what pods use for external addresses
/// too), never the local ones: `internalTrafficPolicy: Local` and the `local_slots` of
/// `externalTrafficPolicy: Local` take every local endpoint.
#[test]
fn topology_hints_leave_the_local_endpoints_alone() {
    let here = |addr: &str, zone: &str| hinted(ep_on(addr, NODE), &[zone], &[]);
    let there = |addr: &str, zone: &str| hinted(ep_on(addr, "node-b"), &[zone], &[]);
    let endpoints = vec![here("10.0.0.1", "zone-a"), here("10.0.0.2", "zone-b"), there("10.0.0.3", "zone-a")];
    let active = |a: &str, is_local: bool| {
        let b = be(a, 80, Tcp, Active);
        if is_local { local(b) } else { b }
    };
    let svc = |itp: &str, etp: &str| {
        let svc = typed("NodePort", service("web", "10.96.0.10", vec![with_node_port(port("", 80, "TCP"), 30080)]));
        with_spec(svc, |s| {
            s.internal_traffic_policy = Some(itp.to_owned());
            s.external_traffic_policy = Some(etp.to_owned());
        })
    };
    let zone_a = in_zone(Some("zone-a"));
    let run_as = |svc: Service| {
        translate_on(&zone_a, vec![svc], vec![slice("web-a", "web", &[("", 80, "TCP")], endpoints.clone())]).desired
    };

    let out = run_as(svc("Cluster", "Cluster"));
    for frontend in [fe("10.96.0.10", 80, Tcp), np(30080, Tcp)] {
        let entry = &out.services[&frontend];
        assert_eq!(entry.slots, vec![active("10.0.0.1", true), active("10.0.0.3", false)], "{frontend}");
        assert_eq!(entry.draining, vec![active("10.0.0.2", true)], "{frontend}");
    }

    let out = run_as(svc("Local", "Local"));
    let cluster_ip = &out.services[&fe("10.96.0.10", 80, Tcp)];
    assert_eq!(cluster_ip.slots, vec![active("10.0.0.1", true), active("10.0.0.2", true)]);
    assert_eq!(cluster_ip.draining, vec![]);
    let node_port = &out.services[&np(30080, Tcp)];
    assert_eq!(node_port.slots, vec![active("10.0.0.1", true), active("10.0.0.3", false)]);
    assert_eq!(node_port.local_slots, vec![active("10.0.0.1", true), active("10.0.0.2", true)]);
    assert_eq!(node_port.draining, vec![active("10.0.0.2", true)]);
}

/// Dual-stack: each family's endpoints are categorized among themselves, as kube-proxy's
/// per-family proxiers see only their own: the IPv4 slice has a ready endpoint here and one
/// elsewhere, the IPv6 slice only a terminating one here and hints for another zone. The IPv4
/// cluster IP serves the ready ones, the IPv6 one falls back to its terminating endpoint;
/// under internalTrafficPolicy Local each takes its own family's local endpoints; zone hints
/// narrow a family only when all of its endpoints carry them.
#[test]
fn dual_stack_endpoints_are_categorized_per_family() {
    let dual = |itp_local: bool| {
        with_spec(service("dual", "10.96.0.5", vec![port("", 80, "TCP")]), move |spec| {
            spec.cluster_ips = Some(vec!["10.96.0.5".to_owned(), "fd00::5".to_owned()]);
            spec.ip_families = Some(vec!["IPv4".to_owned(), "IPv6".to_owned()]);
            spec.internal_traffic_policy = itp_local.then(|| "Local".to_owned());
        })
    };
    let v4 = slice(
        "dual-v4",
        "dual",
        &[("", 8080, "TCP")],
        vec![ep_at("10.0.0.1", NODE, true, true, false), ep_at("10.0.1.1", "node-b", true, true, false)],
    );
    let mut v6 = slice("dual-v6", "dual", &[("", 8080, "TCP")], vec![ep_at("fd00:1::1", NODE, false, true, true)]);
    v6.address_type = "IPv6".to_owned();
    let active = |a| be(a, 8080, Tcp, Active);
    let terminating = |a| be(a, 8080, Tcp, Terminating);
    for itp_local in [false, true] {
        let out = run(vec![dual(itp_local)], vec![v4.clone(), v6.clone()]);
        assert_eq!(out.problems, vec![], "iTP Local: {itp_local}");
        let v4_slots = if itp_local {
            vec![local(active("10.0.0.1"))]
        } else {
            vec![local(active("10.0.0.1")), active("10.0.1.1")]
        };
        assert_eq!(out.desired.services[&fe("10.96.0.5", 80, Tcp)].slots, v4_slots, "iTP Local: {itp_local}");
        assert_eq!(
            out.desired.services[&fe("fd00::5", 80, Tcp)].slots,
            vec![local(terminating("fd00:1::1"))],
            "the IPv6 frontend falls back to its own terminating endpoint (iTP Local: {itp_local})"
        );
    }

    // Zone hints on every IPv6 endpoint, none on the IPv4 ones: only IPv6 is narrowed.
    let hinted6 = |addr: &str, zone: &str| hinted(ep(addr), &[zone], &[]);
    let v4 = slice("dual-v4", "dual", &[("", 8080, "TCP")], vec![ep("10.0.0.1"), ep("10.0.0.2")]);
    let mut v6 = slice(
        "dual-v6",
        "dual",
        &[("", 8080, "TCP")],
        vec![hinted6("fd00:1::1", "zone-a"), hinted6("fd00:1::2", "zone-b")],
    );
    v6.address_type = "IPv6".to_owned();
    let out = translate_on(&in_zone(Some("zone-a")), vec![dual(false)], vec![v4, v6]);
    assert_eq!(out.problems, vec![]);
    let v4_entry = &out.desired.services[&fe("10.96.0.5", 80, Tcp)];
    assert_eq!(v4_entry.slots, vec![active("10.0.0.1"), active("10.0.0.2")], "no hints: every IPv4 endpoint");
    let v6_entry = &out.desired.services[&fe("fd00::5", 80, Tcp)];
    assert_eq!(
        (v6_entry.slots.clone(), v6_entry.draining.clone()),
        (vec![active("fd00:1::1")], vec![active("fd00:1::2")]),
        "IPv6: this zone's endpoint; the other one drains"
    );
}
