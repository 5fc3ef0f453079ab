//! The Helm chart `deploy/helm/rproxy`, with a real helm: `$RPROXY_HELM_BIN`, else the one
//! `scripts/build-helm.sh` builds from tests/helm's Go module (a few minutes the first time, then
//! cached under /var/cache/rproxy/helm, or target/helm without root). `helm lint --strict`
//! passes; the default rendering is the objects of `deploy/*.yaml`, field for field; every flag of `rproxy-agent run` has a value; non-default
//! values render exactly the args given, which the real agent accepts (`deploy.rs`'s check);
//! values of the wrong type, and values the agent would refuse, fail `helm template` with a
//! message naming them.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde_yaml_ng::Value;

use crate::deploy::{
    agent_refuses, args, container, documents, help_flags, pod_spec, run_help, strict, workspace_root,
};

const CHART: &str = "deploy/helm/rproxy";
const RELEASE: &str = "rproxy";
const NAMESPACE: &str = "kube-system";
/// The flags of `rproxy-agent run` that have no value in values.yaml, as its comment says.
const NOT_VALUES: [&str; 4] = ["--node-name", "--manifests", "--kubeconfig", "--ebpf-object"];
/// The agent values that are no flag of `run`.
const NOT_FLAGS: [&str; 2] = ["extraArgs", "logLevel"];

/// helm: `$RPROXY_HELM_BIN`, else the binary `scripts/build-helm.sh` builds (or finds up to
/// date), once per test process.
fn helm_bin() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(bin) = std::env::var_os("RPROXY_HELM_BIN") {
            let bin = PathBuf::from(bin);
            assert!(bin.is_file(), "RPROXY_HELM_BIN={} is not a file", bin.display());
            return bin;
        }
        let script = workspace_root().join("scripts/build-helm.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}): set RPROXY_HELM_BIN to a helm binary to use that one",
            script.display(),
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let dir = stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("{} printed no directory", script.display()));
        let bin = Path::new(dir.trim()).join("helm");
        assert!(bin.is_file(), "{}: no helm in {dir}", script.display());
        bin
    })
}

/// What one helm run gave.
struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs helm with `args` in the workspace root. Its config, cache and data homes are in this
/// test's temp dir and its kubeconfig does not exist: nothing of the user's helm or cluster is
/// read.
fn helm<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Run {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    let out = Command::new(helm_bin())
        .current_dir(workspace_root())
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"))
        .output()
        .expect("running helm");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `helm <args> <chart args>` with `values` (YAML) as a values file if given.
fn helm_with_values(args: &[&str], values: Option<&str>) -> Run {
    let file = values.map(|yaml| {
        let file = tempfile::Builder::new().suffix(".yaml").tempfile().expect("a temp file");
        std::fs::write(file.path(), yaml).expect("writing the values file");
        file
    });
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    if let Some(file) = &file {
        all.extend([OsStr::new("-f"), file.path().as_os_str()]);
    }
    helm(all)
}

/// `helm template` of the chart as release `rproxy` in kube-system, with `values` (YAML) if
/// given: the rendering, or helm's error.
fn template(values: Option<&str>) -> Result<String, String> {
    let run = helm_with_values(&["template", RELEASE, CHART, "--namespace", NAMESPACE], values);
    if run.ok { Ok(run.stdout) } else { Err(run.stderr) }
}

/// The rendering with `values`, which must succeed.
fn rendered(values: Option<&str>) -> String {
    template(values).unwrap_or_else(|e| panic!("helm template with {values:?}: {e}"))
}

/// An object's identity: `apiVersion kind namespace/name`.
fn object_key(value: &Value) -> String {
    let field = |path: &[&str]| {
        path.iter().try_fold(value, |v, k| v.get(*k)).and_then(Value::as_str).unwrap_or_default().to_owned()
    };
    format!(
        "{} {} {}/{}",
        field(&["apiVersion"]),
        field(&["kind"]),
        field(&["metadata", "namespace"]),
        field(&["metadata", "name"])
    )
}

/// Adds `value` to `objects` under its key, failing on a second object with the same key.
fn insert(objects: &mut BTreeMap<String, Value>, value: Value, origin: &str) {
    let key = object_key(&value);
    assert!(objects.insert(key.clone(), value).is_none(), "{origin}: two objects {key}");
}

/// The objects of a multi-document YAML stream, by key.
fn objects(yaml: &str, origin: &str) -> BTreeMap<String, Value> {
    use serde::Deserialize as _;
    let mut objects = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}\n{yaml}"));
        if !value.is_null() {
            insert(&mut objects, value, origin);
        }
    }
    objects
}

