//! `rproxy-agent run`: the agent's event loop.
//!
//! One task owns the datapath, the object store, the map writer, the attach state and the health
//! check server, and reacts to: source updates (manifests directory changes through inotify, or
//! Kubernetes API watch events), link and address notifications (netlink), the conntrack GC tick
//! (the pass itself walks the tables on a blocking thread with its own map handles, so that the
//! health, metrics and health check ports this loop's runtime serves never wait for it), a
//! periodic device rescan, and SIGTERM/SIGINT. Link and address notifications and the rescan
//! also re-read the node addresses of `--devices`; a change re-translates the Services with
//! `nodePort`s. Source updates are applied to the [`Store`] as they come and written in
//! batches: everything already queued is taken in before one flush, and only the frontends the
//! batch touched are compared and written.
//!
//! Nothing is written, and no device attached, before the source has delivered its complete
//! initial state (the manifests read once, or the API's Services and `EndpointSlices` listed):
//! writing a partial state would drop backends that established connections still use. That
//! first write compares every frontend, those adopted from the pinned maps included, so a
//! Service deleted while no agent ran is removed then. Health check node ports open after the
//! same first write. On a signal it exits without detaching
//! anything: the pinned
//! links and maps keep translating with the last state until an agent starts again (and adopts
//! them) or `rproxy-agent cleanup` removes them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use notify::{RecursiveMode, Watcher};
use rproxy_common::Stat;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};
use tracing::{debug, error, info, warn};

use crate::{
    Error, Result,
    bpf::{
        datapath::{Datapath, MapSizes, Maps, XdpMode},
        gc,
    },
    health::{
        http::lock,
        proxy::{self, HEALTH_TIMEOUT, HealthzServer, ProxyHealth},
        service::HealthCheckServer,
    },
    metrics::{self, Metrics, MetricsServer},
    model::Frontend,
    node::{
        devices::{self, DevicePattern},
        external::External,
        pods::{PodNetns, PodSockets},
        snat::{self, PortRange},
    },
    source::{ResyncGate, Update, kube, manifests},
    store::{Changes, Store},
    writer::{self, Writer},
};

/// Where Services and `EndpointSlices` come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A directory of manifests, watched with inotify.
    Manifests(PathBuf),
    /// The Kubernetes API: this kubeconfig, or the usual lookup (`KUBECONFIG`,
    /// `~/.kube/config`, then the in-cluster service account).
    Kube { kubeconfig: Option<PathBuf> },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Manifests(dir) => write!(f, "manifests directory {}", dir.display()),
            Self::Kube { kubeconfig: Some(path) } => write!(f, "Kubernetes API (kubeconfig {})", path.display()),
            Self::Kube { kubeconfig: None } => f.write_str("Kubernetes API"),
        }
    }
}

/// Most change trigger times kept for the network programming latency between two complete
/// syncs.
const MAX_TRIGGERS: usize = 65_536;

/// Largest number of queued source updates taken in before one flush.
const BATCH_MAX: usize = 10_000;

/// Settings of `rproxy-agent run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub source: Source,
    pub node_name: String,
    pub pod_devices: DevicePattern,
    pub bpffs: PathBuf,
    pub gc_interval: Duration,
    /// `--ct-max`, `--ct-max-ipv6`: the conntrack tables' sizes.
    pub map_sizes: MapSizes,
    /// `--ebpf-object`: an eBPF object to load instead of the embedded one.
    pub ebpf_object: Option<PathBuf>,
    pub rescan_interval: Duration,
    /// The node's external devices (`--devices`): `NodePort`s answer on their addresses.
    /// Empty: no `NodePort` frontend.
    pub devices: Vec<String>,
    /// `--nodeport-addresses`: only device addresses inside one of these carry `NodePort`s
    /// (every address when empty).
    pub nodeport_addresses: Vec<IpNet>,
    /// `--xdp-mode` on the external devices.
    pub xdp_mode: XdpMode,
    /// `--cgroup`: where the socket hooks attach.
    pub cgroup: Cgroup,
    /// `--pod-sockets`: which pods' TCP connections the socket hooks translate.
    pub pod_sockets: PodSockets,
    /// `--healthz-bind-address`: where `/healthz` and `/livez` are served (`None`: not served).
    pub healthz_bind: Option<SocketAddr>,
    /// `--metrics-bind-address`: where `/metrics` is served (`None`: not served).
    pub metrics_bind: Option<SocketAddr>,
    /// `--snat-port-range`: source ports of north-south flows to remote backends.
    pub snat_ports: PortRange,
    /// `--external-cluster-ip`: `ClusterIP` frontends take traffic from the external devices.
    pub external_cluster_ip: bool,
}

/// `--cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cgroup {
    /// The root of the (first) cgroup v2 mount; without one, host-network processes are not
    /// translated (logged).
    Auto,
    Path(PathBuf),
    Disabled,
}

