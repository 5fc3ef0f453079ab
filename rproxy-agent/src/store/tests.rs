//! The store must always agree with a full translation of the objects it holds, whatever the
//! order of updates; and it must re-translate only what an update touches.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointHints, EndpointPort, ForNode, ForZone},
};

use super::*;
use crate::translate::{Objects, SERVICE_NAME_LABEL, translate};

const NODE: &str = "node-a";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta { name: Some(name.to_owned()), namespace: Some(String::from("default")), ..ObjectMeta::default() }
}

fn service(name: &str, ip: &str, port: i32, kind: &str) -> Service {
    service_np(name, ip, port, kind, None)
}

fn service_np(name: &str, ip: &str, port: i32, kind: &str, node_port: Option<i32>) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            type_: Some(kind.to_owned()),
            cluster_ip: (kind != "ExternalName").then(|| ip.to_owned()),
            external_name: (kind == "ExternalName").then(|| String::from("example.com")),
            ports: Some(vec![ServicePort {
                name: Some(String::from("p")),
                port,
                protocol: Some(String::from("UDP")),
                node_port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn slice(name: &str, service: Option<&str>, ips: &[u8], ready: bool) -> EndpointSlice {
    let mut metadata = meta(name);
    metadata.labels = service.map(|s| [(SERVICE_NAME_LABEL.to_owned(), s.to_owned())].into());
    EndpointSlice {
        metadata,
        address_type: String::from("IPv4"),
        endpoints: Some(
            ips.iter()
                .map(|last| Endpoint {
                    addresses: vec![format!("10.244.0.{last}")],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(true),
                        terminating: Some(!ready),
                    }),
                    node_name: Some(String::from(if last % 2 == 0 { NODE } else { "node-b" })),
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some(String::from("p")),
            port: Some(5353),
            protocol: Some(String::from("UDP")),
            ..EndpointPort::default()
        }]),
    }
}

/// A small deterministic generator (xorshift), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % n as u64).expect("small")
    }
}

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];
const IPS: [&str; 3] = ["10.96.0.1", "10.96.0.2", "10.96.0.3"];
const KINDS: [&str; 4] = ["ClusterIP", "NodePort", "ExternalName", "Bogus"];
/// Node addresses: one of them is also a cluster IP of [`IPS`].
const NODE_IPS: [&str; 3] = ["10.96.0.1", "192.168.0.1", "192.168.0.2"];

fn random_service(rng: &mut Rng) -> Service {
    let name = NAMES[rng.below(NAMES.len())];
    // Few addresses and ports: frontends collide often (node ports with each other, and with
    // cluster IPs when the node address is one and the nodePort is 53).
    let node_port = [None, Some(53), Some(30053)][rng.below(3)];
    service_np(name, IPS[rng.below(IPS.len())], [53, 54][rng.below(2)], KINDS[rng.below(KINDS.len())], node_port)
}

fn random_node_addresses(rng: &mut Rng) -> Vec<IpAddr> {
    NODE_IPS.iter().filter(|_| rng.below(2) == 0).map(|a| a.parse().unwrap()).collect()
}

fn random_slice(rng: &mut Rng) -> EndpointSlice {
    let owner = match rng.below(7) {
        5 => None,
        6 => Some("ghost"),
        i => Some(NAMES[i]),
    };
    let ips: Vec<u8> = (0..rng.below(4)).map(|_| u8::try_from(rng.below(6)).expect("small")).collect();
    let mut slice = slice(&format!("s{}", rng.below(6)), owner, &ips, rng.below(4) != 0);
    // Endpoints the store packs in other ways (see `CompactSlice`).
    for endpoint in slice.endpoints.iter_mut().flatten() {
        match rng.below(10) {
            0 => endpoint.conditions = None,
            1 => endpoint.node_name = None,
            2 => endpoint.addresses[0] = endpoint.addresses[0].replace("10.244.0.", "010.244.000."),
            3 => endpoint.addresses = vec![String::from("fd00::1")],
            4 => endpoint.addresses.insert(0, String::from("not-an-ip")),
            _ => {}
        }
    }
    // Topology hints on every endpoint (they only narrow when all ready ones have some).
    if rng.below(2) == 0 {
        for endpoint in slice.endpoints.iter_mut().flatten() {
            let zone = ZONES[rng.below(ZONES.len())].to_owned();
            let node = ["node-a", "node-b"][rng.below(2)].to_owned();
            endpoint.hints = Some(EndpointHints {
                for_zones: Some(vec![ForZone { name: zone }]),
                for_nodes: (rng.below(4) == 0).then(|| vec![ForNode { name: node }]),
            });
        }
    }
    slice
}

