//! `cargo xtask bench-cluster`: rproxy against the real API server (`rproxy_tests::k8s::lab`).
//!
//! 1. **Network programming latency**, as kube-proxy's SLI defines it: from a pod's `Ready`
//!    status update to the first connection that reaches it through its Service. One pod backs a
//!    Service; each round the benchmark writes the pod's status unready, waits until
//!    connections are refused (no endpoint left), then writes it ready again (time 0) and
//!    connects to the `ClusterIP` from a client pod on the other node, about every millisecond
//!    (each attempt given 5 ms), until one is answered by that pod. The path covers the API
//!    server, the `EndpointSlice` controller, the agent's watch, translation and map writes.
//!    Measured with `--services` Services present (each selector-less, with a 10-endpoint
//!    `EndpointSlice`, created through the API), p50/p90/p99/max over `--rounds` changes.
//! 2. **Start to programmed**: every agent restarted with all those Services in the API server;
//!    the time from its start to its first `synced` line with every frontend written, and its
//!    RSS then (from the agent's log).
//!
//! Goals (issue 14): p99 ≤ 100 ms with 10,000 Services present.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use rproxy_tests::{
    NodeId,
    cluster::MAX_NODES,
    in_netns,
    k8s::lab::{KubeLab, KubeLabConfig, wait_until},
};
use serde_json::json;

const NAMESPACE: &str = "bench";
/// Timeout of one connection attempt while the benchmark waits for the pod: the lab's round
/// trip is a fraction of a millisecond.
const PROBE_TIMEOUT: Duration = Duration::from_millis(5);
/// Pause before each round (see `measure_latency`).
const ROUND_GAP: Duration = Duration::from_millis(250);
/// Background Services are created this many at a time.
const CREATE_CONCURRENCY: usize = 32;