/// Everything the loop owns.
struct Agent {
    cfg: Config,
    datapath: Datapath,
    maps: Maps,
    writer: Writer,
    store: Store,
    /// Kinds whose initial state the source delivered.
    synced: InSync,
    /// Services and `EndpointSlices` are both synced: the store holds a complete state.
    ready: bool,
    /// The maps were written with a complete state and devices attached.
    first_synced: bool,
    /// Devices with programs attached: name → ifindex.
    attached: BTreeMap<String, u32>,
    /// (name, ifindex) whose attach failed, so the failure is logged once, not every rescan.
    failed: BTreeSet<(String, u32)>,
    /// External devices found missing, so that each is logged once when it goes missing.
    missing_devices: BTreeSet<String>,
    /// The node addresses have been read (and logged) once.
    addresses_read: bool,
    health: HealthCheckServer,
    /// The agent's own health (`/healthz`, `serviceProxyHealthy`).
    proxy_health: Arc<Mutex<ProxyHealth>>,
    healthz: HealthzServer,
    /// Frontends whose last write failed, retried by the next sync (also on the rescan tick).
    retry: BTreeSet<Frontend>,
    /// Errors of the last write (frontends, or backends that could not be removed): while
    /// there are any, every sync writes again. Kept to log a repeated error only once.
    write_errors: BTreeSet<String>,
    external: External,
    /// Last seen totals of the counters `check_counters` watches.
    counters: BTreeMap<u32, u64>,
    /// Holds writes while a watch relists, so Services and slices are not written half-way.
    gate: ResyncGate,
    problems: ProblemLog,
    /// The store's translation made while the programs loaded (`Early`), for the first sync.
    early_translation: Option<Changes>,
    metrics: Metrics,
    metrics_server: MetricsServer,
    /// When the changes of `EndpointSlices` taken in since the last complete sync happened
    /// (their `endpoints.kubernetes.io/last-change-trigger-time`): the network programming
    /// latency of each is observed when a sync has written them.
    triggers: Vec<jiff::Timestamp>,
    /// Rejections by kind already added to the metrics.
    rejections_counted: BTreeMap<&'static str, u64>,
    /// Where the conntrack GC runs, and whether a pass is running.
    gc: GcState,
    /// Whether each family's conntrack table (IPv4, IPv6) was reported nearly full.
    ct_nearly_full: [bool; 2],
    /// Where the GC thread hands its passes back.
    gc_done: mpsc::Sender<gc::Deferred>,
    /// The pods' namespaces listed under `--pod-sockets <glob>` (once the hooks are attached).
    pod_netns: Option<PodNetns>,
}

/// Where the conntrack GC passes run.
enum GcState {
    /// On the loop (the GC thread's own map handles could not be opened).
    Loop,
    /// On the GC thread, whose handles on the tables these are; no pass running.
    Idle(Box<gc::Tables>),
    /// On the GC thread, which holds the handles: a pass is running, which began at this
    /// stamp of the writer's orphanings.
    Running(writer::OrphanStamp),
}

/// Logs rejected objects: a problem at warning level when it appears and at info when it is
/// gone; a transient one ([`crate::model::Problem::transient`]) at debug, with one warning if it
/// lasts [`ProblemLog::LASTING`] (checked on the rescan tick) and then its end at info.
#[derive(Debug, Default)]
struct ProblemLog {
    /// Transient problems standing: since when, and whether they were warned about.
    transient: BTreeMap<String, (Instant, bool)>,
}

impl ProblemLog {
    const LASTING: Duration = Duration::from_secs(30);

    fn appeared(&mut self, p: &crate::model::Problem, now: Instant) {
        if p.transient {
            debug!("waiting: {p}");
            self.transient.insert(p.to_string(), (now, false));
        } else {
            warn!("rejected: {p}");
        }
    }

    fn gone(&mut self, p: &crate::model::Problem) {
        match self.transient.remove(&p.to_string()) {
            Some((_, true)) => info!("no longer rejected: {p}"),
            Some((_, false)) => debug!("resolved: {p}"),
            None if p.transient => debug!("resolved: {p}"),
            None => info!("no longer rejected: {p}"),
        }
    }

    /// Warns once about each transient problem standing for [`ProblemLog::LASTING`]; returns
    /// how many it warned about.
    fn warn_lasting(&mut self, now: Instant) -> usize {
        let mut warned = 0;
        for (p, (since, done)) in &mut self.transient {
            if !*done && now.saturating_duration_since(*since) >= Self::LASTING {
                *done = true;
                warned += 1;
                warn!(for_s = now.saturating_duration_since(*since).as_secs(), "rejected: {p}");
            }
        }
        warned
    }
}

/// The writer, with the state the pinned maps hold (from an earlier agent; nothing when this
/// load created them).
fn adopt(maps: &Maps, created_empty: bool) -> Writer {
    let adopted = if created_empty { writer::nothing_adopted(maps) } else { writer::read_adopted(maps) };
    let (writer, warnings) = Writer::adopt(adopted);
    for w in warnings {
        warn!("adopting pinned maps: {w}");
    }
    writer
}

/// The datapath loaded and set up, its maps, and the writer with the state they hold.
struct Loaded {
    datapath: Datapath,
    maps: Maps,
    writer: Writer,
}

/// [`load_datapath`], the settings the programs read, and the pinned state adopted: all of it
/// blocking work (the verifier, whole-map reads), done off the agent's loop.
fn load_and_adopt(cfg: &Config) -> Result<Loaded> {
    let mut datapath = load_datapath(cfg)?;
    datapath.set_snat_ports(cfg.snat_ports)?;
    datapath.set_external_cluster_ip(cfg.external_cluster_ip)?;
    debug!(range = %cfg.snat_ports, ports = cfg.snat_ports.port_count(), "SNAT port range set");
    let maps = datapath.take_maps()?;
    let writer = adopt(&maps, datapath.created_empty());
    Ok(Loaded { datapath, maps, writer })
}

/// The embedded eBPF object, or `--ebpf-object`'s, loaded with the pinned maps.
fn load_datapath(cfg: &Config) -> Result<Datapath> {
    match &cfg.ebpf_object {
        None => Datapath::load_sized(Some(&cfg.bpffs), cfg.map_sizes),
        Some(path) => {
            let object = std::fs::read(path)
                .map_err(|source| Error::Io { what: format!("reading eBPF object {}", path.display()), source })?;
            info!(object = %path.display(), "loading the eBPF object given by --ebpf-object, not the embedded one");
            Datapath::load_object_sized(&object, Some(&cfg.bpffs), cfg.map_sizes)
        }
    }
}

/// With the API as the source, starts its watches, which send their updates to `tx`.
async fn spawn_watches(cfg: &Config, tx: mpsc::Sender<Update>, stats: Option<Arc<kube::Stats>>) -> Result<()> {
    if let Source::Kube { kubeconfig } = &cfg.source {
        let client = kube::client(kubeconfig.as_deref()).await?;
        info!("waiting for the API server's Services and EndpointSlices before writing any map");
        tokio::spawn(kube::run(client, cfg.node_name.clone(), tx, stats.unwrap_or_default()));
    }
    Ok(())
}

