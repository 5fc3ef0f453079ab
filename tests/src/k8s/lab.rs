//! A real Kubernetes cluster on one machine, without containers: the control plane
//! ([`ControlPlane`]), `N` netns nodes and an external client on one segment ([`Cluster`]), the
//! lab kubelet ([`Kubelet`]), and rproxy-agent on every node with the `DaemonSet`'s own identity.
//!
//! ```text
//!  host namespace: etcd, kube-apiserver (127.0.0.1), controller-manager, scheduler
//!        ▲ forwarded from 172.31.0.250:6443 (the bridge's address in the switch namespace)
//!  switch: bridge 172.31.0.250 ─┬─ node-1 eth0 172.31.0.1 (pods 10.244.1.0/24, rproxy-agent)
//!                               ├─ node-2 eth0 172.31.0.2 (pods 10.244.2.0/24, rproxy-agent)
//!                               └─ client eth0 172.31.0.100 (route to 10.96.0.0/16 via node-1)
//! ```
//!
//! The agents reach the API server at `https://172.31.0.250:6443`, as pods and nodes reach a
//! control-plane node; a task in this process forwards those connections to the API server's
//! loopback port. Each agent runs with `--kubeconfig` holding a token of the `rproxy-agent`
//! `ServiceAccount` of `deploy/rbac.yaml` (applied to the cluster; the token comes from the
//! `TokenRequest` API), never an admin identity. The user and the tests use the admin
//! kubeconfig ([`KubeLab::admin_kubeconfig`]).
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::Serialize;

use crate::{
    agent::AgentSource,
    cluster::{CLIENT_IP, CLIENT_IP6, Cluster, EXTERNAL_DEV, NodeId},
    cmd::{ip, run, run_with_input},
    k8s::{
        control_plane::{ControlPlane, ControlPlaneConfig},
        kubelet::{Kubelet, KubeletNode, pod_ns_suffix, register_nodes},
    },
    netns::in_netns,
    workspace_root,
};

/// The API server's address for the nodes: the bridge's, in the switch namespace.
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 250);
/// Its port there.
pub const API_PORT: u16 = 6443;
/// The Service CIDRs (`--service-cluster-ip-range`): the cluster is dual-stack, IPv4 first
/// (Services are IPv4 unless their `ipFamilyPolicy` asks for more).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const SERVICE_CIDR6: &str = "fd00:96::/112";
/// The agents' `ServiceAccount` (`deploy/rbac.yaml`).
pub const AGENT_SERVICE_ACCOUNT: (&str, &str) = ("kube-system", "rproxy-agent");

/// What [`KubeLab::start`] builds.
#[derive(Clone, Debug)]
pub struct KubeLabConfig {
    /// Number of nodes (1 to [`crate::cluster::MAX_NODES`]).
    pub nodes: u8,
    /// The agent binary; `None`: no agent runs (a cluster without rproxy).
    pub agent_bin: Option<PathBuf>,
    /// Extra `rproxy-agent run` arguments, after `--devices eth0`.
    pub agent_args: Vec<String>,
}

impl Default for KubeLabConfig {
    fn default() -> Self {
        Self { nodes: 2, agent_bin: None, agent_args: Vec::new() }
    }
}

/// What the user of `cargo xtask cluster` needs to reach the cluster (its `--status-file`).
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// An admin kubeconfig.
    pub kubeconfig: PathBuf,
    pub nodes: Vec<NodeStatus>,
    pub client: ClientStatus,
}

#[derive(Clone, Debug, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub netns: String,
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    #[serde(rename = "podCIDR6")]
    pub pod_cidr6: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClientStatus {
    pub netns: String,
    pub address: Ipv4Addr,
    pub address6: Ipv6Addr,
}

