//! The lab kubelet: runs the Pods the scheduler binds to the lab's nodes as network namespaces,
//! and writes their status as a kubelet would, so that the real controllers (`ReplicaSets`,
//! `EndpointSlices`) and rproxy see real pods.
//!
//! For every Pod bound to a lab node it:
//! - makes a pod namespace wired like the lab's pods ([`crate::lab::Node::add_pod_in`]): named
//!   `<lab prefix>-<namespace>-<pod name>`, with an address from the node's pod CIDR (the one
//!   the Pod's status already has, if a kubelet gave it one before);
//! - runs the lab's server ([`crate::server`]) on every `containerPort` number, TCP and UDP (on
//!   80 and 8080 for a pod that declares none, as `kubectl create deployment` makes them): it
//!   answers each connection and datagram with `<pod name> <peer address> <peer port>`, then
//!   echoes;
//! - writes the status: phase `Running`, `podIP(s)`, `hostIP(s)`, the conditions
//!   `PodScheduled`, `Initialized`, `ContainersReady` and `Ready`, and a running status per
//!   container.
//!
//! Readiness follows the Pod's `readinessProbe` (`tcpSocket`, `httpGet`; `exec` and `grpc` cannot
//! run here and count as passing), run from the node's namespace as a kubelet runs them, with
//! the probe's period, timeout and thresholds. The lab's servers do not speak HTTP: an `httpGet`
//! passes when the server answers with an HTTP status in 200..400, or with its greeting line (a
//! lab server is a live one). Without a probe a pod is ready once it runs. The annotation
//! `lab.rproxy.io/ready: "false"` ([`READY_ANNOTATION`]) makes a pod unready whatever its probe
//! says, a switch for tests.
//!
//! A Pod being deleted (its `deletionTimestamp` set) keeps serving, ready, for its grace period,
//! as its containers would until they exit; then its namespace is removed and the Pod deleted
//! with grace period 0, as kubelet does. A Pod removed from the API at once (force deletion),
//! or bound to a node that goes away, is torn down at once.
use std::{
    collections::{BTreeSet, HashMap},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Node as ApiNode, Pod, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    Api, Client, ResourceExt as _,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::watcher::{self, Event},
};
use serde_json::json;
use tokio::{sync::mpsc, task::JoinHandle, time::sleep};

use crate::{
    cluster::{Cluster, NodeId},
    netns::in_netns,
};

/// Ports served by a pod that declares no `containerPort`.
pub const DEFAULT_PORTS: [u16; 2] = [80, 8080];

/// Annotation that makes a pod unready while it is `"false"` (a lab-only switch for tests).
pub const READY_ANNOTATION: &str = "lab.rproxy.io/ready";

/// A lab node the kubelet runs pods on.
#[derive(Clone, Debug)]
pub struct KubeletNode {
    pub id: NodeId,
    /// The Kubernetes node name.
    pub name: String,
    /// The node's network namespace (probes run there).
    pub ns: String,
    /// The node's address (`hostIP`).
    pub address: Ipv4Addr,
}

/// The running kubelet; stopped (its task aborted) on drop. Pods it started stay until the lab
/// is dropped.
#[derive(Debug)]
pub struct Kubelet {
    task: JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts the kubelet of `nodes` on the runtime `rt`: it watches every Pod through `client`
    /// and runs those bound to `nodes` in `lab`. Errors are logged to stderr and retried.
    #[must_use]
    pub fn spawn(
        rt: &tokio::runtime::Handle,
        client: Client,
        lab: Arc<Mutex<Cluster>>,
        nodes: Vec<KubeletNode>,
    ) -> Self {
        let state = State { client, lab, nodes, pods: HashMap::new(), used: HashMap::new() };
        Self { task: rt.spawn(state.run()) }
    }
}

/// What the kubelet's own tasks report back to it.
enum Report {
    /// A pod's probe passed (`true`) or failed its threshold (`false`).
    Probed { uid: String, ready: bool },
    /// A deleted pod's grace period is over.
    GraceOver { uid: String },
}

/// A pod this kubelet runs.
struct Running {
    namespace: String,
    name: String,
    node: NodeId,
    /// Suffix of its namespace name (`<lab prefix>-<suffix>`).
    ns_suffix: String,
    ip: Ipv4Addr,
    /// The probe says ready (always, without a probe).
    probe_ok: bool,
    /// [`READY_ANNOTATION`] is `"false"`.
    held_unready: bool,
    /// The readiness last written to the status.
    written: Option<bool>,
    probe: Option<JoinHandle<()>>,
    grace: Option<JoinHandle<()>>,
    containers: Vec<(String, String)>,
    started: String,
}

