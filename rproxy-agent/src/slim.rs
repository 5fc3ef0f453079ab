//! Trims Services and `EndpointSlices` to the fields the translation reads before the store
//! keeps them, like kube-proxy's informer transform (which drops `managedFields`).
//!
//! A real object carries much the agent never reads: managed fields, annotations, owner
//! references, most labels, endpoint target references and hints, and vectors with spare
//! capacity from deserialization. Keeping only what matters cuts the store's memory by more than
//! half at 10,000 Services. The `resourceVersion` is kept (logs and tests name versions by it), so
//! an API update still re-translates its one Service, which costs microseconds; a relist of
//! unchanged objects compares equal and costs nothing.
//!
//! Kept: name, namespace, resource version, the `kubernetes.io/service-name` label; the whole Service spec except
//! the pod selector, and `status.loadBalancer`; a slice's address type, ports, and each endpoint's
//! addresses, conditions and node name.
use k8s_openapi::{
    api::{
        core::v1::{Service, ServiceStatus},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::translate::SERVICE_NAME_LABEL;

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

/// The slice with only what the translation reads.
#[must_use]
pub fn slice(slice: EndpointSlice) -> EndpointSlice {
    let endpoints = slice.endpoints.map(|endpoints| {
        endpoints
            .into_iter()
            .map(|e| {
                let mut addresses = e.addresses;
                addresses.shrink_to_fit();
                Endpoint { addresses, conditions: e.conditions, node_name: e.node_name, ..Endpoint::default() }
            })
            .collect::<Vec<_>>()
            .into_boxed_slice()
            .into_vec()
    });
    let ports = slice.ports.map(|mut ports| {
        ports.shrink_to_fit();
        ports
    });
    EndpointSlice { metadata: meta(slice.metadata), address_type: slice.address_type, endpoints, ports }
}

fn meta(meta: ObjectMeta) -> ObjectMeta {
    let labels = meta.labels.and_then(|mut labels| {
        let name = labels.remove(SERVICE_NAME_LABEL)?;
        Some([(SERVICE_NAME_LABEL.to_owned(), name)].into())
    });
    ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        labels,
        resource_version: meta.resource_version,
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{LoadBalancerIngress, LoadBalancerStatus, ObjectReference, ServicePort, ServiceSpec},
            discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
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

    #[test]
    fn slimmed_objects_translate_the_same() {
        let (svc, sl) = objects("1");
        let node = crate::model::NodeContext { name: "node-a".into(), addresses: vec![[172, 18, 0, 2].into()] };
        let full = translate_refs(&[&svc], &[&sl], &node);
        let (s, l) = (service(svc), slice(sl));
        assert_eq!(translate_refs(&[&s], &[&l], &node), full);
        assert!(!full.desired.services.is_empty() && !full.desired.health_checks.is_empty());
        // What was dropped.
        assert!(s.metadata.annotations.is_none() && s.metadata.managed_fields.is_none());
        assert!(s.metadata.labels.is_none() && s.spec.as_ref().unwrap().selector.is_none());
        assert!(s.status.as_ref().unwrap().conditions.is_none());
        assert_eq!(l.metadata.labels.as_ref().unwrap().len(), 1);
        assert!(l.endpoints.as_ref().unwrap().iter().all(|e| e.target_ref.is_none() && e.hints.is_none()));
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
}
