//! The `rproxy-agent` process, run inside the node namespace with its output in a log file.
//!
//! The agent is started with `nsenter --net=/run/netns/<node>`, not `ip netns exec`: the latter
//! also gives the program a private mount namespace with a fresh sysfs on `/sys`, where
//! `/sys/fs/bpf` is an empty sysfs directory instead of the host's bpffs, so nothing could be
//! pinned there (and pins would not outlive the agent nor be seen by `cleanup` or `bpftool`).
use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{cmd::run, netns::command as netns_command};

/// How long the agent may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What `rproxy-agent run` is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub bin: PathBuf,
    /// Network namespace to run in.
    pub node_ns: String,
    /// `--node-name`.
    pub node_name: String,
    /// `--manifests DIR` or `--kubeconfig PATH`.
    pub source: AgentSource,
    /// `--pod-devices`.
    pub pod_devices: String,
    /// `--pod-sockets`, unless `extra_args` give it: the node's pods' namespace files (the
    /// lab's nodes share one kernel and cgroup tree, so `all` would take other nodes' pods).
    pub pod_sockets: String,
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// Where stdout and stderr go.
    pub log: PathBuf,
    /// Appended to the command line after the arguments above (e.g. `--devices eth0`).
    pub extra_args: Vec<String>,
}

/// Where an agent reads its Services and `EndpointSlices` from.
#[derive(Debug, Clone)]
pub enum AgentSource {
    /// `--manifests DIR`.
    Manifests(PathBuf),
    /// `--kubeconfig PATH`: a real API server.
    Kubeconfig(PathBuf),
}

/// A running (or exited) agent. Dropping it kills the process if it still runs.
#[derive(Debug)]
pub struct Agent {
    config: AgentConfig,
    child: Child,
}

impl Agent {
    /// Starts `<bin> run --manifests|--kubeconfig .. --node-name .. --pod-devices .. --bpffs ..
    /// [--pod-sockets ..] <extra args>` in the node namespace, in its own process group so that a terminal's Ctrl-C
    /// reaches only the lab, which then stops the agent itself.
    pub fn start(config: AgentConfig) -> Result<Self> {
        let log = File::create(&config.log).with_context(|| format!("cannot create {}", config.log.display()))?;
        let (flag, path) = match &config.source {
            AgentSource::Manifests(dir) => ("--manifests", dir),
            AgentSource::Kubeconfig(file) => ("--kubeconfig", file),
        };
        let child = netns_command(&config.node_ns, &config.bin)
            .arg("run")
            .arg(flag)
            .arg(path)
            .args(["--node-name", &config.node_name, "--pod-devices", &config.pod_devices])
            .arg("--bpffs")
            .arg(&config.bpffs)
            .args(
                (!config.extra_args.iter().any(|a| a.starts_with("--pod-sockets")))
                    .then_some(["--pod-sockets", &config.pod_sockets])
                    .into_iter()
                    .flatten(),
            )
            .args(&config.extra_args)
            .env("NO_COLOR", "1") // plain text in the log file
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", config.bin.display()))?;
        Ok(Self { config, child })
    }

    /// The exit status if the agent has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Fails (with the log) if the agent has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.exited()? {
            None => Ok(()),
            Some(status) => bail!("rproxy-agent exited ({status}); its log:\n{}", self.log_text()),
        }
    }

    /// Sends SIGTERM and waits for the exit; kills it after 10 s.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        kill(self.pid(), Signal::SIGTERM).context("kill(SIGTERM) rproxy-agent")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.child.kill()?;
        self.child.wait()?;
        bail!("rproxy-agent did not exit within {STOP_TIMEOUT:?} of SIGTERM; killed it")
    }

    /// Runs `rproxy-agent cleanup --bpffs <dir>` in the node namespace (same way as `run`).
    pub fn cleanup(&self) -> Result<()> {
        let c = &self.config;
        run(netns_command(&c.node_ns, &c.bin).arg("cleanup").arg("--bpffs").arg(&c.bpffs)).map(drop)
    }

    /// The log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.config.log
    }

    /// The log's content so far (or why it cannot be read).
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.config.log)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.config.log.display()))
    }

    /// The process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    fn pid(&self) -> Pid {
        // Pids fit in i32 (pid_max ≤ 2^22).
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.exited(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