/// [`load_and_adopt`] on a blocking thread, while the source's first updates go into the store
/// (and, if they are complete before the programs are loaded, are translated).
async fn load_while_listing(cfg: &Config, updates: &mut mpsc::Receiver<Update>) -> Result<(Loaded, Early)> {
    let mut early = Early::new(cfg);
    let loading = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || load_and_adopt(&cfg)
    });
    tokio::pin!(loading);
    loop {
        tokio::select! {
            loaded = &mut loading => {
                let what = String::from("loading the eBPF programs");
                let loaded = loaded.map_err(|e| Error::Io { what, source: std::io::Error::other(e) })??;
                return Ok((loaded, early));
            }
            Some(update) = updates.recv() => early.take(update),
        }
    }
}

pub async fn run(cfg: Config) -> Result<()> {
    // Handlers first: a signal during start-up must not kill the agent between attaching a link
    // and pinning it (an unpinned link dies with the process). It is acted on once start-up is
    // complete.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| Error::Io { what: "SIGTERM handler".into(), source })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| Error::Io { what: "SIGINT handler".into(), source })?;
    if !cfg.devices.is_empty() {
        // Only the north-south path SNATs: without external devices the range is unused.
        snat::check_node_ports(cfg.snat_ports, Path::new("/proc/sys"))?;
    }
    let watch_stats = matches!(cfg.source, Source::Kube { .. }).then(|| Arc::new(kube::Stats::default()));
    let (update_tx, mut update_rx) = mpsc::channel::<Update>(1024);
    // The API's lists are read while the programs load (the verifier takes a second or more):
    // the objects go into the store as they come, and are translated if they are complete
    // before the programs are loaded (`Early`); nothing is written before that.
    spawn_watches(&cfg, update_tx, watch_stats.clone()).await?;
    let (Loaded { datapath, maps, writer }, early) = load_while_listing(&cfg, &mut update_rx).await?;
    info!(
        bpffs = %cfg.bpffs.display(),
        frontends = writer.service_count(),
        backends = writer.backend_count(),
        "eBPF programs loaded; pinned state adopted"
    );
    let metrics = Metrics::new(
        metrics::open_stats(&cfg.bpffs),
        metrics::open_service_stats(&cfg.bpffs),
        watch_stats.clone(),
        cfg.map_sizes,
    );
    let (gc_tx, mut gc_rx) = mpsc::channel(1);
    metrics.snat_range.set(i64::from(cfg.snat_ports.port_count()));
    let mut agent = Agent::new(cfg, datapath, maps, writer, metrics, gc_tx, early);
    match gc::Tables::open(&agent.cfg.bpffs) {
        Ok(tables) => agent.gc = GcState::Idle(Box::new(tables)),
        Err(e) => warn!(error = %e, "conntrack GC runs on the agent's loop (its own map handles could not be opened)"),
    }
    // Like kube-proxy's, served from the start: healthy while starting up.
    agent.healthz.ensure();
    agent.metrics_server.ensure();
    let (link_tx, mut link_rx) = mpsc::channel(1);
    if let Err(e) = devices::watch_links(link_tx) {
        warn!(error = %e, "no link notifications; new devices and addresses are found by periodic rescans only");
    }
    // Before the first translation, so that it has the NodePort addresses already.
    agent.refresh_node_addresses();
    let (fs_tx, mut fs_rx) = mpsc::channel(1);
    let _watcher = match &agent.cfg.source {
        Source::Kube { .. } => {
            // The lists may have come in full while the programs loaded: write them now (no-op
            // unless both are in sync), not at the next update.
            agent.sync();
            None
        }
        Source::Manifests(dir) => {
            let watcher = watch_dir(dir, fs_tx)?;
            // State first, then hooks: a device is never attached to maps that do not reflect
            // the manifests yet (beyond what a previous run left).
            agent.reload_manifests();
            Some(watcher)
        }
    };
    info!(
        source = %agent.cfg.source,
        pod_devices = agent.cfg.pod_devices.as_str(),
        devices = ?agent.cfg.devices,
        nodeport_addresses = ?agent.cfg.nodeport_addresses,
        node = %agent.cfg.node_name,
        "agent running"
    );

    let mut gc_tick = interval(agent.cfg.gc_interval);
    let mut rescan_tick = interval(agent.cfg.rescan_interval);
    gc_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    rescan_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Changes held while a watch relists (`ResyncGate`) are written by this deadline.
        let hold = agent.gate.deadline();
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: exiting, the datapath keeps its last state"); break; }
            _ = sigint.recv() => { info!("SIGINT: exiting, the datapath keeps its last state"); break; }
            Some(()) = fs_rx.recv() => {
                // Coalesce the burst of events one editor save or rename produces.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while fs_rx.try_recv().is_ok() {}
                agent.reload_manifests();
            }
            Some(update) = update_rx.recv() => {
                agent.update(update);
                let mut taken = 1;
                while taken < BATCH_MAX && let Ok(update) = update_rx.try_recv() {
                    agent.update(update);
                    taken += 1;
                }
                agent.sync();
            }
            () = tokio::time::sleep_until(hold.unwrap_or_else(tokio::time::Instant::now)), if hold.is_some() => {
                agent.sync();
            }
            Some(()) = link_rx.recv() => agent.devices_changed(),
            _ = rescan_tick.tick() => agent.devices_changed(),
            _ = gc_tick.tick() => agent.gc(),
            Some(done) = gc_rx.recv() => agent.gc_finished(done),
        }
    }
    Ok(())
}