const ZONES: [&str; 2] = ["zone-a", "zone-b"];

/// The node's zone changes (or the Node goes, taking the zone with it).
fn change_zone(store: &mut Store, check: &mut Check, rng: &mut Rng) {
    let zone = [None, Some(ZONES[0]), Some(ZONES[1])][rng.below(3)];
    let node = (zone.is_some() || rng.below(2) == 0).then(|| Box::new(node_in(zone)));
    store.apply(Update::Node(node));
    check.node.zone = zone.map(str::to_owned);
}

/// This node's Node object, in `zone`.
fn node_in(zone: Option<&str>) -> Node {
    let mut metadata = meta(NODE);
    metadata.labels = zone.map(|z| [(ZONE_LABEL.to_owned(), z.to_owned())].into());
    Node { metadata, ..Node::default() }
}

/// Streams `listed` to the store as a list of `kind`, maybe after a list that breaks off
/// half-way (with `junk` objects); the store must not show any of it before `ListDone`: a flush
/// in the middle (maybe) agrees with `before`.
fn stream(
    store: &mut Store,
    rng: &mut Rng,
    kind: &'static str,
    listed: Vec<Update>,
    junk: Vec<Update>,
    before: &mut Check,
) {
    if rng.below(2) == 0 {
        store.apply(Update::ListStart(kind));
        for update in junk {
            store.apply(update);
        }
    }
    store.apply(Update::ListStart(kind));
    let half = listed.len() / 2;
    let mut listed = listed.into_iter();
    listed.by_ref().take(half).for_each(|u| store.apply(u));
    if rng.below(2) == 0 {
        before.flush_and_check(store, "in the middle of a list");
    }
    listed.for_each(|u| store.apply(u));
    store.apply(Update::ListDone(kind));
}

/// What the store must agree with, and the problems it reported and did not fix yet.
#[derive(Clone, Default)]
struct Check {
    services: BTreeMap<String, Service>,
    slices: BTreeMap<String, EndpointSlice>,
    node: NodeContext,
    standing: BTreeSet<String>,
}

impl Check {
    /// Flushes the store and checks that it agrees with a full translation.
    fn flush_and_check(&mut self, store: &mut Store, step: &str) {
        let changes = store.flush();
        for p in &changes.fixed_problems {
            assert!(self.standing.remove(&p.to_string()), "{step}: fixed a problem never reported: {p}");
        }
        for p in &changes.new_problems {
            assert!(self.standing.insert(p.to_string()), "{step}: reported twice: {p}");
        }
        let objects = Objects {
            services: self.services.values().cloned().collect(),
            slices: self.slices.values().cloned().collect(),
        };
        let full = translate(&objects, &self.node);
        assert_eq!(store.desired(), &full.desired, "{step}");
        assert_eq!(self.standing, problem_set(&full.problems), "{step}");
        assert_eq!(store.problem_count(), self.standing.len(), "{step}");
    }
}

fn problem_set(problems: &[Problem]) -> BTreeSet<String> {
    problems.iter().map(ToString::to_string).collect()
}

