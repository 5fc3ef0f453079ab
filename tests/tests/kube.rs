//! rproxy against a real Kubernetes control plane (`rproxy_tests::k8s::lab::KubeLab`): two netns
//! nodes with the lab kubelet and rproxy-agent running as the `DaemonSet`'s `ServiceAccount`,
//! the real controllers writing EndpointSlices, `kubectl` driving it as a user would.
//!
//! One cluster serves every test of this binary (starting one takes seconds); each test works in
//! a namespace of its own and holds the serial lock. The cluster is torn down when the process
//! exits. Without root every test prints why and passes, unless `RPROXY_REQUIRE_KERNEL=1`.
#![expect(clippy::doc_markdown, reason = "Kubernetes kinds and fields (EndpointSlice, NodePort…) are prose here")]
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rproxy_tests::{
    NodeId, agent_bin,
    client::{self, TcpSession},
    cmd::run,
    in_netns,
    k8s::{
        kubelet::READY_ANNOTATION,
        lab::{KubeLab, KubeLabConfig, wait_until},
    },
    serial_or_skip,
};
use serde_json::Value;

/// How long a change may take to reach the datapath (API server, controllers, agent).
const CONVERGE: Duration = Duration::from_secs(20);
/// Timeout of one request that must succeed.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests allowed for every backend of a set to answer.
const MAX_REQUESTS: usize = 80;

// ---------------------------------------------------------------------------------------------
// The shared cluster

static LAB: OnceLock<Mutex<Option<KubeLab>>> = OnceLock::new();

