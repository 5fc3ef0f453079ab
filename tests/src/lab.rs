//! The topology: one node namespace and pods routed Calico-style, plus the agent's lifecycle.
//!
//! Each pod is a namespace joined to the node by a veth pair. Pod side: `eth0` with `<ip>/32`,
//! default route `via 169.254.1.1 dev eth0 onlink`, and a permanent neighbour entry for
//! 169.254.1.1 → the host side's MAC (`ee:ee:ee:ee:ee:ee`, as Calico does). Host side, in the
//! node namespace: `<prefix>p<idx>`, up, proxy ARP on, `rp_filter` off, and the route
//! `<ip>/32 dev <prefix>p<idx>`. The node forwards (`ip_forward=1`) with `rp_filter` off.
use std::{
    net::{Ipv4Addr, UdpSocket},
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;

use crate::{
    agent::{Agent, AgentConfig},
    client::{self, DEFAULT_TIMEOUT, Reply, TcpSession},
    cmd::ip,
    netns::{NetNs, in_netns, sysctl},
    server::{Peers, Server},
};

/// MAC of every host-side veth (Calico's choice); pods have a permanent neighbour entry for it.
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' gateway address (link-local, never assigned anywhere).
pub const GATEWAY: &str = "169.254.1.1";
/// Linux's limit on interface name length.
const IFNAMSIZ_MAX: usize = 15;

/// A pod: a namespace with `eth0`, and the servers running in it. Dropping it stops the servers
/// and deletes the namespace (and so the veth pair).
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    host_dev: String,
    servers: Vec<Server>,
    // Last: the namespace goes after the servers have stopped.
    ns: NetNs,
}

impl Pod {
    /// The pod's name (what its servers announce).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's address.
    #[must_use]
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The pod's network namespace.
    #[must_use]
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The host side of the pod's veth pair, in the node namespace.
    #[must_use]
    pub fn host_dev(&self) -> &str {
        &self.host_dev
    }

    /// Starts a TCP and a UDP server on `port` (see [`crate::server`]).
    pub fn serve(&mut self, port: u16) -> Result<&mut Self> {
        self.servers.push(Server::start(self.ns.name(), &self.name, port)?);
        Ok(self)
    }

    /// Peers seen by all of this pod's servers.
    #[must_use]
    pub fn peers(&self) -> Peers {
        let mut all = Peers::default();
        for p in self.servers.iter().map(Server::peers) {
            all.tcp.extend(p.tcp);
            all.udp.extend(p.udp);
        }
        all
    }

    /// Peers seen by this pod's servers on `port` (empty if none serves it).
    #[must_use]
    pub fn peers_on(&self, port: u16) -> Peers {
        self.servers.iter().filter(|s| s.port() == port).map(Server::peers).next().unwrap_or_default()
    }

