//! The manifests in `deploy/` against the Kubernetes API types and the agent's command line (no
//! root needed). Every document must parse into its k8s-openapi type with no field lost (a typo'd
//! field would otherwise be dropped silently), and hold the properties deploy/README.md promises:
//! read-only RBAC on exactly the watched resources, the `DaemonSet`'s host networking, downward-API
//! node name, host bpffs mount, and an unprivileged container with exactly the documented
//! capabilities. The container's args are checked against the real agent (every flag exists in
//! `run --help`, every required flag is given, the agent's own parsers take every value): the
//! binary in `RPROXY_AGENT_BIN`, else one built here with cargo. `helm.rs` reuses these helpers
//! for the Helm chart's renderings.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, PodSpec, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
    serde::{Deserialize as _, Serialize, de::DeserializeOwned},
};
use serde_yaml_ng::Value;

const NAME: &str = "rproxy-agent";
const NAMESPACE: &str = "kube-system";
const BPFFS: &str = "/sys/fs/bpf";

/// The workspace root, of the sources this test was compiled from.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every document of every `deploy/*.yaml`, with the file it came from.
pub(crate) fn documents() -> Vec<(PathBuf, Value)> {
    let dir = workspace_root().join("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "yaml" || ext == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", file.display()));
            if !value.is_null() {
                docs.push((file.clone(), value));
            }
        }
    }
    docs
}

/// The deploy objects, typed.
struct Deploy {
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    daemon_set: DaemonSet,
}

/// Parses `value` as a `T`, and checks that serialising it again gives the same document (no
/// field unknown to the API type).
pub(crate) fn strict<T: Resource + DeserializeOwned + Serialize>(file: &Path, value: &Value) -> T {
    let parsed: T = serde_yaml_ng::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{}: not a valid {}: {e}", file.display(), T::KIND));
    let again = serde_yaml_ng::to_value(&parsed).expect("serialisable");
    assert_eq!(&again, value, "{}: fields unknown to {} (left: as the API type reads it)", file.display(), T::KIND);
    parsed
}

/// Puts `new` in `slot`, failing on a second object of the same kind.
fn once<T: Resource>(slot: &mut Option<T>, new: T, file: &Path) {
    assert!(slot.replace(new).is_none(), "{}: a second {}", file.display(), T::KIND);
}

fn deploy() -> Deploy {
    let (mut service_account, mut cluster_role, mut binding, mut daemon_set) = (None, None, None, None);
    for (file, value) in documents() {
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
        match (api_version.as_str(), kind.as_str()) {
            ("v1", "ServiceAccount") => once(&mut service_account, strict(&file, &value), &file),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => once(&mut cluster_role, strict(&file, &value), &file),
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => once(&mut binding, strict(&file, &value), &file),
            ("apps/v1", "DaemonSet") => once(&mut daemon_set, strict(&file, &value), &file),
            other => panic!("{}: unexpected object {other:?}", file.display()),
        }
    }
    Deploy {
        service_account: service_account.expect("a ServiceAccount"),
        cluster_role: cluster_role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        daemon_set: daemon_set.expect("a DaemonSet"),
    }
}

pub(crate) fn pod_spec(ds: &DaemonSet) -> &PodSpec {
    ds.spec.template.spec.as_ref().expect("pod spec")
}

