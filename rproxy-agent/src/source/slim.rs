//! Trims Services and `EndpointSlices` to the fields the translation reads before the store
//! keeps them, like kube-proxy's informer transform (which drops `managedFields`).
//!
//! A real object carries much the agent never reads: managed fields, annotations, owner
//! references, most labels, endpoint target references and zones, and vectors with spare
//! capacity from deserialization. Keeping only what matters cuts the store's memory by more than
//! half at 10,000 Services. The `resourceVersion` is kept (logs and tests name versions by it), so
//! an API update still re-translates its one Service, which costs microseconds; a relist of
//! unchanged objects compares equal and costs nothing.
//!
//! Kept: name, namespace, resource version, the `kubernetes.io/service-name` label (and the
//! labels that hide an object from kube-proxies, [`translate::hiding_label`]); the whole Service spec except
//! the pod selector, and `status.loadBalancer`; a slice's address type, ports, its
//! `endpoints.kubernetes.io/last-change-trigger-time` annotation (for the network programming
//! latency metric), and each endpoint's addresses, conditions, node name and topology hints.
//!
//! The store goes further with slices, which are most of its objects (ten endpoints a slice is
//! common): it keeps each one as a [`CompactSlice`], a few dozen bytes an endpoint instead of
//! the API type's 352 plus its strings, which the translation reads as it is
//! ([`CompactSlice::input`]).
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceStatus},
        discovery::v1::{Endpoint, EndpointHints, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    model::{NodeContext, ObjectRef},
    translate::{self, HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL},
};

/// The Service with only what the translation reads.
#[must_use]
pub fn service(svc: Service) -> Service {
    let spec = svc.spec.map(|mut spec| {
        spec.selector = None;
        if let Some(ports) = &mut spec.ports {
            ports.shrink_to_fit();
        }
        spec
    });
    let status = svc
        .status
        .and_then(|s| s.load_balancer)
        .map(|lb| ServiceStatus { load_balancer: Some(lb), ..ServiceStatus::default() });
    Service { metadata: meta(svc.metadata), spec, status }
}

/// A Service as the store keeps it: trimmed ([`service`]) and encoded as its JSON, a few hundred
/// bytes where the API type takes over a kilobyte and a half (dozens of optional fields and
/// strings; 50 MiB for 30,000 Services). [`CompactService::to_service`] decodes it again to
/// translate it (microseconds; the JSON of an API type decodes to the same value). Whether it
/// declares a node port is kept apart: a node address change re-translates those.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactService {
    json: Box<[u8]>,
    node_port: bool,
}

impl CompactService {
    #[must_use]
    pub fn new(svc: Service) -> Self {
        let svc = service(svc);
        let node_port =
            svc.spec.iter().flat_map(|spec| spec.ports.iter().flatten()).any(|p| p.node_port.is_some_and(|n| n != 0));
        // An API type always encodes: its maps have string keys.
        let json = serde_json::to_vec(&svc).unwrap_or_default().into_boxed_slice();
        Self { json, node_port }
    }

    /// The trimmed Service.
    #[must_use]
    pub fn to_service(&self) -> Service {
        // What `new` encoded decodes; were it ever not so, an empty Service is reported by the
        // translation (no name, no spec) instead of stopping the agent.
        serde_json::from_slice(&self.json).unwrap_or_default()
    }

    /// Whether a port declares a `nodePort`.
    #[must_use]
    pub fn has_node_port(&self) -> bool {
        self.node_port
    }
}

/// The slice with only what the translation reads.
#[must_use]
pub fn slice(slice: EndpointSlice) -> EndpointSlice {
    let endpoints = slice.endpoints.map(|endpoints| {
        endpoints
            .into_iter()
            .map(|e| {
                let mut addresses = e.addresses;
                addresses.shrink_to_fit();
                Endpoint {
                    addresses,
                    conditions: e.conditions,
                    node_name: e.node_name,
                    hints: e.hints,
                    ..Endpoint::default()
                }
            })
            .collect::<Vec<_>>()
            .into_boxed_slice()
            .into_vec()
    });
    let ports = slice.ports.map(|mut ports| {
        ports.shrink_to_fit();
        ports
    });
    // The change's trigger time, for the network programming latency (`metrics`), is the one
    // annotation kept.
    let trigger = slice.metadata.annotations.as_ref().and_then(|a| {
        let (k, v) = a.get_key_value(crate::metrics::TRIGGER_TIME_ANNOTATION)?;
        Some([(k.clone(), v.clone())].into())
    });
    let metadata = ObjectMeta { annotations: trigger, ..meta(slice.metadata) };
    EndpointSlice { metadata, address_type: slice.address_type, endpoints, ports }
}