#[test]
fn always_agrees_with_a_full_translation() {
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut store = Store::new(NODE);
    let mut check = Check { node: NodeContext::named(NODE), ..Check::default() };
    let (mut saw_conflict, mut saw_frontends, mut saw_streamed) = (false, 0usize, 0usize);
    let (mut saw_ipv6_endpoint, mut saw_invalid_endpoint) = (false, false);
    let (mut saw_node_ports, mut saw_node_port_conflict, mut saw_cross_kind_conflict) = (0usize, false, false);
    // Flushes where topology hints kept a ready endpoint out of the slots (it drains, active).
    let mut saw_narrowed = 0usize;
    for step in 0..800 {
        // The objects before this step, for a flush in the middle of a streamed list.
        let mut before = check.clone();
        match rng.below(11) {
            0..=2 => {
                let s = random_service(&mut rng);
                check.services.insert(s.metadata.name.clone().unwrap(), s.clone());
                store.apply(Update::ApplyService(Box::new(s)));
            }
            3 => {
                let name = NAMES[rng.below(NAMES.len())];
                if let Some(s) = check.services.remove(name) {
                    store.apply(Update::DeleteService(Box::new(s)));
                }
            }
            4..=6 => {
                let s = random_slice(&mut rng);
                check.slices.insert(s.metadata.name.clone().unwrap(), s.clone());
                store.apply(Update::ApplySlice(Box::new(s)));
            }
            7 => {
                let name = format!("s{}", rng.below(6));
                if let Some(s) = check.slices.remove(&name) {
                    store.apply(Update::DeleteSlice(Box::new(s)));
                }
            }
            8 => {
                // A relist: some objects vanished, some changed.
                check.services.retain(|_, _| rng.below(3) != 0);
                let s = random_service(&mut rng);
                check.services.insert(s.metadata.name.clone().unwrap(), s);
                if rng.below(2) == 0 {
                    store.apply(Update::ResetServices(check.services.values().cloned().collect()));
                } else {
                    saw_streamed += 1;
                    let listed = check.services.values().map(|s| Update::ListedService(Box::new(s.clone())));
                    let junk = (0..2).map(|_| Update::ListedService(Box::new(random_service(&mut rng))));
                    let junk = junk.collect();
                    stream(&mut store, &mut rng, "Service", listed.collect(), junk, &mut before);
                    check.standing = before.standing;
                }
            }
            10 if rng.below(3) == 0 => change_zone(&mut store, &mut check, &mut rng),
            10 => {
                // The node's addresses change (in any order, with duplicates).
                let mut addresses = random_node_addresses(&mut rng);
                addresses.extend(addresses.clone().iter().rev());
                let changed = store.set_node_addresses(addresses.clone());
                addresses.sort_unstable();
                addresses.dedup();
                assert_eq!(changed, addresses != check.node.addresses, "step {step}");
                assert_eq!(store.node_addresses(), addresses.as_slice(), "step {step}");
                check.node.addresses = addresses;
            }
            _ => {
                check.slices.retain(|_, _| rng.below(3) != 0);
                let s = random_slice(&mut rng);
                check.slices.insert(s.metadata.name.clone().unwrap(), s);
                if rng.below(2) == 0 {
                    store.apply(Update::ResetSlices(check.slices.values().cloned().collect()));
                } else {
                    saw_streamed += 1;
                    let listed = check.slices.values().map(|s| Update::ListedSlice(Box::new(s.clone())));
                    let junk = (0..2).map(|_| Update::ListedSlice(Box::new(random_slice(&mut rng))));
                    let junk = junk.collect();
                    stream(&mut store, &mut rng, "EndpointSlice", listed.collect(), junk, &mut before);
                    check.standing = before.standing;
                }
            }
        }
        if rng.below(3) == 0 {
            continue; // let updates pile up before some flushes
        }
        check.flush_and_check(&mut store, &format!("step {step}"));
        let standing = &check.standing;
        saw_conflict |= standing.iter().any(|p| p.contains("already used by"));
        saw_ipv6_endpoint |= standing.iter().any(|p| p.contains("endpoint fd00::1: not of the slice's"));
        saw_invalid_endpoint |= standing.iter().any(|p| p.contains("invalid endpoint address \"not-an-ip\""));
        saw_frontends = saw_frontends.max(store.desired().services.len());
        let narrowed = |e: &ServiceEntry| e.draining.iter().any(|b| b.state == crate::model::BackendState::Active);
        saw_narrowed += usize::from(store.desired().services.values().any(narrowed));
        let node_ports = store.desired().services.values().filter(|e| e.flags & rproxy_common::SVC_F_NODE_PORT != 0);
        saw_node_ports = saw_node_ports.max(node_ports.count());
        saw_node_port_conflict |= standing.iter().any(|p| p.contains("frontend 192.168.0."));
        // The node address 10.96.0.1 with nodePort 53 against the cluster IP 10.96.0.1:53.
        saw_cross_kind_conflict |= standing.iter().any(|p| p.contains("frontend 10.96.0.1:53/"))
            && store.desired().services.iter().any(|(fe, e)| {
                fe.addr == Ipv4Addr::new(10, 96, 0, 1) && fe.port == 53 && e.flags & rproxy_common::SVC_F_NODE_PORT != 0
            });
    }
    // The sequence exercised what it is meant to.
    assert!(saw_conflict && saw_frontends >= 4, "{saw_conflict} {saw_frontends}");
    assert!(
        saw_node_ports >= 2 && saw_node_port_conflict && saw_cross_kind_conflict,
        "{saw_node_ports} {saw_node_port_conflict} {saw_cross_kind_conflict}"
    );
    assert!(saw_streamed >= 20 && saw_ipv6_endpoint && saw_invalid_endpoint, "{saw_streamed}");
    assert!(saw_narrowed >= 5, "{saw_narrowed}");
}