/// The running cluster. Dropping it (also in a panic) stops the kubelet, the agents (with their
/// `cleanup`), removes every namespace and pin, and stops the control plane.
pub struct KubeLab {
    // Drop order matters, see `Drop`.
    kubelet: Option<Kubelet>,
    forwarder: Option<tokio::task::JoinHandle<()>>,
    lab: Option<Arc<Mutex<Cluster>>>,
    control_plane: Option<ControlPlane>,
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    config: KubeLabConfig,
    agent_kubeconfig: PathBuf,
    agent_token: String,
    /// `true` cuts the nodes off the API server.
    partition: tokio::sync::watch::Sender<bool>,
    nodes: Vec<KubeletNode>,
    client_ns: String,
}

impl std::fmt::Debug for KubeLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeLab").field("config", &self.config).field("nodes", &self.nodes).finish_non_exhaustive()
    }
}

impl KubeLab {
    /// Builds everything (see the module doc) and returns once the nodes are registered, the
    /// kubelet runs and every agent has synced with the API server.
    pub fn start(config: KubeLabConfig) -> Result<Self> {
        let bin_dir = ControlPlane::bin_dir()?;
        let cluster = Cluster::with_nodes(config.nodes)?;
        let work = cluster.work_dir().to_owned();
        let switch = cluster.switch_ns().to_owned();
        ip(Some(&switch), &["addr", "add", &format!("{API_ADDR}/24"), "dev", &cluster.bridge()])?;
        let nodes: Vec<KubeletNode> = cluster
            .node_ids()
            .into_iter()
            .map(|id| KubeletNode { id, name: id.k8s_name(), ns: cluster.node(id).ns().to_owned(), address: id.ip() })
            .collect();
        let client_ns = cluster.client_ns().to_owned();
        // As a router that advertises the cluster's Service range: the client reaches
        // ClusterIPs through node-1 (rproxy serves them from outside, as kube-proxy does).
        let via = NodeId::ONE.ip().to_string();
        ip(Some(&client_ns), &["route", "add", SERVICE_CIDR, "via", &via])?;
        let via6 = NodeId::ONE.ip6().to_string();
        ip(Some(&client_ns), &["-6", "route", "add", SERVICE_CIDR6, "via", &via6])?;
        let lab = Arc::new(Mutex::new(cluster));
        let control_plane = ControlPlane::start(ControlPlaneConfig {
            bin_dir,
            work_dir: work.join("control-plane"),
            extra_sans: vec![API_ADDR.into()],
            service_cidr: format!("{SERVICE_CIDR},{SERVICE_CIDR6}"),
        })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("kube-lab")
            .build()
            .context("the lab's runtime")?;
        let (partition, blocked) = tokio::sync::watch::channel(false);
        let forwarder = forward_api(&rt, &switch, control_plane.api_port(), blocked)?;
        let client = rt.block_on(client_from(control_plane.admin_kubeconfig()))?;
        rt.block_on(register_nodes(&client, &nodes))?;
        let kubelet = Kubelet::spawn(rt.handle(), client.clone(), Arc::clone(&lab), nodes.clone());
        let agent_kubeconfig = work.join("agent.kubeconfig");
        let mut this = Self {
            kubelet: Some(kubelet),
            forwarder: Some(forwarder),
            lab: Some(lab),
            control_plane: Some(control_plane),
            rt: Some(rt),
            client,
            config,
            agent_kubeconfig,
            agent_token: String::new(),
            partition,
            nodes,
            client_ns,
        };
        this.agent_identity()?;
        if this.config.agent_bin.is_some() {
            for id in this.node_ids() {
                this.start_agent(id)?;
            }
            this.wait_agents_synced(Duration::from_mins(1))?;
        }
        Ok(this)
    }

    /// `deploy/rbac.yaml` applied, and a kubeconfig for its `ServiceAccount` (a token from the
    /// `TokenRequest` API, valid for a day) pointing at [`API_ADDR`].
    fn agent_identity(&mut self) -> Result<()> {
        let rbac = workspace_root().join("deploy/rbac.yaml");
        run(self.kubectl().arg("apply").arg("-f").arg(&rbac)).context("applying deploy/rbac.yaml")?;
        let (namespace, account) = AGENT_SERVICE_ACCOUNT;
        let token = run(self.kubectl().args(["-n", namespace, "create", "token", account, "--duration", "24h"]))
            .context("a token for the agents' ServiceAccount")?;
        token.trim().clone_into(&mut self.agent_token);
        self.control_plane().write_kubeconfig(
            &self.agent_kubeconfig,
            &format!("https://{API_ADDR}:{API_PORT}"),
            &self.agent_token,
        )
    }