impl Running {
    fn ready(&self) -> bool {
        self.probe_ok && !self.held_unready
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for task in [self.probe.take(), self.grace.take()].into_iter().flatten() {
            task.abort();
        }
    }
}

struct State {
    client: Client,
    lab: Arc<Mutex<Cluster>>,
    nodes: Vec<KubeletNode>,
    /// By pod uid.
    pods: HashMap<String, Running>,
    /// Host numbers of each node's pod CIDR in use.
    used: HashMap<NodeId, BTreeSet<u8>>,
}

impl State {
    async fn run(mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        loop {
            let mut listed: Option<BTreeSet<String>> = None;
            let mut events =
                std::pin::pin!(watcher::watcher(Api::<Pod>::all(self.client.clone()), watcher::Config::default()));
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(Event::Init)) => listed = Some(BTreeSet::new()),
                        Some(Ok(Event::InitApply(pod))) => {
                            if let Some(seen) = &mut listed {
                                seen.insert(pod.uid().unwrap_or_default());
                            }
                            self.apply(pod, &tx).await;
                        }
                        Some(Ok(Event::InitDone)) => {
                            // Pods gone while the watch was down.
                            let seen = listed.take().unwrap_or_default();
                            let gone: Vec<String> = self.pods.keys().filter(|uid| !seen.contains(*uid)).cloned().collect();
                            for uid in gone {
                                self.teardown(&uid).await;
                            }
                        }
                        Some(Ok(Event::Apply(pod))) => self.apply(pod, &tx).await,
                        Some(Ok(Event::Delete(pod))) => self.teardown(&pod.uid().unwrap_or_default()).await,
                        Some(Err(e)) => {
                            eprintln!("lab kubelet: watching pods: {e}");
                            sleep(Duration::from_millis(500)).await;
                            break;
                        }
                        None => break,
                    },
                    Some(report) = rx.recv() => self.report(report).await,
                }
            }
        }
    }

    fn node(&self, name: &str) -> Option<&KubeletNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// A pod added or changed.
    async fn apply(&mut self, pod: Pod, tx: &mpsc::UnboundedSender<Report>) {
        let Some(uid) = pod.uid() else { return };
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).and_then(|n| self.node(n)).cloned()
        else {
            return;
        };
        let held_unready = pod.annotations().get(READY_ANNOTATION).is_some_and(|v| v == "false");
        let deleting = pod.metadata.deletion_timestamp.is_some();
        if !self.pods.contains_key(&uid) {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) {
                return;
            }
            if deleting {
                // Deleted before it ran here: nothing to stop.
                self.delete_now(&pod).await;
                return;
            }
            match self.start(&pod, &node, held_unready, tx).await {
                Ok(running) => {
                    self.pods.insert(uid.clone(), running);
                }
                Err(e) => {
                    eprintln!(
                        "lab kubelet: starting pod {}/{}: {e:#}",
                        pod.namespace().unwrap_or_default(),
                        pod.name_any()
                    );
                    return;
                }
            }
        }
        let Some(running) = self.pods.get_mut(&uid) else { return };
        running.held_unready = held_unready;
        if deleting && running.grace.is_none() {
            let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30);
            let (tx, uid) = (tx.clone(), uid.clone());
            running.grace = Some(tokio::spawn(async move {
                sleep(Duration::from_secs(u64::try_from(grace).unwrap_or(0))).await;
                let _ = tx.send(Report::GraceOver { uid });
            }));
        }
        self.write_status(&uid).await;
    }

    /// Makes the pod's namespace, starts its servers and probe.
    async fn start(
        &mut self,
        pod: &Pod,
        node: &KubeletNode,
        held_unready: bool,
        tx: &mpsc::UnboundedSender<Report>,
    ) -> Result<Running> {
        let namespace = pod.namespace().unwrap_or_else(|| String::from("default"));
        let name = pod.name_any();
        let uid = pod.uid().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let mut ports: BTreeSet<u16> = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| u16::try_from(p.container_port).ok())
            .collect();
        if ports.is_empty() {
            // `kubectl create deployment web --image=any` declares no port: serve the usual ones.
            ports.extend(DEFAULT_PORTS);
        }
        let previous = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
        let ip = self.allocate(node.id, previous)?;
        let ns_suffix = ns_suffix(&namespace, &name, &uid);
        let lab = Arc::clone(&self.lab);
        let (pod_name, suffix, id) = (name.clone(), ns_suffix.clone(), node.id);
        let made = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut lab = lab.lock().unwrap_or_else(PoisonError::into_inner);
            let node = lab.node_mut(id);
            // Dual-stack: the IPv6 address has the same host number in the node's IPv6 pod CIDR.
            let pod = node.add_pod_dual_in(&pod_name, &suffix, ip, id.pod_ip6(ip.octets()[3]))?;
            for port in ports {
                pod.serve(port)?;
            }
            Ok(())
        })
        .await
        .context("pod setup task")?;
        if let Err(e) = made {
            self.release(node.id, ip);
            self.remove_from_lab(node.id, &ns_suffix).await;
            return Err(e);
        }
        let probe = spec.containers.iter().find_map(|c| c.readiness_probe.clone());
        let probe_task = probe.map(|probe| {
            let target = ProbeTarget::of(&probe, &spec.containers, node.ns.clone(), ip);
            tokio::spawn(probe_loop(probe, target, uid.clone(), tx.clone()))
        });
        let containers =
            spec.containers.iter().map(|c| (c.name.clone(), c.image.clone().unwrap_or_default())).collect();
        Ok(Running {
            namespace,
            name,
            node: node.id,
            ns_suffix,
            ip,
            probe_ok: probe_task.is_none(),
            held_unready,
            written: None,
            probe: probe_task,
            grace: None,
            containers,
            started: jiff_now(),
        })
    }

    /// The address for a new pod on `node`: `previous` (what an earlier kubelet gave it) if it
    /// is free and in the node's CIDR, else the lowest free host from .2.
    fn allocate(&mut self, node: NodeId, previous: Option<Ipv4Addr>) -> Result<Ipv4Addr> {
        let used = self.used.entry(node).or_default();
        let cidr = node.pod_cidr().octets();
        let host = previous
            .filter(|ip| ip.octets()[..3] == cidr[..3])
            .map(|ip| ip.octets()[3])
            .filter(|h| (2..=254).contains(h) && !used.contains(h))
            .or_else(|| (2..=254).find(|h| !used.contains(h)));
        let Some(host) = host else { bail!("node-{}'s pod CIDR is full", node.number()) };
        used.insert(host);
        Ok(node.pod_ip(host))
    }

    fn release(&mut self, node: NodeId, ip: Ipv4Addr) {
        if let Some(used) = self.used.get_mut(&node) {
            used.remove(&ip.octets()[3]);
        }
    }

    async fn remove_from_lab(&self, node: NodeId, ns_suffix: &str) {
        let (lab, suffix) = (Arc::clone(&self.lab), ns_suffix.to_owned());
        let _ = tokio::task::spawn_blocking(move || {
            lab.lock().unwrap_or_else(PoisonError::into_inner).node_mut(node).remove_pod(&suffix);
        })
        .await;
    }

    /// Stops a pod this kubelet runs (servers, namespace); no API call.
    async fn teardown(&mut self, uid: &str) {
        let Some(running) = self.pods.remove(uid) else { return };
        self.release(running.node, running.ip);
        self.remove_from_lab(running.node, &running.ns_suffix).await;
    }

    async fn report(&mut self, report: Report) {
        match report {
            Report::Probed { uid, ready } => {
                if let Some(running) = self.pods.get_mut(&uid) {
                    running.probe_ok = ready;
                    self.write_status(&uid).await;
                }
            }
            Report::GraceOver { uid } => {
                let Some(running) = self.pods.get(&uid) else { return };
                let (namespace, name) = (running.namespace.clone(), running.name.clone());
                self.teardown(&uid).await;
                let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                    ..DeleteParams::default()
                };
                if let Err(e) = api.delete(&name, &params).await
                    && !is_not_found(&e)
                {
                    eprintln!("lab kubelet: deleting pod {namespace}/{name}: {e}");
                }
            }
        }
    }

    /// Deletes a pod that never ran here, with grace period 0.
    async fn delete_now(&self, pod: &Pod) {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
        if let Err(e) = api.delete(&pod.name_any(), &params).await
            && !is_not_found(&e)
        {
            eprintln!("lab kubelet: deleting pod {}: {e}", pod.name_any());
        }
    }

    /// Writes the pod's status if its readiness differs from what was written.
    async fn write_status(&mut self, uid: &str) {
        let Some(running) = self.pods.get(uid) else { return };
        let ready = running.ready();
        if running.written == Some(ready) {
            return;
        }
        let Some(node) = self.nodes.iter().find(|n| n.id == running.node) else { return };
        let status = pod_status(running, node.address, ready);
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &running.namespace);
        match api.patch_status(&running.name, &PatchParams::default(), &Patch::Merge(status)).await {
            Ok(_) => {
                if let Some(running) = self.pods.get_mut(uid) {
                    running.written = Some(ready);
                }
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => eprintln!("lab kubelet: status of pod {}/{}: {e}", running.namespace, running.name),
        }
    }
}

