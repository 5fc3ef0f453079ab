//! `cargo xtask cluster`: a real Kubernetes cluster on this machine, without containers, with
//! rproxy on every node (see `rproxy_tests::k8s::lab`). As root:
//! `cargo run -p rproxy-tests --example cluster -- [--nodes N] [--status-file PATH] [--duration SECS]`.
//! The agent binary comes from `rproxy_tests::agent_bin` (`$RPROXY_AGENT_BIN`), the control plane
//! from `scripts/build-k8s.sh` (`$RPROXY_K8S_BIN`). Ctrl-C tears everything down.
use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use rproxy_tests::{
    cluster::MAX_NODES,
    k8s::{
        control_plane::ControlPlane,
        lab::{KubeLab, KubeLabConfig},
    },
};

struct Args {
    nodes: u8,
    status_file: Option<PathBuf>,
    duration: Option<Duration>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args { nodes: 2, status_file: None, duration: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--nodes" => {
                args.nodes = value()?.parse().context("--nodes")?;
                if !(1..=MAX_NODES).contains(&args.nodes) {
                    bail!("--nodes: 1 to {MAX_NODES}");
                }
            }
            "--status-file" => args.status_file = Some(PathBuf::from(value()?)),
            "--duration" => args.duration = Some(Duration::from_secs(value()?.parse().context("--duration")?)),
            "-h" | "--help" => {
                println!(
                    "cargo xtask cluster [--nodes N] [--status-file PATH] [--duration SECS]\n\n\
                     A Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,\n\
                     kube-scheduler), N network-namespace nodes (default 2) running rproxy-agent and a lab\n\
                     kubelet, and an external client, on this machine. --status-file writes the kubeconfig,\n\
                     nodes and client as JSON once everything is ready. Ctrl-C (or --duration) removes it all."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other} (see --help)"),
        }
    }
    Ok(args)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    let started = Instant::now();
    eprintln!("starting the control plane and {} nodes…", args.nodes);
    let lab = KubeLab::start(KubeLabConfig {
        nodes: args.nodes,
        agent_bin: Some(rproxy_tests::agent_bin()?),
        ..KubeLabConfig::default()
    })?;
    let status = lab.status();
    if let Some(path) = &args.status_file {
        std::fs::write(path, serde_json::to_string_pretty(&status)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let bin = ControlPlane::bin_dir()?;
    println!("cluster ready in {:.1?}", started.elapsed());
    println!("{}", serde_json::to_string_pretty(&status)?);
    println!("\nTry it (another shell, as root):");
    println!("  export KUBECONFIG={} PATH={}:$PATH", status.kubeconfig.display(), bin.display());
    println!("  kubectl get nodes -o wide");
    println!("  kubectl create deployment web --image=any --replicas=3");
    println!("  kubectl expose deployment web --port 80 --target-port 8080 --type NodePort");
    println!("  kubectl get pods -o wide; kubectl get endpointslices");
    println!("  CIP=$(kubectl get svc web -o jsonpath='{{.spec.clusterIP}}')");
    println!("  NP=$(kubectl get svc web -o jsonpath='{{.spec.ports[0].nodePort}}')");
    let node1 = &status.nodes[0];
    println!(
        "  nsenter --net=/run/netns/{} bash -c \"exec 3<>/dev/tcp/$CIP/80; head -1 <&3\"   # from node {}",
        node1.netns, node1.name
    );
    println!(
        "  nsenter --net=/run/netns/{} bash -c \"exec 3<>/dev/tcp/{}/$NP; head -1 <&3\"   # from the external client",
        status.client.netns, node1.address
    );
    println!(
        "  nsenter --net=/run/netns/{} bash -c \"exec 3<>/dev/tcp/$CIP/80; head -1 <&3\"   # the ClusterIP from outside (routed via {})",
        status.client.netns, node1.name
    );
    println!("Agent logs: {}", lab.lab().work_dir().display());
    println!("Ctrl-C stops the cluster and removes everything.");
    while !stop.load(Ordering::Relaxed) && args.duration.is_none_or(|d| started.elapsed() < d) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("stopping…");
    drop(lab);
    if let Some(path) = &args.status_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