    /// A UDP socket bound in this pod to an ephemeral port, for [`client::udp_exchange`] (it
    /// stays in the pod's namespace whichever thread uses it).
    pub fn udp_socket(&self) -> Result<UdpSocket> {
        self.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("UDP bind"))
    }

    /// Opens a [`TcpSession`] from this pod.
    pub fn tcp_session(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> Result<TcpSession> {
        self.run(|| TcpSession::connect(addr, port, timeout))
    }

    /// [`client::tcp_request`] from this pod, with [`DEFAULT_TIMEOUT`].
    pub fn tcp_request(&self, addr: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Reply> {
        self.tcp_request_timeout(addr, port, payload, DEFAULT_TIMEOUT)
    }

    /// [`client::tcp_request`] from this pod.
    pub fn tcp_request_timeout(&self, addr: Ipv4Addr, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
        self.run(|| client::tcp_request(addr, port, payload, timeout))
    }

    /// [`client::udp_request`] from this pod, with [`DEFAULT_TIMEOUT`].
    pub fn udp_request(&self, addr: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Reply> {
        self.udp_request_timeout(addr, port, payload, DEFAULT_TIMEOUT)
    }

    /// [`client::udp_request`] from this pod.
    pub fn udp_request_timeout(&self, addr: Ipv4Addr, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
        self.run(|| client::udp_request(addr, port, payload, timeout))
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(self.ns.name(), f)?.with_context(|| format!("from pod {}", self.name))
    }
}

/// A lab: the node namespace, its pods, and optionally the agent. Dropping it (also while a test
/// panics) stops the agent, runs `rproxy-agent cleanup`, deletes every namespace and the pin
/// dir, and — when panicking — prints the agent's log.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    node_name: String,
    pin_dir: PathBuf,
    agent: Option<Agent>,
    /// An agent was started and `rproxy-agent cleanup` has not succeeded since.
    needs_cleanup: bool,
    // Drop order: pods, then the node, then the work dir (agent log).
    pods: Vec<Pod>,
    node: NetNs,
    work: TempDir,
}

impl Lab {
    /// Creates the node namespace. `node_name` is the Kubernetes node name given to the agent
    /// (`--node-name`), matched against `EndpointSlices`' `nodeName`.
    pub fn new(node_name: &str) -> Result<Self> {
        let prefix = next_prefix()?;
        let pin_dir = Path::new("/sys/fs/bpf").join(&prefix);
        remove_pin_dir(&pin_dir)?;
        let work = tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir()?;
        let node = NetNs::create(&format!("{prefix}-node"))?;
        for key in ["net/ipv4/conf/all/rp_filter", "net/ipv4/conf/default/rp_filter"] {
            sysctl(node.name(), key, "0")?;
        }
        sysctl(node.name(), "net/ipv4/ip_forward", "1")?;
        Ok(Self {
            prefix,
            node_name: node_name.to_owned(),
            pin_dir,
            agent: None,
            needs_cleanup: false,
            pods: Vec::new(),
            node,
            work,
        })
    }

    /// Adds pod `name` with address `ip_addr` (see the module doc for the plumbing).
    pub fn add_pod(&mut self, name: &str, ip_addr: Ipv4Addr) -> Result<&mut Pod> {
        ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "pod name {name:?}: use letters, digits and '-'"
        );
        ensure!(self.pods.iter().all(|p| p.name != name), "pod {name} exists already");
        let host_dev = format!("{}p{}", self.prefix, self.pods.len() + 1);
        ensure!(host_dev.len() <= IFNAMSIZ_MAX, "interface name {host_dev} is too long");
        let ns = NetNs::create(&format!("{}-{name}", self.prefix))?;
        let (node, pod) = (Some(self.node.name()), Some(ns.name()));
        let ip_cidr = format!("{ip_addr}/32");
        let dev = host_dev.as_str();

        #[rustfmt::skip]
        let steps: [(Option<&str>, &[&str]); 7] = [
            (node, &["link", "add", dev, "address", HOST_MAC, "type", "veth",
                     "peer", "name", "eth0", "netns", ns.name()]),
            (pod, &["addr", "add", &ip_cidr, "dev", "eth0"]),
            (pod, &["link", "set", "eth0", "up"]),
            (pod, &["route", "add", "default", "via", GATEWAY, "dev", "eth0", "onlink"]),
            (pod, &["neigh", "replace", GATEWAY, "lladdr", HOST_MAC, "dev", "eth0",
                    "nud", "permanent"]),
            (node, &["link", "set", dev, "up"]),
            (node, &["route", "add", &ip_cidr, "dev", dev]),
        ];
        for (ns_name, args) in steps {
            ip(ns_name, args)?;
        }
        for (key, value) in [("proxy_arp", "1"), ("rp_filter", "0")] {
            sysctl(self.node.name(), &format!("net/ipv4/conf/{dev}/{key}"), value)?;
        }

        self.pods.push(Pod { name: name.to_owned(), ip: ip_addr, host_dev, servers: Vec::new(), ns });
        Ok(self.pods.last_mut().expect("just pushed"))
    }

    /// The pod named `name`.
    ///
    /// # Panics
    /// If there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// All pods, in creation order.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// `rpx<pid><counter>`: the start of every name this lab creates.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node's network namespace.
    #[must_use]
    pub fn node_ns(&self) -> &str {
        self.node.name()
    }

    /// The Kubernetes node name given to the agent.
    #[must_use]
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Glob matching every pod's host-side device (`--pod-devices`).
    #[must_use]
    pub fn pod_devices_glob(&self) -> String {
        format!("{}p*", self.prefix)
    }

    /// The agent's bpffs pin dir (`--bpffs`), removed with the lab.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A scratch directory removed with the lab (holds the agent's log).
    #[must_use]
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Starts `rproxy-agent run` in the node namespace on the manifests in `manifests`.
    pub fn start_agent(&mut self, agent_bin: &Path, manifests: &Path) -> Result<()> {
        if let Some(agent) = &mut self.agent {
            ensure!(agent.exited()?.is_some(), "the agent is already running");
        }
        let manifests = manifests.canonicalize().with_context(|| format!("manifests dir {}", manifests.display()))?;
        self.agent = Some(Agent::start(AgentConfig {
            bin: agent_bin.to_owned(),
            node_ns: self.node.name().to_owned(),
            node_name: self.node_name.clone(),
            manifests,
            pod_devices: self.pod_devices_glob(),
            bpffs: self.pin_dir.clone(),
            log: self.work.path().join("agent.log"),
        })?);
        self.needs_cleanup = true;
        Ok(())
    }

    /// Fails, with the agent's log, unless the agent is running.
    pub fn ensure_agent_running(&mut self) -> Result<()> {
        self.agent_mut()?.ensure_running()
    }

    /// Sends SIGTERM to the agent and waits for it to exit (killing it after 10 s).
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        self.agent_mut()?.stop()
    }

    /// Runs `rproxy-agent cleanup --bpffs <pin dir>` in the node namespace.
    pub fn cleanup_agent(&mut self) -> Result<()> {
        self.agent_mut()?.cleanup()?;
        self.needs_cleanup = false;
        Ok(())
    }

    /// The agent's log file, once an agent was started.
    #[must_use]
    pub fn agent_log_path(&self) -> Option<&Path> {
        self.agent.as_ref().map(Agent::log_path)
    }

    /// The agent's log so far ("" if no agent was started).
    #[must_use]
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    fn agent_mut(&mut self) -> Result<&mut Agent> {
        self.agent.as_mut().context("no agent was started")
    }

    fn teardown(&mut self) -> Result<()> {
        if let Some(agent) = &mut self.agent {
            let stopped = agent.stop().map(drop);
            if self.needs_cleanup {
                agent.cleanup()?;
            }
            stopped?;
        }
        remove_pin_dir(&self.pin_dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() && self.agent.is_some() {
            eprintln!("---- rproxy-agent log ({}) ----\n{}---- end of log ----", self.prefix, self.agent_log());
        }
        if let Err(e) = self.teardown() {
            eprintln!("rproxy-tests: tearing down lab {}: {e:#}", self.prefix);
        }
        self.agent = None;
        // The fields' drops delete the pods', then the node's namespace, then the work dir.
    }
}

/// `rpx<pid><nn>`: the counter has a fixed width of two digits so that the digits after `rpx`
/// can never be the same for two different (pid, counter) pairs.
fn next_prefix() -> Result<String> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n >= 100 {
        bail!("more than 100 labs in one process");
    }
    Ok(format!("rpx{}{n:02}", std::process::id()))
}

fn remove_pin_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}