/// The one container.
pub(crate) fn container(ds: &DaemonSet) -> &Container {
    let containers = &pod_spec(ds).containers;
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

pub(crate) fn args(ds: &DaemonSet) -> &[String] {
    container(ds).args.as_deref().expect("container args")
}

/// The value after `flag` in the container's args (as `--flag value` or `--flag=value`).
fn arg_value<'a>(ds: &'a DaemonSet, flag: &str) -> Option<&'a str> {
    let args = args(ds);
    args.iter().enumerate().find_map(|(i, arg)| {
        if arg == flag {
            args.get(i + 1).map(String::as_str)
        } else {
            arg.strip_prefix(flag).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

#[test]
fn every_document_is_a_known_object_in_kube_system() {
    let d = deploy();
    for (kind, name) in [
        ("ServiceAccount", &d.service_account.metadata.name),
        ("ClusterRole", &d.cluster_role.metadata.name),
        ("ClusterRoleBinding", &d.binding.metadata.name),
        ("DaemonSet", &d.daemon_set.metadata.name),
    ] {
        assert_eq!(name.as_deref(), Some(NAME), "{kind} name");
    }
    assert_eq!(d.service_account.metadata.namespace.as_deref(), Some(NAMESPACE));
    assert_eq!(d.daemon_set.metadata.namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn rbac_is_read_only_on_exactly_the_watched_resources() {
    let role = deploy().cluster_role;
    assert!(role.aggregation_rule.is_none(), "no aggregated rules");
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().expect("rules") {
        assert!(rule.resource_names.is_none(), "rules apply to all objects: {rule:?}");
        assert!(rule.non_resource_urls.is_none(), "no non-resource URLs: {rule:?}");
        let groups = rule.api_groups.as_deref().expect("apiGroups");
        let resources = rule.resources.as_deref().expect("resources");
        for group in groups {
            for resource in resources {
                for verb in &rule.verbs {
                    assert!(granted.insert((group.as_str(), resource.as_str(), verb.as_str())), "duplicate grant");
                }
            }
        }
    }
    let expected: BTreeSet<_> = [("", "services"), ("", "nodes"), ("discovery.k8s.io", "endpointslices")]
        .into_iter()
        .flat_map(|(group, resource)| ["get", "list", "watch"].map(|verb| (group, resource, verb)))
        .collect();
    assert_eq!(granted, expected);
}

#[test]
fn the_service_account_is_bound_and_used() {
    let d = deploy();
    let role_ref = &d.binding.role_ref;
    assert_eq!(
        (role_ref.api_group.as_deref(), role_ref.kind.as_str(), role_ref.name.as_str()),
        (Some("rbac.authorization.k8s.io"), "ClusterRole", NAME)
    );
    let subjects = d.binding.subjects.as_deref().expect("subjects");
    assert_eq!(subjects.len(), 1, "bound to the agent only");
    let subject = &subjects[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()),
        ("ServiceAccount", NAME, Some(NAMESPACE))
    );
    let pod = pod_spec(&d.daemon_set);
    assert_eq!(pod.service_account_name.as_deref(), Some(NAME));
    assert_ne!(pod.automount_service_account_token, Some(false), "the agent needs its token");
    assert_ne!(d.service_account.automount_service_account_token, Some(false), "the agent needs its token");
}

#[test]
fn the_daemon_set_runs_on_every_node_in_the_host_network() {
    let ds = deploy().daemon_set;
    let spec = &ds.spec;
    let labels = spec.template.metadata.as_ref().and_then(|m| m.labels.as_ref()).expect("pod labels");
    for (k, v) in spec.selector.match_labels.as_ref().expect("matchLabels") {
        assert_eq!(labels.get(k), Some(v), "the selector matches the pods");
    }
    let strategy = spec.update_strategy.as_ref().expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let pod = pod_spec(&ds);
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert!(pod.host_pid.is_none_or(|v| !v) && pod.host_ipc.is_none_or(|v| !v), "no host pid or ipc namespace");
    let grace = pod.termination_grace_period_seconds.expect("terminationGracePeriodSeconds");
    assert!((1..=10).contains(&grace), "short grace period: {grace}");
    // Like kube-proxy: one toleration with no key and no effect tolerates every taint.
    let tolerations = pod.tolerations.as_deref().expect("tolerations");
    assert!(
        tolerations.iter().any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()),
        "tolerates every taint: {tolerations:?}"
    );

    let c = container(&ds);
    assert_eq!(c.image.as_deref(), Some("rproxy-agent:dev"));
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref()).expect("resource requests");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"), "{requests:?}");
}

#[test]
fn the_node_name_comes_from_the_downward_api() {
    let ds = deploy().daemon_set;
    let env = container(&ds).env.as_deref().expect("env");
    let node_name: Vec<_> = env.iter().filter(|e| e.name == "NODE_NAME").collect();
    assert_eq!(node_name.len(), 1, "one NODE_NAME");
    let field = node_name[0].value_from.as_ref().and_then(|v| v.field_ref.as_ref()).expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(arg_value(&ds, "--node-name"), Some("$(NODE_NAME)"));
}

#[test]
fn the_agent_pins_in_the_host_bpffs() {
    let ds = deploy().daemon_set;
    let c = container(&ds);
    let mount = c
        .volume_mounts
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|m| m.mount_path == BPFFS)
        .expect("a volume mounted on /sys/fs/bpf");
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(mount.read_only, Some(true), "pins are written");
    let volume = pod_spec(&ds)
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.name == mount.name)
        .expect("the mounted volume");
    let host_path = volume.host_path.as_ref().expect("a hostPath volume");
    assert_eq!((host_path.path.as_str(), host_path.type_.as_deref()), (BPFFS, Some("Directory")));
    let pins = arg_value(&ds, "--bpffs").expect("--bpffs");
    assert!(Path::new(pins).starts_with(BPFFS) && pins != BPFFS, "pins in a directory of the host bpffs: {pins}");
    assert_eq!(arg_value(&ds, "--pod-devices"), Some("veth*,cali*,lxc*"), "the documented default");
    assert_eq!(args(&ds).first().map(String::as_str), Some("run"));
    assert_eq!(arg_value(&ds, "--manifests"), None, "the agent watches the API server");
}