/// The first list of a kind, into a store that holds none, takes the listing as it is (no
/// object compared or hashed again): what it translates must be what the general path would.
#[test]
fn a_first_list_into_an_empty_store_agrees_with_a_full_translation() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for round in 0..60 {
        let mut store = Store::new(NODE);
        let mut check = Check { node: NodeContext::named(NODE), ..Check::default() };
        // One definition a name, as the API lists them.
        let services: BTreeMap<String, Service> = (0..rng.below(8))
            .map(|_| random_service(&mut rng))
            .map(|s| (s.metadata.name.clone().unwrap(), s))
            .collect();
        let slices: BTreeMap<String, EndpointSlice> =
            (0..rng.below(8)).map(|_| random_slice(&mut rng)).map(|s| (s.metadata.name.clone().unwrap(), s)).collect();
        let slices_first = rng.below(2) == 0;
        for pass in 0..2 {
            let mut before = check.clone();
            if (pass == 0) == slices_first {
                check.slices.clone_from(&slices);
                let listed = slices.values().map(|s| Update::ListedSlice(Box::new(s.clone()))).collect();
                stream(&mut store, &mut rng, "EndpointSlice", listed, Vec::new(), &mut before);
            } else {
                check.services.clone_from(&services);
                let listed = services.values().map(|s| Update::ListedService(Box::new(s.clone()))).collect();
                stream(&mut store, &mut rng, "Service", listed, Vec::new(), &mut before);
            }
            check.standing = before.standing;
            if rng.below(2) == 0 {
                check.flush_and_check(&mut store, &format!("round {round}, after list {pass}"));
            }
        }
        check.flush_and_check(&mut store, &format!("round {round}"));
    }
}

