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
    /// Install the toolchain and system packages (LLVM 22, bpf-linker, rust-src, iproute2, bpftool).
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
    /// Datapath benchmark: ns/packet through BPF_PROG_TEST_RUN vs an empty TC program.
    Bench {
        /// Extra arguments for the benchmark (see `cargo xtask bench -- --help`).
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
    /// rustfmt check and clippy (pedantic, warnings are errors).
    Lint,
    /// Run the release agent on a node of a kind cluster, against its API server (Ctrl-C stops it).
    Run(kind::RunArgs),
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

fn setup() -> Result<()> {
    run(Command::new("bash").arg(root().join("scripts/setup.sh")))
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
                .env("RPROXY_REQUIRE_KERNEL", "1")
                .arg("--")
                .args(args);
            run(&mut c)
        }
        Cmd::Lab { manifests, duration } => {
            setup()?;
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
        Cmd::Bench { args } => {
            setup()?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-agent", "--example", "datapath-bench", "--"]).args(args);
            run(&mut c)
        }
        Cmd::BenchControlPlane { args } => {
            setup()?;
            let agent = build_agent(true)?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-tests", "--example", "control-plane-bench", "--"])
                .args(args)
                .env("RPROXY_AGENT_BIN", &agent);
            run(&mut c)
        }
        Cmd::BenchNodeport { args } => {
            setup()?;
            let agent = build_agent(true)?;
            let mut c = cargo();
            c.args(["run", "--release", "-q", "-p", "rproxy-tests", "--example", "nodeport-bench", "--"])
                .args(args)
                .env("RPROXY_AGENT_BIN", &agent);
            run(&mut c)
        }
        Cmd::Run(args) => kind::run(&args, &agent_path(true), || {
            setup()?;
            build_agent(true).map(drop)
        }),
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
