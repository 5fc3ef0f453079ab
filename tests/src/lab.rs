//! The topology: one node namespace and pods routed Calico-style, plus the agent's lifecycle.
//! [`Node`] is one node with its pods and agent; [`Lab`] is a single-node lab built on it (the
//! two-node lab is [`crate::cluster`]).
//!
//! Each pod is a namespace joined to the node by a veth pair. Pod side: `eth0` with `<ip>/32`,
//! default route `via 169.254.1.1 dev eth0 onlink`, and a permanent neighbour entry for
//! 169.254.1.1 → the host side's MAC (`ee:ee:ee:ee:ee:ee`, as Calico does). Host side, in the
//! node namespace: `<prefix>p<idx>`, up, proxy ARP on, `rp_filter` off, and the route
//! `<ip>/32 dev <prefix>p<idx>`. The node forwards (`ip_forward=1`) with `rp_filter` off.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    path::{Path, PathBuf},
    process::ExitStatus,
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use tempfile::TempDir;

use crate::{
    agent::{Agent, AgentConfig, AgentSource},
    client::{self, DEFAULT_TIMEOUT, Reply, TcpSession},
    cmd::ip,
    netns::{NetNs, in_netns, sysctl},
    server::{Peers, Server},
};

/// MAC of every host-side veth (Calico's choice); pods have a permanent neighbour entry for it.
pub const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
/// The pods' gateway address (link-local, never assigned anywhere).
pub const GATEWAY: &str = "169.254.1.1";
/// The pods' IPv6 gateway (link-local, never assigned anywhere), as Calico's `fe80::ecee:eeff:feee:eeee`.
pub const GATEWAY6: &str = "fe80::1";
/// Linux's limit on interface name length.
pub(crate) const IFNAMSIZ_MAX: usize = 15;