struct Args {
    services: Vec<usize>,
    rounds: usize,
    nodes: u8,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { services: vec![1_000, 10_000], rounds: 100, nodes: 2 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--services" => {
                args.services =
                    value()?.split(',').map(|s| s.trim().parse().context("--services")).collect::<Result<_>>()?;
                args.services.sort_unstable();
            }
            "--rounds" => args.rounds = value()?.parse().context("--rounds")?,
            "--nodes" => {
                args.nodes = value()?.parse().context("--nodes")?;
                ensure!((2..=MAX_NODES).contains(&args.nodes), "--nodes: 2 to {MAX_NODES}");
            }
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench-cluster [-- --services 1000,10000] [--rounds 100] [--nodes 2]\n\n\
                     Network programming latency (a pod's Ready status update to the first connection\n\
                     through its Service that reaches it) with each number of Services present (10\n\
                     endpoints each, created through the API), and every agent's start-to-programmed\n\
                     time with the largest number."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    ensure!(args.rounds > 0 && !args.services.is_empty(), "nothing to measure");
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let lab = KubeLab::start(KubeLabConfig {
        nodes: args.nodes,
        agent_bin: Some(rproxy_tests::agent_bin()?),
        ..KubeLabConfig::default()
    })?;
    lab.kubectl_run(&["create", "namespace", NAMESPACE])?;
    // The measured Service: one pod on node 1, probed from a client pod on node 2.
    rproxy_tests::cmd::run_with_input(
        lab.kubectl().args(["-n", NAMESPACE, "apply", "-f", "-"]),
        &format!(
            "apiVersion: v1
kind: Pod
metadata: {{name: target, labels: {{app: target}}}}
spec:
  nodeName: {}
  containers: [{{name: app, image: lab, ports: [{{containerPort: 8080}}]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  nodeName: {}
  containers: [{{name: client, image: lab}}]
---
apiVersion: v1
kind: Service
metadata: {{name: target}}
spec:
  selector: {{app: target}}
  ports: [{{port: 80, targetPort: 8080}}]
",
            NodeId::ONE.k8s_name(),
            NodeId::TWO.k8s_name()
        ),
    )?;
    let mut client_ns = None;
    wait_until("the client pod", Duration::from_secs(30), || {
        client_ns = lab.pod_netns(NAMESPACE, "client");
        Ok(client_ns.is_some())
    })?;
    let client_ns = client_ns.context("client pod")?;
    let cip: Ipv4Addr = lab
        .kubectl_run(&["-n", NAMESPACE, "get", "service", "target", "-o", "jsonpath={.spec.clusterIP}"])?
        .trim()
        .parse()?;
    wait_until("the target pod answering through its Service", Duration::from_secs(30), || {
        Ok(answered_by(&client_ns, cip, Duration::from_millis(300)).as_deref() == Some("target"))
    })?;

    let mut report = String::new();
    let mut present = 0;
    for &target in &args.services {
        let started = Instant::now();
        lab.block_on(create_services(&lab, present, target))?;
        eprintln!("{target} background Services present (created {} in {:.1?})", target - present, started.elapsed());
        present = target;
        // Let the agents write them all before measuring.
        wait_until("the agents programmed every Service", Duration::from_mins(10), || {
            Ok(lab.node_ids().iter().all(|id| last_frontends(&lab.agent_log(*id)) > present))
        })?;
        let samples = measure_latency(&lab, &client_ns, cip, args.rounds)?;
        report.push_str(&latency_row(present, &samples));
    }

    // Start to programmed, every agent, with the most Services.
    let mut restarts = String::new();
    for id in lab.node_ids() {
        lab.lab().node_mut(id).stop_agent()?;
        let started = Instant::now();
        lab.start_agent(id)?;
        let mut line = None;
        wait_until("the restarted agent programmed every Service", Duration::from_mins(10), || {
            line = lab
                .agent_log(id)
                .lines()
                .find(|l| l.contains(" synced ") && frontends_of(l) > present)
                .map(str::to_owned);
            Ok(line.is_some())
        })?;
        let took = started.elapsed();
        let rss = line.as_deref().and_then(|l| field(l, "rss_mib")).unwrap_or(0);
        let _ =
            writeln!(restarts, "  {}: start to every frontend programmed {took:.2?} (RSS {rss} MiB)", id.k8s_name());
    }

    println!("\nrproxy against kube-apiserver v1.36.3 ({} nodes, release agent)\n", args.nodes);
    println!("Network programming latency: pod Ready status update -> first connection through its ClusterIP");
    println!("that reaches it ({} changes per row; goal p99 <= 100 ms with 10,000 Services)\n", args.rounds);
    println!("{:>9}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}", "services", "p50 ms", "p90 ms", "p99 ms", "max ms", "goal");
    print!("{report}");
    println!("\nRestart with {present} Services x 10 endpoints in the API server (the agent's own log):");
    print!("{restarts}");
    Ok(())
}

/// The pod that answers one TCP connection from `netns` to `cip:80`, if one does in `timeout`.
fn answered_by(netns: &str, cip: Ipv4Addr, timeout: Duration) -> Option<String> {
    in_netns(netns, || rproxy_tests::client::tcp_request(cip, 80, b"", timeout)).ok()?.ok().map(|r| r.0)
}

/// Writes the target pod's readiness as a kubelet would (its `Ready` and `ContainersReady`
/// conditions).
async fn set_ready(api: &Api<Pod>, ready: bool) -> Result<()> {
    let flag = if ready { "True" } else { "False" };
    let status = json!({ "status": { "conditions": [
        { "type": "PodScheduled", "status": "True" },
        { "type": "Initialized", "status": "True" },
        { "type": "ContainersReady", "status": flag },
        { "type": "Ready", "status": flag },
    ]}});
    api.patch_status("target", &PatchParams::default(), &Patch::Merge(status)).await.context("pod status")?;
    Ok(())
}

/// `rounds` times: unready (until connections are refused), then ready at time 0 and connect
/// until the target answers. The latencies.
fn measure_latency(lab: &KubeLab, client_ns: &str, cip: Ipv4Addr, rounds: usize) -> Result<Vec<Duration>> {
    let api: Api<Pod> = Api::namespaced(lab.client(), NAMESPACE);
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // Rounds are spaced: each makes two EndpointSlice updates, and kube-controller-manager's
        // client is limited to 20 requests/s (--kube-api-qps, burst 30). Back to back, rounds
        // would measure that limit (about 45 ms a change once the burst is spent), not the path.
        std::thread::sleep(ROUND_GAP);
        lab.block_on(set_ready(&api, false))?;
        wait_until("no endpoint left", Duration::from_secs(10), || {
            Ok(answered_by(client_ns, cip, Duration::from_millis(100)).is_none())
        })
        .with_context(|| format!("round {round}"))?;
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        lab.block_on(set_ready(&api, true))?;
        let trace = std::env::var_os("RPROXY_BENCH_TRACE").is_some();
        let patched = t0.elapsed();
        let took = in_netns(client_ns, || -> Result<Duration> {
            loop {
                // A short timeout: while the Service has no endpoint the datapath rejects, but
                // its ICMP rate limit drops some SYNs, and a long wait on one would hide the
                // moment the pod became reachable.
                if let Ok((name, _)) = rproxy_tests::client::tcp_request(cip, 80, b"", PROBE_TIMEOUT)
                    && name == "target"
                {
                    return Ok(t0.elapsed());
                }
                ensure!(t0.elapsed() < Duration::from_secs(10), "round {round}: not reachable 10 s after the update");
                std::thread::sleep(Duration::from_millis(1));
            }
        })??;
        samples.push(took);
        if trace {
            let log = lab.agent_log(NodeId::TWO);
            let line = log
                .lines()
                .rev()
                .find(|l| l.contains("service programmed") && l.contains("bench/target") && l.contains("backends=1"));
            let at = line
                .and_then(|l| l.split_whitespace().next())
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            let wall0 = k8s_openapi::jiff::Timestamp::try_from(wall0).ok();
            let programmed = at.zip(wall0).map(|(a, w)| a.duration_since(w));
            eprintln!(
                "round {round}: status patch returned {patched:?}, agent programmed at {programmed:?}, reached {took:?}"
            );
        }
    }
    Ok(samples)
}

fn latency_row(services: usize, samples: &[Duration]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let at = |q: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index"
        )]
        let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i].as_secs_f64() * 1000.0
    };
    let p99 = at(0.99);
    let goal = if services >= 10_000 { if p99 <= 100.0 { "met" } else { "MISSED" } } else { "-" };
    format!("{services:>9}  {:>8.1}  {:>8.1}  {p99:>8.1}  {:>8.1}  {goal:>8}\n", at(0.50), at(0.90), at(1.0))
}