fn meta(meta: ObjectMeta) -> ObjectMeta {
    // The service name, and the labels that hide an object from kube-proxies (the store
    // applies that rule).
    let labels = meta.labels.map(|labels| {
        labels
            .into_iter()
            .filter(|(k, _)| [SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL].contains(&k.as_str()))
            .collect::<std::collections::BTreeMap<_, _>>()
    });
    let labels = labels.filter(|l| !l.is_empty());
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

/// An `EndpointSlice` as the store keeps it: what the translation reads, packed. About 32 bytes an
/// endpoint, where the API type takes 352 plus two or three strings.
///
/// Name and namespace are left out (the store keys slices by them), and so is the resource
/// version: two versions that translate the same compare equal. An endpoint keeps its first
/// address (the only one the translation reads), its three conditions, and whether it is on this
/// node rather than its node name (all the translation does with it); likewise, of its topology
/// hints, the zone names and whether the node hints name this node. A compact slice is so tied
/// to one node. [`CompactSlice::input`] reads it for the translation, which translates it
/// exactly as the original on that node.
#[derive(Clone, Debug, PartialEq)]
pub struct CompactSlice {
    /// The `kubernetes.io/service-name` label.
    service_name: Option<Box<str>>,
    address_type: Box<str>,
    endpoints: Box<[CompactEndpoint]>,
    /// Without `appProtocol`.
    ports: Box<[EndpointPort]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct CompactEndpoint {
    address: Address,
    ready: Option<bool>,
    serving: Option<bool>,
    terminating: Option<bool>,
    /// The endpoint's `nodeName` is this node.
    local: bool,
    /// Its topology hints, if it has any (most endpoints have none: a pointer's worth).
    hints: Option<Box<CompactHints>>,
}

/// An endpoint's topology hints as the translation reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CompactHints {
    /// `hints.forZones[].name`; empty: no zone hints.
    zones: Box<[Box<str>]>,
    /// `hints.forNodes`: `None` if there are none, else whether one names this node.
    this_node: Option<bool>,
}

impl CompactHints {
    fn new(hints: Option<&EndpointHints>, node_name: &str) -> Option<Box<Self>> {
        let hints = hints?;
        let zones: Box<[Box<str>]> = hints.for_zones.iter().flatten().map(|z| z.name.as_str().into()).collect();
        let nodes = hints.for_nodes.as_deref().unwrap_or_default();
        let this_node = (!nodes.is_empty()).then(|| nodes.iter().any(|n| n.name == node_name));
        (!zones.is_empty() || this_node.is_some()).then(|| Box::new(Self { zones, this_node }))
    }
}

/// An endpoint's first address.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    Missing,
    /// Parsed: the translation reads an IPv4 address only as its value, however it is written.
    V4(Ipv4Addr),
    /// IPv6 or invalid, as written: the translation names it in a problem.
    Other(Box<str>),
}

impl CompactSlice {
    /// `slice` packed, for the node named `node_name`.
    #[must_use]
    pub fn new(slice: &EndpointSlice, node_name: &str) -> Self {
        let endpoints = slice.endpoints.iter().flatten().map(|e| {
            let conditions = e.conditions.as_ref();
            let address = match e.addresses.first() {
                None => Address::Missing,
                Some(raw) => match translate::parse_ip(raw) {
                    Some(IpAddr::V4(addr)) => Address::V4(addr),
                    _ => Address::Other(raw.as_str().into()),
                },
            };
            CompactEndpoint {
                address,
                ready: conditions.and_then(|c| c.ready),
                serving: conditions.and_then(|c| c.serving),
                terminating: conditions.and_then(|c| c.terminating),
                local: translate::is_local(e.node_name.as_deref(), node_name),
                hints: CompactHints::new(e.hints.as_ref(), node_name),
            }
        });
        let ports = slice.ports.iter().flatten().map(|p| EndpointPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.clone(),
            app_protocol: None,
        });
        Self {
            service_name: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .map(|n| n.as_str().into()),
            address_type: slice.address_type.as_str().into(),
            endpoints: endpoints.collect(),
            ports: ports.collect(),
        }
    }

    /// The `kubernetes.io/service-name` label, if set.
    #[must_use]
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref()
    }

    /// Whether an endpoint has zone hints: how the slice translates depends on the node's zone.
    #[must_use]
    pub fn has_zone_hints(&self) -> bool {
        self.endpoints.iter().any(|e| e.hints.as_ref().is_some_and(|h| !h.zones.is_empty()))
    }

    /// The slice named `slice_ref` as the translation reads it (`translate::translate_refs`),
    /// without rebuilding the `EndpointSlice`: it translates as the original slice does, on
    /// the node it was packed for.
    #[must_use]
    pub fn input<'a>(&'a self, slice_ref: &'a ObjectRef) -> SliceView<'a> {
        SliceView { slice_ref, slice: self }
    }
}

