//! Services, `EndpointSlices` and this node's Node from a live Kubernetes API server, as a stream
//! of [`Update`]s.
//!
//! Three [`kube::runtime::watcher()`]s (list, then watch from the list's resource version, with
//! bookmarks) run side by side:
//! - Services and `EndpointSlices`, selected like kube-proxy selects them ([`LABEL_SELECTOR`]:
//!   neither handled by another proxy nor belonging to a headless Service);
//! - this node's Node, selected with the field selector `metadata.name=<node>`.
//!
//! Every (re)list is streamed as it is read, page by page: [`Update::ListStart`], one
//! [`Update::ListedService`] / [`Update::ListedSlice`] / [`Update::ListedNode`] per object,
//! [`Update::ListDone`] (the store then replaces what it held with the complete set, so objects
//! deleted while the watch was down disappear), then [`Update::Synced`]. Nothing here holds a
//! list: with 10,000 Services and their slices, a buffered list would be tens of MiB of API
//! objects next to the store's copies.
//!
//! Watch errors never end the source: a broken watch is reported ([`Update::WatchLost`]) and
//! lists again after a short delay ([`Retry`]: about a second while the server is away for less
//! than a minute), so the agent catches up a second after the API server answers again; each
//! error is counted in [`Stats`], logged at debug, and a watch failing for ten seconds is
//! warned about once.
use std::{
    marker::PhantomData,
    pin::pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher::{self, Event},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, info, warn};

pub use crate::translate::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::{
    error::{Error, Result},
    source::{Update, slim},
};

/// The server-side label selector for Services and `EndpointSlices`, the one kube-proxy uses.
pub const LABEL_SELECTOR: &str = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// [`LABEL_SELECTOR`], built from its labels.
#[must_use]
pub fn label_selector() -> String {
    format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
}

/// The server-side field selector for this node's Node object.
#[must_use]
pub fn node_field_selector(node_name: &str) -> String {
    format!("metadata.name={node_name}")
}

/// A client for the API server.
///
/// With `kubeconfig`, that file's current context. Without, [`Config::infer`]: the kubeconfig
/// named by `KUBECONFIG` or `~/.kube/config` if there is one, else the in-cluster service account
/// (`KUBERNETES_SERVICE_HOST`/`PORT` and the mounted token and CA).
///
/// Nothing is sent to the server yet.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let what = || format!("kubeconfig {}", path.display());
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|source| Error::KubeClient { what: what(), source: source.into() })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::KubeClient { what: what(), source: source.into() })?
        }
        None => Config::infer().await.map_err(|source| Error::KubeClient {
            what: "no in-cluster service account and no usable kubeconfig (KUBECONFIG, ~/.kube/config)".to_owned(),
            source: source.into(),
        })?,
    };
    let server = config.cluster_url.to_string();
    Client::try_from(config).map_err(|source| Error::KubeClient {
        what: format!("creating the client for {server}"),
        source: source.into(),
    })
}

/// What the watchers did, per kind, for logs, tests and a future metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    /// The Services watcher.
    pub services: KindStats,
    /// The `EndpointSlices` watcher.
    pub slices: KindStats,
    /// The Node watcher.
    pub node: KindStats,
    all_synced_logged: AtomicBool,
}

impl Stats {
    /// Whether all three watchers completed their initial list.
    #[must_use]
    pub fn all_synced(&self) -> bool {
        self.services.synced() && self.slices.synced() && self.node.synced()
    }
}

/// One watcher's counters.
#[derive(Debug, Default)]
pub struct KindStats {
    errors: AtomicU64,
    relists: AtomicU64,
    synced: AtomicBool,
}

impl KindStats {
    /// Watch errors so far (failed lists, failed watch requests, error events, broken streams).
    #[must_use]
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Lists after the first one (each follows an error: an expired resource version, a failed list).
    #[must_use]
    pub fn relists(&self) -> u64 {
        self.relists.load(Ordering::Relaxed)
    }

    /// Whether the initial list completed (it stays true through later errors and relists).
    #[must_use]
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }
}

/// Watches Services, `EndpointSlices` and the Node named `node_name` through `client`, sending
/// [`Update`]s to `tx` and counting into `stats`. Returns when `tx`'s receiver is dropped (and
/// only then: API errors are retried forever).
pub async fn run(client: Client, node_name: String, tx: mpsc::Sender<Update>, stats: Arc<Stats>) {
    let selected = watcher::Config::default().labels(&label_selector());
    let node = watcher::Config::default().fields(&node_field_selector(&node_name));
    tokio::join!(
        watch::<Service>(Api::all(client.clone()), selected.clone(), &tx, &stats),
        watch::<EndpointSlice>(Api::all(client.clone()), selected, &tx, &stats),
        watch::<Node>(Api::all(client), node, &tx, &stats),
    );
}

