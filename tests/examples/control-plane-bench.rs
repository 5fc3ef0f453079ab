//! Control-plane benchmark: the real agent binary against a fake Kubernetes API server on
//! loopback, which lists N Services × E endpoints (paged, as the watcher asks) and then streams
//! watch events.
//!
//! Measured:
//! - start to fully programmed: agent spawn → its first `synced` line holding every frontend;
//! - one more Service when N exist: a watch event (Service + its `EndpointSlice`) sent → the
//!   agent's `service programmed` line for it, repeated;
//! - peak RSS of the agent (`VmHWM`).
//!
//! Run as root (the agent loads BPF programs): `cargo xtask bench-control-plane [-- --help]`.
//! The agent runs in the host network namespace, talks only to 127.0.0.1, attaches to no
//! device (`--pod-devices` matches nothing), and pins under a private bpffs directory that is
//! cleaned up at the end.
use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::StatusCode,
    response::{IntoResponse as _, Response},
};
use serde_json::{Value, json};
use tokio::sync::broadcast;
use tokio_stream::{StreamExt as _, wrappers::BroadcastStream};

/// `--services N --endpoints E --adds K --agent PATH`.
struct Args {
    services: usize,
    endpoints: usize,
    adds: usize,
    agent: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        services: 10_000,
        endpoints: 10,
        adds: 20,
        agent: std::env::var_os("RPROXY_AGENT_BIN")
            .map_or_else(|| PathBuf::from("target/release/rproxy-agent"), PathBuf::from),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--services" => args.services = value()?.parse()?,
            "--endpoints" => args.endpoints = value()?.parse()?,
            "--adds" => args.adds = value()?.parse()?,
            "--agent" => args.agent = value()?.into(),
            "--help" | "-h" => {
                println!(
                    "control-plane-bench [--services N (10000)] [--endpoints E (10)] [--adds K (20)] [--agent PATH]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if args.services == 0 || args.services > 60_000 || args.endpoints == 0 || args.endpoints > 250 {
        bail!("--services must be 1..=60000 and --endpoints 1..=250");
    }
    Ok(args)
}

/// `--service-map-max` and `--backend-map-max` for the Services measured (and the added ones):
/// the defaults, or the next power of two that holds them with a quarter to spare, as an
/// operator would size a cluster of this scale.
fn table_sizes(args: &Args) -> (u32, u32) {
    let services = args.services + args.adds;
    // One ClusterIP port each: slot 0 and one slot per endpoint; one backend id per endpoint.
    let size = |need: usize, default: u32| {
        let want = u32::try_from(need + need / 4).unwrap_or(u32::MAX).next_power_of_two();
        want.max(default)
    };
    (
        size(services * (1 + args.endpoints), rproxy_common::limits::SERVICES_MAX),
        size(services * args.endpoints + 1, rproxy_common::limits::BACKENDS_MAX),
    )
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", 1 + i / 250, 1 + i % 250)
}

fn service(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "bench", "resourceVersion": "1"},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]}
    })
}