impl Agent {
    /// The loop's state before the source has delivered anything.
    fn new(
        cfg: Config,
        datapath: Datapath,
        maps: Maps,
        writer: Writer,
        metrics: Metrics,
        gc_done: mpsc::Sender<gc::Deferred>,
        early: Early,
    ) -> Self {
        let proxy_health = Arc::new(Mutex::new(ProxyHealth::new(HEALTH_TIMEOUT)));
        let mut agent = Agent {
            metrics_server: MetricsServer::new(cfg.metrics_bind, metrics.clone()),
            metrics,
            triggers: Vec::new(),
            rejections_counted: BTreeMap::new(),
            gc: GcState::Loop,
            ct_nearly_full: [false; 2],
            gc_done,
            store: early.store,
            healthz: HealthzServer::new(cfg.healthz_bind, Arc::clone(&proxy_health)),
            external: External::new(cfg.devices.clone(), cfg.xdp_mode),
            cfg,
            datapath,
            maps,
            writer,
            synced: InSync::default(),
            ready: false,
            first_synced: false,
            attached: BTreeMap::new(),
            failed: BTreeSet::new(),
            missing_devices: BTreeSet::new(),
            addresses_read: false,
            health: HealthCheckServer::new(Ipv4Addr::UNSPECIFIED, Arc::clone(&proxy_health)),
            proxy_health,
            retry: BTreeSet::new(),
            write_errors: BTreeSet::new(),
            counters: BTreeMap::new(),
            gate: ResyncGate::default(),
            problems: ProblemLog::default(),
            early_translation: early.translated,
            pod_netns: None,
        };
        agent.record_changes(early.services, early.slices, early.triggers);
        for update in early.deferred {
            if Early::for_the_agent(&update) {
                agent.update(update);
            } else {
                agent.note(&update);
            }
        }
        agent
    }

    /// Reads the manifests directory: it replaces every Service and `EndpointSlice` held.
    fn reload_manifests(&mut self) {
        let Source::Manifests(dir) = &self.cfg.source else { return };
        let (objects, problems) = match manifests::load_dir(dir) {
            Ok(loaded) => loaded,
            Err(e) => {
                // Keep the last state rather than wiping the maps because of a transient error.
                error!(error = %e, "manifests not read; keeping the current state");
                return;
            }
        };
        self.store.set_loose_problems("file", problems);
        for update in [Update::ResetServices(objects.services), Update::ResetSlices(objects.slices)] {
            self.count_change(&update);
            self.store.apply(update);
        }
        self.update(Update::Synced("Service"));
        self.update(Update::Synced("EndpointSlice"));
        self.sync();
    }

    /// A link or address notification, or the periodic rescan: re-reads the node addresses
    /// (and writes what they change), retries failed map writes, attaches to new pod devices,
    /// and retries the health ports that failed to open.
    fn devices_changed(&mut self) {
        self.problems.warn_lasting(Instant::now());
        self.refresh_node_addresses();
        self.sync();
        self.retry_failed();
        self.rescan();
        self.healthz.ensure();
        self.metrics_server.ensure();
        if self.first_synced {
            self.health.update(&self.store.desired().health_checks);
        }
    }