extern "C" fn teardown() {
    if let Some(lab) = LAB.get() {
        drop(lab.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// The cluster (started by the first test that needs it), or `None` when not root.
fn lab(test: &str) -> Option<(MutexGuard<'static, ()>, MutexGuard<'static, Option<KubeLab>>)> {
    let serial = serial_or_skip(test)?;
    let cell = LAB.get_or_init(|| {
        // SAFETY: registers a plain function to run at exit.
        unsafe { libc::atexit(teardown) };
        Mutex::new(None)
    });
    let mut guard = cell.lock().unwrap_or_else(PoisonError::into_inner);
    if guard.is_none() {
        let config = KubeLabConfig {
            agent_bin: Some(agent_bin().expect("the agent binary")),
            agent_args: vec![String::from("--ct-gc-interval"), String::from("2")],
            ..KubeLabConfig::default()
        };
        *guard = Some(KubeLab::start(config).expect("starting the Kubernetes lab"));
    }
    Some((serial, guard))
}

/// Runs `body` in namespace `ns` (created, and deleted afterwards) of the shared cluster.
fn with_namespace(test: &str, ns: &str, body: impl FnOnce(&mut Ctx<'_>) -> Result<()>) {
    let Some((_serial, mut guard)) = lab(test) else { return };
    let lab = guard.as_mut().expect("started");
    let created = lab.kubectl_run(&["create", "namespace", ns]).map(drop);
    let mut ctx = Ctx { lab, ns: ns.to_owned() };
    let result = created.and_then(|()| body(&mut ctx));
    let lab = ctx.lab;
    let _ = lab.kubectl_run(&["delete", "namespace", ns, "--wait=false"]);
    if let Err(e) = result {
        for id in lab.node_ids() {
            let log = lab.agent_log(id);
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- agent log on {} (last lines) ---", id.k8s_name());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        panic!("{test}: {e:?}");
    }
}

/// A test's view of the cluster: its namespace.
struct Ctx<'a> {
    lab: &'a mut KubeLab,
    ns: String,
}

impl Ctx<'_> {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend(args);
        self.lab.kubectl_run(&all)
    }

    fn apply(&self, yaml: &str) -> Result<()> {
        rproxy_tests::cmd::run_with_input(self.lab.kubectl().args(["-n", &self.ns, "apply", "-f", "-"]), yaml).map(drop)
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    /// A Deployment `name` of `replicas` pods serving TCP and UDP on 8080, with `extra` added to
    /// the pod spec (YAML at the spec's indentation).
    fn deployment(&self, name: &str, replicas: u32, extra: &str) -> Result<()> {
        self.apply(&format!(
            "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
{extra}
      containers:
      - name: app
        image: lab
        ports:
        - {{containerPort: 8080, protocol: TCP}}
        - {{containerPort: 8080, protocol: UDP}}
"
        ))
    }

    /// A Service `name` selecting the pods of app `app`, port 80 → 8080 over TCP and UDP, of
    /// `type_`, with `extra` added to its spec.
    fn service(&self, name: &str, app: &str, type_: &str, extra: &str) -> Result<()> {
        self.apply(&format!(
            "apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: {type_}
  selector: {{app: {app}}}
  ports:
  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}
{extra}
"
        ))
    }

    fn cluster_ip(&self, svc: &str) -> Result<Ipv4Addr> {
        let svc = self.json(&["get", "service", svc])?;
        svc["spec"]["clusterIP"].as_str().context("no clusterIP")?.parse().context("clusterIP")
    }

    fn node_port(&self, svc: &str) -> Result<u16> {
        let svc = self.json(&["get", "service", svc])?;
        let port = svc["spec"]["ports"][0]["nodePort"].as_u64().context("no nodePort")?;
        Ok(u16::try_from(port)?)
    }

    /// The Service's endpoints as the EndpointSlice controller publishes them: (pod name,
    /// ready, serving, terminating).
    fn endpoints(&self, svc: &str) -> Result<Vec<(String, bool, bool, bool)>> {
        let label = format!("kubernetes.io/service-name={svc}");
        let slices = self.json(&["get", "endpointslices", "-l", &label])?;
        let mut out = Vec::new();
        for slice in slices["items"].as_array().into_iter().flatten() {
            for e in slice["endpoints"].as_array().into_iter().flatten() {
                let c = &e["conditions"];
                let flag = |k: &str| c[k].as_bool().unwrap_or(false);
                let name = e["targetRef"]["name"].as_str().unwrap_or_default().to_owned();
                out.push((name, flag("ready"), flag("serving"), flag("terminating")));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Waits until the Service has exactly `n` ready endpoints; their pod names.
    fn wait_ready(&self, svc: &str, n: usize) -> Result<BTreeSet<String>> {
        let mut names = BTreeSet::new();
        wait_until(&format!("{n} ready endpoints of {svc}"), CONVERGE, || {
            names = self.endpoints(svc)?.into_iter().filter(|e| e.1).map(|e| e.0).collect();
            Ok(names.len() == n)
        })?;
        Ok(names)
    }

    /// The pods of app `app` that run (phase Running, an IP), by name, with their node.
    fn pods(&self, app: &str) -> Result<Vec<(String, String)>> {
        let pods = self.json(&["get", "pods", "-l", &format!("app={app}")])?;
        Ok(pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && p["status"]["podIP"].is_string())
            .map(|p| {
                let name = p["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                (name, p["spec"]["nodeName"].as_str().unwrap_or_default().to_owned())
            })
            .collect())
    }

    /// A client pod `name` on node `node` (a bare Pod), once it runs: its netns.
    fn client_pod(&self, name: &str, node: NodeId) -> Result<String> {
        self.apply(&format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{role: client}}}}
spec:
  nodeName: {}
  containers: [{{name: client, image: lab}}]
",
            node.k8s_name()
        ))?;
        let mut netns = None;
        wait_until(&format!("client pod {name} running"), CONVERGE, || {
            netns = self.lab.pod_netns(&self.ns, name);
            Ok(netns.is_some())
        })?;
        netns.context("client pod")
    }
}

/// One TCP request from namespace `netns` to `to`: the backend's name.
/// An address of either family that the request helpers take (`Ipv4Addr`, `Ipv6Addr`, `IpAddr`).
trait Addr: Into<IpAddr> + Copy + Send + Sync + std::fmt::Display {}

impl<A: Into<IpAddr> + Copy + Send + Sync + std::fmt::Display> Addr for A {}

fn tcp_from<A: Addr>(netns: &str, to: (A, u16), timeout: Duration) -> Result<String> {
    Ok(in_netns(netns, || client::tcp_request(to.0, to.1, b"hello", timeout))??.0)
}

/// One UDP request from namespace `netns` to `to`: the backend's name.
fn udp_from<A: Addr>(netns: &str, to: (A, u16), timeout: Duration) -> Result<String> {
    Ok(in_netns(netns, || client::udp_request(to.0, to.1, b"hello", timeout))??.0)
}

/// Requests (TCP, or UDP with `udp`) from `netns` to `to` until every pod of `want` answered;
/// fails if another pod answers, or after [`MAX_REQUESTS`].
fn reaches_exactly<A: Addr>(netns: &str, to: (A, u16), udp: bool, want: &BTreeSet<String>) -> Result<()> {
    let mut unseen = want.clone();
    for attempt in 1..=MAX_REQUESTS {
        let name = if udp { udp_from(netns, to, TIMEOUT) } else { tcp_from(netns, to, TIMEOUT) }
            .with_context(|| format!("request {attempt} to {}:{} ({})", to.0, to.1, if udp { "UDP" } else { "TCP" }))?;
        ensure!(want.contains(&name), "{}:{} answered by {name}, not one of {want:?}", to.0, to.1);
        unseen.remove(&name);
        if unseen.is_empty() {
            return Ok(());
        }
    }
    bail!("{}:{}: {unseen:?} never answered in {MAX_REQUESTS} requests", to.0, to.1)
}

/// Retries [`reaches_exactly`] until it holds (the change it checks is still propagating), for
/// at most [`CONVERGE`].
fn converges_to<A: Addr>(netns: &str, to: (A, u16), udp: bool, want: &BTreeSet<String>) -> Result<()> {
    wait_until(&format!("{}:{} served by exactly {want:?}", to.0, to.1), CONVERGE, || {
        reaches_exactly(netns, to, udp, want).map(|()| true)
    })
}

/// Connections opened one after another (each: connect, greeting, echo, close) from `netns`
/// to `to` until `stop`: (attempts, failures with their error).
fn connection_stream<A: Addr>(netns: &str, to: (A, u16), stop: &AtomicBool) -> Result<(usize, Vec<String>)> {
    in_netns(netns, || {
        let (mut attempts, mut failures) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            attempts += 1;
            let started = Instant::now();
            let result = TcpSession::connect(to.0, to.1, TIMEOUT).and_then(|mut s| s.echo(b"stream"));
            if let Err(e) = result {
                failures.push(format!("attempt {attempt} after {:?}: {e:#}", started.elapsed(), attempt = attempts));
            }
            thread::sleep(Duration::from_millis(20));
        }
        (attempts, failures)
    })
}