/// The capability names in the table under "### Capabilities" in deploy/README.md.
fn documented_capabilities() -> BTreeSet<String> {
    let path = workspace_root().join("deploy/README.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let section = text.split("### Capabilities").nth(1).expect("a Capabilities section");
    let section = section.split("\n#").next().unwrap_or_default();
    section.lines().filter_map(|line| line.strip_prefix("| `")?.split('`').next()).map(str::to_owned).collect()
}

#[test]
fn the_container_is_unprivileged_with_exactly_the_documented_capabilities() {
    let ds = deploy().daemon_set;
    let sc = container(&ds).security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true), "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<String> = caps.add.iter().flatten().cloned().collect();
    assert_eq!(added.len(), caps.add.as_ref().map_or(0, Vec::len), "no duplicates");
    let expected: BTreeSet<String> = ["BPF", "NET_ADMIN", "PERFMON"].map(str::to_owned).into();
    assert_eq!(added, expected);
    assert_eq!(documented_capabilities(), expected, "deploy/README.md documents each added capability");
    assert_eq!(sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()), Some("RuntimeDefault"));
    assert_eq!(sc.app_armor_profile.as_ref().map(|p| p.type_.as_str()), Some("Unconfined"));
    // Nothing at pod level undoes the container's settings.
    if let Some(pod_sc) = &pod_spec(&ds).security_context {
        assert!(pod_sc.seccomp_profile.as_ref().is_none_or(|p| p.type_ != "Unconfined"));
    }
}

/// The agent binary: `$RPROXY_AGENT_BIN`, else built by cargo (up to date, wherever
/// `CARGO_TARGET_DIR` puts it), once per test process.
fn agent_binary() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(find_agent_binary)
}

fn find_agent_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("RPROXY_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        assert!(bin.is_file(), "RPROXY_AGENT_BIN={} is not a file", bin.display());
        return bin;
    }
    let out = Command::new(env!("CARGO"))
        .current_dir(workspace_root())
        .args(["build", "-p", "rproxy-agent", "--bin", "rproxy-agent", "--message-format=json-render-diagnostics"])
        .output()
        .expect("running cargo build");
    assert!(out.status.success(), "cargo build -p rproxy-agent failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|msg| msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "rproxy-agent")
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the rproxy-agent executable")
}

/// The long flags an option list in `--help` output declares (first words of option lines).
pub(crate) fn help_flags(help: &str) -> BTreeSet<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| line.split_whitespace().take_while(|w| w.starts_with('-') || w.starts_with('<')))
        .filter(|word| word.starts_with("--"))
        .map(|word| word.trim_end_matches(',').to_owned())
        .collect()
}

/// The flags the `Usage:` line of `--help` output requires (those outside `[...]`).
fn required_flags(help: &str) -> BTreeSet<String> {
    let usage = help.lines().find_map(|l| l.trim_start().strip_prefix("Usage:")).expect("a Usage: line");
    let mut depth = 0usize;
    let mut required = BTreeSet::new();
    for word in usage.split_whitespace() {
        depth += word.matches('[').count();
        if depth == 0 && word.starts_with("--") {
            required.insert(word.to_owned());
        }
        depth = depth.saturating_sub(word.matches(']').count());
    }
    required
}

#[test]
fn help_flags_are_read_from_option_lines_only() {
    let help = "Usage: x run [OPTIONS] --a <A>\n\nOptions:\n      --alpha <DIR>  Uses --not-a-flag [default: 1]\n  \
                -h, --help         Print help\n      --beta-gamma\n";
    assert_eq!(help_flags(help), ["--alpha", "--beta-gamma", "--help"].map(str::to_owned).into());
    let usage = "Usage: x run [OPTIONS] --node-name <NAME> [--opt <A> [--nested]] --pod-devices <GLOB> [ARGS]...\n";
    assert_eq!(required_flags(usage), ["--node-name", "--pod-devices"].map(str::to_owned).into());
}