/// Runs one watcher until `tx` closes.
///
/// Any error ends the watch: the agent is told ([`Update::WatchLost`]) and, after a [`Retry`]
/// delay, a new watcher lists again (as client-go's reflector relists after a broken watch), so
/// that what the agent holds is complete again at that list's end, whatever happened meanwhile.
/// Errors are logged at debug; a watch failing for [`Retry::PERSISTENT`] gets one warning, and
/// its recovery one line.
async fn watch<K: Watched>(api: Api<K>, config: watcher::Config, tx: &mpsc::Sender<Update>, stats: &Stats) {
    let kind_stats = K::stats(stats);
    let mut mapper = EventMapper::<K>::default();
    let mut retry = Retry::default();
    let mut lists = 0_u64;
    // The agent was told the watch broke, and its relist has not completed yet.
    let mut lost = false;
    // A warning went out for the current run of failures.
    let mut warned = false;
    loop {
        let mut events = pin!(watcher::watcher(api.clone(), config.clone()));
        let error = loop {
            let item = tokio::select! {
                item = events.next() => item,
                () = tx.closed() => return,
            };
            // A watcher never ends by itself; should one, start a new one.
            let Some(item) = item else { break None };
            let event = match item {
                Ok(event) => event,
                Err(err) => break Some(err),
            };
            if matches!(event, Event::Init) {
                if lists > 0 {
                    kind_stats.relists.fetch_add(1, Ordering::Relaxed);
                    debug!(kind = K::KIND, "relisting");
                }
                lists += 1;
            }
            // Trimmed as they arrive, so that the updates queued for the store are small (see
            // `slim`).
            let event = match event {
                Event::Apply(o) => Event::Apply(K::slim(o)),
                Event::Delete(o) => Event::Delete(K::slim(o)),
                Event::InitApply(o) => Event::InitApply(K::slim(o)),
                other => other,
            };
            let step = mapper.map(event);
            for update in step.updates {
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            if let Some(objects) = step.synced {
                lost = false;
                kind_stats.synced.store(true, Ordering::Relaxed);
                if std::mem::take(&mut warned) {
                    let failing = retry.failing_for(Instant::now()).unwrap_or_default();
                    info!(kind = K::KIND, objects, failing_s = failing.as_secs(), "watch recovered and in sync");
                } else {
                    info!(kind = K::KIND, objects, "watch in sync");
                }
                if stats.all_synced() && !stats.all_synced_logged.swap(true, Ordering::Relaxed) {
                    info!("all watches in sync");
                }
            }
        };
        let now = Instant::now();
        let delay = retry.failed(now);
        if let Some(err) = &error {
            kind_stats.errors.fetch_add(1, Ordering::Relaxed);
            let failing = retry.failing_for(now).unwrap_or_default();
            if failing >= Retry::PERSISTENT && !warned {
                warned = true;
                warn!(
                    kind = K::KIND,
                    error = %err,
                    failing_s = failing.as_secs(),
                    "cannot watch the API server; retrying, the datapath keeps the state it has"
                );
            } else {
                debug!(kind = K::KIND, error = %err, retry_ms = delay.as_millis(), "watch error; relisting");
            }
        }
        if !lost {
            lost = true;
            if tx.send(Update::WatchLost(K::KIND)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = tx.closed() => return,
        }
    }
}

/// When to try again after a watch or list failed: soon enough that the agent catches up about a
/// second after the API server answers again, gently enough that a long outage does not become
/// a storm of requests from every node.
///
/// The first retry after 250 ms, doubling to 1 s for the first minute of failures, then to 10 s;
/// each delay jittered by ±20 %. A run of failures ends after [`Retry::QUIET`] without one.
#[derive(Debug, Default)]
pub struct Retry {
    /// First failure of the current run, the last one, and how many.
    run: Option<(Instant, Instant, u32)>,
}

impl Retry {
    pub const FIRST: Duration = Duration::from_millis(250);
    /// Longest delay during the first [`Retry::FAST_FOR`] of a run.
    pub const FAST_MAX: Duration = Duration::from_secs(1);
    pub const FAST_FOR: Duration = Duration::from_mins(1);
    /// Longest delay after that.
    pub const SLOW_MAX: Duration = Duration::from_secs(10);
    /// A run of failures ends after this long without one.
    pub const QUIET: Duration = Duration::from_secs(30);
    /// Failing this long is worth a warning.
    pub const PERSISTENT: Duration = Duration::from_secs(10);

    /// Records a failure at `now`; the delay before the next try.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let (first, failures) = match self.run {
            Some((first, last, failures)) if now.saturating_duration_since(last) < Self::QUIET => {
                (first, failures.saturating_add(1))
            }
            _ => (now, 1),
        };
        self.run = Some((first, now, failures));
        let max = if now.saturating_duration_since(first) < Self::FAST_FOR { Self::FAST_MAX } else { Self::SLOW_MAX };
        let base = Self::FIRST.saturating_mul(1 << (failures - 1).min(16)).min(max);
        base.mul_f64(0.8 + 0.4 * unit_random())
    }

    /// How long the current run of failures has lasted at `now` (`None` outside one).
    #[must_use]
    pub fn failing_for(&self, now: Instant) -> Option<Duration> {
        let (first, last, _) = self.run?;
        (now.saturating_duration_since(last) < Self::QUIET).then(|| now.saturating_duration_since(first))
    }
}