#[test]
fn one_new_service_translates_one_service() {
    let mut store = Store::new(NODE);
    let many: Vec<Service> =
        (0..50).map(|i| service(&format!("svc{i}"), &format!("10.96.1.{i}"), 53, "ClusterIP")).collect();
    store.apply(Update::ResetServices(many));
    store.apply(Update::ResetSlices(
        (0..50).map(|i| slice(&format!("sl{i}"), Some(&format!("svc{i}")), &[1, 2], true)).collect(),
    ));
    let first = store.flush();
    assert_eq!((first.translated, first.frontends.len()), (50, 50));
    assert!(!store.is_dirty());

    store.apply(Update::ApplyService(Box::new(service("new", "10.96.2.1", 53, "ClusterIP"))));
    store.apply(Update::ApplySlice(Box::new(slice("new-1", Some("new"), &[3], true))));
    let changes = store.flush();
    assert_eq!(changes.translated, 1);
    let fe = Frontend { addr: "10.96.2.1".parse().unwrap(), port: 53, proto: crate::model::Protocol::Udp };
    assert_eq!(changes.frontends, BTreeSet::from([fe]));
    assert_eq!(store.desired().services[&fe].slots.len(), 1);

    // The same object again (a resync) changes nothing.
    store.apply(Update::ApplyService(Box::new(service("new", "10.96.2.1", 53, "ClusterIP"))));
    assert!(!store.is_dirty());
    // The node object does not re-translate anything.
    store.apply(Update::Node(None));
    assert!(!store.is_dirty());
}

#[test]
fn a_conflict_clears_when_the_winner_goes() {
    let mut store = Store::new(NODE);
    store.apply(Update::ApplyService(Box::new(service("a", IPS[0], 53, "ClusterIP"))));
    store.apply(Update::ApplyService(Box::new(service("b", IPS[0], 53, "ClusterIP"))));
    let changes = store.flush();
    assert_eq!(changes.new_problems.len(), 1, "{:?}", changes.new_problems);
    assert_eq!(changes.new_problems[0].object, "default/b");
    let fe = *store.desired().services.keys().next().unwrap();
    assert_eq!(&*store.desired().services[&fe].service.name, "a");

    store.apply(Update::DeleteService(Box::new(service("a", IPS[0], 53, "ClusterIP"))));
    let changes = store.flush();
    assert_eq!(changes.fixed_problems.len(), 1);
    assert_eq!(&*store.desired().services[&fe].service.name, "b");
    assert_eq!(store.problem_count(), 0);
    assert_eq!(store.rejected_total().get("Service"), Some(&1));
}

#[test]
fn zone_changes_retranslate_only_services_with_zone_hints() {
    let mut store = Store::new(NODE);
    let plain = (0..20).map(|i| service(&format!("plain{i}"), &format!("10.96.1.{i}"), 53, "ClusterIP"));
    let hinted_svc = service("hinted", "10.96.2.1", 53, "ClusterIP");
    store.apply(Update::ResetServices(plain.chain([hinted_svc]).collect()));
    let mut hinted = slice("hinted-1", Some("hinted"), &[1, 2], true);
    for (endpoint, zone) in hinted.endpoints.iter_mut().flatten().zip(ZONES) {
        endpoint.hints = Some(EndpointHints { for_zones: Some(vec![ForZone { name: zone.into() }]), for_nodes: None });
    }
    store.apply(Update::ResetSlices(vec![hinted, slice("plain1-1", Some("plain1"), &[3], true)]));
    assert_eq!(store.flush().translated, 21);
    let fe = Frontend { addr: "10.96.2.1".parse().unwrap(), port: 53, proto: crate::model::Protocol::Udp };
    let slots = |store: &Store| store.desired().services[&fe].slots.iter().map(|b| b.addr.addr).collect::<Vec<_>>();
    let ips = |lasts: &[u8]| lasts.iter().map(|l| IpAddr::from([10, 244, 0, *l])).collect::<Vec<_>>();
    // No zone yet: both endpoints.
    assert_eq!(slots(&store), ips(&[1, 2]));

    for (zone, want) in [(Some("zone-b"), vec![2]), (Some("zone-a"), vec![1]), (None, vec![1, 2])] {
        store.apply(Update::Node(Some(Box::new(node_in(zone)))));
        let changes = store.flush();
        assert_eq!(changes.translated, 1, "only the Service with hints ({zone:?})");
        assert_eq!(changes.frontends, BTreeSet::from([fe]));
        assert_eq!(slots(&store), ips(&want), "{zone:?}");
    }
    // The same zone again, or another label change: nothing to do.
    store.apply(Update::Node(Some(Box::new(node_in(None)))));
    assert!(!store.is_dirty());
    store.apply(Update::Node(Some(Box::new(node_in(Some("zone-a"))))));
    store.apply(Update::Node(None));
    assert_eq!(store.flush().translated, 1);
    assert_eq!(slots(&store), ips(&[1, 2]), "no Node: no zone");
}