/// The status a kubelet writes for a running pod.
fn pod_status(running: &Running, host: Ipv4Addr, ready: bool) -> serde_json::Value {
    let flag = if ready { "True" } else { "False" };
    let now = jiff_now();
    let condition = |kind: &str, status: &str| json!({ "type": kind, "status": status, "lastTransitionTime": now });
    let containers: Vec<serde_json::Value> = running
        .containers
        .iter()
        .map(|(name, image)| {
            json!({
                "name": name,
                "image": image,
                "imageID": "",
                "containerID": format!("lab://{}", running.ns_suffix),
                "ready": ready,
                "started": true,
                "restartCount": 0,
                "state": { "running": { "startedAt": running.started } },
            })
        })
        .collect();
    json!({
        "status": {
            "phase": "Running",
            "podIP": running.ip.to_string(),
            "podIPs": [{ "ip": running.ip.to_string() }, { "ip": running.node.pod_ip6(running.ip.octets()[3]).to_string() }],
            "hostIP": host.to_string(),
            "hostIPs": [{ "ip": host.to_string() }, { "ip": running.node.ip6().to_string() }],
            "startTime": running.started,
            "conditions": [
                condition("PodScheduled", "True"),
                condition("Initialized", "True"),
                condition("ContainersReady", flag),
                condition("Ready", flag),
            ],
            "containerStatuses": containers,
        }
    })
}