/// A number in `[0, 1)`, random enough for jitter (std's per-process random hash keys).
fn unit_random() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish() >> 11;
    #[expect(clippy::cast_precision_loss, reason = "53 bits fit an f64 exactly")]
    let (x, scale) = (bits as f64, (1u64 << 53) as f64);
    x / scale
}

/// A kind this source watches, and how its objects become [`Update`]s.
trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static {
    /// The name in [`Update::ListStart`], [`Update::ListDone`], [`Update::Synced`] and in logs.
    const KIND: &'static str;
    /// One object of a (re)list.
    fn listed(object: Self) -> Update;
    fn apply(object: Self) -> Update;
    fn delete(object: Self) -> Update;
    fn stats(stats: &Stats) -> &KindStats;
    /// The object trimmed to what the agent reads.
    fn slim(self) -> Self {
        self
    }
}

impl Watched for Service {
    const KIND: &'static str = "Service";
    fn listed(object: Self) -> Update {
        Update::ListedService(Box::new(object))
    }
    fn apply(object: Self) -> Update {
        Update::ApplyService(Box::new(object))
    }
    fn delete(object: Self) -> Update {
        Update::DeleteService(Box::new(object))
    }
    fn stats(stats: &Stats) -> &KindStats {
        &stats.services
    }
    fn slim(self) -> Self {
        slim::service(self)
    }
}

impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlice";
    fn listed(object: Self) -> Update {
        Update::ListedSlice(Box::new(object))
    }
    fn apply(object: Self) -> Update {
        Update::ApplySlice(Box::new(object))
    }
    fn delete(object: Self) -> Update {
        Update::DeleteSlice(Box::new(object))
    }
    fn stats(stats: &Stats) -> &KindStats {
        &stats.slices
    }
    fn slim(self) -> Self {
        slim::slice(self)
    }
}

impl Watched for Node {
    const KIND: &'static str = "Node";
    /// The field selector matches one name, so the list has at most one object.
    fn listed(object: Self) -> Update {
        Update::ListedNode(Box::new(object))
    }
    fn apply(object: Self) -> Update {
        Update::Node(Some(Box::new(object)))
    }
    fn delete(_: Self) -> Update {
        Update::Node(None)
    }
    fn stats(stats: &Stats) -> &KindStats {
        &stats.node
    }
}

/// Turns one watcher's events into [`Update`]s, streaming its (re)lists (see the module
/// documentation), and counts the objects each list gave.
struct EventMapper<K> {
    listed: usize,
    kind: PhantomData<fn() -> K>,
}

impl<K> Default for EventMapper<K> {
    fn default() -> Self {
        Self { listed: 0, kind: PhantomData }
    }
}

/// What one event gives.
#[derive(Debug)]
struct Mapped {
    updates: Vec<Update>,
    /// `Some(object count)` when a list completed.
    synced: Option<usize>,
}

impl<K: Watched> EventMapper<K> {
    fn map(&mut self, event: Event<K>) -> Mapped {
        let (updates, synced) = match event {
            Event::Init => {
                // A list that failed half-way starts over with a new `Init`, and so a new
                // `ListStart`, which drops its partial objects.
                self.listed = 0;
                (vec![Update::ListStart(K::KIND)], None)
            }
            Event::InitApply(object) => {
                self.listed += 1;
                (vec![K::listed(object)], None)
            }
            Event::InitDone => (vec![Update::ListDone(K::KIND), Update::Synced(K::KIND)], Some(self.listed)),
            Event::Apply(object) => (vec![K::apply(object)], None),
            Event::Delete(object) => (vec![K::delete(object)], None),
        };
        Mapped { updates, synced }
    }
}

#[cfg(test)]
mod tests;
