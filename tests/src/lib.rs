//! rproxy's network-namespace lab: a Calico-style routed "node" with pods on veth pairs, pod
//! servers and clients, the agent's process, and Kubernetes manifests, all built from the test
//! process and torn down by `Drop` guards.
//!
//! Everything here touches the kernel (namespaces, links, bpffs) and needs root; tests take
//! [`serial`] so that they run one at a time. Every name a lab creates starts with
//! `rpx<pid><counter>` (see [`Lab::prefix`]), so concurrent processes never collide.
//!
//! - [`netns`]: namespaces and running code inside one ([`in_netns`]);
//! - [`lab`]: the topology ([`Lab`], [`Node`], [`Pod`]) and the agent's lifecycle;
//! - [`cluster`]: two nodes and an external client on one bridge ([`Cluster`]), for north-south
//!   traffic; [`nodeport`]: the `NodePort` Service used on it; [`kube_proxy`]: kube-proxy-shaped
//!   iptables and nftables baselines; [`load`]: the `NodePort` benchmark's TCP load and UDP
//!   counters; [`pktgen`]: its UDP packet generator (`BPF_PROG_TEST_RUN` live frames); [`xdp`]:
//!   rproxy's `XDP_PASS` program, for the cluster's switch ports and the generator; [`wire`]: the
//!   benchmark's wire sink and XDP floor (tested by `tests/wire.rs`); [`clusterip`]: the east-west
//!   `ClusterIP` scale benchmark's scenario and its fresh-4-tuple client;
//! - [`server`] / [`client`]: the TCP/UDP name-and-echo protocol;
//! - [`manifest`]: Service / `EndpointSlice` YAML; [`demo`]: the demo service used by the e2e tests
//!   and the interactive lab ([`run_interactive`]).
//!
//! Tests (as root): `cargo test -p rproxy-tests` runs the manifest tests, `tests/e2e.rs` (the demo
//! service), `tests/semantics.rs` (Service semantics, each test with its own Service),
//! `tests/cluster_lab.rs` and `tests/nodeport_baselines.rs` (the two-node lab);
//! `cargo test -p rproxy-tests --test one_node lab_plumbing` needs no agent, nor do the
//! `nodeport_baselines` tests. The agent-dependent
//! tests run the binary [`agent_bin`] finds (`RPROXY_AGENT_BIN` overrides it). The interactive lab
//! without xtask: `cargo run -p rproxy-tests --example lab [-- MANIFESTS_DIR]`.

pub mod agent;
pub mod client;
pub mod cluster;
pub mod clusterip;
pub mod cmd;
pub mod demo;
pub mod interactive;
pub mod k8s;
pub mod kube_proxy;
pub mod lab;
pub mod load;
pub mod manifest;
pub mod netns;
pub mod nodeport;
pub mod pktgen;
pub mod server;
pub mod soak;
pub mod wire;
pub mod xdp;

use std::{
    path::{Path, PathBuf},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

pub use cluster::{Cluster, NodeId};
pub use interactive::run_interactive;
pub use lab::{Lab, Node, Pod};
pub use netns::in_netns;

/// Serialises every test that touches the kernel. Poison-tolerant: a panicking test does not
/// fail the ones after it.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// [`serial`] for a test that needs the kernel, or `None` (after printing why `test` is
/// skipped) when not root. With `RPROXY_REQUIRE_KERNEL=1` not being root fails instead.
///
/// # Panics
/// When not root while `RPROXY_REQUIRE_KERNEL=1`.
#[must_use]
pub fn serial_or_skip(test: &str) -> Option<MutexGuard<'static, ()>> {
    if is_root() {
        Some(serial())
    } else {
        assert!(
            std::env::var("RPROXY_REQUIRE_KERNEL").as_deref() != Ok("1"),
            "{test}: RPROXY_REQUIRE_KERNEL=1 but not running as root"
        );
        eprintln!("skipping {test}: needs root (network namespaces, bpffs)");
        None
    }
}

/// Polls `ok` (sleeping 10 ms after each `false`) until it held `streak` times in a row or
/// `limit` passed since `since`. Returns when that run of successes started, counted from `since`.
pub fn streak_start(since: Instant, limit: Duration, streak: usize, mut ok: impl FnMut() -> bool) -> Option<Duration> {
    let mut run_start = None;
    let mut run = 0;
    while since.elapsed() < limit {
        let tried_at = since.elapsed();
        if ok() {
            let start = *run_start.get_or_insert(tried_at);
            run += 1;
            if run == streak {
                return Some(start);
            }
        } else {
            (run_start, run) = (None, 0);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    None
}

/// Whether this process runs as root (the lab needs it).
#[must_use]
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The workspace root (`tests/..`).
#[must_use]
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The eBPF object of the last release before BTF maps (commit c871198), for upgrade tests
/// (`rproxy-agent run --ebpf-object`); how it was built: tests/fixtures/README.md.
#[must_use]
pub fn previous_ebpf_object() -> PathBuf {
    workspace_root().join("tests/fixtures/rproxy-ebpf-c871198.o")
}

/// The `rproxy-agent` binary: `$RPROXY_AGENT_BIN`, else `target/release/rproxy-agent`, else
/// `target/debug/rproxy-agent` under the workspace root.
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("RPROXY_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("RPROXY_AGENT_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let target = workspace_root().join("target");
    let candidates = [target.join("release/rproxy-agent"), target.join("debug/rproxy-agent")];
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!(
            "rproxy-agent binary not found (looked at $RPROXY_AGENT_BIN, {}, {}): run `cargo xtask \
             test`, or build it with `cargo build --release -p rproxy-agent`",
            candidates[0].display(),
            candidates[1].display()
        )
    })
}