#[test]
fn node_address_changes_retranslate_only_services_with_node_ports() {
    let mut store = Store::new(NODE);
    let plain = (0..20).map(|i| service(&format!("plain{i}"), &format!("10.96.1.{i}"), 53, "ClusterIP"));
    let with_np = service_np("np", "10.96.2.1", 53, "NodePort", Some(30053));
    store.apply(Update::ResetServices(plain.chain([with_np]).collect()));
    store.apply(Update::ResetSlices(vec![slice("np-1", Some("np"), &[2], true)]));
    let first = store.flush();
    assert_eq!(first.translated, 21);
    // No node address yet: no NodePort frontend.
    assert_eq!(store.desired().services.len(), 21);

    let node_ip: Ipv4Addr = "192.168.0.1".parse().unwrap();
    assert!(store.set_node_addresses([node_ip]));
    let changes = store.flush();
    assert_eq!(changes.translated, 1, "only the Service with a nodePort");
    let fe = Frontend { addr: node_ip.into(), port: 30053, proto: crate::model::Protocol::Udp };
    let cluster_ip = Frontend { addr: "10.96.2.1".parse().unwrap(), port: 53, ..fe };
    assert_eq!(changes.frontends, BTreeSet::from([cluster_ip, fe]));
    let entry = &store.desired().services[&fe];
    assert_eq!((&*entry.service.name, entry.flags), ("np", rproxy_common::SVC_F_NODE_PORT));
    assert_eq!(entry.slots.len(), 1);

    // The same set again (another order, duplicates) is no change.
    assert!(!store.set_node_addresses([node_ip, node_ip]));
    assert!(!store.is_dirty());

    // Another address replaces it: the old frontend goes, the new one comes.
    let other: Ipv4Addr = "192.168.0.2".parse().unwrap();
    assert!(store.set_node_addresses([other]));
    let changes = store.flush();
    let new_fe = Frontend { addr: other.into(), ..fe };
    assert_eq!(changes.frontends, BTreeSet::from([cluster_ip, fe, new_fe]));
    assert!(!store.desired().services.contains_key(&fe) && store.desired().services.contains_key(&new_fe));

    // None left: no NodePort frontend.
    assert!(store.set_node_addresses::<std::net::IpAddr>([]));
    store.flush();
    assert_eq!(store.desired().services.len(), 21);
}