/// A pod: a namespace with `eth0`, and the servers running in it. Dropping it stops the servers
/// and deletes the namespace (and so the veth pair).
#[derive(Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    /// A dual-stack pod's IPv6 address.
    ip6: Option<Ipv6Addr>,
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

    /// The pod's IPv6 address, if it is dual-stack.
    #[must_use]
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
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

    /// An IPv6 [`Pod::udp_socket`].
    pub fn udp6_socket(&self) -> Result<UdpSocket> {
        self.run(|| UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).context("UDP bind"))
    }

    /// Opens a [`TcpSession`] from this pod.
    pub fn tcp_session(&self, addr: impl Into<IpAddr> + Send, port: u16, timeout: Duration) -> Result<TcpSession> {
        self.run(|| TcpSession::connect(addr, port, timeout))
    }

    /// Opens a [`TcpSession`] from this pod's source port `local_port`
    /// ([`TcpSession::connect_from`]).
    pub fn tcp_session_from(
        &self,
        local_port: u16,
        addr: impl Into<IpAddr> + Send,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpSession> {
        self.run(|| TcpSession::connect_from(Some(local_port), addr, port, timeout))
    }

    /// [`client::tcp_request`] from this pod, with [`DEFAULT_TIMEOUT`].
    pub fn tcp_request(&self, addr: impl Into<IpAddr> + Send, port: u16, payload: &[u8]) -> Result<Reply> {
        self.tcp_request_timeout(addr, port, payload, DEFAULT_TIMEOUT)
    }

    /// [`client::tcp_request`] from this pod.
    pub fn tcp_request_timeout(
        &self,
        addr: impl Into<IpAddr> + Send,
        port: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Reply> {
        self.run(|| client::tcp_request(addr, port, payload, timeout))
    }

    /// [`client::udp_request`] from this pod, with [`DEFAULT_TIMEOUT`].
    pub fn udp_request(&self, addr: impl Into<IpAddr> + Send, port: u16, payload: &[u8]) -> Result<Reply> {
        self.udp_request_timeout(addr, port, payload, DEFAULT_TIMEOUT)
    }

    /// [`client::udp_request`] from this pod.
    pub fn udp_request_timeout(
        &self,
        addr: impl Into<IpAddr> + Send,
        port: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Reply> {
        self.run(|| client::udp_request(addr, port, payload, timeout))
    }

    fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_netns(self.ns.name(), f)?.with_context(|| format!("from pod {}", self.name))
    }
}

/// A node: a namespace that forwards, its pods (see the module doc for the plumbing), and
/// optionally the agent running in it. [`Lab`] has one; [`crate::cluster::Cluster`] has two.
///
/// Dropping it (also while a test panics) stops the agent, runs `rproxy-agent cleanup`, removes
/// the pin dir, deletes the pods' and the node's namespaces, and — when panicking — prints the
/// agent's log.
#[derive(Debug)]
pub struct Node {
    /// The Kubernetes node name (`--node-name`).
    name: String,
    /// Start of the pods' namespace names (`<prefix>-<pod name>`).
    ns_prefix: String,
    /// Start of the host-side pod device names (`<dev_prefix><n>`).
    dev_prefix: String,
    /// Pod names whose namespace would be one of the lab's own.
    reserved: Vec<String>,
    pin_dir: PathBuf,
    log: PathBuf,
    agent: Option<Agent>,
    /// An agent was started and `rproxy-agent cleanup` has not succeeded since.
    needs_cleanup: bool,
    /// Pod devices made so far (the next one is `<dev_prefix><devices + 1>`).
    devices: usize,
    // Drop order: pods, then the node.
    pods: Vec<Pod>,
    ns: NetNs,
}

/// Where and how a [`Node`] is created.
#[derive(Debug, Clone)]
pub(crate) struct NodeSpec {
    /// Namespace name.
    pub ns: String,
    /// Kubernetes node name.
    pub name: String,
    /// Start of the pods' namespace names.
    pub ns_prefix: String,
    /// Start of the host-side pod device names.
    pub dev_prefix: String,
    /// Pod names not allowed (their namespace would be one of the lab's own).
    pub reserved: Vec<String>,
    /// The agent's bpffs pin dir.
    pub pin_dir: PathBuf,
    /// The agent's log file.
    pub log: PathBuf,
}

impl Node {
    /// Creates the node namespace: forwarding on, `rp_filter` off, ICMP redirects off (a node
    /// forwarding out of the interface a packet came in on must not teach the sender a shortcut
    /// past it). Removes a stale pin dir of the same name.
    pub(crate) fn create(spec: NodeSpec) -> Result<Self> {
        remove_pin_dir(&spec.pin_dir)?;
        let ns = NetNs::create(&spec.ns)?;
        for (key, value) in [
            ("net/ipv4/conf/all/rp_filter", "0"),
            ("net/ipv4/conf/default/rp_filter", "0"),
            ("net/ipv4/conf/all/send_redirects", "0"),
            ("net/ipv4/conf/default/send_redirects", "0"),
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
            // Devices made later (pods' veths) use their link-local address at once: duplicate
            // address detection would hold neighbour discovery back for a second.
            ("net/ipv6/conf/default/accept_dad", "0"),
        ] {
            sysctl(ns.name(), key, value)?;
        }
        Ok(Self {
            name: spec.name,
            ns_prefix: spec.ns_prefix,
            dev_prefix: spec.dev_prefix,
            reserved: spec.reserved,
            pin_dir: spec.pin_dir,
            log: spec.log,
            agent: None,
            needs_cleanup: false,
            devices: 0,
            pods: Vec::new(),
            ns,
        })
    }

    /// Adds pod `name` with address `ip_addr` (see the module doc for the plumbing), in namespace
    /// `<prefix>-<name>`.
    pub fn add_pod(&mut self, name: &str, ip_addr: Ipv4Addr) -> Result<&mut Pod> {
        self.add_pod_in(name, name, ip_addr)
    }

    /// [`Node::add_pod`] with namespace `<prefix>-<ns_suffix>`: a pod whose name is not unique
    /// in the lab (the same name in two Kubernetes namespaces) or not a namespace name.
    pub fn add_pod_in(&mut self, name: &str, ns_suffix: &str, ip_addr: Ipv4Addr) -> Result<&mut Pod> {
        ensure!(
            !ns_suffix.is_empty() && ns_suffix.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'),
            "pod namespace {ns_suffix:?}: use letters, digits and '-'"
        );
        ensure!(!self.reserved.iter().any(|r| r == ns_suffix), "pod namespace {ns_suffix:?} is reserved by the lab");
        let ns_name = format!("{}-{ns_suffix}", self.ns_prefix);
        ensure!(self.pods.iter().all(|p| p.ns.name() != ns_name), "pod namespace {ns_name} exists already");
        self.devices += 1;
        let host_dev = format!("{}{}", self.dev_prefix, self.devices);
        ensure!(host_dev.len() <= IFNAMSIZ_MAX, "interface name {host_dev} is too long");
        let ns = NetNs::create(&ns_name)?;
        let (node, pod) = (Some(self.ns.name()), Some(ns.name()));
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
            sysctl(self.ns.name(), &format!("net/ipv4/conf/{dev}/{key}"), value)?;
        }

        self.pods.push(Pod { name: name.to_owned(), ip: ip_addr, ip6: None, host_dev, servers: Vec::new(), ns });
        Ok(self.pods.last_mut().expect("just pushed"))
    }

    /// [`Node::add_pod`] with an IPv6 address too (a dual-stack pod): its default route goes
    /// to [`GATEWAY6`] on the host side of its veth, and the node routes `ip6/128` to it.
    pub fn add_pod_dual(&mut self, name: &str, ip_addr: Ipv4Addr, ip6: Ipv6Addr) -> Result<&mut Pod> {
        self.add_pod_dual_in(name, name, ip_addr, ip6)
    }

    /// [`Node::add_pod_dual`] with namespace `<prefix>-<ns_suffix>` (see [`Node::add_pod_in`]).
    pub fn add_pod_dual_in(
        &mut self,
        name: &str,
        ns_suffix: &str,
        ip_addr: Ipv4Addr,
        ip6: Ipv6Addr,
    ) -> Result<&mut Pod> {
        let node = self.ns.name().to_owned();
        let pod = self.add_pod_in(name, ns_suffix, ip_addr)?;
        let cidr = format!("{ip6}/128");
        let (dev, pod_ns) = (pod.host_dev.clone(), pod.ns.name().to_owned());
        #[rustfmt::skip]
        let steps: [(&str, &[&str]); 4] = [
            (&pod_ns, &["-6", "addr", "add", &cidr, "dev", "eth0", "nodad"]),
            (&pod_ns, &["-6", "neigh", "replace", GATEWAY6, "lladdr", HOST_MAC, "dev", "eth0", "nud", "permanent"]),
            (&pod_ns, &["-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0"]),
            (&node, &["-6", "route", "add", &cidr, "dev", &dev]),
        ];
        for (ns_name, args) in steps {
            ip(Some(ns_name), args)?;
        }
        let pod = self.pods.last_mut().expect("just pushed");
        pod.ip6 = Some(ip6);
        Ok(pod)
    }

    /// Removes the pod whose namespace is `<prefix>-<ns_suffix>` (its servers stop, its
    /// namespace and veth pair go). Whether there was one.
    pub fn remove_pod(&mut self, ns_suffix: &str) -> bool {
        let ns_name = format!("{}-{ns_suffix}", self.ns_prefix);
        let before = self.pods.len();
        self.pods.retain(|p| p.ns.name() != ns_name);
        self.pods.len() != before
    }

    /// The pod named `name`, if this node has it.
    #[must_use]
    pub fn find_pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The pod named `name`.
    ///
    /// # Panics
    /// If there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name).unwrap_or_else(|| panic!("no pod {name} on node {}", self.name))
    }

    /// The pod named `name`, mutable (to start servers in it), if this node has it.
    pub fn find_pod_mut(&mut self, name: &str) -> Option<&mut Pod> {
        self.pods.iter_mut().find(|p| p.name == name)
    }

    /// All pods, in creation order.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The node's network namespace.
    #[must_use]
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The Kubernetes node name given to the agent.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Glob matching every pod's host-side device (`--pod-devices`).
    #[must_use]
    pub fn pod_devices_glob(&self) -> String {
        format!("{}*", self.dev_prefix)
    }

    /// The start of this node's pods' namespace names (`<prefix>-<pod>`).
    #[must_use]
    pub fn pod_ns_prefix(&self) -> &str {
        &self.ns_prefix
    }

    /// The files of this node's pods' network namespaces, as a glob (`--pod-sockets`): pods'
    /// TCP connections are translated at `connect()` by this node's agent only.
    #[must_use]
    pub fn pod_netns_glob(&self) -> String {
        format!("/run/netns/{}-*", self.ns_prefix)
    }

    /// The agent's bpffs pin dir (`--bpffs`), removed with the node.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Starts `rproxy-agent run` in the node namespace on the manifests in `manifests`, with
    /// `extra_args` appended to the command line (see [`AgentConfig::extra_args`]).
    pub fn start_agent(&mut self, agent_bin: &Path, manifests: &Path, extra_args: &[&str]) -> Result<()> {
        let manifests = manifests.canonicalize().with_context(|| format!("manifests dir {}", manifests.display()))?;
        self.start_agent_from(agent_bin, AgentSource::Manifests(manifests), extra_args)
    }

    /// Starts `rproxy-agent run` in the node namespace on `source` (see [`Node::start_agent`]).
    pub fn start_agent_from(&mut self, agent_bin: &Path, source: AgentSource, extra_args: &[&str]) -> Result<()> {
        if let Some(agent) = &mut self.agent {
            ensure!(agent.exited()?.is_some(), "the agent is already running");
        }
        self.agent = Some(Agent::start(AgentConfig {
            bin: agent_bin.to_owned(),
            node_ns: self.ns.name().to_owned(),
            node_name: self.name.clone(),
            source,
            pod_devices: self.pod_devices_glob(),
            pod_sockets: self.pod_netns_glob(),
            bpffs: self.pin_dir.clone(),
            log: self.log.clone(),
            extra_args: extra_args.iter().map(|&a| a.to_owned()).collect(),
        })?);
        self.needs_cleanup = true;
        Ok(())
    }

    /// Fails, with the agent's log, unless the agent is running.
    pub fn ensure_agent_running(&mut self) -> Result<()> {
        self.agent_mut()?.ensure_running()
    }

    /// The agent's exit status once it has exited; `None` while it runs.
    pub fn agent_exited(&mut self) -> Result<Option<ExitStatus>> {
        self.agent_mut()?.exited()
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

    /// [`Node::stop_agent`], then [`Node::cleanup_agent`] if an agent was started; also removes
    /// the pin dir. Nothing to do without an agent.
    pub fn remove_agent(&mut self) -> Result<()> {
        if let Some(agent) = &mut self.agent {
            let stopped = agent.stop().map(drop);
            if self.needs_cleanup {
                agent.cleanup()?;
                self.needs_cleanup = false;
            }
            stopped?;
        }
        remove_pin_dir(&self.pin_dir)
    }

    /// The agent's log file, once an agent was started.
    #[must_use]
    pub fn agent_log_path(&self) -> Option<&Path> {
        self.agent.as_ref().map(Agent::log_path)
    }

    /// The running agent's process id (`None` if none was started or it has exited).
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Agent::id).filter(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    }

    /// The agent's log so far ("" if no agent was started).
    #[must_use]
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(Agent::log_text).unwrap_or_default()
    }

    fn agent_mut(&mut self) -> Result<&mut Agent> {
        self.agent.as_mut().context("no agent was started")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() && self.agent.is_some() {
            eprintln!("---- rproxy-agent log ({}) ----\n{}---- end of log ----", self.ns.name(), self.agent_log());
        }
        if let Err(e) = self.remove_agent() {
            eprintln!("rproxy-tests: tearing down node {}: {e:#}", self.ns.name());
        }
        self.agent = None;
        // The fields' drops delete the pods', then the node's namespace.
    }
}