/// The first place where `left` and `right` differ, as `path: left != right`, or `None` when they
/// are equal (mapping keys in any order).
fn difference(left: &Value, right: &Value, path: &str) -> Option<String> {
    match (left, right) {
        (Value::Mapping(lefts), Value::Mapping(rights)) => {
            let keys: BTreeSet<String> =
                lefts.keys().chain(rights.keys()).map(|k| serde_yaml_ng::to_string(k).unwrap_or_default()).collect();
            keys.iter().find_map(|key| {
                let key_value: Value = serde_yaml_ng::from_str(key).unwrap_or(Value::Null);
                let sub = format!("{path}.{}", key.trim());
                match (lefts.get(&key_value), rights.get(&key_value)) {
                    (Some(l), Some(r)) => difference(l, r, &sub),
                    (l, r) => Some(format!("{sub}: {l:?} != {r:?}")),
                }
            })
        }
        (Value::Sequence(lefts), Value::Sequence(rights)) if lefts.len() == rights.len() => {
            lefts.iter().zip(rights).enumerate().find_map(|(i, (l, r))| difference(l, r, &format!("{path}[{i}]")))
        }
        _ => (left != right).then(|| format!("{path}: {left:?} != {right:?}")),
    }
}

/// The one `DaemonSet` of a rendering, parsed strictly (no field unknown to the API type), and
/// every other object checked the same way.
fn daemon_set(yaml: &str, origin: &str) -> DaemonSet {
    let origin = Path::new(origin);
    let mut found = None;
    for (key, value) in objects(yaml, &origin.display().to_string()) {
        match key.split_whitespace().take(2).collect::<Vec<_>>()[..] {
            ["v1", "ServiceAccount"] => {
                strict::<ServiceAccount>(origin, &value);
            }
            ["rbac.authorization.k8s.io/v1", "ClusterRole"] => {
                strict::<ClusterRole>(origin, &value);
            }
            ["rbac.authorization.k8s.io/v1", "ClusterRoleBinding"] => {
                strict::<ClusterRoleBinding>(origin, &value);
            }
            ["apps/v1", "DaemonSet"] => assert!(found.replace(strict(origin, &value)).is_none(), "a second DaemonSet"),
            _ => panic!("{}: unexpected object {key}", origin.display()),
        }
    }
    found.unwrap_or_else(|| panic!("{}: no DaemonSet", origin.display()))
}

/// The container's args after `run`, as flag → value (each flag once, each with a value).
fn flag_values(ds: &DaemonSet) -> BTreeMap<&str, &str> {
    let args = args(ds);
    assert_eq!(args.first().map(String::as_str), Some("run"), "{args:?}");
    let rest = &args[1..];
    assert_eq!(rest.len() % 2, 0, "every flag has a value: {args:?}");
    let mut flags = BTreeMap::new();
    for pair in rest.chunks(2) {
        assert!(pair[0].starts_with("--"), "a flag, then its value: {args:?}");
        assert!(flags.insert(pair[0].as_str(), pair[1].as_str()).is_none(), "{} twice: {args:?}", pair[0]);
    }
    flags
}

/// The container's ports, as (name, port).
fn ports(ds: &DaemonSet) -> Vec<(&str, i32)> {
    container(ds).ports.iter().flatten().map(|p| (p.name.as_deref().unwrap_or_default(), p.container_port)).collect()
}

/// The pod template's annotations.
fn annotations(ds: &DaemonSet) -> BTreeMap<String, String> {
    ds.spec.template.metadata.as_ref().and_then(|m| m.annotations.clone()).unwrap_or_default()
}

/// The values file of the chart.
fn default_values() -> Value {
    let path = workspace_root().join(CHART).join("values.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `ctMaxIpv6` → `--ct-max-ipv6`.
fn flag_of(key: &str) -> String {
    let mut flag = String::from("--");
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            flag.push('-');
        }
        flag.push(c.to_ascii_lowercase());
    }
    flag
}