/// Runs `during` while connections stream from the client pod (`pod_netns`) to the ClusterIP
/// and from the external client (`client_ns`) to a NodePort; fails unless every connection of
/// both streams worked.
fn under_connections<A: Addr + 'static>(
    client_ns: &str,
    pod_netns: &str,
    cluster_ip: (A, u16),
    node_port: (A, u16),
    during: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let client_ns = client_ns.to_owned();
    let (pod_ns, stop1, stop2) = (pod_netns.to_owned(), Arc::clone(&stop), Arc::clone(&stop));
    let east = thread::spawn(move || connection_stream(&pod_ns, cluster_ip, &stop1));
    let north = thread::spawn(move || connection_stream(&client_ns, node_port, &stop2));
    thread::sleep(Duration::from_millis(500));
    let result = during();
    thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let east = east.join().map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
    let north = north.join().map_err(|_| anyhow::anyhow!("stream thread panicked"))??;
    result?;
    eprintln!(
        "connections: pod → ClusterIP {} ({} failed), client → NodePort {} ({} failed)",
        east.0,
        east.1.len(),
        north.0,
        north.1.len()
    );
    ensure!(
        east.1.is_empty() && north.1.is_empty(),
        "failed connections: pod → ClusterIP {:?}; client → NodePort {:?}",
        east.1,
        north.1
    );
    ensure!(east.0 > 10 && north.0 > 10, "too few connections to judge: {} and {}", east.0, north.0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests

/// The agents run with their `ServiceAccount`'s token, and the real authorizer gives that token
/// get, list and watch on Services, EndpointSlices and Nodes, and nothing else.
#[test]
fn agent_token_can_only_read_services_endpointslices_and_nodes() {
    with_namespace("agent_token_can_only_read_services_endpointslices_and_nodes", "t-rbac", |ctx| {
        let lab = &*ctx.lab;
        for id in lab.node_ids() {
            let log = lab.agent_log(id);
            ensure!(log.contains("all watches in sync"), "the agent on {} did not sync:\n{log}", id.k8s_name());
        }
        let kubeconfig = lab.agent_kubeconfig().with_extension("loopback");
        lab.control_plane().write_kubeconfig(&kubeconfig, &lab.control_plane().api_url(), lab.agent_token())?;
        let can_sub = |verb: &str, resource: &str, subresource: Option<&str>| -> Result<bool> {
            let mut cmd = lab.kubectl();
            cmd.arg("--kubeconfig").arg(&kubeconfig).args(["auth", "can-i", verb, resource, "--all-namespaces"]);
            if let Some(sub) = subresource {
                cmd.arg(format!("--subresource={sub}"));
            }
            let out = cmd.output()?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match answer.as_str() {
                "yes" => Ok(true),
                "no" => Ok(false),
                other => bail!("can-i {verb} {resource}: {other:?} {}", String::from_utf8_lossy(&out.stderr)),
            }
        };
        let can = |verb: &str, resource: &str| can_sub(verb, resource, None);
        for resource in ["services", "endpointslices.discovery.k8s.io", "nodes"] {
            for verb in ["get", "list", "watch"] {
                ensure!(can(verb, resource)?, "the agent cannot {verb} {resource}");
            }
            for verb in ["create", "update", "patch", "delete", "deletecollection"] {
                ensure!(!can(verb, resource)?, "the agent can {verb} {resource}");
            }
        }
        for resource in ["pods", "secrets", "configmaps", "endpoints", "namespaces", "events", "serviceaccounts"] {
            for verb in ["get", "list", "create", "update"] {
                ensure!(!can(verb, resource)?, "the agent can {verb} {resource}");
            }
        }
        for (verb, resource, sub) in [
            ("update", "services", "status"),
            ("patch", "services", "status"),
            ("update", "nodes", "status"),
            ("create", "serviceaccounts", "token"),
            ("create", "pods", "eviction"),
        ] {
            ensure!(!can_sub(verb, resource, Some(sub))?, "the agent can {verb} {resource}/{sub}");
        }
        // The whole list the authorizer gives: resource rules only for the three kinds (and the
        // self-review APIs every identity has), read-only.
        let list =
            run(lab.kubectl().arg("--kubeconfig").arg(&kubeconfig).args(["auth", "can-i", "--list", "-n", "default"]))?;
        for line in list.lines().skip(1) {
            // Resources  Non-Resource URLs  Resource Names  Verbs, the last one like [get list watch].
            let (Some(resource), Some(verbs)) = (line.split_whitespace().next(), line.rfind('[').map(|i| &line[i..]))
            else {
                continue;
            };
            if resource.starts_with("selfsubject") || resource.starts_with('[') || resource.starts_with('/') {
                continue;
            }
            ensure!(
                ["services", "nodes", "endpointslices.discovery.k8s.io"].contains(&resource),
                "the agent has rights on {resource}: {line}"
            );
            ensure!(verbs.trim_end() == "[get list watch]", "the agent's verbs on {resource}: {verbs}");
        }
        Ok(())
    });
}

/// A Deployment exposed as a NodePort Service: from a pod and from the external client (through
/// either node's NodePort, and its ClusterIP routed through node-1) traffic reaches every
/// replica, over TCP and UDP; scaling up and down moves it;
/// a pod made unready leaves and comes back when ready again.
#[test]
fn deployment_traffic_follows_replicas_scale_and_readiness() {
    with_namespace("deployment_traffic_follows_replicas_scale_and_readiness", "t-deploy", |ctx| {
        ctx.deployment("web", 3, "")?;
        ctx.service("web", "web", "NodePort", "")?;
        let pods = ctx.wait_ready("web", 3)?;
        let client = ctx.client_pod("client", NodeId::ONE)?;
        let (cip, np) = (ctx.cluster_ip("web")?, ctx.node_port("web")?);
        for udp in [false, true] {
            converges_to(&client, (cip, 80), udp, &pods)?;
            for node in [NodeId::ONE, NodeId::TWO] {
                converges_to(ctx.lab.client_ns(), (node.ip(), np), udp, &pods)?;
            }
            // The ClusterIP from outside, routed through node-1, as kube-proxy serves it.
            converges_to(ctx.lab.client_ns(), (cip, 80), udp, &pods)?;
        }

        ctx.kubectl(&["scale", "deployment", "web", "--replicas", "5"])?;
        let five = ctx.wait_ready("web", 5)?;
        converges_to(&client, (cip, 80), false, &five)?;
        converges_to(ctx.lab.client_ns(), (NodeId::TWO.ip(), np), false, &five)?;

        ctx.kubectl(&["scale", "deployment", "web", "--replicas", "2"])?;
        let two = ctx.wait_ready("web", 2)?;
        converges_to(&client, (cip, 80), false, &two)?;
        converges_to(ctx.lab.client_ns(), (NodeId::ONE.ip(), np), true, &two)?;

        // Unready (the lab's readiness switch), then ready again.
        let unready = two.iter().next().context("a pod")?.clone();
        ctx.kubectl(&["annotate", "pod", &unready, &format!("{READY_ANNOTATION}=false")])?;
        let rest = ctx.wait_ready("web", 1)?;
        converges_to(&client, (cip, 80), false, &rest)?;
        ctx.kubectl(&["annotate", "pod", &unready, &format!("{READY_ANNOTATION}-")])?;
        let back = ctx.wait_ready("web", 2)?;
        ensure!(back == two, "ready again: {back:?}, expected {two:?}");
        converges_to(&client, (cip, 80), false, &two)?;
        Ok(())
    });
}

/// A readinessProbe decides readiness: a pod whose probe port does not answer never becomes
/// ready, one whose probe answers does.
#[test]
fn readiness_probes_decide_which_pods_serve() {
    with_namespace("readiness_probes_decide_which_pods_serve", "t-probe", |ctx| {
        ctx.deployment("good", 2, "      terminationGracePeriodSeconds: 1")?;
        ctx.kubectl(&["patch", "deployment", "good", "--type", "json", "-p",
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/readinessProbe","value":{"tcpSocket":{"port":8080},"periodSeconds":1}}]"#])?;
        ctx.deployment("bad", 1, "")?;
        ctx.kubectl(&["patch", "deployment", "bad", "--type", "json", "-p",
            r#"[{"op":"add","path":"/spec/template/spec/containers/0/readinessProbe","value":{"httpGet":{"port":9999,"path":"/healthz"},"periodSeconds":1}}]"#])?;
        ctx.apply("apiVersion: v1\nkind: Service\nmetadata: {name: both}\nspec:\n  selector: {tier: probed}\n  ports: [{port: 80, targetPort: 8080}]\n")?;
        for name in ["good", "bad"] {
            ctx.kubectl(&[
                "patch",
                "deployment",
                name,
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"template":{"metadata":{"labels":{"tier":"probed"}}}}}"#,
            ])?;
        }
        let ready = ctx.wait_ready("both", 2)?;
        ensure!(ready.iter().all(|n| n.starts_with("good-")), "ready endpoints {ready:?}");
        thread::sleep(Duration::from_secs(3));
        let all = ctx.endpoints("both")?;
        ensure!(
            all.iter().filter(|e| e.0.starts_with("bad-")).all(|e| !e.1),
            "the pod whose probe fails is ready: {all:?}"
        );
        let client = ctx.client_pod("client", NodeId::TWO)?;
        converges_to(&client, (ctx.cluster_ip("both")?, 80), false, &ready)
    });
}

/// Graceful termination: a deleted pod's open connection keeps working through its grace period
/// while new connections go to the other pods; a Service whose pods are all terminating falls
/// back to them, as kube-proxy does.
#[test]
fn graceful_termination_drains_and_falls_back_to_terminating_pods() {
    with_namespace("graceful_termination_drains_and_falls_back_to_terminating_pods", "t-grace", |ctx| {
        ctx.deployment("web", 2, "      terminationGracePeriodSeconds: 15")?;
        ctx.service("web", "web", "ClusterIP", "")?;
        let pods = ctx.wait_ready("web", 2)?;
        let client = ctx.client_pod("client", NodeId::ONE)?;
        let cip = ctx.cluster_ip("web")?;
        converges_to(&client, (cip, 80), false, &pods)?;
        let mut session = in_netns(&client, || TcpSession::connect(cip, 80, TIMEOUT))??;
        let doomed = session.server().to_owned();
        ctx.kubectl(&["delete", "pod", &doomed, "--wait=false"])?;
        wait_until("the deleted pod's endpoint terminating", CONVERGE, || {
            Ok(ctx.endpoints("web")?.iter().any(|e| e.0 == doomed && e.3 && e.2 && !e.1))
        })?;
        // New connections: the other pods (the survivor and the replacement) only.
        let others = ctx.wait_ready("web", 2)?;
        ensure!(!others.contains(&doomed), "{doomed} still ready: {others:?}");
        converges_to(&client, (cip, 80), false, &others)?;
        for i in 0..3 {
            session
                .echo(format!("draining {i}").as_bytes())
                .with_context(|| format!("the connection to {doomed}, terminating"))?;
            thread::sleep(Duration::from_secs(1));
        }

        // Scale to zero: every pod terminating; new connections still served by them.
        ctx.kubectl(&["scale", "deployment", "web", "--replicas", "0"])?;
        wait_until("only terminating endpoints", CONVERGE, || {
            let e = ctx.endpoints("web")?;
            Ok(!e.is_empty() && e.iter().all(|e| e.3 && e.2 && !e.1))
        })?;
        let terminating: BTreeSet<String> = ctx.endpoints("web")?.into_iter().filter(|e| e.2).map(|e| e.0).collect();
        let name = tcp_from(&client, (cip, 80), TIMEOUT).context("a new connection while every pod terminates")?;
        ensure!(terminating.contains(&name), "answered by {name}, not one of the terminating {terminating:?}");
        Ok(())
    });
}

/// `kubectl patch` of a Service takes effect: type ClusterIP → NodePort → LoadBalancer (with
/// its status) → ExternalName → ClusterIP, a port change, `sessionAffinity`,
/// `externalTrafficPolicy` and `internalTrafficPolicy`.
#[test]
fn service_patches_take_effect() {
    with_namespace("service_patches_take_effect", "t-patch", |ctx| {
        // Two pods on each node, placed by name.
        ctx.deployment("web", 4, "      topologySpreadConstraints: [{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: web}}}]")?;
        ctx.service("web", "web", "ClusterIP", "")?;
        let all = ctx.wait_ready("web", 4)?;
        let on = |node: NodeId| -> Result<BTreeSet<String>> {
            Ok(ctx.pods("web")?.into_iter().filter(|p| p.1 == node.k8s_name()).map(|p| p.0).collect())
        };
        let (on1, on2) = (on(NodeId::ONE)?, on(NodeId::TWO)?);
        ensure!(on1.len() == 2 && on2.len() == 2, "pods not spread: {on1:?} {on2:?}");
        let client = ctx.client_pod("client", NodeId::ONE)?;
        let cip = ctx.cluster_ip("web")?;
        converges_to(&client, (cip, 80), false, &all)?;
        let outside = ctx.lab.client_ns().to_owned();

        // NodePort.
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"type":"NodePort"}}"#])?;
        let np = ctx.node_port("web")?;
        converges_to(&outside, (NodeId::TWO.ip(), np), false, &all)?;

        // LoadBalancer, its ingress IP routed to node 1 by the client.
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"type":"LoadBalancer"}}"#])?;
        let lb_ip = Ipv4Addr::new(192, 0, 2, 80);
        ctx.kubectl(&[
            "patch",
            "service",
            "web",
            "--subresource",
            "status",
            "--type",
            "merge",
            "-p",
            &format!(r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{lb_ip}"}}]}}}}}}"#),
        ])?;
        let route_added = rproxy_tests::cmd::ip(
            Some(&outside),
            &["route", "replace", &format!("{lb_ip}/32"), "via", &NodeId::ONE.ip().to_string()],
        );
        route_added?;
        converges_to(&outside, (lb_ip, 80), false, &all)?;

        // externalTrafficPolicy Local: through node 1, only node 1's pods, seeing the client.
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"externalTrafficPolicy":"Local"}}"#])?;
        converges_to(&outside, (NodeId::ONE.ip(), np), false, &on1)?;
        let seen = in_netns(&outside, || TcpSession::connect(NodeId::ONE.ip(), np, TIMEOUT))??.seen_as();
        ensure!(seen.map(|s| s.ip()) == Some(rproxy_tests::cluster::CLIENT_IP.into()), "the backend saw {seen:?}");
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#])?;

        // internalTrafficPolicy Local: the pod on node 1 reaches node 1's pods only.
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"internalTrafficPolicy":"Local"}}"#])?;
        converges_to(&client, (cip, 80), false, &on1)?;
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"internalTrafficPolicy":"Cluster"}}"#])?;
        converges_to(&client, (cip, 80), false, &all)?;

        // sessionAffinity ClientIP: every new connection of the client on one pod.
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#])?;
        wait_until("affinity", CONVERGE, || {
            let names: BTreeSet<String> =
                (0..12).map(|_| tcp_from(&client, (cip, 80), TIMEOUT)).collect::<Result<_>>()?;
            Ok(names.len() == 1)
        })?;
        ctx.kubectl(&["patch", "service", "web", "-p", r#"{"spec":{"sessionAffinity":"None"}}"#])?;
        converges_to(&client, (cip, 80), false, &all)?;

        // A port change: 80 → 81.
        ctx.kubectl(&[
            "patch",
            "service",
            "web",
            "--type",
            "json",
            "-p",
            r#"[{"op":"replace","path":"/spec/ports/0/port","value":81}]"#,
        ])?;
        converges_to(&client, (cip, 81), false, &all)?;
        wait_until("port 80 no longer translated", CONVERGE, || {
            Ok(tcp_from(&client, (cip, 80), Duration::from_millis(300)).is_err())
        })?;

        // ExternalName: the ClusterIP goes; back to ClusterIP: a new one works.
        ctx.kubectl(&["patch", "service", "web", "--type", "merge", "-p",
            r#"{"spec":{"type":"ExternalName","externalName":"example.com","clusterIP":null,"clusterIPs":null,"ports":[{"name":"tcp","port":81,"targetPort":8080,"protocol":"TCP"}],"externalTrafficPolicy":null,"sessionAffinity":null,"internalTrafficPolicy":null}}"#])?;
        wait_until("the ClusterIP gone with ExternalName", CONVERGE, || {
            Ok(tcp_from(&client, (cip, 81), Duration::from_millis(300)).is_err())
        })?;
        ctx.kubectl(&[
            "patch",
            "service",
            "web",
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"type":"ClusterIP","externalName":null}}"#,
        ])?;
        let new_ip = ctx.cluster_ip("web")?;
        converges_to(&client, (new_ip, 81), false, &all)
    });
}

