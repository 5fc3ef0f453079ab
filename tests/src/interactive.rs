//! The interactive lab behind `cargo xtask lab`: the demo topology with the agent running on a
//! manifests directory, some traffic to show the balancing, and instructions for poking at it.
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::{
    demo::{self, CLIENT, CLUSTER_IP, PORT},
    is_root,
    lab::Lab,
};

/// Requests sent per protocol to show the balancing.
const REQUESTS: usize = 30;
/// Env var: exit this many seconds after the lab is up instead of waiting for a signal.
const DURATION_ENV: &str = "RPROXY_LAB_DURATION_SECS";

/// Builds the demo lab (node, `backend-a..c`, `client`), runs `agent_bin` on `manifests_dir`,
/// shows the balancing of 30 TCP and UDP requests to the `ClusterIP`, prints how to poke
/// at the lab, then waits for SIGINT/SIGTERM (or `$RPROXY_LAB_DURATION_SECS` seconds) and
/// removes everything.
pub fn run_interactive(agent_bin: &Path, manifests_dir: &Path) -> Result<()> {
    ensure!(is_root(), "the lab needs root (network namespaces, bpffs)");
    let duration = match std::env::var(DURATION_ENV) {
        Ok(v) => Some(Duration::from_secs(v.parse().with_context(|| format!("{DURATION_ENV}={v}"))?)),
        Err(_) => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let _signals = SignalFlag::register(&stop)?;

    let manifests_dir =
        &manifests_dir.canonicalize().with_context(|| format!("manifests dir {}", manifests_dir.display()))?;
    let mut lab = demo::build_lab()?;
    lab.start_agent(agent_bin, manifests_dir)?;
    println!("lab {}: agent started on {}, waiting for it…", lab.prefix(), manifests_dir.display());
    match demo::wait_ready(&mut lab) {
        Ok(()) => print_balancing(&lab),
        Err(e) => {
            lab.ensure_agent_running()?;
            println!("warning: {e:#}\n(does {} hold the demo Service?)", manifests_dir.display());
        }
    }
    print_instructions(&lab, agent_bin, manifests_dir);

    if let Some(d) = duration {
        println!("\nthe lab stops in {}s ({DURATION_ENV}) or on Ctrl-C", d.as_secs());
    } else {
        println!("\nCtrl-C (SIGINT) or SIGTERM stops the lab and removes it");
    }
    let deadline = duration.map(|d| Instant::now() + d);
    while !stop.load(Ordering::Relaxed) && deadline.is_none_or(|d| Instant::now() < d) {
        lab.ensure_agent_running()?;
        thread::sleep(Duration::from_millis(100));
    }
    println!("removing the lab…");
    drop(lab);
    println!("done");
    Ok(())
}

/// Sends the requests and prints how many each backend answered.
fn print_balancing(lab: &Lab) {
    let client = lab.pod(CLIENT.0);
    let mut counts: BTreeMap<String, [usize; 2]> = BTreeMap::new();
    let mut first_error = None;
    for (column, payload) in [(0, b"hello over tcp\n"), (1, b"hello over udp\n")] {
        for _ in 0..REQUESTS {
            let reply = if column == 0 {
                client.tcp_request(CLUSTER_IP, PORT, payload)
            } else {
                client.udp_request(CLUSTER_IP, PORT, payload)
            };
            let key = match reply {
                Ok((name, _)) => name,
                Err(e) => {
                    first_error.get_or_insert(e);
                    "(failed)".to_owned()
                }
            };
            counts.entry(key).or_default()[column] += 1;
        }
    }
    println!("\n{REQUESTS} TCP and {REQUESTS} UDP requests from {} to {CLUSTER_IP}:{PORT}:", CLIENT.0);
    println!("  {:<12} {:>5} {:>5}", "answered by", "TCP", "UDP");
    for (name, [tcp, udp]) in &counts {
        println!("  {name:<12} {tcp:>5} {udp:>5}");
    }
    if let Some(e) = first_error {
        println!("  first failure: {e:#}");
    }
}

fn print_instructions(lab: &Lab, agent_bin: &Path, manifests_dir: &Path) {
    let client = lab.pod(CLIENT.0);
    let (cns, node, pins) = (client.ns(), lab.node_ns(), lab.pin_dir().display());
    println!("\nnamespaces:");
    println!("  {:<10} {node}  (pod devices {})", "node", lab.pod_devices_glob());
    for pod in lab.pods() {
        println!("  {:<10} {}  ({}, host side {})", pod.name(), pod.ns(), pod.ip(), pod.host_dev());
    }
    println!("\ntry (as root; servers answer '<pod name>' then echo until you close):");
    println!("  ip netns exec {cns} bash -c 'exec 3<>/dev/tcp/{CLUSTER_IP}/{PORT}; echo hi >&3; timeout 1 cat <&3'");
    if which("nc") {
        println!("  echo hi | ip netns exec {cns} nc -N {CLUSTER_IP} {PORT}");
        println!("  echo hi | ip netns exec {cns} nc -u -w1 {CLUSTER_IP} {PORT}");
    }
    println!("  ip netns exec {cns} ping -c1 {}   # a backend's own address", demo::BACKENDS[0].1);
    println!("\nBPF state (pinned under {pins}):");
    for map in ["RPX_SVC4", "RPX_BE4", "RPX_CT4", "RPX_RNAT4", "RPX_STATS"] {
        println!("  bpftool map dump pinned {pins}/{map}");
    }
    println!("  ip netns exec {node} bpftool net show");
    println!("  {} dump --bpffs {pins}   # the same maps, decoded, with the counters", agent_bin.display());
    println!("  {} dump --bpffs {pins} -o json   # the same as JSON", agent_bin.display());
    println!("\nthe agent's own health, as kube-proxy's (port 10256):");
    println!(
        "  ip netns exec {node} bash -c 'exec 3<>/dev/tcp/127.0.0.1/10256; printf \"GET /healthz HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'"
    );
    println!("\nits metrics, as kube-proxy's (port 10249, Prometheus text):");
    println!(
        "  ip netns exec {node} bash -c 'exec 3<>/dev/tcp/127.0.0.1/10249; printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3' | grep -v '^#'"
    );
    if let Some(log) = lab.agent_log_path() {
        println!("\nagent log: tail -f {}", log.display());
    }
    println!(
        "\nthe agent watches {}: edits to its Service / EndpointSlice YAML take effect within a second",
        manifests_dir.display()
    );
}

/// Whether `program` is on `$PATH`.
fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// SIGINT and SIGTERM set the flag; one while the flag is set already exits at once (status
/// 130). The flag is set on drop, so that after the lab a signal acts about as by default.
struct SignalFlag(Arc<AtomicBool>);

impl SignalFlag {
    fn register(flag: &Arc<AtomicBool>) -> Result<Self> {
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(signal, 130, flag.clone())?;
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(Self(flag.clone()))
    }
}

impl Drop for SignalFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