/// Every agent value set to something other than the agent's and the chart's defaults, with an
/// image and an extra toleration.
const NON_DEFAULT: &str = r#"
image:
  repository: registry.example/rproxy-agent
  tag: v0.1.0
agent:
  podDevices: ["veth*", "cni*"]
  bpffs: /sys/fs/bpf/rproxy-blue
  devices: [eth0, bond0]
  nodeportAddresses: [10.0.0.0/8, "2001:db8::/64"]
  xdpMode: native
  cgroup: /run/rproxy/cgroup/system.slice
  podSockets: none
  ctGcInterval: 3
  ctMax: 65536
  ctMaxIpv6: 4096
  serviceMapMax: 524288
  backendMapMax: 524288
  rescanInterval: 7
  healthzBindAddress: 0.0.0.0:10266
  metricsBindAddress: "[::]:9100"
  snatPortRange: 20000-29999
  externalClusterIp: false
  serviceCounters: false
  logLevel: debug
tolerations:
  - operator: Exists
  - key: example.com/dedicated
    operator: Equal
    value: proxy
    effect: NoSchedule
"#;

#[test]
fn helm_lint_passes_strict_with_default_and_non_default_values() {
    for values in [None, Some(NON_DEFAULT)] {
        let run = helm_with_values(&["lint", "--strict", CHART], values);
        assert!(run.ok, "helm lint --strict with {values:?}:\n{}{}", run.stdout, run.stderr);
        assert!(run.stdout.contains("1 chart(s) linted, 0 chart(s) failed"), "{}", run.stdout);
        assert!(!run.stdout.contains("[WARNING]") && !run.stdout.contains("[ERROR]"), "{}", run.stdout);
    }
}

#[test]
fn the_default_rendering_is_the_deploy_manifests() {
    let rendered = objects(&rendered(None), "the default rendering");
    let mut deployed = BTreeMap::new();
    for (file, value) in documents() {
        insert(&mut deployed, value, &file.display().to_string());
    }
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        deployed.keys().collect::<Vec<_>>(),
        "the default rendering (left) and deploy/*.yaml (right) hold the same objects"
    );
    assert_eq!(rendered.len(), 4, "{:?}", rendered.keys());
    for (key, value) in &rendered {
        if let Some(diff) = difference(value, &deployed[key], "") {
            panic!(
                "{key}: the default rendering differs from deploy/ at {diff}\n--- rendered:\n{}--- deploy/:\n{}",
                serde_yaml_ng::to_string(value).unwrap_or_default(),
                serde_yaml_ng::to_string(&deployed[key]).unwrap_or_default()
            );
        }
    }
}

