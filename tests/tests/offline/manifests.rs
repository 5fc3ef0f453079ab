//! The manifest renderer against the Kubernetes API types (no root needed): every rendered field
//! must be one the API knows (a round trip through k8s-openapi loses nothing, as kubectl's strict
//! field validation would demand), and `lab/manifests/demo.yaml` must hold the demo objects.
use k8s_openapi::{
    Resource,
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use rproxy_tests::{demo, manifest, nodeport};
use serde_yaml_ng::Value;

/// The documents of a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Parses `yaml` as a `T` and checks that serialising it again gives the same document.
fn strict<T: Resource + DeserializeOwned + Serialize>(yaml: &str) -> T {
    let value: Value = serde_yaml_ng::from_str(yaml).expect("valid YAML");
    let parsed: T =
        serde_yaml_ng::from_value(value.clone()).unwrap_or_else(|e| panic!("not a valid {}: {e}\n{yaml}", T::KIND));
    let again = serde_yaml_ng::to_value(&parsed).expect("serialisable");
    assert_eq!(again, value, "fields unknown to {} in:\n{yaml}", T::KIND);
    parsed
}

#[test]
fn service_renders_as_a_valid_service() {
    let svc: Service = strict(&demo::service().to_string());
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
    let ports = spec.ports.expect("ports");
    assert_eq!(ports.len(), 2);
    assert_eq!((ports[1].name.as_deref(), ports[1].protocol.as_deref(), ports[1].port), (Some("dns"), Some("UDP"), 80));
}

#[test]
fn endpoint_slice_renders_as_a_valid_endpoint_slice() {
    let slice: EndpointSlice = strict(&demo::endpoint_slice(&["backend-a", "backend-c"]).to_string());
    let labels = slice.metadata.labels.expect("labels");
    assert_eq!(labels["kubernetes.io/service-name"], "demo");
    assert_eq!(slice.address_type, "IPv4");
    let endpoints = slice.endpoints.expect("endpoints");
    let addresses: Vec<_> = endpoints.iter().map(|e| e.addresses[0].as_str()).collect();
    assert_eq!(addresses, ["10.244.1.11", "10.244.1.13"]);
    let conditions = endpoints[0].conditions.as_ref().expect("conditions");
    assert_eq!((conditions.ready, conditions.serving, conditions.terminating), (Some(true), Some(true), Some(false)));
    assert_eq!(endpoints[0].node_name.as_deref(), Some(demo::NODE_NAME));
}

#[test]
fn empty_lists_render_as_valid_objects() {
    let mut slice = demo::endpoint_slice(&[]);
    slice.ports.clear();
    strict::<EndpointSlice>(&slice.to_string());
    let mut svc = demo::service();
    svc.ports.clear();
    strict::<Service>(&svc.to_string());
}

#[test]
fn bundled_demo_manifest_matches_the_lab() {
    let bundled = include_str!("../../../lab/manifests/demo.yaml");
    assert_eq!(documents(bundled), documents(&demo::manifest()), "lab/manifests/demo.yaml is out of date");
}

#[test]
fn write_atomic_replaces_the_file_and_leaves_no_temp_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("svc.yaml");
    manifest::write_atomic(&path, "one").expect("first write");
    manifest::write_atomic(&path, "two").expect("second write");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "two");
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).expect("read_dir").map(|e| e.expect("entry").file_name()).collect();
    assert_eq!(names, ["svc.yaml"]);
}

#[test]
fn nodeport_service_renders_as_a_valid_nodeport_service() {
    let svc: Service = strict(&nodeport::service().to_string());
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("NodePort"));
    assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
    let ports: Vec<_> = spec.ports.expect("ports").into_iter().map(|p| (p.protocol, p.port, p.node_port)).collect();
    assert_eq!(
        ports,
        [(Some("TCP".into()), 80, Some(i32::from(nodeport::NODE_PORT))), (Some("UDP".into()), 80, Some(30080))]
    );
    let slice: EndpointSlice = strict(&nodeport::endpoint_slice(&nodeport::backends(1)).to_string());
    let nodes: Vec<_> = slice.endpoints.expect("endpoints").into_iter().map(|e| (e.addresses, e.node_name)).collect();
    assert_eq!(
        nodes,
        [
            (vec!["10.244.1.11".to_owned()], Some("node-1".to_owned())),
            (vec!["10.244.2.11".to_owned()], Some("node-2".to_owned()))
        ]
    );
    // The multi-document file holds both.
    assert_eq!(documents(&nodeport::manifest(&nodeport::backends(1))).len(), 2);
}