    /// The agents' bearer token (their `ServiceAccount`'s).
    #[must_use]
    pub fn agent_token(&self) -> &str {
        &self.agent_token
    }

    /// Cuts the nodes off the API server (`true`: their connections to it are closed and new
    /// ones refused) or lets them reach it again. The user's and the tests' admin access, on
    /// loopback, is not affected.
    pub fn partition_nodes(&self, cut: bool) {
        self.partition.send_replace(cut);
    }

    /// The network namespace of pod `namespace/name`, once the kubelet runs it.
    #[must_use]
    pub fn pod_netns(&self, namespace: &str, name: &str) -> Option<String> {
        let lab = self.lab();
        let suffix = pod_ns_suffix(namespace, name);
        lab.node_ids().into_iter().find_map(|id| {
            let node = lab.node(id);
            let wanted = format!("{}-{suffix}", node.pod_ns_prefix());
            node.pods().iter().map(|p| p.ns().to_owned()).find(|ns| *ns == wanted)
        })
    }

    /// The control plane.
    ///
    /// # Panics
    /// Never while the lab lives.
    #[must_use]
    pub fn control_plane(&self) -> &ControlPlane {
        self.control_plane.as_ref().expect("the control plane lives as long as the lab")
    }

    /// The control plane, to restart its API server or compact etcd.
    ///
    /// # Panics
    /// Never while the lab lives.
    pub fn control_plane_mut(&mut self) -> &mut ControlPlane {
        self.control_plane.as_mut().expect("the control plane lives as long as the lab")
    }