#[test]
fn a_streamed_list_replaces_the_held_set_at_its_end() {
    let mut store = Store::new(NODE);
    store.apply(Update::ResetServices(vec![
        service("a", IPS[0], 53, "ClusterIP"),
        service("b", IPS[1], 53, "ClusterIP"),
    ]));
    store.flush();
    assert_eq!(store.object_counts(), (2, 0));

    // A list that breaks off after `c`, then a complete one with `b` and `d`.
    store.apply(Update::ListStart("Service"));
    store.apply(Update::ListedService(Box::new(service("c", IPS[2], 53, "ClusterIP"))));
    store.apply(Update::ListStart("Service"));
    store.apply(Update::ListedService(Box::new(service("b", IPS[1], 53, "ClusterIP"))));
    store.apply(Update::ListedService(Box::new(service("d", IPS[2], 53, "ClusterIP"))));
    assert!(!store.is_dirty(), "nothing changes before the list is complete");
    store.apply(Update::ListDone("Service"));
    let changes = store.flush();
    assert_eq!(changes.translated, 2, "a is gone, d is new, b is the same");
    let names: BTreeSet<&str> = store.desired().services.values().map(|e| &*e.service.name).collect();
    assert_eq!(names, BTreeSet::from(["b", "d"]));

    // A `ListDone` without its `ListStart` changes nothing.
    store.apply(Update::ListDone("Service"));
    assert!(!store.is_dirty());
    assert_eq!(store.object_counts(), (2, 0));

    // The Node: listed or not found.
    let node = Node { metadata: meta(NODE), ..Node::default() };
    store.apply(Update::ListStart("Node"));
    store.apply(Update::ListedNode(Box::new(node.clone())));
    assert!(store.node().is_none());
    store.apply(Update::ListDone("Node"));
    assert_eq!(store.node(), Some(&node));
    store.apply(Update::ListStart("Node"));
    store.apply(Update::ListDone("Node"));
    assert!(store.node().is_none());
    assert!(!store.is_dirty(), "the Node object does not re-translate anything");
}

/// kube-proxy's rule, applied by the store for every source: a Service or slice labelled for
/// another proxy (or headless) counts as absent, in a list and in an update; removing the label
/// brings it back.
#[test]
fn hiding_labels_make_objects_absent() {
    use crate::translate::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
    let labelled = |mut svc: Service, label: &str| {
        svc.metadata.labels = Some([(label.to_owned(), String::from("other"))].into());
        svc
    };
    let fe = |ip: &str| Frontend { addr: ip.parse().unwrap(), port: 53, proto: crate::model::Protocol::Udp };
    let mut store = Store::new(NODE);
    store.apply(Update::ResetServices(vec![
        service("plain", "10.96.3.1", 53, "ClusterIP"),
        labelled(service("other-proxy", "10.96.3.2", 53, "ClusterIP"), SERVICE_PROXY_NAME_LABEL),
        labelled(service("headless", "10.96.3.3", 53, "ClusterIP"), HEADLESS_LABEL),
    ]));
    let mut hidden_slice = slice("plain-hidden", Some("plain"), &[9], true);
    hidden_slice.metadata.labels.as_mut().unwrap().insert(HEADLESS_LABEL.to_owned(), String::new());
    store.apply(Update::ResetSlices(vec![slice("plain-1", Some("plain"), &[1], true), hidden_slice]));
    store.flush();
    let frontends: Vec<Frontend> = store.desired().services.keys().copied().collect();
    assert_eq!(frontends, [fe("10.96.3.1")]);
    assert_eq!(store.desired().services[&fe("10.96.3.1")].slots.len(), 1, "the labelled slice's endpoint was used");
    assert_eq!(store.object_counts(), (1, 1));

    // An update that adds the label removes the object; one that removes it brings it back.
    store.apply(Update::ApplyService(Box::new(labelled(
        service("plain", "10.96.3.1", 53, "ClusterIP"),
        SERVICE_PROXY_NAME_LABEL,
    ))));
    store.flush();
    assert!(store.desired().services.is_empty());
    store.apply(Update::ApplyService(Box::new(service("other-proxy", "10.96.3.2", 53, "ClusterIP"))));
    store.apply(Update::ApplyService(Box::new(service("plain", "10.96.3.1", 53, "ClusterIP"))));
    store.flush();
    let frontends: Vec<Frontend> = store.desired().services.keys().copied().collect();
    assert_eq!(frontends, [fe("10.96.3.1"), fe("10.96.3.2")]);
    // The same through the API source's trimming, which keeps the hiding labels.
    store.apply(Update::ApplyService(Box::new(crate::source::slim::service(labelled(
        service("other-proxy", "10.96.3.2", 53, "ClusterIP"),
        HEADLESS_LABEL,
    )))));
    store.flush();
    let frontends: Vec<Frontend> = store.desired().services.keys().copied().collect();
    assert_eq!(frontends, [fe("10.96.3.1")]);
}