    /// Reads the addresses of `--devices` into the store (which re-translates the Services with
    /// `nodePort`s on the next flush if they changed). Logs the set when it changes, and each
    /// device when it goes missing or comes back.
    fn refresh_node_addresses(&mut self) {
        if self.cfg.devices.is_empty() {
            return;
        }
        let found = match devices::node_addresses(&self.cfg.devices, &self.cfg.nodeport_addresses) {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, "reading the node addresses; keeping the current ones");
                return;
            }
        };
        let missing: BTreeSet<String> = found.missing.into_iter().collect();
        for name in missing.difference(&self.missing_devices) {
            warn!(device = %name, "external device not found; its addresses are used once it appears");
        }
        for name in self.missing_devices.difference(&missing) {
            info!(device = %name, "external device found");
        }
        self.missing_devices = missing;
        let changed = self.store.set_node_addresses(found.addresses.iter().copied());
        if changed || !self.addresses_read {
            self.addresses_read = true;
            if found.addresses.is_empty() {
                warn!(devices = ?self.cfg.devices, "no node address on the external devices: NodePorts are not served");
            } else {
                info!(addresses = ?found.addresses, "node addresses for NodePorts");
            }
        }
    }

    /// Takes one source update in.
    fn update(&mut self, update: Update) {
        self.note(&update);
        self.count_change(&update);
        match update {
            Update::Synced(_) => {}
            update @ (Update::Node(_) | Update::ListDone("Node")) => {
                self.store.apply(update);
                let node = self.store.node();
                let addresses: Vec<String> = node
                    .and_then(|n| n.status.as_ref())
                    .and_then(|s| s.addresses.as_ref())
                    .map(|a| a.iter().map(|a| format!("{}={}", a.type_, a.address)).collect())
                    .unwrap_or_default();
                if node.is_some() {
                    info!(node = %self.cfg.node_name, addresses = ?addresses, "Node object");
                } else {
                    warn!(node = %self.cfg.node_name, "no Node object for this node");
                }
                let changed = lock(&self.proxy_health).set_node(node);
                if let Some(eligible) = changed {
                    if eligible {
                        info!(node = %self.cfg.node_name, "node eligible for load balancer traffic again: /healthz answers 200");
                    } else {
                        warn!(node = %self.cfg.node_name, "node being deleted or tainted {}: /healthz answers 503", proxy::TO_BE_DELETED_TAINT);
                    }
                }
            }
            other => self.store.apply(other),
        }
    }

    /// What an update tells the agent besides its objects: a watch lost or relisted (for the
    /// resync gate), a kind in sync.
    fn note(&mut self, update: &Update) {
        self.gate.observe(update);
        if self.synced.observe(update) {
            self.ready = true;
        }
    }

    /// Counts a Service or `EndpointSlice` change for the metrics (kube-proxy counts each
    /// informer event, the initial list's included), and keeps the slice's trigger time.
    fn count_change(&mut self, update: &Update) {
        let mut triggers = Vec::new();
        if let Some((services, slices)) = changes_in(update, &mut triggers) {
            self.record_changes(services, slices, triggers);
        }
    }

    /// Counts `services` and `slices` changes, with the trigger times of the slices.
    fn record_changes(&mut self, services: u64, slices: u64, triggers: Vec<jiff::Timestamp>) {
        if services == 0 && slices == 0 {
            return;
        }
        self.triggers.extend(triggers);
        let m = &self.metrics;
        metrics::count_changes(&m.service_changes, &m.service_changes_pending, services);
        metrics::count_changes(&m.endpoint_changes, &m.endpoint_changes_pending, slices);
        m.sync_last_queued.set(metrics::unix_seconds(jiff::Timestamp::now()));
        // While writes keep failing nothing is observed: keep the newest, not an unbounded list.
        if self.triggers.len() > MAX_TRIGGERS {
            self.triggers.drain(..self.triggers.len() - MAX_TRIGGERS);
        }
    }

    /// Writes again what failed to be written (`retry`, and backends whose removal failed), on
    /// the rescan tick while the store has no change of its own: one line when it completes, the
    /// errors only when they change.
    fn retry_failed(&mut self) {
        if self.write_errors.is_empty() || self.store.is_dirty() {
            return;
        }
        // The failed write left its change marked as waiting (`take_write_outcome`): the agent's
        // health keeps counting from then.
        let retry = std::mem::take(&mut self.retry);
        let report = self.writer.sync_frontends(self.store.desired(), &retry, &mut self.maps);
        log_written(&report);
        let purged = self.take_write_outcome(&report);
        if purged > 0 {
            info!(udp_flows_moved = purged, "UDP flows of stale backends moved (retry)");
        }
        self.health.update(&self.store.desired().health_checks);
    }

    /// Logs a write's errors (each once while it repeats), keeps its failed frontends for a
    /// retry, marks the agent up to date when there were none, and removes the conntrack
    /// entries of UDP flows the write left without a backend (returns how many).
    fn take_write_outcome(&mut self, report: &writer::SyncReport) -> usize {
        let errors: BTreeSet<String> = report.errors.iter().cloned().collect();
        for e in &errors {
            if self.write_errors.contains(e) {
                debug!("map write failed again: {e}");
            } else {
                error!("map write failed, this service keeps its previous state until a retry succeeds: {e}");
            }
        }
        if errors.is_empty() && !self.write_errors.is_empty() {
            info!(retried = self.write_errors.len(), "failed map writes completed");
        }
        self.retry.clone_from(&report.failed);
        self.write_errors = errors;
        if self.write_errors.is_empty() {
            lock(&self.proxy_health).updated(jiff::Timestamp::now());
        }
        if report.stale_udp.is_empty() {
            0
        } else {
            let stale = report.stale_udp.iter().copied().collect();
            gc::purge_udp(&mut self.maps.conntrack, &stale) + gc::purge_udp(&mut self.maps.conntrack6, &stale)
        }
    }

    /// Translates what changed, writes it (with the frontends whose last write failed), and logs
    /// the outcome. The first sync after the source's initial state also attaches the devices.
    /// The agent is healthy again once a write has no errors.
    fn sync(&mut self) {
        if !self.ready || (!self.store.is_dirty() && self.first_synced) {
            return;
        }
        if self.first_synced && self.gate.hold(tokio::time::Instant::now()) {
            debug!(relisting = ?self.gate.relisting().collect::<Vec<_>>(), "changes held until the relists complete");
            return;
        }
        let started = Instant::now();
        lock(&self.proxy_health).queued(started);
        // What was translated while the programs loaded (`Early`), then what changed since.
        let earlier = self.early_translation.take();
        let mut changes = self.store.flush();
        let now = Instant::now();
        for c in earlier.iter().chain([&changes]) {
            for p in &c.new_problems {
                self.problems.appeared(p, now);
            }
            for p in &c.fixed_problems {
                self.problems.gone(p);
            }
        }
        if let Some(mut earlier) = earlier {
            changes.frontends.append(&mut earlier.frontends);
            changes.translated += earlier.translated;
        }
        changes.frontends.append(&mut self.retry);
        if !self.first_synced {
            // The source's complete state against everything the maps hold: frontends adopted
            // from an earlier agent that the source no longer has (deleted while no agent ran)
            // are removed now; the source reports no change for them.
            changes.frontends.extend(self.writer.frontends());
        }
        let report = self.writer.sync_frontends(self.store.desired(), &changes.frontends, &mut self.maps);
        let desired = &self.store.desired().services;
        self.metrics.service_labels.update(changes.frontends.iter().map(|fe| {
            let shown = self.writer.rev_nat_id(fe).zip(desired.get(fe));
            (*fe, shown.map(|(id, entry)| (id, metrics::ServiceLabel::of(*fe, entry))))
        }));
        log_written(&report);
        let purged = self.take_write_outcome(&report);
        self.health.update(&self.store.desired().health_checks);
        self.record_sync(started.elapsed(), !self.first_synced, report.errors.len());
        let (services, slices) = self.store.object_counts();
        info!(
            services,
            slices,
            translated = changes.translated,
            frontends = self.writer.service_count(),
            backends = self.writer.backend_count(),
            programmed = report.programmed.len(),
            removed = report.removed.len(),
            problems = self.store.problem_count(),
            rejected_total = ?self.store.rejected_total(),
            map_ops = report.ops,
            map_errors = report.errors.len(),
            udp_flows_moved = purged,
            rss_mib = resident_mib(),
            elapsed_ms = started.elapsed().as_millis(),
            "synced"
        );
        if !self.first_synced {
            self.first_synced = true;
            // State first, then hooks: devices are attached only to maps that hold the
            // source's complete state.
            if let Err(e) = self.datapath.top_up_migration() {
                error!(error = %e, "copying the flows of the old maps (map migration)");
            }
            // Devices before the socket hooks: once a pod's TCP reaches a Service (at
            // connect()), its device translates the rest of its traffic too.
            self.rescan();
            self.attach_sockets();
            // The old programs (with the old maps) are replaced everywhere by now.
            if let Err(e) = self.datapath.finish_migration() {
                error!(error = %e, "finishing the map migration (the old maps stay pinned in legacy/)");
            }
        }
    }

    /// The metrics of a sync that took `elapsed` (`full`: the first, which compares every
    /// frontend) and had `errors` failed writes.
    fn record_sync(&mut self, elapsed: Duration, full: bool, errors: usize) {
        let now = jiff::Timestamp::now();
        let m = &self.metrics;
        metrics::observe_sync(m, elapsed, full, errors == 0, now);
        m.map_write_errors.inc_by(errors as u64);
        m.frontends.set(i64::try_from(self.writer.service_count()).unwrap_or(i64::MAX));
        m.backends.set(i64::try_from(self.writer.backend_count()).unwrap_or(i64::MAX));
        m.rejected_objects.set(i64::try_from(self.store.problem_count()).unwrap_or(i64::MAX));
        for (kind, total) in self.store.rejected_total() {
            let counted = self.rejections_counted.entry(kind).or_default();
            m.rejections.get_or_create(&metrics::KindLabel { kind }).inc_by(total.saturating_sub(*counted));
            *counted = *total;
        }
        if errors == 0 {
            // Programmed: how long since each change behind the slices written happened.
            for t in self.triggers.drain(..) {
                let latency = now.duration_since(t).as_secs_f64();
                if latency >= 0.0 {
                    m.network_programming.observe(latency);
                }
            }
        }
    }

    /// Attaches to new pod devices, forgets removed ones (once the maps hold a complete state).
    fn rescan(&mut self) {
        if !self.first_synced {
            return;
        }
        let present = match devices::interfaces() {
            Ok(p) => p,
            Err(e) => {
                error!(error = %e, "listing interfaces");
                return;
            }
        };
        let plan = devices::plan(&present, &self.attached, &self.cfg.pod_devices);
        for name in plan.detach {
            self.attached.remove(&name);
            debug!(ifname = %name, "device gone");
            if let Err(e) = self.datapath.detach_pinned(&name) {
                warn!(ifname = %name, error = %e, "removing pinned links of a removed device");
            }
        }
        for (name, idx) in plan.attach {
            match self.datapath.attach(&name) {
                Ok(()) => {
                    self.failed.remove(&(name.clone(), idx));
                    self.attached.insert(name, idx);
                }
                Err(e) => {
                    if self.failed.insert((name.clone(), idx)) {
                        error!(ifname = %name, error = %e, "attach failed; will retry");
                    }
                }
            }
        }
        self.external.sync(&mut self.datapath, &present);
        // After the devices: a pod's connections are translated at connect() once its device
        // translates the rest of its traffic (a pod's namespace exists before its device).
        self.list_pod_netns();
        // Links pinned by an earlier run for devices that no longer exist.
        match self.datapath.pinned_interfaces() {
            Ok(pinned) => {
                for name in pinned.into_iter().filter(|n| !present.contains_key(n)) {
                    if let Err(e) = self.datapath.detach_pinned(&name) {
                        warn!(ifname = %name, error = %e, "removing stale pinned links");
                    }
                }
            }
            Err(e) => warn!(error = %e, "listing pinned links"),
        }
    }

    /// Attaches the socket hooks (`--cgroup`) for host-network processes and, as
    /// `--pod-sockets` says, pods' TCP connections (whose namespaces are listed first).
    fn attach_sockets(&mut self) {
        let cgroup = match &self.cfg.cgroup {
            Cgroup::Disabled => {
                if !matches!(self.cfg.pod_sockets, PodSockets::Off) {
                    info!("--cgroup none: pods' connections are translated on their devices only");
                }
                return;
            }
            Cgroup::Path(p) => p.clone(),
            Cgroup::Auto => {
                let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
                let Some(p) = crate::bpf::datapath::cgroup2_mount(&mountinfo) else {
                    warn!(
                        "no cgroup v2 mount: host-network processes do not reach services (mount one, or pass --cgroup)"
                    );
                    return;
                };
                p
            }
        };
        if let PodSockets::Listed(glob) = &self.cfg.pod_sockets {
            self.pod_netns = Some(PodNetns::new(glob.clone()));
            self.list_pod_netns();
        } else if let Err(e) = self.datapath.set_pod_netns(&BTreeSet::new()) {
            // What an earlier run listed is unused without CONFIG_F_POD_NETNS_LISTED.
            warn!(error = %e, "emptying the pod network namespaces an earlier run listed");
        }
        if let Err(e) = self.datapath.attach_sockets(&cgroup, &self.cfg.pod_sockets) {
            self.pod_netns = None;
            error!(cgroup = %cgroup.display(), error = %e, "socket hooks not attached: host-network processes do not reach services");
        }
    }

    /// Reads the pods' namespaces (`--pod-sockets <glob>`) and writes their cookies to
    /// `RPX_POD_NETNS` when they are not there yet (the first time: replacing what an earlier
    /// run left; a failed write: again at the next rescan).
    fn list_pod_netns(&mut self) {
        let Some(pods) = &mut self.pod_netns else { return };
        let cookies = match pods.scan() {
            Ok(Some(cookies)) => cookies,
            Ok(None) => return,
            Err(e) => {
                // Once per failure, not at every rescan.
                if pods.failed(&e.to_string()) {
                    warn!(error = %e, "listing pod network namespaces: their TCP connections are translated on their devices");
                }
                return;
            }
        };
        match self.datapath.set_pod_netns(&cookies) {
            Ok((added, removed)) => {
                pods.written();
                if added + removed > 0 {
                    debug!(added, removed, listed = cookies.len(), "pod network namespaces");
                }
            }
            Err(e) => {
                warn!(error = %e, "writing the pod network namespaces: their TCP connections are translated on their devices");
            }
        }
    }

    /// Warns when datapath drop counters that need an operator's attention moved since the last
    /// look (SNAT port exhaustion, FIB failures, conntrack inserts failing).
    fn check_counters(&mut self) {
        for (stat, what) in [
            (Stat::SnatExhausted, "new north-south flows dropped: every SNAT port towards their backend is taken"),
            (Stat::FibFail, "north-south packets dropped: no usable route (FIB lookup failed)"),
            (Stat::CtInsertFail, "new flows dropped: conntrack insert failed (map full?)"),
        ] {
            let now = crate::bpf::datapath::stat_total(&self.maps.stats, stat);
            let last = self.counters.insert(stat as u32, now).unwrap_or(now);
            if now > last {
                warn!(counter = stat.name(), dropped = now - last, total = now, "{what}");
            }
        }
    }

    /// The GC tick: a pass on the GC thread (a blocking task with its own map handles: walking
    /// hundreds of thousands of entries must not stall the health, metrics and health check
    /// ports this loop's runtime serves), or on the loop without them. A tick during a pass is
    /// skipped.
    fn gc(&mut self) {
        self.check_counters();
        let began = self.writer.orphan_stamp();
        let tables = match std::mem::replace(&mut self.gc, GcState::Running(began)) {
            GcState::Idle(tables) => tables,
            running @ GcState::Running(_) => {
                self.gc = running;
                debug!("conntrack GC: the previous pass is still running");
                return;
            }
            GcState::Loop => {
                self.gc = GcState::Loop;
                let started = Instant::now();
                let v4 = gc::run_pass(&mut self.maps.conntrack, |id| self.writer.has_backend(id));
                let v6 = gc::run_pass(&mut self.maps.conntrack6, |id| self.writer.has_backend(id));
                self.gc_pass_done(v4, v6, started.elapsed(), Some(began));
                return;
            }
        };
        let known = self.writer.backend_ids();
        let done = self.gc_done.clone();
        tokio::task::spawn_blocking(move || {
            // The receiver lives as long as the loop.
            let _ = done.blocking_send(gc::run_deferred(*tables, &known));
        });
    }

    /// A pass of the GC thread is back: the entries it found naming a backend it did not know
    /// are judged against the backends programmed now.
    fn gc_finished(&mut self, done: gc::Deferred) {
        let gc::Deferred { tables, v4: (mut v4, gone4), v6: (mut v6, gone6), elapsed } = done;
        let began = match std::mem::replace(&mut self.gc, GcState::Idle(Box::new(tables))) {
            GcState::Running(began) => Some(began),
            _ => None,
        };
        let started = Instant::now();
        gc::settle_gone(&mut self.maps.conntrack, gone4, |id| self.writer.has_backend(id), &mut v4);
        gc::settle_gone(&mut self.maps.conntrack6, gone6, |id| self.writer.has_backend(id), &mut v6);
        self.gc_pass_done(v4, v6, elapsed + started.elapsed(), began);
    }

    /// Metrics and logs of a pass, and the orphaned backends no flow names any more released:
    /// those orphaned before the pass `began` (`None`: not known, none).
    fn gc_pass_done(&mut self, v4: gc::Pass, v6: gc::Pass, elapsed: Duration, began: Option<writer::OrphanStamp>) {
        let sizes = self.cfg.map_sizes;
        for (i, (family, p, capacity, flag)) in
            [("ipv4", &v4, sizes.ct4, "--ct-max"), ("ipv6", &v6, sizes.ct6, "--ct-max-ipv6")].into_iter().enumerate()
        {
            let left = p.scanned.saturating_sub(p.expired + p.backend_gone);
            let label = metrics::FamilyLabel { family };
            let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
            self.metrics.conntrack_entries.get_or_create(&label).set(gauge(left));
            self.metrics.snat_ports.get_or_create(&label).set(gauge(p.snat_ports));
            self.metrics.snat_ports_busiest.get_or_create(&label).set(gauge(p.snat_ports_busiest));
            let crossing = gc::fill_crossing(left, capacity, self.ct_nearly_full[i]);
            match crossing {
                Some(true) => warn!(
                    family,
                    entries = left,
                    capacity,
                    "conntrack table nearly full: new flows now evict the least recently used ones, idle \
                     long-lived connections included (raise {flag})"
                ),
                Some(false) => info!(family, entries = left, capacity, "conntrack table no longer nearly full"),
                None => {}
            }
            if let Some(warned) = crossing {
                self.ct_nearly_full[i] = warned;
            }
        }
        let pass = v4.merge(v6);
        self.metrics.gc_duration.observe(elapsed.as_secs_f64());
        // Backends that left their Services, once no flow names them.
        let (released, errors) = match began {
            Some(began) => {
                self.writer.release_orphans_scanned_at(began, |id| pass.in_use.contains(&id), &mut self.maps)
            }
            None => (0, Vec::new()),
        };
        for e in errors {
            warn!("orphaned backend not removed (retried at the next pass): {e}");
        }
        if pass.expired + pass.backend_gone + released > 0 {
            info!(
                scanned = pass.scanned,
                expired = pass.expired,
                backend_gone = pass.backend_gone,
                backends_released = released,
                orphans = self.writer.orphan_count(),
                elapsed_ms = elapsed.as_millis(),
                "conntrack GC"
            );
        } else {
            debug!(scanned = pass.scanned, orphans = self.writer.orphan_count(), "conntrack GC: nothing to remove");
        }
    }
}