fn slice(name: &str, index: usize, endpoints: usize) -> Value {
    let eps: Vec<Value> = (0..endpoints)
        .map(|e| {
            let n = index * endpoints + e;
            json!({"addresses": [format!("10.{}.{}.{}", 128 + n / 65_536, (n / 256) % 256, n % 256)],
                   "conditions": {"ready": true, "serving": true, "terminating": false},
                   "nodeName": if e % 3 == 0 { "bench-node" } else { "other" }})
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-abcde"), "namespace": "bench", "resourceVersion": "1",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

/// One fake API resource: its list (each item as JSON text), and the sender of its watch streams.
struct Resource {
    kind: &'static str,
    items: Vec<String>,
    events: broadcast::Sender<String>,
}

#[derive(Clone)]
struct Api {
    resources: Arc<HashMap<&'static str, Resource>>,
    requests: Arc<Mutex<Vec<String>>>,
}

fn query(req: &Request) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn handle(State(api): State<Api>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    api.requests.lock().expect("lock").push(req.uri().to_string());
    let Some(res) = api.resources.get(path.as_str()) else {
        return (StatusCode::NOT_FOUND, format!("no {path}")).into_response();
    };
    let q = query(&req);
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        let stream = BroadcastStream::new(res.events.subscribe())
            .filter_map(|ev| ev.ok().map(|line| Ok::<_, std::io::Error>(format!("{line}\n"))));
        return Response::builder()
            .header("content-type", "application/json")
            .body(Body::from_stream(stream))
            .expect("response");
    }
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX).max(1);
    let start: usize = q.get("continue").and_then(|c| c.parse().ok()).unwrap_or(0);
    let end = start.saturating_add(limit).min(res.items.len());
    let mut metadata = json!({"resourceVersion": "1"});
    if end < res.items.len() {
        metadata["continue"] = json!(end.to_string());
    }
    // The items were serialized when generated: a page costs this process a copy, not a
    // serialization, so that it takes as little as it can of the CPUs the agent is measured on.
    let items = &res.items[start.min(end)..end];
    let mut body = Vec::with_capacity(items.iter().map(|i| i.len() + 1).sum::<usize>() + 128);
    body.extend_from_slice(
        format!(r#"{{"apiVersion":"v1","kind":"{}List","metadata":{metadata},"items":["#, res.kind).as_bytes(),
    );
    for (k, item) in items.iter().enumerate() {
        if k > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item.as_bytes());
    }
    body.extend_from_slice(b"]}");
    Response::builder().header("content-type", "application/json").body(Body::from(body)).expect("response")
}

/// The agent process; SIGTERM + cleanup on drop.
struct Agent {
    child: Child,
    bin: PathBuf,
    bpffs: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(0)),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = Command::new(&self.bin).args(["cleanup", "--bpffs"]).arg(&self.bpffs).status();
    }
}

fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    Ok(line.split_whitespace().nth(1).context("VmHWM value")?.parse()?)
}

fn wait_line(
    lines: &std_mpsc::Receiver<String>,
    deadline: Duration,
    mut pred: impl FnMut(&str) -> bool,
) -> Result<String> {
    let until = Instant::now() + deadline;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if pred(&line) => return Ok(line),
            Ok(_) => {}
            Err(_) => bail!("timed out after {deadline:?}"),
        }
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() - 1) * p / 100]
}

