//! Input fuzzing of the control plane (proptest): Services and `EndpointSlices` as YAML and JSON,
//! valid, malformed and hostile, through the manifests parser and the translation. Properties:
//! no panic; every problem names an object (its `namespace/name`) or the file; a valid Service
//! and its slice, next to the rest, keep being translated (one bad object never takes the others
//! down); hostile inputs (deep nesting, alias bombs, huge port lists, 10,000 endpoints in one
//! slice, invalid UTF-8) end in a problem or in a bounded result, never in a hang or a crash.
use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
};

use proptest::prelude::*;
use serde_json::{Value, json};

use super::manifests::{load_dir, parse_documents};
use crate::{
    model::{Frontend, NodeContext, Protocol},
    translate::translate,
};

/// The valid Service every case carries, and its slice: it must stay translated.
fn witness() -> String {
    let svc = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "witness", "namespace": "ok"},
        "spec": {"clusterIP": "10.96.9.9", "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    });
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "witness-1", "namespace": "ok", "labels": {"kubernetes.io/service-name": "witness"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.244.9.9"], "conditions": {"ready": true}}]
    });
    format!(
        "{}\n---\n{}\n",
        serde_yaml_ng::to_string(&svc).expect("yaml"),
        serde_yaml_ng::to_string(&slice).expect("yaml")
    )
}

fn node() -> NodeContext {
    NodeContext { name: "n1".into(), addresses: vec![IpAddr::V4(Ipv4Addr::new(172, 31, 0, 1))], zone: None }
}

/// Parses `text` (with the witness after it), translates, and checks the properties.
fn check(text: &str) -> Result<(), TestCaseError> {
    let all = format!("{text}\n---\n{}", witness());
    let (objects, mut problems) = parse_documents(&all, "case.yaml");
    let t = translate(&objects, &node());
    problems.extend(t.problems);
    for p in &problems {
        prop_assert!(!p.object.is_empty() && !p.reason.is_empty(), "a problem without its object or reason: {p:?}");
        prop_assert!(p.kind == "file" || p.object.contains('/'), "{} {}: not namespace/name", p.kind, p.object);
    }
    let fe = Frontend { addr: IpAddr::V4(Ipv4Addr::new(10, 96, 9, 9)), port: 80, proto: Protocol::Tcp };
    let entry = t.desired.services.get(&fe);
    prop_assert!(
        entry.is_some_and(|e| e.slots.len() == 1 && &*e.service.name == "witness"),
        "the witness Service is gone: {problems:?}"
    );
    Ok(())
}

/// Scalars of every JSON type, hostile ones included.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-2i64..70_000).prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        prop_oneof![
            Just("TCP"),
            Just("UDP"),
            Just("SCTP"),
            Just("tcp"),
            Just(""),
            Just("10.96.0.1"),
            Just("None"),
            Just("fd00::1"),
            Just("300.1.1.1"),
            Just("10.0.0.0/8"),
            Just("Local"),
            Just("Cluster"),
            Just("IPv4"),
            Just("IPv6"),
            Just("FQDN"),
            Just("ClientIP"),
            Just("NodePort"),
            Just("LoadBalancer"),
            Just("ExternalName"),
        ]
        .prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..4)
            .prop_map(|v| Value::from(v.iter().map(|b| format!("{b}")).collect::<Vec<_>>().join("."))),
    ]
}

/// A value of any shape, up to a few levels deep.
fn any_value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field of a Service or a slice, by path (in JSON pointer form), that a mutation replaces.
const SERVICE_FIELDS: [&str; 18] = [
    "/metadata/name",
    "/metadata/namespace",
    "/metadata/labels",
    "/spec/type",
    "/spec/clusterIP",
    "/spec/clusterIPs",
    "/spec/ports",
    "/spec/ports/0/port",
    "/spec/ports/0/protocol",
    "/spec/ports/0/nodePort",
    "/spec/ports/0/targetPort",
    "/spec/externalIPs",
    "/spec/externalTrafficPolicy",
    "/spec/internalTrafficPolicy",
    "/spec/sessionAffinity",
    "/spec/sessionAffinityConfig",
    "/spec/loadBalancerSourceRanges",
    "/status/loadBalancer/ingress",
];

const SLICE_FIELDS: [&str; 12] = [
    "/metadata/name",
    "/metadata/labels",
    "/addressType",
    "/ports",
    "/ports/0/port",
    "/ports/0/protocol",
    "/endpoints",
    "/endpoints/0/addresses",
    "/endpoints/0/conditions",
    "/endpoints/0/nodeName",
    "/endpoints/0/hints",
    "/endpoints/0/zone",
];

fn service_template(n: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("s{n}"), "namespace": "fuzz"},
        "spec": {
            "type": "NodePort", "clusterIP": format!("10.96.1.{}", n % 250 + 1),
            "ports": [{"name": "p", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30000 + n % 2000}],
            "externalTrafficPolicy": "Cluster", "sessionAffinity": "None",
        }
    })
}