/// The `service.kubernetes.io/service-proxy-name` and `service.kubernetes.io/headless` labels
/// hide a Service from rproxy, as from kube-proxy; removing them brings it back.
#[test]
fn proxy_name_and_headless_labels_hide_a_service() {
    with_namespace("proxy_name_and_headless_labels_hide_a_service", "t-labels", |ctx| {
        ctx.deployment("web", 1, "")?;
        ctx.service("web", "web", "ClusterIP", "")?;
        let pods = ctx.wait_ready("web", 1)?;
        let client = ctx.client_pod("client", NodeId::TWO)?;
        let cip = ctx.cluster_ip("web")?;
        converges_to(&client, (cip, 80), false, &pods)?;
        for label in ["service.kubernetes.io/service-proxy-name=other", "service.kubernetes.io/headless="] {
            ctx.kubectl(&["label", "service", "web", label])?;
            wait_until(&format!("{label} hides the Service"), CONVERGE, || {
                Ok(tcp_from(&client, (cip, 80), Duration::from_millis(300)).is_err())
            })?;
            let key = label.split('=').next().unwrap_or_default();
            ctx.kubectl(&["label", "service", "web", &format!("{key}-")])?;
            converges_to(&client, (cip, 80), false, &pods)?;
        }
        Ok(())
    });
}

