use k8s_openapi::api::{
    core::v1::{ClientIPConfig, SessionAffinityConfig},
    discovery::v1::EndpointConditions,
};

use super::*;
use BackendState::{Active, Terminating};
use Protocol::{Tcp, Udp};

const NODE: &str = "node-a";

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
    ObjectRef { namespace: namespace.to_owned(), name: name.to_owned() }
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
    }
}

fn desired(entries: Vec<(Frontend, ServiceEntry)>) -> Desired {
    Desired { services: entries.into_iter().collect(), ..Desired::default() }
}

fn prob(kind: &'static str, object: &str, reason: &str) -> Problem {
    problem(kind, object, reason)
}

fn run(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Translation {
    translate(&Objects { services, slices }, NODE)
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
        prob("EndpointSlice", "default/ghost-a", "no Service default/ghost for this slice"),
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

#[test]
fn ipv6_is_refused_and_dual_stack_keeps_ipv4() {
    let dual = with_spec(service("dual", "10.96.0.5", vec![port("", 80, "TCP")]), |spec| {
        spec.cluster_ips = Some(vec!["10.96.0.5".to_owned(), "fd00::5".to_owned()]);
    });
    let v6_only = service("v6", "fd00::6", vec![port("", 80, "TCP")]);
    let mut v6_slice = slice("dual-v6", "dual", &[("", 80, "TCP")], vec![ep("fd00:1::1")]);
    v6_slice.address_type = "IPv6".to_owned();
    let mut fqdn_slice = slice("dual-fqdn", "dual", &[("", 80, "TCP")], vec![ep("example.com")]);
    fqdn_slice.address_type = "FQDN".to_owned();
    let v4_slice = slice("dual-v4", "dual", &[("", 80, "TCP")], vec![ep("10.0.0.1"), ep("fd00:1::2")]);
    let out = run(vec![dual, v6_only], vec![v6_slice, fqdn_slice, v4_slice]);
    let expected = desired(vec![(
        fe("10.96.0.5", 80, Tcp),
        entry("default/dual", "", vec![be("10.0.0.1", 80, Tcp, Active)], vec![]),
    )]);
    assert_eq!(out.desired, expected);
    let problems = vec![
        prob("EndpointSlice", "default/dual-v4", "endpoint fd00:1::2: IPv6 is not supported by the datapath yet"),
        prob("EndpointSlice", "default/dual-v6", "addressType IPv6: IPv6 is not supported by the datapath yet"),
        prob("Service", "default/dual", "clusterIP fd00::5: IPv6 is not supported by the datapath yet"),
        prob("Service", "default/v6", "clusterIP fd00::6: IPv6 is not supported by the datapath yet"),
    ];
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
    let (t, f) = (Some(true), Some(false));
    let services = vec![
        service("web", "10.96.0.10", vec![port("http", 80, "TCP"), port("dns", 53, "UDP")]),
        service("b/api", "10.96.0.9", vec![port("", 80, "TCP")]),
        service("a/api", "10.96.0.9", vec![port("", 80, "TCP")]),
        service("bad", "nope", vec![port("", 80, "TCP")]),
    ];
    let slices = vec![
        slice(
            "web-a",
            "web",
            &[("http", 8080, "TCP"), ("dns", 5353, "UDP")],
            vec![ep_on("10.0.0.1", NODE), ep_cond("10.0.0.2", f, t, t), ep_cond("10.0.0.3", f, f, t)],
        ),
        slice("web-b", "web", &[("http", 9090, "TCP")], vec![ep_cond("10.0.0.2", t, t, f), ep("10.0.0.4")]),
        slice("a/api-a", "api", &[("", 80, "TCP")], vec![ep("10.0.1.1"), ep("10.0.1.2")]),
        slice("ghost-a", "ghost", &[("", 80, "TCP")], vec![ep("10.0.0.5")]),
    ];
    let reference = run(services.clone(), slices.clone());
    assert!(!reference.desired.services.is_empty());
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