fn slice_template(n: u16) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": format!("s{n}-x"), "namespace": "fuzz", "labels": {"kubernetes.io/service-name": format!("s{n}")}},
        "ports": [{"name": "p", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [format!("10.244.1.{}", n % 250 + 1)], "conditions": {"ready": true}, "nodeName": "n1"}]
    })
}

/// Sets the field at `pointer` (creating the path where it can) to `v`.
fn set(doc: &mut Value, pointer: &str, v: Value) {
    if let Some(slot) = doc.pointer_mut(pointer) {
        *slot = v;
        return;
    }
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    if let Some(Value::Object(m)) = doc.pointer_mut(parent) {
        m.insert(key.to_owned(), v);
    }
}

/// Services and slices from the templates, each with up to three fields replaced.
fn objects() -> impl Strategy<Value = Vec<Value>> {
    let mutated = |template: fn(u16) -> Value, fields: &'static [&'static str]| {
        (any::<u16>(), prop::collection::vec((prop::sample::select(fields), any_value()), 0..3)).prop_map(
            move |(n, muts)| {
                let mut doc = template(n);
                for (field, v) in muts {
                    set(&mut doc, field, v);
                }
                doc
            },
        )
    };
    prop::collection::vec(
        prop_oneof![mutated(service_template, &SERVICE_FIELDS), mutated(slice_template, &SLICE_FIELDS)],
        1..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text at all: problems, never a panic, and the witness stays.
    #[test]
    fn any_text_is_refused_or_read_and_the_rest_stays(text in ".{0,400}") {
        check(&text)?;
    }

    /// Services and slices with fields of any type and value, as YAML and as JSON.
    #[test]
    fn mutated_objects_are_refused_by_name_and_the_rest_stays(docs in objects(), json in any::<bool>()) {
        let text = docs
            .iter()
            .map(|d| if json { serde_json::to_string(d).expect("json") } else { serde_yaml_ng::to_string(d).expect("yaml") })
            .collect::<Vec<_>>()
            .join("\n---\n");
        check(&text)?;
    }
}

#[test]
fn hostile_documents_end_in_problems_and_the_rest_stays() {
    // Deep nesting, past the parser's recursion limit.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    // An alias bomb ("billion laughs"): each level nine references to the one before.
    let mut bomb = String::from("a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n");
    for (prev, name) in ["a", "b", "c", "d", "e", "f", "g", "h", "i"].windows(2).map(|w| (w[0], w[1])) {
        let refs = vec![format!("*{prev}"); 9].join(",");
        let _ = writeln!(bomb, "{name}: &{name} [{refs}]");
    }
    // A Service with 10,000 ports, and a slice with 10,000 endpoints.
    let mut many_ports = service_template(7);
    let ports: Vec<Value> = (0..10_000)
        .map(|i| json!({"name": format!("p{i}"), "port": 1 + i % 65_000, "targetPort": 8080, "protocol": "TCP"}))
        .collect();
    set(&mut many_ports, "/spec/ports", Value::from(ports));
    let mut many_endpoints = slice_template(7);
    let endpoints: Vec<Value> = (0..10_000)
        .map(|i| json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256)], "conditions": {"ready": true}}))
        .collect();
    set(&mut many_endpoints, "/endpoints", Value::from(endpoints));
    for (what, text) in [
        ("deep nesting", deep),
        ("alias bomb", bomb),
        ("10,000 ports", serde_json::to_string(&many_ports).expect("json")),
        ("10,000 endpoints", serde_json::to_string(&many_endpoints).expect("json")),
    ] {
        check(&text).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
}

#[test]
fn a_file_that_is_not_utf8_is_a_problem_naming_it_and_the_rest_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("bad.yaml"), b"kind: Service\nmetadata: {name: \xff\xfe}\n").expect("write");
    std::fs::write(dir.path().join("good.yaml"), witness()).expect("write");
    let (objects, problems) = load_dir(dir.path()).expect("the directory is readable");
    assert!(problems.iter().any(|p| p.kind == "file" && p.object.ends_with("bad.yaml")), "{problems:?}");
    assert_eq!((objects.services.len(), objects.slices.len()), (1, 1), "the good file loads");
}

#[test]
fn a_file_past_the_size_limit_is_refused_whole_and_the_rest_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let big = std::fs::File::create(dir.path().join("big.yaml")).expect("create");
    big.set_len(super::manifests::MAX_FILE_BYTES + 1).expect("a sparse file past the limit");
    std::fs::write(dir.path().join("good.yaml"), witness()).expect("write");
    let (objects, problems) = load_dir(dir.path()).expect("the directory is readable");
    assert!(
        problems.iter().any(|p| p.kind == "file" && p.object.ends_with("big.yaml") && p.reason.contains("bytes")),
        "{problems:?}"
    );
    assert_eq!((objects.services.len(), objects.slices.len()), (1, 1), "the good file loads");
}