/// The API server restarted (after etcd was compacted, so that the agents' watches come back
/// to a 410 Gone), and the nodes cut off it for a few seconds while a Service is created and a
/// Deployment scaled, all under continuous connections: none fails, and the agents converge on
/// what changed meanwhile about a second after reaching the API server again.
#[test]
fn api_server_restart_compaction_and_partition_lose_no_connection() {
    with_namespace("api_server_restart_compaction_and_partition_lose_no_connection", "t-api", |ctx| {
        ctx.deployment("web", 2, "")?;
        ctx.service("web", "web", "NodePort", "")?;
        let pods = ctx.wait_ready("web", 2)?;
        let client = ctx.client_pod("client", NodeId::ONE)?;
        let (cip, np) = (ctx.cluster_ip("web")?, ctx.node_port("web")?);
        let outside = ctx.lab.client_ns().to_owned();
        converges_to(&client, (cip, 80), false, &pods)?;
        converges_to(&outside, (NodeId::ONE.ip(), np), false, &pods)?;
        let syncs = |ctx: &Ctx<'_>| -> usize {
            ctx.lab.node_ids().iter().map(|id| ctx.lab.agent_log(*id).matches("watch in sync").count()).sum()
        };
        let before = syncs(ctx);

        // Changes, etcd compacted past them, the API server restarted: the watches resume from
        // compacted versions (410), relist, and catch up.
        under_connections(&outside, &client, (cip, 80), (NodeId::ONE.ip(), np), || {
            ctx.kubectl(&["scale", "deployment", "web", "--replicas", "3"])?;
            ctx.wait_ready("web", 3)?;
            let revision = ctx.lab.control_plane().compact_etcd()?;
            eprintln!("etcd compacted at revision {revision}");
            ctx.lab.control_plane_mut().restart_apiserver()
        })?;
        let three = ctx.wait_ready("web", 3)?;
        converges_to(&client, (cip, 80), false, &three)?;
        wait_until("the agents relisted", CONVERGE, || Ok(syncs(ctx) >= before + 2 * ctx.lab.node_ids().len()))?;

        // Cut off for 5 s while things change; then caught up about a second after.
        let late_pods = under_connections(&outside, &client, (cip, 80), (NodeId::ONE.ip(), np), || {
            ctx.lab.partition_nodes(true);
            thread::sleep(Duration::from_secs(1));
            ctx.deployment("late", 2, "")?;
            ctx.service("late", "late", "ClusterIP", "")?;
            ctx.kubectl(&["scale", "deployment", "web", "--replicas", "2"])?;
            ctx.wait_ready("late", 2)?;
            ctx.wait_ready("web", 2)?;
            thread::sleep(Duration::from_secs(3));
            Ok(())
        });
        let late_pods = late_pods.and_then(|()| ctx.wait_ready("late", 2));
        let late_ip = ctx.cluster_ip("late")?;
        let refused_while_cut = tcp_from(&client, (late_ip, 80), Duration::from_millis(500)).is_err();
        let healed = Instant::now();
        ctx.lab.partition_nodes(false);
        let late_pods = late_pods?;
        ensure!(refused_while_cut, "the partitioned agents served a Service created meanwhile");
        wait_until("the Service created meanwhile reachable", Duration::from_secs(5), || {
            Ok(tcp_from(&client, (late_ip, 80), Duration::from_millis(300)).is_ok())
        })?;
        let took = healed.elapsed();
        eprintln!("the Service created during the partition answered {took:?} after it healed");
        ensure!(took <= Duration::from_secs(3), "caught up only {took:?} after the partition healed");
        converges_to(&client, (late_ip, 80), false, &late_pods)?;
        let two = ctx.wait_ready("web", 2)?;
        converges_to(&client, (cip, 80), false, &two)
    });
}