/// The Service and `EndpointSlice` changes `update` counts as, `(services, slices)` (`None`: it
/// is no change), adding the trigger times of its slices to `triggers`.
fn changes_in(update: &Update, triggers: &mut Vec<jiff::Timestamp>) -> Option<(u64, u64)> {
    Some(match update {
        Update::ResetServices(all) => (all.len() as u64, 0),
        Update::ResetSlices(all) => {
            triggers.extend(all.iter().filter_map(trigger_time));
            (0, all.len() as u64)
        }
        Update::ListedService(_) | Update::ApplyService(_) | Update::DeleteService(_) => (1, 0),
        Update::ListedSlice(slice) | Update::ApplySlice(slice) => {
            triggers.extend(trigger_time(slice));
            (0, 1)
        }
        Update::DeleteSlice(_) => (0, 1),
        _ => return None,
    })
}

/// Which of the kinds the store needs (Services, `EndpointSlices`) the source has delivered
/// whole.
#[derive(Default)]
struct InSync(BTreeSet<&'static str>);

impl InSync {
    /// Notes `update`; `true` when it completes the set (once).
    fn observe(&mut self, update: &Update) -> bool {
        match update {
            Update::Synced(kind @ ("Service" | "EndpointSlice")) => self.0.insert(kind) && self.0.len() == 2,
            _ => false,
        }
    }
}

/// Source updates that arrive while the programs load. The objects go into the store at once
/// (a list of 60,000 objects is never held whole); what the agent does besides storing them
/// waits for it to exist: the Node's updates, and the markers (list done, watch lost, in sync)
/// its resync gate and readiness follow.
/// Once Services and `EndpointSlices` are both in sync, the store is translated at once
/// (`translated`): the first sync then only writes, and the translation of a large cluster
/// (0.7 s at 30,000 Services) overlaps the verifier's work instead of following it.
struct Early {
    store: Store,
    deferred: Vec<Update>,
    services: u64,
    slices: u64,
    triggers: Vec<jiff::Timestamp>,
    /// Kinds whose initial state the source delivered.
    in_sync: InSync,
    /// The store's translation once both kinds were in sync, for the first sync to write.
    translated: Option<Changes>,
}

impl Early {
    /// The store starts with the node's `NodePort` addresses when they can be read (the agent
    /// reads and logs them again), so that a translation made while the programs load has them.
    fn new(cfg: &Config) -> Self {
        let mut store = Store::new(&cfg.node_name);
        if !cfg.devices.is_empty()
            && let Ok(found) = devices::node_addresses(&cfg.devices, &cfg.nodeport_addresses)
        {
            store.set_node_addresses(found.addresses.iter().copied());
        }
        Self {
            store,
            deferred: Vec::new(),
            services: 0,
            slices: 0,
            triggers: Vec::new(),
            in_sync: InSync::default(),
            translated: None,
        }
    }

    /// Whether the agent takes `update` in itself (`Agent::update`), rather than the store
    /// (with the agent noting it afterwards).
    fn for_the_agent(update: &Update) -> bool {
        matches!(update, Update::Node(_) | Update::ListedNode(_) | Update::ListStart("Node") | Update::ListDone("Node"))
    }

    fn take(&mut self, update: Update) {
        if Self::for_the_agent(&update) {
            self.deferred.push(update);
            return;
        }
        if let Some((services, slices)) = changes_in(&update, &mut self.triggers) {
            self.services += services;
            self.slices += slices;
        }
        if matches!(update, Update::ListDone(_) | Update::WatchLost(_) | Update::Synced(_)) {
            self.deferred.push(update.clone());
        }
        let complete = self.in_sync.observe(&update);
        self.store.apply(update);
        if complete {
            let started = Instant::now();
            let changes = self.store.flush();
            debug!(
                translated = changes.translated,
                elapsed_ms = started.elapsed().as_millis(),
                "translated while the programs load"
            );
            self.translated = Some(changes);
        }
    }
}

/// When the change behind `slice` happened, as the `EndpointSlice` controller records it.
fn trigger_time(slice: &k8s_openapi::api::discovery::v1::EndpointSlice) -> Option<jiff::Timestamp> {
    slice.metadata.annotations.as_ref()?.get(metrics::TRIGGER_TIME_ANNOTATION)?.parse().ok()
}

/// One line per frontend a write programmed or removed, unless a whole cluster is being
/// programmed at once (then at debug).
fn log_written(report: &writer::SyncReport) {
    let detail = report.programmed.len() + report.removed.len() <= 100;
    for (fe, svc, n) in &report.programmed {
        if detail {
            info!(service = %svc, frontend = %fe, backends = n, "service programmed");
        } else {
            debug!(service = %svc, frontend = %fe, backends = n, "service programmed");
        }
    }
    for (fe, svc) in &report.removed {
        if detail {
            info!(service = %svc, frontend = %fe, "service removed");
        } else {
            debug!(service = %svc, frontend = %fe, "service removed");
        }
    }
}

/// The agent's resident memory in MiB (0 if unknown), for the logs.
fn resident_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    kib / 1024
}