#[expect(clippy::too_many_lines, reason = "one linear benchmark script, clearer in one piece")]
fn main() -> Result<()> {
    let args = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;

    let t = Instant::now();
    let names: Vec<String> = (0..args.services).map(|i| format!("svc-{i}")).collect();
    let services: Vec<String> = names.iter().enumerate().map(|(i, n)| service(n, &cluster_ip(i)).to_string()).collect();
    let slices: Vec<String> = names.iter().enumerate().map(|(i, n)| slice(n, i, args.endpoints).to_string()).collect();
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "bench-node", "resourceVersion": "1"},
                      "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}});
    let mk = |kind, items| Resource { kind, items, events: broadcast::channel(1024).0 };
    let resources: HashMap<&'static str, Resource> = [
        ("/api/v1/services", mk("Service", services)),
        ("/apis/discovery.k8s.io/v1/endpointslices", mk("EndpointSlice", slices)),
        ("/api/v1/nodes", mk("Node", vec![node.to_string()])),
    ]
    .into();
    let api = Api { resources: Arc::new(resources), requests: Arc::default() };
    println!("generated {} Services × {} endpoints in {:?}", args.services, args.endpoints, t.elapsed());
    let (service_map, backend_map) = table_sizes(&args);
    println!("agent tables: --service-map-max {service_map} --backend-map-max {backend_map}");

    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let app = Router::new().fallback(handle).with_state(api.clone());
    rt.spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: bench\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: bench\n  user: {{}}\ncontexts:\n- name: bench\n  context:\n    cluster: bench\n    user: bench\n\
             current-context: bench\n"
        ),
    )?;
    let bpffs = PathBuf::from(format!("/sys/fs/bpf/rpxbench{}", std::process::id()));

    let started = Instant::now();
    let mut child = Command::new(&args.agent)
        .args(["run", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--node-name", "bench-node", "--pod-devices", "rpxbench-none-*", "--cgroup", "none", "--bpffs"])
        .arg(&bpffs)
        .args(["--service-map-max", &service_map.to_string(), "--backend-map-max", &backend_map.to_string()])
        .env("RPROXY_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args.agent.display()))?;
    let stderr = child.stderr.take().context("stderr")?;
    let pid = child.id();
    let _agent = Agent { child, bin: args.agent.clone(), bpffs };
    let (tx, lines) = std_mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if std::env::var_os("BENCH_VERBOSE").is_some() {
                eprintln!("agent: {line}");
            }
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let want = format!("frontends={}", args.services);
    // Where the start-up goes: the lists and the programs' load run side by side, then the
    // first sync.
    let (mut listed, mut loaded) = (None, None);
    let line = wait_line(&lines, Duration::from_mins(2), |l| {
        if l.contains("all watches in sync") {
            listed.get_or_insert(started.elapsed());
        }
        if l.contains("eBPF programs loaded") {
            loaded.get_or_insert(started.elapsed());
        }
        l.contains(" synced") && l.contains(&want)
    })
    .context("waiting for the initial sync")?;
    let initial = started.elapsed();
    let rss_initial = peak_rss_kib(pid)?;
    println!("start → {} frontends programmed: {initial:.2?}", args.services);
    let seen = |at: Option<Duration>| at.map_or_else(|| "not seen".to_owned(), |d| format!("{d:.2?}"));
    println!("  lists in sync at {}, programs loaded at {}", seen(listed), seen(loaded));
    println!("  agent: {}", line.split_once("synced").map_or(line.as_str(), |(_, r)| r).trim());

    let mut latencies = Vec::new();
    for k in 0..args.adds {
        let name = format!("added-{k}");
        let ip = cluster_ip(args.services + k);
        let svc = json!({"type": "ADDED", "object": service(&name, &ip)}).to_string();
        let sl = json!({"type": "ADDED", "object": slice(&name, args.services + k, args.endpoints)}).to_string();
        // Let the agent settle so that each add is measured alone.
        std::thread::sleep(Duration::from_millis(50));
        while lines.try_recv().is_ok() {}
        let sent = Instant::now();
        api.resources["/apis/discovery.k8s.io/v1/endpointslices"].events.send(sl).context("no slice watch open")?;
        api.resources["/api/v1/services"].events.send(svc).context("no service watch open")?;
        let needle = format!("bench/{name}");
        let want_backends = format!("backends={}", args.endpoints);
        wait_line(&lines, Duration::from_secs(10), |l| {
            l.contains("service programmed") && l.contains(&needle) && l.contains(&want_backends)
        })
        .with_context(|| format!("waiting for {name}"))?;
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    if !latencies.is_empty() {
        println!(
            "one more Service (+ its slice, {} endpoints) with {} present, {} adds: median {:.2?}, p90 {:.2?}, max {:.2?}",
            args.endpoints,
            args.services,
            latencies.len(),
            percentile(&latencies, 50),
            percentile(&latencies, 90),
            latencies[latencies.len() - 1],
        );
    }
    let rss = peak_rss_kib(pid)?;
    println!("agent peak RSS: {:.1} MiB (after the initial sync: {:.1} MiB)", mib(rss), mib(rss_initial));
    let requests = api.requests.lock().expect("lock").len();
    println!("API requests served: {requests}");
    // Issue 9's targets at 10,000 Services, issue 18's from 30,000 on.
    let (initial_max, add_max) = if args.services >= 30_000 {
        (Duration::from_secs(3), Duration::from_millis(2))
    } else {
        (Duration::from_secs(2), Duration::from_millis(5))
    };
    println!(
        "targets: initial ≤ {initial_max:?}: {}; add ≤ {add_max:?} (median): {}; RSS ≤ 150 MiB: {}",
        verdict(initial <= initial_max),
        verdict(latencies.is_empty() || percentile(&latencies, 50) <= add_max),
        verdict(rss <= 150 * 1024),
    );
    Ok(())
}

fn mib(kib: u64) -> f64 {
    f64::from(u32::try_from(kib).unwrap_or(u32::MAX)) / 1024.0
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}