#[test]
fn the_difference_finder_names_the_first_difference() {
    let a: Value = serde_yaml_ng::from_str("{a: {b: [1, 2]}, c: x}").expect("YAML");
    let reordered: Value = serde_yaml_ng::from_str("{c: x, a: {b: [1, 2]}}").expect("YAML");
    assert_eq!(difference(&a, &reordered, ""), None, "key order does not matter");
    let b: Value = serde_yaml_ng::from_str("{a: {b: [1, 3]}, c: x}").expect("YAML");
    assert_eq!(difference(&a, &b, "").as_deref(), Some(".a.b[1]: Number(2) != Number(3)"));
    let c: Value = serde_yaml_ng::from_str("{a: {b: [1, 2]}}").expect("YAML");
    assert_eq!(difference(&a, &c, "").as_deref(), Some(r#".c: Some(String("x")) != None"#));
}

#[test]
fn every_agent_flag_has_a_value() {
    let defaults = default_values();
    let agent = defaults.get("agent").and_then(Value::as_mapping).expect("agent values");
    let keys: Vec<&str> = agent.keys().filter_map(Value::as_str).collect();
    let valued: BTreeSet<String> = keys.iter().filter(|k| !NOT_FLAGS.contains(k)).map(|k| flag_of(k)).collect();
    let mut flags = help_flags(&run_help());
    flags.remove("--help");
    for flag in NOT_VALUES {
        assert!(flags.remove(flag), "`rproxy-agent run` no longer has {flag}: update NOT_VALUES and values.yaml");
    }
    assert_eq!(valued, flags, "values.yaml's agent values (left) and `rproxy-agent run`'s flags (right)");
    let text = std::fs::read_to_string(workspace_root().join(CHART).join("values.yaml")).expect("values.yaml");
    for flag in NOT_VALUES {
        assert!(text.contains(flag), "values.yaml says why {flag} has no value");
    }
    // NON_DEFAULT sets each of them, so the test below renders every flag.
    let non_default: Value = serde_yaml_ng::from_str(NON_DEFAULT).expect("NON_DEFAULT is YAML");
    let set: BTreeSet<String> = non_default["agent"]
        .as_mapping()
        .expect("agent")
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| !NOT_FLAGS.contains(k))
        .map(flag_of)
        .collect();
    assert_eq!(set, valued, "NON_DEFAULT sets every flag's value");
}

#[test]
fn non_default_values_render_exactly_and_the_agent_accepts_them() {
    let ds = daemon_set(&rendered(Some(NON_DEFAULT)), "helm template (non-default values)");
    let expected = BTreeMap::from([
        ("--node-name", "$(NODE_NAME)"),
        ("--pod-devices", "veth*,cni*"),
        ("--bpffs", "/sys/fs/bpf/rproxy-blue"),
        ("--devices", "eth0,bond0"),
        ("--nodeport-addresses", "10.0.0.0/8,2001:db8::/64"),
        ("--xdp-mode", "native"),
        ("--cgroup", "/run/rproxy/cgroup/system.slice"),
        ("--pod-sockets", "none"),
        ("--ct-gc-interval", "3"),
        ("--ct-max", "65536"),
        ("--ct-max-ipv6", "4096"),
        ("--service-map-max", "524288"),
        ("--backend-map-max", "524288"),
        ("--rescan-interval", "7"),
        ("--healthz-bind-address", "0.0.0.0:10266"),
        ("--metrics-bind-address", "[::]:9100"),
        ("--snat-port-range", "20000-29999"),
        ("--external-cluster-ip", "false"),
        ("--service-counters", "false"),
    ]);
    assert_eq!(flag_values(&ds), expected);
    if let Some(refused) = agent_refuses(args(&ds)) {
        panic!("the non-default rendering: {refused}");
    }

    let c = container(&ds);
    assert_eq!(c.image.as_deref(), Some("registry.example/rproxy-agent:v0.1.0"));
    assert_eq!(ports(&ds), [("metrics", 9100), ("healthz", 10266)], "the ports follow the bind addresses");
    let annotations = annotations(&ds);
    assert_eq!(annotations.get("prometheus.io/port").map(String::as_str), Some("9100"));
    assert_eq!(annotations.get("prometheus.io/scrape").map(String::as_str), Some("true"));
    let log = c.env.iter().flatten().find(|e| e.name == "RPROXY_LOG").and_then(|e| e.value.as_deref());
    assert_eq!(log, Some("debug"));
    let tolerations = serde_yaml_ng::to_value(pod_spec(&ds).tolerations.as_ref().expect("tolerations")).expect("YAML");
    let given: Value = serde_yaml_ng::from_str(NON_DEFAULT).expect("YAML");
    assert_eq!(tolerations, given["tolerations"], "the tolerations given, and only them");
    // What values.yaml keeps for every node's service proxy.
    let pod = pod_spec(&ds);
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.host_network, Some(true));
}

#[test]
fn empty_bind_addresses_and_no_cgroup_leave_out_ports_annotations_and_mounts() {
    let values = r#"
agent:
  devices: []
  cgroup: none
  healthzBindAddress: ""
  metricsBindAddress: ""
"#;
    let ds = daemon_set(&rendered(Some(values)), "helm template (nothing served)");
    let flags = flag_values(&ds);
    assert_eq!(flags.get("--metrics-bind-address"), Some(&""), "{flags:?}");
    assert_eq!(flags.get("--healthz-bind-address"), Some(&""), "{flags:?}");
    assert_eq!(flags.get("--cgroup"), Some(&"none"), "{flags:?}");
    assert_eq!(flags.get("--devices"), None, "no devices: no NodePort");
    if let Some(refused) = agent_refuses(args(&ds)) {
        panic!("the rendering without ports: {refused}");
    }
    assert_eq!(ports(&ds), [], "no port is served");
    assert!(annotations(&ds).is_empty(), "nothing to scrape: {:?}", annotations(&ds));
    let mounts: Vec<&str> = container(&ds).volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert_eq!(mounts, ["/sys/fs/bpf"], "no host cgroup mount without the hooks");
    let volumes: Vec<&str> = pod_spec(&ds).volumes.iter().flatten().map(|v| v.name.as_str()).collect();
    assert_eq!(volumes, ["bpffs"]);
}

