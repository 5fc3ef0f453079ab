//! `rproxy-agent run`: the agent's event loop.
//!
//! One task owns the datapath, the map writer and the attach state, and reacts to: manifests
//! directory changes (inotify), link notifications (netlink), the conntrack GC tick, a periodic
//! device rescan, and SIGTERM/SIGINT. On a signal it exits without detaching anything: the pinned
//! links and maps keep translating with the last state until an agent starts again (and adopts
//! them) or `rproxy-agent cleanup` removes them.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
    time::{MissedTickBehavior, interval},
};
use tracing::{debug, error, info, warn};

use crate::{
    Error, Result,
    datapath::{Datapath, Maps},
    devices::{self, DevicePattern},
    gc, manifests, translate,
    writer::{self, Writer},
};

/// Settings of `rproxy-agent run`.
#[derive(Clone, Debug)]
pub struct Config {
    pub manifests: PathBuf,
    pub node_name: String,
    pub pod_devices: DevicePattern,
    pub bpffs: PathBuf,
    pub gc_interval: Duration,
    pub rescan_interval: Duration,
}

/// Everything the loop owns.
struct Agent {
    cfg: Config,
    datapath: Datapath,
    maps: Maps,
    writer: Writer,
    /// Devices with programs attached: name → ifindex.
    attached: BTreeMap<String, u32>,
    /// (name, ifindex) whose attach failed, so the failure is logged once, not every rescan.
    failed: BTreeSet<(String, u32)>,
    /// Problems of the last reload, to log each one once when it appears and when it is fixed.
    problems: BTreeSet<String>,
}

pub async fn run(cfg: Config) -> Result<()> {
    // Handlers first: a signal during start-up must not kill the agent between attaching a link
    // and pinning it (an unpinned link dies with the process). It is acted on once start-up is
    // complete.
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|source| Error::Io { what: "SIGTERM handler".into(), source })?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|source| Error::Io { what: "SIGINT handler".into(), source })?;
    let mut datapath = Datapath::load(Some(&cfg.bpffs))?;
    let maps = datapath.take_maps()?;
    let (writer, warnings) = Writer::adopt(writer::read_adopted(&maps));
    for w in warnings {
        warn!("adopting pinned maps: {w}");
    }
    info!(
        bpffs = %cfg.bpffs.display(),
        frontends = writer.service_count(),
        backends = writer.backend_count(),
        "eBPF programs loaded; pinned state adopted"
    );
    let mut agent = Agent {
        cfg,
        datapath,
        maps,
        writer,
        attached: BTreeMap::new(),
        failed: BTreeSet::new(),
        problems: BTreeSet::new(),
    };

    let (link_tx, mut link_rx) = mpsc::channel(1);
    if let Err(e) = devices::watch_links(link_tx) {
        warn!(error = %e, "no link notifications; new devices are found by periodic rescans only");
    }
    let (fs_tx, mut fs_rx) = mpsc::channel(1);
    let _watcher = watch_dir(&agent.cfg.manifests, fs_tx)?;

    // State first, then hooks: a device is never attached to maps that do not reflect the
    // manifests yet (beyond what a previous run left).
    agent.reload();
    agent.rescan();
    info!(
        manifests = %agent.cfg.manifests.display(),
        pod_devices = agent.cfg.pod_devices.as_str(),
        node = %agent.cfg.node_name,
        "agent running"
    );

    let mut gc_tick = interval(agent.cfg.gc_interval);
    let mut rescan_tick = interval(agent.cfg.rescan_interval);
    gc_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    rescan_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: exiting, the datapath keeps its last state"); break; }
            _ = sigint.recv() => { info!("SIGINT: exiting, the datapath keeps its last state"); break; }
            Some(()) = fs_rx.recv() => {
                // Coalesce the burst of events one editor save or rename produces.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while fs_rx.try_recv().is_ok() {}
                agent.reload();
            }
            Some(()) = link_rx.recv() => agent.rescan(),
            _ = rescan_tick.tick() => agent.rescan(),
            _ = gc_tick.tick() => agent.gc(),
        }
    }
    Ok(())
}

impl Agent {
    /// Reads the manifests directory, translates, writes the maps, and logs what changed.
    fn reload(&mut self) {
        let started = Instant::now();
        let (objects, mut problems) = match manifests::load_dir(&self.cfg.manifests) {
            Ok(loaded) => loaded,
            Err(e) => {
                // Keep the last state rather than wiping the maps because of a transient error.
                error!(error = %e, "manifests not read; keeping the current state");
                return;
            }
        };
        let translation = translate::translate(&objects, &self.cfg.node_name);
        problems.extend(translation.problems);
        self.log_problems(problems.iter().map(ToString::to_string).collect());

        let report = self.writer.sync(&translation.desired, &mut self.maps);
        for (fe, svc, n) in &report.programmed {
            info!(service = %svc, frontend = %fe, backends = n, "service programmed");
        }
        for (fe, svc) in &report.removed {
            info!(service = %svc, frontend = %fe, "service removed");
        }
        for e in &report.errors {
            error!("map write failed, this service keeps its previous state: {e}");
        }
        info!(
            services = objects.services.len(),
            slices = objects.slices.len(),
            frontends = self.writer.service_count(),
            backends = self.writer.backend_count(),
            problems = problems.len(),
            map_ops = report.ops,
            elapsed_ms = started.elapsed().as_millis(),
            "synced"
        );
    }

    fn log_problems(&mut self, now: BTreeSet<String>) {
        for p in now.difference(&self.problems) {
            warn!("rejected: {p}");
        }
        for p in self.problems.difference(&now) {
            info!("no longer rejected: {p}");
        }
        self.problems = now;
    }

    /// Attaches to new pod devices, forgets removed ones.
    fn rescan(&mut self) {
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

    fn gc(&mut self) {
        let started = Instant::now();
        let pass = gc::run_pass(&mut self.maps.conntrack, self.writer.backend_ids());
        let level_info = pass.expired + pass.backend_gone > 0;
        if level_info {
            info!(
                scanned = pass.scanned,
                expired = pass.expired,
                backend_gone = pass.backend_gone,
                elapsed_ms = started.elapsed().as_millis(),
                "conntrack GC"
            );
        } else {
            debug!(scanned = pass.scanned, "conntrack GC: nothing to remove");
        }
    }
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