/// The real agent's `run --help` output.
pub(crate) fn run_help() -> String {
    let bin = agent_binary();
    let out = Command::new(bin).args(["run", "--help"]).output().expect("running rproxy-agent run --help");
    assert!(out.status.success(), "{} run --help: {}", bin.display(), String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(help_flags(&help).contains("--node-name"), "unexpected `run --help` output:\n{help}");
    help
}

/// Why the real agent would refuse the container args `args` (`run` and its flags), or `None`
/// if it takes them: a flag that `run --help` does not list, a required flag missing, or a value
/// that the agent's own parsers reject. The values are checked by running the agent with `args`
/// and `--help` appended: clap parses every value given before it prints the help, and nothing
/// runs.
pub(crate) fn agent_refuses(args: &[String]) -> Option<String> {
    let help = run_help();
    let accepted = help_flags(&help);
    if args.first().map(String::as_str) != Some("run") {
        return Some(format!("the args do not start with `run`: {args:?}"));
    }
    let used: Vec<&str> = args
        .iter()
        .filter(|a| a.starts_with("--"))
        .map(|a| a.split_once('=').map_or(a.as_str(), |(flag, _)| flag))
        .collect();
    if let Some(flag) = used.iter().find(|flag| !accepted.contains(**flag)) {
        return Some(format!("`rproxy-agent run` has no {flag} (it accepts {accepted:?})"));
    }
    if let Some(flag) = required_flags(&help).into_iter().find(|flag| !used.contains(&flag.as_str())) {
        return Some(format!("`rproxy-agent run` requires {flag}; args: {args:?}"));
    }
    let bin = agent_binary();
    let out = Command::new(bin).args(args).arg("--help").output().expect("running rproxy-agent");
    (!out.status.success()).then(|| {
        format!("rproxy-agent {args:?} --help: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim())
    })
}

#[test]
fn the_agent_check_refuses_unknown_flags_missing_flags_and_bad_values() {
    let args = |list: &[&str]| list.iter().map(|&a| a.to_owned()).collect::<Vec<_>>();
    let good = ["run", "--node-name", "n", "--pod-devices", "veth*", "--ct-max", "4096", "--metrics-bind-address", ""];
    assert_eq!(agent_refuses(&args(&good)), None);
    for (bad, why) in [
        (&["run", "--node-name", "n", "--pod-devices", "veth*", "--no-such-flag", "1"][..], "has no --no-such-flag"),
        (&["run", "--node-name", "n"], "requires --pod-devices"),
        (&["run", "--node-name", "n", "--pod-devices", "veth*", "--ct-max", "1"], "between 4096 and 16777216"),
        (&["run", "--node-name", "n", "--pod-devices", "veth*", "--xdp-mode", "fast"], "invalid value 'fast'"),
        (&["--node-name", "n", "--pod-devices", "veth*"], "do not start with `run`"),
    ] {
        let refused = agent_refuses(&args(bad)).unwrap_or_else(|| panic!("{bad:?} accepted"));
        assert!(refused.contains(why), "{bad:?}: {refused}");
    }
}

#[test]
fn the_agent_accepts_every_flag_in_the_container_args() {
    let ds = deploy().daemon_set;
    assert!(args(&ds).iter().any(|a| a.starts_with("--")), "args: {:?}", args(&ds));
    if let Some(refused) = agent_refuses(args(&ds)) {
        panic!("deploy/daemonset.yaml: {refused}");
    }
}

/// The pod template tells Prometheus where the metrics are (the port `--metrics-bind-address`
/// serves by default, named in the container's ports with the health port), and the Grafana
/// dashboard parses and queries only metrics that docs/metrics.md documents.
#[test]
fn metrics_are_scraped_and_the_dashboard_queries_documented_metrics() {
    let ds = deploy().daemon_set;
    let template = ds.spec.template.metadata.as_ref().expect("template metadata");
    let annotations = template.annotations.as_ref().expect("scrape annotations");
    let get = |k: &str| annotations.get(k).map(String::as_str);
    assert_eq!(
        (get("prometheus.io/scrape"), get("prometheus.io/port"), get("prometheus.io/path")),
        (Some("true"), Some("10249"), Some("/metrics"))
    );
    assert_eq!(arg_value(&ds, "--metrics-bind-address"), None, "the default, 0.0.0.0:10249");
    let ports: Vec<(Option<&str>, i32)> =
        container(&ds).ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("metrics"), 10249), (Some("healthz"), 10256)]);

    let path = workspace_root().join("deploy/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let docs = std::fs::read_to_string(workspace_root().join("docs/metrics.md")).expect("docs/metrics.md");
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("a query");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("rproxy_") || word.starts_with("kubeproxy_") {
                    queried.insert(word.trim_end_matches("_bucket").to_owned());
                }
            }
        }
    }
    assert!(queried.len() >= 8, "{queried:?}");
    for metric in &queried {
        assert!(
            docs.contains(&format!("`{metric}")),
            "the dashboard queries {metric}, which docs/metrics.md does not list"
        );
    }
}