#[test]
fn names_labels_image_digest_and_api_server_follow_their_values() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let values = format!(
        r#"
fullnameOverride: rproxy-blue
image: {{repository: registry.example/rproxy-agent, tag: ignored, digest: "{digest}"}}
apiServer: {{host: 192.0.2.10, port: 8443}}
extraEnv: [{{name: EXTRA, value: "1"}}]
commonLabels: {{team: net}}
podLabels: {{tier: node}}
podAnnotations: {{example.com/note: hi}}
metrics: {{scrapeAnnotations: false}}
"#
    );
    let yaml = rendered(Some(&values));
    let objects = objects(&yaml, "helm template (names)");
    for (key, value) in &objects {
        assert_eq!(value["metadata"]["name"].as_str(), Some("rproxy-blue"), "{key}");
        assert_eq!(value["metadata"]["labels"]["team"].as_str(), Some("net"), "{key}: commonLabels");
        assert_eq!(value["metadata"]["labels"]["app.kubernetes.io/name"].as_str(), Some("rproxy-blue"), "{key}");
    }
    let binding: ClusterRoleBinding = strict(
        Path::new("binding"),
        objects.values().find(|v| v["kind"] == "ClusterRoleBinding").expect("a ClusterRoleBinding"),
    );
    assert_eq!(binding.role_ref.name, "rproxy-blue");
    let subjects = binding.subjects.expect("subjects");
    assert_eq!((subjects[0].name.as_str(), subjects[0].namespace.as_deref()), ("rproxy-blue", Some(NAMESPACE)));

    let ds = daemon_set(&yaml, "helm template (names)");
    assert_eq!(pod_spec(&ds).service_account_name.as_deref(), Some("rproxy-blue"));
    let selector = ds.spec.selector.match_labels.clone().expect("matchLabels");
    assert_eq!(selector, BTreeMap::from([("app.kubernetes.io/name".to_owned(), "rproxy-blue".to_owned())]));
    let pod_labels = ds.spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).expect("pod labels");
    assert_eq!(pod_labels.get("tier").map(String::as_str), Some("node"));
    assert_eq!(pod_labels.get("app.kubernetes.io/name").map(String::as_str), Some("rproxy-blue"));
    assert_eq!(
        annotations(&ds),
        BTreeMap::from([("example.com/note".to_owned(), "hi".to_owned())]),
        "podAnnotations, without the scrape annotations"
    );
    let c = container(&ds);
    assert_eq!(c.image.as_deref(), Some(format!("registry.example/rproxy-agent@{digest}").as_str()));
    let env: BTreeMap<&str, Option<&str>> =
        c.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
    assert_eq!(env.get("KUBERNETES_SERVICE_HOST"), Some(&Some("192.0.2.10")));
    assert_eq!(env.get("KUBERNETES_SERVICE_PORT"), Some(&Some("8443")));
    assert_eq!(env.get("EXTRA"), Some(&Some("1")));
    assert_eq!(env.get("NODE_NAME"), Some(&None), "NODE_NAME still from the downward API");
}

/// Checks that the schema node `schema` types every value under `values` (at `path`): each key
/// has a schema with a `type`, recursively where the schema lists properties.
fn check_typed(values: &Value, schema: &serde_json::Value, path: &str) -> Vec<String> {
    let mut untyped = Vec::new();
    let Some(map) = values.as_mapping() else { return untyped };
    let Some(properties) = schema.get("properties") else { return untyped };
    for (key, value) in map {
        let key = key.as_str().expect("string keys");
        let sub = format!("{path}.{key}");
        match properties.get(key) {
            Some(node) if node.get("type").is_some() => untyped.extend(check_typed(value, node, &sub)),
            _ => untyped.push(sub),
        }
    }
    untyped
}