/// Restarts each node's agent in turn (`round` names the restarts in errors), each time until
/// the agents are synced again, then a pause.
fn restart_each_agent(ctx: &Ctx<'_>, round: usize) -> Result<()> {
    for id in ctx.lab.node_ids() {
        ctx.lab.restart_agent(id).with_context(|| format!("restart {round} of {}", id.k8s_name()))?;
        ctx.lab.wait_agents_synced(CONVERGE)?;
        thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// The agents restarted (as the `DaemonSet` restarts its pods) under continuous connections:
/// none fails.
#[test]
fn agent_restarts_lose_no_connection() {
    with_namespace("agent_restarts_lose_no_connection", "t-restart", |ctx| {
        ctx.deployment("web", 3, "")?;
        ctx.service("web", "web", "NodePort", "")?;
        let pods = ctx.wait_ready("web", 3)?;
        let client = ctx.client_pod("client", NodeId::TWO)?;
        let (cip, np) = (ctx.cluster_ip("web")?, ctx.node_port("web")?);
        converges_to(&client, (cip, 80), false, &pods)?;
        let outside = ctx.lab.client_ns().to_owned();
        under_connections(&outside, &client, (cip, 80), (NodeId::ONE.ip(), np), || {
            (0..2).try_for_each(|round| restart_each_agent(ctx, round))
        })?;
        // Changes after the restarts still reach the datapath.
        ctx.kubectl(&["scale", "deployment", "web", "--replicas", "1"])?;
        let one = ctx.wait_ready("web", 1)?;
        converges_to(&client, (cip, 80), false, &one)
    });
}

/// A dual-stack Service (`ipFamilyPolicy: RequireDualStack`) in the dual-stack cluster: the API
/// server gives it a cluster IP of each family and the `EndpointSlice` controller a slice of each
/// address type. Over IPv6 it answers a pod on the cluster IP, and the external client on the
/// cluster IP (routed to node 1) and on each node's IPv6 address at the `NodePort`, TCP and UDP,
/// through exactly the ready pods; the agents restarted under IPv6 connections (pod to cluster
/// IP, client to `NodePort`) lose none; a scale-down is followed over IPv6.
#[test]
fn a_dual_stack_service_is_served_over_ipv6() {
    with_namespace("a_dual_stack_service_is_served_over_ipv6", "t-dual", |ctx| {
        ctx.deployment("web", 2, "")?;
        ctx.service("web", "web", "NodePort", "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]")?;
        let pods = ctx.wait_ready("web", 2)?;
        let svc = ctx.json(&["get", "service", "web"])?;
        let ips: Vec<IpAddr> = svc["spec"]["clusterIPs"]
            .as_array()
            .context("no clusterIPs")?
            .iter()
            .map(|ip| ip.as_str().unwrap_or_default().parse().context("clusterIPs"))
            .collect::<Result<_>>()?;
        ensure!(matches!(ips[..], [IpAddr::V4(_), IpAddr::V6(_)]), "clusterIPs {ips:?}: not IPv4 then IPv6");
        let cip6 = ips[1];
        let slices = ctx.json(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web"])?;
        let types: BTreeSet<&str> =
            slices["items"].as_array().into_iter().flatten().filter_map(|s| s["addressType"].as_str()).collect();
        ensure!(types == BTreeSet::from(["IPv4", "IPv6"]), "EndpointSlices of address types {types:?}");
        let np = ctx.node_port("web")?;
        let client = ctx.client_pod("client", NodeId::TWO)?;
        let outside = ctx.lab.client_ns().to_owned();
        for udp in [false, true] {
            converges_to(&client, (cip6, 80), udp, &pods)?;
            converges_to(&outside, (cip6, 80), udp, &pods)?;
            for id in ctx.lab.node_ids() {
                converges_to(&outside, (IpAddr::from(id.ip6()), np), udp, &pods)?;
            }
        }
        under_connections(&outside, &client, (cip6, 80), (IpAddr::from(NodeId::ONE.ip6()), np), || {
            restart_each_agent(ctx, 0)
        })?;
        ctx.kubectl(&["scale", "deployment", "web", "--replicas", "1"])?;
        let one = ctx.wait_ready("web", 1)?;
        converges_to(&client, (cip6, 80), false, &one)?;
        converges_to(&outside, (IpAddr::from(NodeId::TWO.ip6()), np), false, &one)
    });
}

/// `GET /metrics` of node `id`'s agent (`--metrics-bind-address`, kube-proxy's 10249), from the
/// external client: the body.
fn metrics_of(ctx: &Ctx<'_>, id: NodeId) -> Result<String> {
    let outside = ctx.lab.client_ns().to_owned();
    let (status, body) = in_netns(&outside, || client::http_get(id.ip(), 10249, "/metrics", TIMEOUT))??;
    ensure!(status == 200, "GET /metrics: {status}");
    Ok(body)
}

/// `/metrics` as an operator replacing kube-proxy reads it: kube-proxy's sync metrics, the
/// network programming latency measured from the EndpointSlice controller's trigger times (a
/// scale-up observed within the histogram's bounds), Service and endpoint changes counted, the
/// datapath's translations counted as traffic flows, programmed frontends, conntrack entries
/// after a GC pass, and the watches synced.
#[test]
fn metrics_show_kube_proxy_s_and_the_datapath_s_figures() {
    with_namespace("metrics_show_kube_proxy_s_and_the_datapath_s_figures", "t-metrics", |ctx| {
        let before = metrics_of(ctx, NodeId::ONE)?;
        let programmed =
            |t: &str| client::metric_sample(t, "kubeproxy_network_programming_duration_seconds_count").unwrap_or(0.0);
        let endpoint_changes =
            |t: &str| client::metric_sample(t, "kubeproxy_sync_proxy_rules_endpoint_changes_total").unwrap_or(0.0);
        ctx.deployment("web", 2, "")?;
        ctx.service("web", "web", "NodePort", "")?;
        let pods = ctx.wait_ready("web", 2)?;
        let client = ctx.client_pod("client", NodeId::ONE)?;
        let cip = ctx.cluster_ip("web")?;
        converges_to(&client, (cip, 80), false, &pods)?;
        // An open connection: its conntrack entries outlive the GC passes.
        let mut held = in_netns(&client, || TcpSession::connect(cip, 80, TIMEOUT))??;
        held.echo(b"held")?;
        let mut after = String::new();
        wait_until("the network programming latency observed", CONVERGE, || {
            after = metrics_of(ctx, NodeId::ONE)?;
            Ok(programmed(&after) > programmed(&before))
        })?;
        wait_until("conntrack entries counted by a GC pass", CONVERGE, || {
            after = metrics_of(ctx, NodeId::ONE)?;
            Ok(client::metric_sample(&after, "rproxy_conntrack_entries{family=\"ipv4\"}").unwrap_or(0.0) >= 2.0)
        })?;
        held.echo(b"still held")?;
        ensure!(endpoint_changes(&after) > endpoint_changes(&before), "endpoint changes not counted:\n{after}");
        // Every observation of this change is a latency of seconds, not a clock mix-up. (The
        // cluster's earlier tests cut the nodes off the API server: their latencies are longer.)
        let within = |t: &str| {
            client::metric_sample(t, "kubeproxy_network_programming_duration_seconds_bucket{le=\"10.0\"}")
                .unwrap_or(0.0)
        };
        ensure!(
            within(&after) - within(&before) >= programmed(&after) - programmed(&before),
            "network programming latencies beyond 10 s:\n{after}"
        );
        for (name, min) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds_count", 1.0),
            ("kubeproxy_sync_full_proxy_rules_duration_seconds_count", 1.0),
            ("kubeproxy_sync_proxy_rules_service_changes_total", 1.0),
            ("rproxy_frontends", 2.0),
            ("rproxy_backends", 2.0),
            ("rproxy_datapath_translations_total{event=\"new_flow\"}", 1.0),
            ("rproxy_watch_synced{kind=\"EndpointSlice\"}", 1.0),
            ("rproxy_map_capacity{map=\"conntrack\",family=\"ipv4\"}", 524_288.0),
        ] {
            let v = client::metric_sample(&after, name).with_context(|| format!("no {name} in:\n{after}"))?;
            ensure!(v >= min, "{name} is {v}, expected at least {min}");
        }
        let last = client::metric_sample(&after, "kubeproxy_sync_proxy_rules_last_timestamp_seconds")
            .context("no last sync time")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        ensure!((now - 300.0..=now + 1.0).contains(&last), "last sync at {last}, now {now}");
        ensure!(
            client::metric_sample(&after, "rproxy_datapath_drops_total{reason=\"ct_insert_fail\"}") == Some(0.0),
            "{after}"
        );
        Ok(())
    });
}

/// helm: `$RPROXY_HELM_BIN`, else the binary `scripts/build-helm.sh` builds from tests/helm (the
/// directory it prints last), as the offline chart tests find it.
fn helm_bin() -> Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("RPROXY_HELM_BIN") {
        let bin = std::path::PathBuf::from(bin);
        ensure!(bin.is_file(), "RPROXY_HELM_BIN={} is not a file", bin.display());
        return Ok(bin);
    }
    let script = rproxy_tests::workspace_root().join("scripts/build-helm.sh");
    let out = run(std::process::Command::new("bash").arg(&script).stderr(std::process::Stdio::inherit()))?;
    let dir = out.lines().rev().find(|l| !l.trim().is_empty()).context("build-helm.sh printed no directory")?;
    Ok(std::path::Path::new(dir.trim()).join("helm"))
}

/// `helm template rproxy deploy/helm/rproxy --namespace kube-system` with `args` added.
fn helm_template(args: &[&str]) -> Result<String> {
    let root = rproxy_tests::workspace_root();
    let home = std::env::temp_dir().join("rproxy-kube-test-helm");
    run(std::process::Command::new(helm_bin()?)
        .current_dir(&root)
        .args(["template", "rproxy", "deploy/helm/rproxy", "--namespace", "kube-system"])
        .args(args)
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data")))
}

/// `kind namespace/name` of every object of a multi-document YAML stream, or of a `List`.
fn object_names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let field = |k: &str| o["metadata"][k].as_str().unwrap_or_default().to_owned();
            format!("{} {}/{}", o["kind"].as_str().unwrap_or_default(), field("namespace"), field("name"))
        })
        .collect()
}