/// A lab: the node namespace, its pods, and optionally the agent. Dropping it (also while a test
/// panics) stops the agent, runs `rproxy-agent cleanup`, deletes every namespace and the pin
/// dir, and — when panicking — prints the agent's log (see [`Node`]).
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    // Drop order: the node (agent, pods, namespace), then the work dir (agent log).
    node: Node,
    work: TempDir,
}

impl Lab {
    /// Creates the node namespace. `node_name` is the Kubernetes node name given to the agent
    /// (`--node-name`), matched against `EndpointSlices`' `nodeName`.
    pub fn new(node_name: &str) -> Result<Self> {
        let prefix = next_prefix()?;
        let work = tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir()?;
        let node = Node::create(NodeSpec {
            ns: format!("{prefix}-node"),
            name: node_name.to_owned(),
            ns_prefix: prefix.clone(),
            dev_prefix: format!("{prefix}p"),
            reserved: vec!["node".to_owned()],
            pin_dir: Path::new("/sys/fs/bpf").join(&prefix),
            log: work.path().join("agent.log"),
        })?;
        Ok(Self { prefix, node, work })
    }

    /// Adds pod `name` with address `ip_addr` (see the module doc for the plumbing).
    pub fn add_pod(&mut self, name: &str, ip_addr: Ipv4Addr) -> Result<&mut Pod> {
        self.node.add_pod(name, ip_addr)
    }

