//! `cargo xtask`: the project's commands. Each one runs `scripts/setup.sh` first (idempotent and
#![expect(clippy::doc_markdown, reason = "doc comments here are --help text, shown as written")]
//! fast when everything is installed), so a fresh Debian machine with rustup needs nothing else.
mod kind;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "rproxy developer commands")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain and system packages (LLVM 22, bpf-linker, rust-src, iproute2, bpftool,
    /// iptables, nftables, ethtool, openssl), mount bpffs, and build the Kubernetes control plane
    /// from tests/k8s (Go 1.26 or later needed).
    Setup,
    /// Build the self-contained agent binary (target/release/rproxy-agent).
    Build,
    /// Run every test: unit, BPF_PROG_TEST_RUN packet tests, network-namespace end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build a lab in network namespaces, run the agent on the bundled manifests and show it work.
    Lab {
        /// Manifests directory the agent watches (edit files there while the lab runs).
        #[arg(long, default_value = "lab/manifests")]
        manifests: PathBuf,
        /// Exit after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Datapath fuzzing: generated frames, valid and broken, through every program with
    /// BPF_PROG_TEST_RUN, every property checked (verdicts, checksums, untouched frames,
    /// conntrack pairs); prints the seed, and on a failure the frame.
    FuzzDatapath {
        /// Frames to run.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// Seed (default: random, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Soak test in the two-node lab: traffic of every kind (short TCP, UDP, long-lived streams;
    /// pods, external client, host; both families) while endpoints churn every second, both
    /// agents restart ten times and the programs are upgraded from the previous release and back;
    /// then every conntrack entry must go. Reports failures, leftovers and the agents' RSS.
    Soak {
        /// Minutes of traffic.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Extra arguments (see `cargo xtask soak -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Datapath benchmark: ns/packet through BPF_PROG_TEST_RUN vs an empty TC program.
    Bench {
        /// Extra arguments for the benchmark (see `cargo xtask bench -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Conntrack GC benchmark: reading a 440,000-entry table key by key (aya's iterator) against
    /// batch reads, CPU and wall time in one run, and one paced GC pass's share of a CPU.
    BenchGc {
        /// Extra arguments (see `cargo xtask bench-gc -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Control-plane benchmark: the release agent against a fake API server on loopback with
    /// 10,000 Services × 10 endpoints: time to program, time to add one Service, peak RSS.
    BenchControlPlane {
        /// Extra arguments (see `cargo xtask bench-control-plane -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// NodePort benchmark in the two-node lab: TCP connections/s and UDP packets/s from an
    /// external client to a node port, through direct routing, kube-proxy-shaped iptables and
    /// nftables rules, and the rproxy agent (generic XDP, native XDP and TC).
    BenchNodeport {
        /// Extra arguments (see `cargo xtask bench-nodeport -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// East-west ClusterIP scale benchmark in the one-node lab: TCP connections/s and first-packet
    /// latency (connect() through the ClusterIP, p50/p99) from a client pod with 100, 1,000,
    /// 10,000 and 30,000 Services present, through direct routing, kube-proxy-shaped iptables and
    /// nftables rules, and the rproxy agent.
    BenchClusterip {
        /// Extra arguments (see `cargo xtask bench-clusterip -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Benchmark against the real API server (`cargo xtask cluster`'s): network programming
    /// latency (a pod's Ready update to the first connection reaching it through its Service)
    /// with 1,000 and 10,000 Services present, and the agents' start-to-programmed time.
    BenchCluster {
        /// Extra arguments (see `cargo xtask bench-cluster -- --help`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy (pedantic, warnings are errors).
    Lint,
    /// Run the release agent on a node of a kind cluster, against its API server (Ctrl-C stops it).
    Run(kind::RunArgs),
    /// A real Kubernetes cluster on this machine, without containers: etcd, kube-apiserver,
    /// kube-controller-manager and kube-scheduler built from their Go modules, network-namespace
    /// nodes running the release agent and a lab kubelet, and an external client. Ctrl-C removes it.
    Cluster {
        /// Number of nodes.
        #[arg(long, default_value_t = 2)]
        nodes: u8,
        /// Write the admin kubeconfig's path, the nodes and the client as JSON here once ready.
        #[arg(long, value_name = "PATH")]
        status_file: Option<PathBuf>,
        /// Exit after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// `scripts/setup.sh`: the toolchain, system packages and the Kubernetes control plane.
fn setup() -> Result<()> {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")))
}

/// `scripts/setup.sh` without the Kubernetes control plane (the commands that do not need it).
fn setup_without_control_plane() -> Result<()> {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")).arg("--no-control-plane"))
}

/// The directory of the Kubernetes binaries `scripts/build-k8s.sh` built (it prints it last).
fn k8s_bin() -> Result<PathBuf> {
    script_bin_dir("build-k8s.sh")
}

/// Runs `scripts/NAME` (a build script of Go binaries, cached) and returns the directory it
/// prints last: where the binaries are.
fn script_bin_dir(name: &str) -> Result<PathBuf> {
    let out = Command::new("bash").arg(root().join("scripts").join(name)).output().context(name.to_owned())?;
    if !out.status.success() {
        bail!("scripts/{name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout).with_context(|| format!("{name} output"))?;
    let dir =
        text.lines().rev().find(|l| !l.trim().is_empty()).with_context(|| format!("{name} printed no directory"))?;
    Ok(PathBuf::from(dir.trim()))
}

/// The helm binary `scripts/build-helm.sh` built (in the directory it prints last), for the Helm
/// chart's tests.
fn helm_bin() -> Result<PathBuf> {
    Ok(script_bin_dir("build-helm.sh")?.join("helm"))
}

/// Where `build_agent` puts the binary: under `$CARGO_TARGET_DIR` (relative to the workspace root,
/// where cargo runs) if set, else `target/`.
fn agent_path(profile_release: bool) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), |dir| root().join(dir));
    target.join(if profile_release { "release" } else { "debug" }).join("rproxy-agent")
}

fn build_agent(profile_release: bool) -> Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "rproxy-agent", "--bin", "rproxy-agent"]);
    if profile_release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(agent_path(profile_release))
}

/// Runs example `name` of rproxy-tests (release) with `args`, after the setup (with the
/// Kubernetes control plane when `control_plane`) and the release agent's build, which it gets
/// in `RPROXY_AGENT_BIN` (and the control plane's binaries in `RPROXY_K8S_BIN`).
fn lab_example(name: &str, args: &[String], control_plane: bool) -> Result<()> {
    if control_plane {
        setup()?;
    } else {
        setup_without_control_plane()?;
    }
    let agent = build_agent(true)?;
    let mut c = cargo();
    c.args(["run", "--release", "-q", "-p", "rproxy-tests", "--example", name, "--"])
        .args(args)
        .env("RPROXY_AGENT_BIN", &agent);
    if control_plane {
        c.env("RPROXY_K8S_BIN", k8s_bin()?);
    }
    run(&mut c)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            let bin = build_agent(true)?;
            eprintln!("built {}", bin.display());
            Ok(())
        }
        Cmd::Test { args } => {
            setup()?;
            let agent = build_agent(false)?;
            let mut c = cargo();
            c.args(["test", "--workspace"])
                .env("RPROXY_AGENT_BIN", &agent)
                .env("RPROXY_K8S_BIN", k8s_bin()?)
                .env("RPROXY_HELM_BIN", helm_bin()?)
                .env("RPROXY_REQUIRE_KERNEL", "1")
                .arg("--")
                .args(args);
            run(&mut c)
        }
        Cmd::Lab { manifests, duration } => {
            setup_without_control_plane()?;
            let agent = build_agent(true)?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-tests", "--example", "lab", "--"])
                .arg(root().join(manifests))
                .env("RPROXY_AGENT_BIN", &agent);
            if let Some(d) = duration {
                c.env("RPROXY_LAB_DURATION_SECS", d.to_string());
            }
            run(&mut c)
        }
        Cmd::FuzzDatapath { frames, seed } => {
            setup_without_control_plane()?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-agent", "--example", "fuzz-datapath", "--"])
                .arg("--frames")
                .arg(frames.to_string());
            if let Some(seed) = seed {
                c.arg("--seed").arg(seed.to_string());
            }
            run(&mut c)
        }
        Cmd::Bench { args } => {
            setup_without_control_plane()?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-agent", "--example", "datapath-bench", "--"]).args(args);
            run(&mut c)
        }
        Cmd::BenchGc { args } => {
            setup_without_control_plane()?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-agent", "--example", "gc-bench", "--"]).args(args);
            run(&mut c)
        }
        Cmd::Soak { minutes, args } => {
            let mut all = vec![String::from("--minutes"), minutes.to_string()];
            all.extend(args);
            lab_example("soak", &all, false)
        }
        Cmd::BenchControlPlane { args } => lab_example("control-plane-bench", &args, false),
        Cmd::BenchNodeport { args } => lab_example("nodeport-bench", &args, false),
        Cmd::BenchClusterip { args } => lab_example("clusterip-bench", &args, false),
        Cmd::Run(args) => kind::run(&args, &agent_path(true), || {
            setup_without_control_plane()?;
            build_agent(true).map(drop)
        }),
        Cmd::BenchCluster { args } => lab_example("cluster-bench", &args, true),
        Cmd::Cluster { nodes, status_file, duration } => {
            let mut args = vec![String::from("--nodes"), nodes.to_string()];
            if let Some(path) = status_file {
                // Relative to where the user ran cargo xtask, not to the workspace root.
                args.push(String::from("--status-file"));
                args.push(std::path::absolute(path)?.display().to_string());
            }
            if let Some(d) = duration {
                args.extend([String::from("--duration"), d.to_string()]);
            }
            lab_example("cluster", &args, true)
        }
        Cmd::Lint => {
            run(cargo().args(["fmt", "--all", "--check"]))?;
            // The eBPF crate is outside the workspace.
            run(Command::new("cargo").current_dir(root().join("rproxy-ebpf")).args(["fmt", "--check"]))?;
            run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
            run(Command::new("cargo").current_dir(root().join("rproxy-ebpf")).env("RUSTC_BOOTSTRAP", "1").args([
                "clippy",
                "--release",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]))
        }
    }
}