/// Now, as an RFC 3339 timestamp in whole seconds (as the API stores it).
fn jiff_now() -> String {
    use k8s_openapi::jiff::Timestamp;
    Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH).to_string()
}

/// The pod namespace's suffix: [`pod_ns_suffix`], or for a name that cannot be one (too long)
/// `pod-<start of its uid>`.
fn ns_suffix(namespace: &str, name: &str, uid: &str) -> String {
    let plain = pod_ns_suffix(namespace, name);
    if plain.len() <= 100 && plain.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        plain
    } else {
        format!("pod-{}", uid.chars().filter(char::is_ascii_alphanumeric).take(12).collect::<String>())
    }
}

/// The suffix of pod `namespace/name`'s network namespace name (`<lab prefix>-<suffix>`):
/// `<namespace>-<name>`, dots as dashes.
#[must_use]
pub fn pod_ns_suffix(namespace: &str, name: &str) -> String {
    format!("{namespace}-{name}").replace('.', "-")
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// Where and how a readiness probe connects.
#[derive(Clone, Debug)]
struct ProbeTarget {
    node_ns: String,
    addr: SocketAddr,
    /// `httpGet`'s path; `None` for `tcpSocket`, and for the handlers that cannot run here
    /// (`exec`, `grpc`), `addr` port 0: passing.
    http_path: Option<String>,
}

impl ProbeTarget {
    fn of(probe: &Probe, containers: &[k8s_openapi::api::core::v1::Container], node_ns: String, ip: Ipv4Addr) -> Self {
        let named = |port: &IntOrString| -> u16 {
            match port {
                IntOrString::Int(n) => u16::try_from(*n).unwrap_or(0),
                IntOrString::String(name) => containers
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some(name))
                    .and_then(|p| u16::try_from(p.container_port).ok())
                    .unwrap_or(0),
            }
        };
        let (port, http_path) = if let Some(tcp) = &probe.tcp_socket {
            (named(&tcp.port), None)
        } else if let Some(http) = &probe.http_get {
            (named(&http.port), Some(http.path.clone().unwrap_or_else(|| String::from("/"))))
        } else {
            (0, None)
        };
        Self { node_ns, addr: SocketAddr::from((ip, port)), http_path }
    }

    /// One try, from the node's namespace.
    fn check(&self, timeout: Duration) -> bool {
        if self.addr.port() == 0 {
            return true;
        }
        let attempt = || -> std::io::Result<bool> {
            let mut stream = TcpStream::connect_timeout(&self.addr, timeout)?;
            let Some(path) = &self.http_path else { return Ok(true) };
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kube-probe/lab\r\nConnection: close\r\n\r\n",
                self.addr
            );
            stream.write_all(request.as_bytes())?;
            let mut head = [0u8; 64];
            let n = stream.read(&mut head)?;
            let line = String::from_utf8_lossy(&head[..n]);
            Ok(match line.strip_prefix("HTTP/1.") {
                Some(rest) => {
                    rest.get(2..5).and_then(|code| code.parse::<u16>().ok()).is_some_and(|c| (200..400).contains(&c))
                }
                // A lab server's greeting: it is up.
                None => n > 0,
            })
        };
        in_netns(&self.node_ns, attempt).ok().and_then(Result::ok).unwrap_or(false)
    }
}

