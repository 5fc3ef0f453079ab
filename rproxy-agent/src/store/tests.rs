//! The store must always agree with a full translation of the objects it holds, whatever the
//! order of updates; and it must re-translate only what an update touches.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{ServicePort, ServiceSpec},
    discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
};

use super::*;
use crate::translate::{Objects, translate};

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

fn random_node_addresses(rng: &mut Rng) -> Vec<Ipv4Addr> {
    NODE_IPS.iter().filter(|_| rng.below(2) == 0).map(|a| a.parse().unwrap()).collect()
}

fn random_slice(rng: &mut Rng) -> EndpointSlice {
    let owner = match rng.below(7) {
        5 => None,
        6 => Some("ghost"),
        i => Some(NAMES[i]),
    };
    let ips: Vec<u8> = (0..rng.below(4)).map(|_| u8::try_from(rng.below(6)).expect("small")).collect();
    slice(&format!("s{}", rng.below(6)), owner, &ips, rng.below(4) != 0)
}

fn problem_set(problems: &[Problem]) -> BTreeSet<String> {
    problems.iter().map(ToString::to_string).collect()
}

#[test]
fn always_agrees_with_a_full_translation() {
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let mut store = Store::new(NODE);
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
    let mut standing: BTreeSet<String> = BTreeSet::new();
    let mut node = NodeContext::named(NODE);
    let (mut saw_conflict, mut saw_frontends) = (false, 0usize);
    let (mut saw_node_ports, mut saw_node_port_conflict, mut saw_cross_kind_conflict) = (0usize, false, false);
    for step in 0..800 {
        match rng.below(11) {
            0..=2 => {
                let s = random_service(&mut rng);
                services.insert(s.metadata.name.clone().unwrap(), s.clone());
                store.apply(Update::ApplyService(Box::new(s)));
            }
            3 => {
                let name = NAMES[rng.below(NAMES.len())];
                if let Some(s) = services.remove(name) {
                    store.apply(Update::DeleteService(Box::new(s)));
                }
            }
            4..=6 => {
                let s = random_slice(&mut rng);
                slices.insert(s.metadata.name.clone().unwrap(), s.clone());
                store.apply(Update::ApplySlice(Box::new(s)));
            }
            7 => {
                let name = format!("s{}", rng.below(6));
                if let Some(s) = slices.remove(&name) {
                    store.apply(Update::DeleteSlice(Box::new(s)));
                }
            }
            8 => {
                // A relist: some objects vanished, some changed.
                services.retain(|_, _| rng.below(3) != 0);
                let s = random_service(&mut rng);
                services.insert(s.metadata.name.clone().unwrap(), s);
                store.apply(Update::ResetServices(services.values().cloned().collect()));
            }
            10 => {
                // The node's addresses change (in any order, with duplicates).
                let mut addresses = random_node_addresses(&mut rng);
                addresses.extend(addresses.clone().iter().rev());
                let changed = store.set_node_addresses(addresses.clone());
                addresses.sort_unstable();
                addresses.dedup();
                assert_eq!(changed, addresses != node.addresses, "step {step}");
                assert_eq!(store.node_addresses(), addresses.as_slice(), "step {step}");
                node.addresses = addresses;
            }
            _ => {
                slices.retain(|_, _| rng.below(3) != 0);
                let s = random_slice(&mut rng);
                slices.insert(s.metadata.name.clone().unwrap(), s);
                store.apply(Update::ResetSlices(slices.values().cloned().collect()));
            }
        }
        if rng.below(3) == 0 {
            continue; // let updates pile up before some flushes
        }
        let changes = store.flush();
        for p in &changes.fixed_problems {
            assert!(standing.remove(&p.to_string()), "step {step}: fixed a problem never reported: {p}");
        }
        for p in &changes.new_problems {
            assert!(standing.insert(p.to_string()), "step {step}: reported twice: {p}");
        }
        let objects =
            Objects { services: services.values().cloned().collect(), slices: slices.values().cloned().collect() };
        let full = translate(&objects, &node);
        assert_eq!(store.desired(), &full.desired, "step {step}");
        assert_eq!(standing, problem_set(&full.problems), "step {step}");
        assert_eq!(store.problem_count(), standing.len(), "step {step}");
        saw_conflict |= standing.iter().any(|p| p.contains("already used by"));
        saw_frontends = saw_frontends.max(store.desired().services.len());
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
    assert_eq!(store.desired().services[&fe].service.name, "a");

    store.apply(Update::DeleteService(Box::new(service("a", IPS[0], 53, "ClusterIP"))));
    let changes = store.flush();
    assert_eq!(changes.fixed_problems.len(), 1);
    assert_eq!(store.desired().services[&fe].service.name, "b");
    assert_eq!(store.problem_count(), 0);
    assert_eq!(store.rejected_total().get("Service"), Some(&1));
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
    let fe = Frontend { addr: node_ip, port: 30053, proto: crate::model::Protocol::Udp };
    let cluster_ip = Frontend { addr: "10.96.2.1".parse().unwrap(), port: 53, ..fe };
    assert_eq!(changes.frontends, BTreeSet::from([cluster_ip, fe]));
    let entry = &store.desired().services[&fe];
    assert_eq!((entry.service.name.as_str(), entry.flags), ("np", rproxy_common::SVC_F_NODE_PORT));
    assert_eq!(entry.slots.len(), 1);

    // The same set again (another order, duplicates) is no change.
    assert!(!store.set_node_addresses([node_ip, node_ip]));
    assert!(!store.is_dirty());

    // Another address replaces it: the old frontend goes, the new one comes.
    let other: Ipv4Addr = "192.168.0.2".parse().unwrap();
    assert!(store.set_node_addresses([other]));
    let changes = store.flush();
    let new_fe = Frontend { addr: other, ..fe };
    assert_eq!(changes.frontends, BTreeSet::from([cluster_ip, fe, new_fe]));
    assert!(!store.desired().services.contains_key(&fe) && store.desired().services.contains_key(&new_fe));

    // None left: no NodePort frontend.
    assert!(store.set_node_addresses([]));
    store.flush();
    assert_eq!(store.desired().services.len(), 21);
}