    /// The netns lab (nodes, pods, client), locked: hold it briefly, the kubelet needs it to
    /// start and stop pods.
    ///
    /// # Panics
    /// Never while the lab lives.
    pub fn lab(&self) -> MutexGuard<'_, Cluster> {
        self.lab.as_ref().expect("the lab lives").lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An admin client of the API server.
    #[must_use]
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `f` on the lab's runtime.
    ///
    /// # Panics
    /// Never while the lab lives.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.as_ref().expect("the runtime lives as long as the lab").block_on(f)
    }

    /// `kubectl` with the admin kubeconfig.
    #[must_use]
    pub fn kubectl(&self) -> Command {
        self.control_plane().kubectl()
    }

    /// Runs `kubectl <args>` (admin); its stdout.
    pub fn kubectl_run(&self, args: &[&str]) -> Result<String> {
        run(self.kubectl().args(args))
    }

    /// `kubectl apply -f -` of `yaml` (admin).
    pub fn apply(&self, yaml: &str) -> Result<String> {
        run_with_input(self.kubectl().args(["apply", "-f", "-"]), yaml)
    }

    /// The admin kubeconfig.
    #[must_use]
    pub fn admin_kubeconfig(&self) -> &Path {
        self.control_plane().admin_kubeconfig()
    }

    /// The agents' kubeconfig (the `ServiceAccount`'s token).
    #[must_use]
    pub fn agent_kubeconfig(&self) -> &Path {
        &self.agent_kubeconfig
    }

    /// The nodes' ids.
    #[must_use]
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The client's namespace.
    #[must_use]
    pub fn client_ns(&self) -> &str {
        &self.client_ns
    }

    /// Runs `f` in the client's namespace.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.client_ns, f)
    }

    /// Runs `f` in node `id`'s namespace.
    pub fn in_node<T: Send>(&self, id: NodeId, f: impl FnOnce() -> T + Send) -> Result<T> {
        let ns = self.nodes.iter().find(|n| n.id == id).context("no such node")?.ns.clone();
        in_netns(&ns, f)
    }

    /// Starts node `id`'s agent with the `ServiceAccount`'s kubeconfig, `--devices eth0` and
    /// the configured extra arguments.
    pub fn start_agent(&self, id: NodeId) -> Result<()> {
        let bin = self.config.agent_bin.clone().context("this lab runs no agent")?;
        let mut args = vec![String::from("--devices"), String::from(EXTERNAL_DEV)];
        args.extend(self.config.agent_args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let source = AgentSource::Kubeconfig(self.agent_kubeconfig.clone());
        self.lab().node_mut(id).start_agent_from(&bin, source, &args)
    }

    /// Stops node `id`'s agent (SIGTERM) and starts it again, as a `DaemonSet` restarts its pod.
    pub fn restart_agent(&self, id: NodeId) -> Result<()> {
        self.lab().node_mut(id).stop_agent()?;
        self.start_agent(id)
    }

    /// Node `id`'s agent log.
    #[must_use]
    pub fn agent_log(&self, id: NodeId) -> String {
        self.lab().node(id).agent_log()
    }

    /// Waits until every agent has logged its first `synced` line (it has the API server's
    /// Services and `EndpointSlices` in its maps).
    pub fn wait_agents_synced(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        for id in self.node_ids() {
            loop {
                self.lab().node_mut(id).ensure_agent_running()?;
                if self.agent_log(id).contains(" synced") {
                    break;
                }
                ensure!(start.elapsed() < timeout, "the agent on {} has not synced after {timeout:?}", id.k8s_name());
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// What `cargo xtask cluster` writes to its status file.
    #[must_use]
    pub fn status(&self) -> Status {
        Status {
            kubeconfig: self.admin_kubeconfig().to_owned(),
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeStatus {
                    name: n.name.clone(),
                    netns: n.ns.clone(),
                    address: n.address,
                    address6: n.id.ip6(),
                    pod_cidr: format!("{}/24", n.id.pod_cidr()),
                    pod_cidr6: format!("{}/64", n.id.pod_cidr6()),
                })
                .collect(),
            client: ClientStatus { netns: self.client_ns.clone(), address: CLIENT_IP, address6: CLIENT_IP6 },
        }
    }
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        // The kubelet and the forwarder first, and the runtime with them (its blocking tasks
        // finish), so that nothing but this holds the netns lab; then the lab (agents with their
        // cleanup, pods, namespaces, pins); the control plane last.
        drop(self.kubelet.take());
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.abort();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(10));
        }
        if let Some(lab) = self.lab.take() {
            match Arc::try_unwrap(lab) {
                Ok(lab) => drop(lab.into_inner().unwrap_or_else(PoisonError::into_inner)),
                Err(_) => eprintln!("kube lab: the netns lab is still shared; it goes with its last user"),
            }
        }
        if let Some(mut control_plane) = self.control_plane.take()
            && let Err(e) = control_plane.stop()
        {
            eprintln!("kube lab: stopping the control plane: {e:#}");
        }
    }
}

/// A client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let file = Kubeconfig::read_from(kubeconfig).with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?;
    Client::try_from(config).context("the API client")
}

/// Listens on [`API_ADDR`]:[`API_PORT`] in the switch namespace and forwards each connection to
/// the API server on 127.0.0.1:`api_port` (this process's namespace).
/// While `blocked` holds, connections are refused (closed at once) and open ones are cut: the
/// nodes lose the API server, as in a network partition ([`KubeLab::partition_nodes`]).
fn forward_api(
    rt: &tokio::runtime::Runtime,
    switch_ns: &str,
    api_port: u16,
    blocked: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = in_netns(switch_ns, || TcpListener::bind(SocketAddr::from((API_ADDR, API_PORT))))?
        .with_context(|| format!("listening on {API_ADDR}:{API_PORT} in {switch_ns}"))?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _guard = rt.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    Ok(rt.spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            if *blocked.borrow() {
                continue;
            }
            let mut blocked = blocked.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", api_port)).await else { return };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = blocked.wait_for(|b| *b) => {}
                }
            });
        }
    }))
}

/// Waits (at most `timeout`, polling every 50 ms) until `check` returns `Ok(true)`; the last
/// error, or a timeout naming `what`, otherwise.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            match last {
                Some(e) => return Err(e.context(format!("{what}: not after {timeout:?}"))),
                None => bail!("{what}: not after {timeout:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