#[test]
fn the_schema_types_every_value_and_refuses_unknown_ones() {
    let path = workspace_root().join(CHART).join("values.schema.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let schema: serde_json::Value = serde_json::from_str(&text).expect("values.schema.json is JSON");
    assert_eq!(check_typed(&default_values(), &schema, ""), Vec::<String>::new(), "values without a typed schema");
    for (name, node) in [("the values", &schema), ("agent", &schema["properties"]["agent"])] {
        assert_eq!(node["additionalProperties"], false, "{name}: a misspelt key is an error");
    }
}

#[test]
fn wrongly_typed_values_fail_helm_template() {
    for (values, path) in [
        ("agent: {ctMax: \"524288\"}", "/agent/ctMax"),
        ("agent: {ctGcInterval: 2.5}", "/agent/ctGcInterval"),
        ("agent: {externalClusterIp: \"yes\"}", "/agent/externalClusterIp"),
        ("agent: {devices: eth0}", "/agent/devices"),
        ("agent: {podDevices: []}", "/agent/podDevices"),
        ("agent: {ctMaxx: 4096}", "ctMaxx"),
        ("image: {tag: 1.0}", "/image/tag"),
        ("tolerations: {operator: Exists}", "/tolerations"),
        ("metrics: {scrapeAnnotations: \"true\"}", "/metrics/scrapeAnnotations"),
        ("resources: {limits: {memory: [1]}}", "/resources/limits/memory"),
    ] {
        let error = template(Some(values)).err().unwrap_or_else(|| panic!("{values}: rendered"));
        assert!(error.contains("values don't meet the specifications of the schema"), "{values}: {error}");
        assert!(error.contains(path), "{values}: the error names {path}: {error}");
    }
}

#[test]
fn values_the_agent_would_refuse_fail_at_render_time() {
    for (key, value, flag) in [
        ("ctMax", "1", "--ct-max"),
        ("ctMaxIpv6", "33554432", "--ct-max-ipv6"),
        ("serviceMapMax", "4095", "--service-map-max"),
        ("backendMapMax", "16777217", "--backend-map-max"),
        ("xdpMode", "fast", "--xdp-mode"),
        ("podSockets", "some", "--pod-sockets"),
        ("nodeportAddresses", "10.0.0.1", "--nodeport-addresses"),
        ("metricsBindAddress", "localhost:9100", "--metrics-bind-address"),
        ("healthzBindAddress", "0.0.0.0:70000", "--healthz-bind-address"),
        ("snatPortRange", "80-90", "--snat-port-range"),
        ("snatPortRange", "30000-20000", "--snat-port-range"),
    ] {
        let args = ["run", "--node-name", "n", "--pod-devices", "veth*", flag, value].map(str::to_owned);
        assert!(agent_refuses(&args).is_some(), "the agent takes {flag} {value}: not a case for this test");
        // As YAML: a number where the agent's value is one, a list for the list values.
        let yaml = if key == "nodeportAddresses" { format!("[{value}]") } else { format!("{value:?}") };
        let yaml = if value.parse::<u64>().is_ok() { value.to_owned() } else { yaml };
        let values = format!("agent: {{{key}: {yaml}}}");
        let error = template(Some(&values)).err().unwrap_or_else(|| panic!("{values}: rendered"));
        assert!(error.contains(key), "{values}: the error names {key}: {error}");
    }
}

#[test]
fn the_install_notes_say_how_to_check_and_clean_up() {
    let run = helm(["install", RELEASE, CHART, "--namespace", NAMESPACE, "--dry-run=client"]);
    assert!(run.ok, "helm install --dry-run=client: {}", run.stderr);
    let notes = run.stdout.split("NOTES:").nth(1).unwrap_or_else(|| panic!("no NOTES:\n{}", run.stdout));
    for expected in [
        "kubectl -n kube-system rollout status daemonset/rproxy-agent",
        "all watches in sync",
        "http://NODE-IP:10249/metrics",
        "rproxy-agent cleanup --bpffs /sys/fs/bpf/rproxy",
    ] {
        assert!(notes.contains(expected), "NOTES lack {expected:?}:\n{notes}");
    }
}