/// A compact slice with its name ([`CompactSlice::input`]).
#[derive(Clone, Copy, Debug)]
pub struct SliceView<'a> {
    slice_ref: &'a ObjectRef,
    slice: &'a CompactSlice,
}

impl translate::SliceInput for SliceView<'_> {
    fn slice_ref(&self) -> Result<ObjectRef, String> {
        Ok(self.slice_ref.clone())
    }

    fn service_name(&self) -> Option<&str> {
        self.slice.service_name.as_deref()
    }

    fn address_type(&self) -> &str {
        &self.slice.address_type
    }

    fn ports(&self) -> &[EndpointPort] {
        &self.slice.ports
    }

    fn endpoints(&self, node: &NodeContext) -> impl Iterator<Item = translate::EndpointFields<'_>> {
        let zone = node.zone.as_deref().unwrap_or_default();
        self.slice.endpoints.iter().map(move |e| translate::EndpointFields {
            address: match &e.address {
                Address::Missing => None,
                Address::V4(addr) => Some(translate::Address::Parsed(IpAddr::V4(*addr))),
                Address::Other(raw) => Some(translate::Address::Text(raw)),
            },
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
            local: e.local,
            hints: e.hints.as_ref().map_or_else(translate::Hints::default, |h| translate::Hints {
                zone: (!h.zones.is_empty()).then(|| h.zones.iter().any(|z| &**z == zone)),
                node: h.this_node,
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{LoadBalancerIngress, LoadBalancerStatus, ObjectReference, ServicePort, ServiceSpec},
            discovery::v1::{EndpointConditions, EndpointHints, EndpointPort, ForNode, ForZone},
        },
        apimachinery::pkg::apis::meta::v1::{Condition, ManagedFieldsEntry, Time},
    };

    use super::*;
    use crate::translate::translate_refs;

    fn full_meta(labels: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some("web".into()),
            namespace: Some("shop".into()),
            labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            annotations: Some([("a".to_owned(), "x".repeat(1000))].into()),
            managed_fields: Some(vec![ManagedFieldsEntry { manager: Some("kubectl".into()), ..Default::default() }]),
            resource_version: Some("123".into()),
            uid: Some("u-1".into()),
            ..ObjectMeta::default()
        }
    }

    fn objects(resource_version: &str) -> (Service, EndpointSlice) {
        let mut svc = Service {
            metadata: full_meta(&[("app", "web")]),
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                cluster_ip: Some("10.96.0.7".into()),
                selector: Some([("app".to_owned(), "web".to_owned())].into()),
                external_traffic_policy: Some("Local".into()),
                health_check_node_port: Some(32_000),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    node_port: Some(30_080),
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                }]),
                ..ServiceSpec::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress { ip: Some("192.0.2.1".into()), ..Default::default() }]),
                }),
                conditions: Some(vec![Condition {
                    type_: "x".into(),
                    status: "True".into(),
                    reason: "r".into(),
                    message: "m".into(),
                    last_transition_time: Time(k8s_openapi::jiff::Timestamp::default()),
                    observed_generation: None,
                }]),
            }),
        };
        svc.metadata.resource_version = Some(resource_version.into());
        let mut slice = EndpointSlice {
            metadata: full_meta(&[(SERVICE_NAME_LABEL, "web"), ("endpointslice.kubernetes.io/managed-by", "c")]),
            address_type: "IPv4".into(),
            endpoints: Some(
                (1..=3)
                    .map(|i| Endpoint {
                        addresses: vec![format!("10.244.0.{i}")],
                        conditions: Some(EndpointConditions {
                            ready: Some(i != 2),
                            serving: Some(true),
                            terminating: Some(i == 2),
                        }),
                        node_name: Some(if i == 1 { "node-a" } else { "node-b" }.into()),
                        target_ref: Some(ObjectReference { name: Some(format!("pod-{i}")), ..Default::default() }),
                        hints: Some(EndpointHints::default()),
                        zone: Some("z".into()),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..EndpointPort::default()
            }]),
        };
        slice.metadata.resource_version = Some(resource_version.into());
        slice.metadata.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::default()));
        (svc, slice)
    }

    /// A slice keeps its change's trigger time (the network programming latency starts there)
    /// and no other annotation.
    #[test]
    fn a_slice_keeps_only_its_trigger_time_annotation() {
        let (_, mut sl) = objects("1");
        let trigger = crate::metrics::TRIGGER_TIME_ANNOTATION;
        sl.metadata.annotations = Some(
            [(trigger.to_owned(), "2026-12-03T01:00:00Z".to_owned()), ("other".to_owned(), "x".to_owned())].into(),
        );
        let kept = slice(sl).metadata.annotations.expect("annotations");
        assert_eq!(kept.into_iter().collect::<Vec<_>>(), [(trigger.to_owned(), "2026-12-03T01:00:00Z".to_owned())]);
    }

    #[test]
    fn slimmed_objects_translate_the_same() {
        let (svc, sl) = objects("1");
        let node =
            crate::model::NodeContext { name: "node-a".into(), addresses: vec![[172, 18, 0, 2].into()], zone: None };
        let full = translate_refs(&[&svc], &[&sl], &node);
        let (s, l) = (service(svc), slice(sl));
        assert_eq!(translate_refs(&[&s], &[&l], &node), full);
        assert!(!full.desired.services.is_empty() && !full.desired.health_checks.is_empty());
        // What was dropped.
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        assert!(s.metadata.labels.is_none() && s.spec.as_ref().unwrap().selector.is_none());
        assert!(s.status.as_ref().unwrap().conditions.is_none());
        assert_eq!(l.metadata.labels.as_ref().unwrap().len(), 1);
        assert!(l.endpoints.as_ref().unwrap().iter().all(|e| e.target_ref.is_none() && e.zone.is_none()));
        assert!(l.endpoints.as_ref().unwrap().iter().all(|e| e.hints.is_some()), "topology hints are kept");
    }

    /// Endpoints with node and zone hints, with hints of one kind only, with empty hints: the
    /// compact form translates as the original on every node, in every zone.
    #[test]
    fn compact_slices_keep_the_topology_hints() {
        let hints = |zones: &[&str], nodes: &[&str]| EndpointHints {
            for_zones: Some(zones.iter().map(|z| ForZone { name: (*z).to_owned() }).collect()),
            for_nodes: Some(nodes.iter().map(|n| ForNode { name: (*n).to_owned() }).collect()),
        };
        let endpoint = |i: u8, node: &str, hints: EndpointHints| Endpoint {
            addresses: vec![format!("10.244.0.{i}")],
            node_name: Some(node.into()),
            hints: Some(hints),
            ..Endpoint::default()
        };
        let all = vec![
            endpoint(1, "node-a", hints(&["zone-a"], &["node-a"])),
            endpoint(2, "node-b", hints(&["zone-b"], &["node-b"])),
            endpoint(3, "node-c", hints(&["zone-a", "zone-b"], &["node-c"])),
        ];
        let mut zones_only = all.clone();
        for e in &mut zones_only {
            e.hints.as_mut().unwrap().for_nodes = None;
        }
        let mut one_empty = all.clone();
        one_empty[2].hints = Some(hints(&[], &[]));
        let svc = web_service();
        let mut narrowed = 0;
        for endpoints in [all, zones_only, one_empty] {
            let mut slice = odd_slices().remove(0);
            slice.endpoints = Some(endpoints);
            let r = ObjectRef { namespace: "shop".into(), name: "web".into() };
            for node_name in ["node-a", "node-b", "node-c", ""] {
                for zone in [None, Some("zone-a"), Some("zone-b")] {
                    let node = crate::model::NodeContext {
                        name: node_name.into(),
                        addresses: Vec::new(),
                        zone: zone.map(str::to_owned),
                    };
                    let compact = CompactSlice::new(&slice, node_name);
                    assert!(compact.has_zone_hints());
                    let view = compact.input(&r);
                    let full = translate_refs(&[&svc], &[&slice], &node);
                    assert_eq!(translate_refs(&[&svc], &[&view], &node), full, "node {node_name:?}, zone {zone:?}");
                    let slots = full.desired.services.values().next().unwrap().slots.len();
                    narrowed += usize::from(slots < 3);
                }
            }
        }
        assert!(narrowed > 10, "the hints narrow the slots in most cases: {narrowed}");
        assert!(!CompactSlice::new(&odd_slices()[0], "node-a").has_zone_hints());
    }

    /// The store's form of a Service decodes to the trimmed Service, compares as it does, and
    /// knows whether a port declares a `nodePort`.
    #[test]
    fn compact_services_decode_to_the_trimmed_service() {
        let (svc, _) = objects("1");
        let mut cluster_ip = web_service();
        for p in cluster_ip.spec.as_mut().unwrap().ports.iter_mut().flatten() {
            p.node_port = None;
        }
        for s in [svc.clone(), web_service(), cluster_ip.clone()] {
            assert_eq!(CompactService::new(s.clone()).to_service(), service(s));
        }
        assert!(CompactService::new(svc.clone()).has_node_port());
        assert!(!CompactService::new(cluster_ip).has_node_port());
        let mut annotated = svc.clone();
        annotated.metadata.annotations = Some([("a".to_owned(), "b".to_owned())].into());
        assert_eq!(CompactService::new(annotated), CompactService::new(svc.clone()));
        assert_ne!(CompactService::new(objects("2").0), CompactService::new(svc));
    }

    #[test]
    fn only_what_is_kept_matters_for_equality() {
        let (a_svc, a_slice) = objects("1");
        let (mut b_svc, mut b_slice) = objects("1");
        b_svc.metadata.annotations = None;
        b_slice.endpoints.as_mut().unwrap()[0].target_ref = None;
        assert_ne!((&a_svc, &a_slice), (&b_svc, &b_slice));
        assert_eq!(service(a_svc.clone()), service(b_svc));
        assert_eq!(slice(a_slice.clone()), slice(b_slice));
        let (c_svc, c_slice) = objects("2");
        assert_ne!(service(a_svc), service(c_svc));
        assert_ne!(slice(a_slice), slice(c_slice));
    }

    /// Slices of every shape the translation distinguishes: sloppy, IPv6, invalid and missing
    /// addresses; unset, partial and full conditions; this node, another, none; odd ports,
    /// labels and address types.
    fn odd_slices() -> Vec<EndpointSlice> {
        let endpoint = |address: Option<&str>, conditions: Option<[Option<bool>; 3]>, node: Option<&str>| Endpoint {
            addresses: address.into_iter().map(str::to_owned).chain(["10.9.9.9".to_owned()]).take(2).collect(),
            conditions: conditions.map(|[ready, serving, terminating]| EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name: node.map(str::to_owned),
            zone: Some("z".into()),
            ..Endpoint::default()
        };
        let endpoints = vec![
            endpoint(Some("10.244.0.1"), None, Some("node-a")),
            endpoint(Some("010.244.000.2"), Some([Some(false), Some(true), Some(true)]), Some("node-a")),
            endpoint(Some("10.244.0.3"), Some([None, Some(false), None]), Some("node-b")),
            endpoint(Some("10.244.0.4"), Some([Some(false), None, Some(true)]), None),
            endpoint(Some("10.244.0.5"), Some([Some(true), Some(true), Some(false)]), Some("")),
            endpoint(Some("fd00::6"), None, Some("node-a")),
            endpoint(Some("10.244.0.300"), None, None),
            endpoint(Some(""), None, None),
            Endpoint { addresses: Vec::new(), ..Endpoint::default() },
            // The same backend as the first, less available: the merge keeps the first.
            endpoint(Some("10.244.0.1"), Some([Some(false), Some(false), Some(true)]), Some("node-b")),
        ];
        let port = |name: Option<&str>, port: Option<i32>, protocol: Option<&str>| EndpointPort {
            name: name.map(str::to_owned),
            port,
            protocol: protocol.map(str::to_owned),
            app_protocol: Some("http".into()),
        };
        let base = EndpointSlice {
            metadata: full_meta(&[(SERVICE_NAME_LABEL, "web")]),
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(vec![
                port(Some("http"), Some(8080), Some("TCP")),
                port(Some("dns"), Some(5353), None),
                port(None, Some(9090), Some("UDP")),
                port(Some("bad"), None, Some("TCP")),
                port(Some("sctp"), Some(7777), Some("SCTP")),
            ]),
        };
        let mut slices = vec![base.clone()];
        for (i, address_type) in ["IPv6", "FQDN", "bogus"].into_iter().enumerate() {
            let mut other = base.clone();
            other.metadata.name = Some(format!("web-{i}"));
            other.address_type = address_type.into();
            slices.push(other);
        }
        for (i, labels) in [None, Some(""), Some("ghost")].into_iter().enumerate() {
            let mut other = base.clone();
            other.metadata.name = Some(format!("other-{i}"));
            other.metadata.labels = labels.map(|l| [(SERVICE_NAME_LABEL.to_owned(), l.to_owned())].into());
            slices.push(other);
        }
        let mut empty = base.clone();
        (empty.metadata.name, empty.endpoints, empty.ports) = (Some("web-empty".into()), None, None);
        slices.push(empty);
        slices
    }

    fn web_service() -> Service {
        let port = |name: Option<&str>, port: i32, protocol: &str| ServicePort {
            name: name.map(str::to_owned),
            port,
            protocol: Some(protocol.into()),
            node_port: Some(30_000 + port),
            ..ServicePort::default()
        };
        let mut svc = objects("1").0;
        let spec = svc.spec.as_mut().unwrap();
        spec.ports = Some(vec![port(Some("http"), 80, "TCP"), port(Some("dns"), 53, "TCP"), port(None, 90, "UDP")]);
        svc
    }

    #[test]
    fn compact_slices_translate_the_same() {
        let svc = web_service();
        let slices = odd_slices();
        for node_name in ["node-a", "node-b", ""] {
            let node = crate::model::NodeContext {
                name: node_name.into(),
                addresses: vec![[172, 18, 0, 2].into()],
                zone: None,
            };
            let packed: Vec<(ObjectRef, CompactSlice)> = slices
                .iter()
                .map(|s| {
                    let r = ObjectRef::new(translate::namespace_of(&s.metadata), s.metadata.name.as_deref().unwrap());
                    (r, CompactSlice::new(s, node_name))
                })
                .collect();
            let views: Vec<SliceView<'_>> = packed.iter().map(|(r, c)| c.input(r)).collect();
            let full = translate_refs(&[&svc], &slices.iter().collect::<Vec<_>>(), &node);
            assert_eq!(translate_refs(&[&svc], &views.iter().collect::<Vec<_>>(), &node), full, "node {node_name:?}");
            // The slices exercise what they are meant to.
            let entry = full.desired.services.values().next().unwrap();
            assert!(!entry.slots.is_empty(), "{full:?}");
            assert!(full.problems.len() >= 8, "{:?}", full.problems);
            if node_name == "node-a" {
                assert!(
                    entry.slots.iter().any(|b| b.local)
                        && full.desired.health_checks.values().all(|h| h.local_endpoints > 0)
                );
            }
        }
    }

    #[test]
    fn compact_slices_compare_by_what_translates() {
        let base = odd_slices().remove(0);
        let compact = |s: &EndpointSlice| CompactSlice::new(s, "node-a");
        let mut same = base.clone();
        same.metadata.resource_version = Some("99".into());
        same.endpoints.as_mut().unwrap()[1].addresses = vec!["10.244.0.2".into()];
        same.endpoints.as_mut().unwrap()[2].node_name = Some("node-c".into());
        same.endpoints.as_mut().unwrap()[0].zone = None;
        assert_eq!(compact(&base), compact(&same));
        assert_eq!(compact(&base).service_name(), Some("web"));

        let mut moved = base.clone();
        moved.endpoints.as_mut().unwrap()[2].node_name = Some("node-a".into());
        let mut unready = base.clone();
        unready.endpoints.as_mut().unwrap()[0].conditions =
            Some(EndpointConditions { ready: Some(false), ..Default::default() });
        let mut renumbered = base.clone();
        renumbered.ports.as_mut().unwrap()[0].port = Some(8081);
        let mut readdressed = base.clone();
        readdressed.endpoints.as_mut().unwrap()[5].addresses = vec!["fd00::7".into()];
        for changed in [moved, unready, renumbered, readdressed] {
            assert_ne!(compact(&base), compact(&changed));
        }
    }
}