/// The Helm chart's default rendering, applied to the real API server with a server-side dry run
/// and strict field validation: every object is accepted (admission, validation and defaulting
/// run), the `DaemonSet` comes back with the rendered args and the server's defaults, and nothing
/// is stored. The same dry run refuses a rendering with a field unknown to the API and one with
/// an invalid label, so an acceptance means something.
#[test]
fn helm_default_rendering_passes_a_server_side_dry_run() {
    let test = "helm_default_rendering_passes_a_server_side_dry_run";
    let Some((_serial, guard)) = lab(test) else { return };
    let lab = guard.as_ref().expect("started");
    let result = (|| -> Result<()> {
        let yaml = helm_template(&[])?;
        let mut rendered = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(&yaml) {
            let value: Value = serde::Deserialize::deserialize(doc).context("the rendering is YAML")?;
            if !value.is_null() {
                rendered.push(value);
            }
        }
        let names = object_names(&rendered);
        ensure!(names.len() == 4, "the rendering's objects: {names:?}");
        let daemon_set =
            || lab.kubectl_run(&["-n", "kube-system", "get", "daemonset", "--ignore-not-found", "-o", "name"]);
        ensure!(daemon_set()?.trim().is_empty(), "a DaemonSet already in kube-system: {}", daemon_set()?);

        let dry_run = ["apply", "--dry-run=server", "--validate=strict", "-o", "json", "-f", "-"];
        let out = rproxy_tests::cmd::run_with_input(lab.kubectl().args(dry_run), &yaml)?;
        let answer: Value = serde_json::from_str(&out).with_context(|| format!("kubectl's answer: {out}"))?;
        let items = answer["items"].as_array().with_context(|| format!("not a List: {answer}"))?;
        ensure!(object_names(items) == names, "accepted {:?}, rendered {names:?}", object_names(items));
        let ds = items.iter().find(|o| o["kind"] == "DaemonSet").context("no DaemonSet in the answer")?;
        let rendered_ds = rendered.iter().find(|o| o["kind"] == "DaemonSet").context("no DaemonSet rendered")?;
        let container = |o: &Value| o["spec"]["template"]["spec"]["containers"][0].clone();
        ensure!(container(ds)["args"] == container(rendered_ds)["args"], "args changed: {}", container(ds)["args"]);
        ensure!(ds["spec"]["revisionHistoryLimit"] == 10, "the server's defaults: {}", ds["spec"]);
        ensure!(container(ds)["terminationMessagePath"] == "/dev/termination-log", "the server's defaults");
        ensure!(daemon_set()?.trim().is_empty(), "the dry run stored a DaemonSet: {}", daemon_set()?);

        for (set, refusal) in [
            (r#"tolerations=[{"operator":"Exists","bogus":1}]"#, "bogus"),
            (r#"commonLabels={"tier":"not a label value!"}"#, "not a label value!"),
        ] {
            let yaml = helm_template(&["--set-json", set])?;
            match rproxy_tests::cmd::run_with_input(lab.kubectl().args(dry_run), &yaml) {
                Ok(out) => bail!("the dry run accepted {set}: {out}"),
                Err(e) => ensure!(format!("{e:#}").contains(refusal), "{set}: refused for another reason: {e:#}"),
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        panic!("{test}: {e:?}");
    }
}

#[test]
fn seen_as_parses_the_greeting() {
    let line = b"web-1 10.244.1.5 40000";
    assert_eq!(client::greeting_peer(line), Some(SocketAddr::from(([10, 244, 1, 5], 40000))));
}