/// Creates background Services `from..to` (selector-less, one TCP port) with a 10-endpoint
/// `EndpointSlice` each.
async fn create_services(lab: &KubeLab, from: usize, to: usize) -> Result<()> {
    let services: Api<Service> = Api::namespaced(lab.client(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(lab.client(), NAMESPACE);
    futures::stream::iter(from..to)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("bg-{i}");
                let svc: Service = serde_json::from_value(json!({
                    "metadata": { "name": name },
                    "spec": { "ports": [{ "port": 80, "targetPort": 8080, "protocol": "TCP" }] },
                }))?;
                services.create(&PostParams::default(), &svc).await.with_context(|| format!("Service {name}"))?;
                let endpoints: Vec<serde_json::Value> = (0..10)
                    .map(|e| {
                        let n = i * 10 + e;
                        json!({
                            "addresses": [format!("10.250.{}.{}", (n >> 8) & 0xff, n & 0xff)],
                            "conditions": { "ready": true, "serving": true, "terminating": false },
                        })
                    })
                    .collect();
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": { "name": format!("{name}-1"), "labels": { "kubernetes.io/service-name": name } },
                    "addressType": "IPv4",
                    "endpoints": endpoints,
                    "ports": [{ "port": 8080, "protocol": "TCP" }],
                }))?;
                slices.create(&PostParams::default(), &slice).await.with_context(|| format!("slice of {name}"))?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// `frontends=` of the agent's last `synced` line (0 before one).
fn last_frontends(log: &str) -> usize {
    log.lines().rev().find(|l| l.contains(" synced ")).map_or(0, frontends_of)
}

fn frontends_of(line: &str) -> usize {
    field(line, "frontends").unwrap_or(0)
}

/// The number after `name=` in a log line.
fn field(line: &str, name: &str) -> Option<usize> {
    let fields: BTreeMap<&str, &str> = line.split_whitespace().filter_map(|w| w.split_once('=')).collect();
    fields.get(name)?.parse().ok()
}