/// Runs `probe` until aborted, reporting each change of its verdict (the first pass included).
async fn probe_loop(probe: Probe, target: ProbeTarget, uid: String, tx: mpsc::UnboundedSender<Report>) {
    let secs =
        |v: Option<i32>, default: u64| v.and_then(|v| u64::try_from(v).ok()).filter(|v| *v > 0).unwrap_or(default);
    let period = Duration::from_secs(secs(probe.period_seconds, 10));
    let timeout = Duration::from_secs(secs(probe.timeout_seconds, 1));
    let (successes_needed, failures_needed) = (secs(probe.success_threshold, 1), secs(probe.failure_threshold, 3));
    sleep(Duration::from_secs(secs(probe.initial_delay_seconds, 0))).await;
    let (mut ready, mut successes, mut failures) = (false, 0, 0);
    loop {
        let target = target.clone();
        let ok = tokio::task::spawn_blocking(move || target.check(timeout)).await.unwrap_or(false);
        if ok {
            successes += 1;
            failures = 0;
        } else {
            failures += 1;
            successes = 0;
        }
        let verdict = if ready { failures < failures_needed } else { successes >= successes_needed };
        if verdict != ready {
            ready = verdict;
            if tx.send(Report::Probed { uid: uid.clone(), ready }).is_err() {
                return;
            }
        }
        sleep(period).await;
    }
}

/// Registers `nodes` as Node objects (created, or updated if they exist): their pod CIDR,
/// addresses, capacity, and a `Ready` condition (there is no heartbeat: the node-lifecycle
/// controller does not run).
pub async fn register_nodes(client: &Client, nodes: &[KubeletNode]) -> Result<()> {
    let api: Api<ApiNode> = Api::all(client.clone());
    for node in nodes {
        let cidr = format!("{}/24", node.id.pod_cidr());
        let cidr6 = format!("{}/64", node.id.pod_cidr6());
        let object = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": node.name,
                "labels": {
                    "kubernetes.io/hostname": node.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                },
            },
            "spec": { "podCIDR": cidr, "podCIDRs": [cidr, cidr6] },
        });
        let params = PatchParams::apply("lab-kubelet").force();
        api.patch(&node.name, &params, &Patch::Apply(&object))
            .await
            .with_context(|| format!("registering Node {}", node.name))?;
        let now = jiff_now();
        let capacity = json!({ "cpu": "8", "memory": "32Gi", "pods": "250", "ephemeral-storage": "100Gi" });
        let status = json!({
            "status": {
                "addresses": [
                    { "type": "InternalIP", "address": node.address.to_string() },
                    { "type": "InternalIP", "address": node.id.ip6().to_string() },
                    { "type": "Hostname", "address": node.name },
                ],
                "capacity": capacity,
                "allocatable": capacity,
                "conditions": [{
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "lab kubelet is posting ready status",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }],
                "nodeInfo": {
                    "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "rproxy lab",
                    "containerRuntimeVersion": "lab://0", "kubeletVersion": "v1.36.3", "kubeProxyVersion": "",
                    "operatingSystem": "linux", "architecture": "amd64",
                },
            }
        });
        api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .with_context(|| format!("status of Node {}", node.name))?;
        // The API server's TaintNodesByCondition admission gives a new Node the not-ready taint,
        // which the node-lifecycle controller (not running here) would lift once it is Ready.
        api.patch(&node.name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "taints": null } })))
            .await
            .with_context(|| format!("untainting Node {}", node.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_suffixes_are_names_or_uids() {
        assert_eq!(ns_suffix("default", "web-7d9f-abcde", "u"), "default-web-7d9f-abcde");
        assert_eq!(ns_suffix("default", "db.0", "u"), "default-db-0");
        assert_eq!(ns_suffix("default", &"x".repeat(200), "1234-5678-9abc-def0"), "pod-123456789abc");
    }
}