/// Watches `dir` (not recursively) and sends `()` on every change.
fn watch_dir(dir: &Path, tx: mpsc::Sender<()>) -> Result<notify::RecommendedWatcher> {
    if !dir.is_dir() {
        return Err(Error::ManifestsDir {
            path: dir.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        match &ev {
            // Our own reads of the files: not a change.
            Ok(ev) if matches!(ev.kind, notify::EventKind::Access(_)) => return,
            Ok(_) => {}
            Err(e) => warn!(error = %e, "manifests watch error; reloading"),
        }
        // Full: a reload is already pending and will see this change too.
        let _ = tx.try_send(());
    })
    .map_err(|e| Error::Watch { what: dir.display().to_string(), reason: e.to_string() })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| Error::Watch { what: dir.display().to_string(), reason: e.to_string() })?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Problem;

    fn problem(reason: &str, transient: bool) -> Problem {
        Problem { kind: "EndpointSlice", object: String::from("default/a-1"), reason: reason.to_owned(), transient }
    }

    #[test]
    fn transient_problems_are_warned_about_only_when_they_last() {
        let t0 = Instant::now();
        let mut log = ProblemLog::default();
        let passing = problem("no Service default/a for this slice", true);
        let lasting = problem("no Service default/b for this slice", true);
        log.appeared(&passing, t0);
        log.appeared(&lasting, t0);
        log.appeared(&problem("missing label", false), t0);
        assert_eq!(log.warn_lasting(t0 + Duration::from_secs(5)), 0);
        log.gone(&passing);
        assert_eq!(log.warn_lasting(t0 + ProblemLog::LASTING), 1, "the lasting one, once");
        assert_eq!(log.warn_lasting(t0 + ProblemLog::LASTING * 2), 0);
        log.gone(&lasting);
        assert!(log.transient.is_empty());
    }
}