    /// Adds a dual-stack pod ([`Node::add_pod_dual`]).
    pub fn add_pod_dual(&mut self, name: &str, ip_addr: Ipv4Addr, ip6: Ipv6Addr) -> Result<&mut Pod> {
        self.node.add_pod_dual(name, ip_addr, ip6)
    }

    /// The pod named `name`.
    ///
    /// # Panics
    /// If there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.node.pod(name)
    }

    /// All pods, in creation order.
    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        self.node.pods()
    }

    /// The node (its namespace, pods and agent).
    #[must_use]
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// `rpx<pid><counter>`: the start of every name this lab creates.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The node's network namespace.
    #[must_use]
    pub fn node_ns(&self) -> &str {
        self.node.ns()
    }

    /// The Kubernetes node name given to the agent.
    #[must_use]
    pub fn node_name(&self) -> &str {
        self.node.name()
    }

    /// Glob matching every pod's host-side device (`--pod-devices`).
    #[must_use]
    pub fn pod_devices_glob(&self) -> String {
        self.node.pod_devices_glob()
    }

    /// The agent's bpffs pin dir (`--bpffs`), removed with the lab.
    #[must_use]
    pub fn pin_dir(&self) -> &Path {
        self.node.pin_dir()
    }

    /// A scratch directory removed with the lab (holds the agent's log).
    #[must_use]
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Starts `rproxy-agent run` in the node namespace on the manifests in `manifests`.
    pub fn start_agent(&mut self, agent_bin: &Path, manifests: &Path) -> Result<()> {
        self.node.start_agent(agent_bin, manifests, &[])
    }

    /// [`Lab::start_agent`] with `extra_args` appended to the command line.
    pub fn start_agent_with(&mut self, agent_bin: &Path, manifests: &Path, extra_args: &[&str]) -> Result<()> {
        self.node.start_agent(agent_bin, manifests, extra_args)
    }

    /// Fails, with the agent's log, unless the agent is running.
    pub fn ensure_agent_running(&mut self) -> Result<()> {
        self.node.ensure_agent_running()
    }

    /// The agent's exit status once it has exited; `None` while it runs.
    pub fn agent_exited(&mut self) -> Result<Option<ExitStatus>> {
        self.node.agent_exited()
    }

    /// Sends SIGTERM to the agent and waits for it to exit (killing it after 10 s).
    pub fn stop_agent(&mut self) -> Result<ExitStatus> {
        self.node.stop_agent()
    }

    /// Runs `rproxy-agent cleanup --bpffs <pin dir>` in the node namespace.
    pub fn cleanup_agent(&mut self) -> Result<()> {
        self.node.cleanup_agent()
    }

    /// The agent's log file, once an agent was started.
    #[must_use]
    pub fn agent_log_path(&self) -> Option<&Path> {
        self.node.agent_log_path()
    }

    /// The agent's log so far ("" if no agent was started).
    #[must_use]
    pub fn agent_log(&self) -> String {
        self.node.agent_log()
    }
}

/// `rpx<pid><nn>`: the counter has a fixed width of two digits so that the digits after `rpx`
/// can never be the same for two different (pid, counter) pairs.
pub(crate) fn next_prefix() -> Result<String> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    if n >= 100 {
        bail!("more than 100 labs in one process");
    }
    Ok(format!("rpx{}{n:02}", std::process::id()))
}

pub(crate) fn remove_pin_dir(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}
