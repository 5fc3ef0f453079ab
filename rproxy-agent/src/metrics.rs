//! Prometheus metrics on `--metrics-bind-address` (kube-proxy's flag and port, 10249): `/metrics`
//! in the `OpenMetrics` text format (prometheus-client).
//!
//! - kube-proxy's metrics where rproxy has the same thing, with kube-proxy's names, meanings and
//!   buckets: how long a sync (translate + map writes) takes, when the last one ran and was
//!   queued, Service and `EndpointSlice` changes seen and pending, and the network programming
//!   latency: from an `EndpointSlice`'s `endpoints.kubernetes.io/last-change-trigger-time`
//!   (when the change that caused it happened, as the `EndpointSlice` controller records it) to
//!   the end of the sync that programmed it.
//! - `rproxy_*`: the datapath's counters (read from the pinned `RPX_STATS` at each scrape, through
//!   the metrics server's own map handle: a scrape never waits for the agent's loop), map use
//!   against capacity, conntrack entries after the last GC pass, rejected objects and the
//!   Kubernetes watches' state.
//!
//! The agent's loop updates the metrics it owns (sync, GC, changes) as it goes; the server
//! reads them and the maps when scraped.
use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use http_body_util::Full;
use hyper::{
    Response, StatusCode,
    body::Bytes,
    header::{self, HeaderValue},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets, linear_buckets},
    },
    registry::Registry,
};
use rproxy_common::{
    SVC_F_CLUSTER_IP, SVC_F_EXTERNAL_IP, SVC_F_LOAD_BALANCER, SVC_F_NODE_PORT, ServiceStats, Stat, limits, map_names,
};
use tracing::warn;

use crate::{
    bpf::datapath::{MapSizes, stat_total},
    health::http::{Server, lock},
    model::Frontend,
    source::kube,
};

/// The annotation the `EndpointSlice` controller sets to when the change behind a slice's
/// update happened (kube-proxy's network programming latency starts there).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How the datapath's counters are reported: `rproxy_datapath_translations_total{event}`,
/// `rproxy_datapath_drops_total{reason}`, or `rproxy_datapath_events_total{event}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    /// A packet translated (or forwarded) by the datapath.
    Translation,
    /// A packet the datapath dropped, or answered with an ICMP error instead of forwarding.
    Drop,
    /// Anything else worth counting (fragments passed, ICMP errors sent, …).
    Other,
}

/// The kind of datapath counter `stat` is.
#[must_use]
pub fn stat_kind(stat: Stat) -> StatKind {
    match stat {
        Stat::NewFlow | Stat::Established | Stat::RevNat | Stat::Forwarded | Stat::IcmpRelated => StatKind::Translation,
        Stat::NoBackend
        | Stat::CtInsertFail
        | Stat::RewriteFail
        | Stat::SnatExhausted
        | Stat::FibFail
        | Stat::TtlExceeded
        | Stat::FragNeeded
        | Stat::SourceRangeDrop
        | Stat::CtClash => StatKind::Drop,
        Stat::BackendGone | Stat::Fragment | Stat::IcmpSent | Stat::TailCallFail | Stat::PortRemapped => {
            StatKind::Other
        }
    }
}

/// The metrics the agent's loop updates. Cheap to clone (every metric is shared).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `kubeproxy_sync_proxy_rules_duration_seconds`.
    pub sync_duration: Histogram,
    /// `kubeproxy_sync_full_proxy_rules_duration_seconds`: the first sync (every frontend
    /// compared).
    pub sync_full_duration: Histogram,
    /// `kubeproxy_sync_partial_proxy_rules_duration_seconds`: the later ones (the changes).
    pub sync_partial_duration: Histogram,
    /// `kubeproxy_sync_proxy_rules_last_timestamp_seconds`: the end of the last sync that wrote
    /// everything.
    pub sync_last: Gauge<f64, AtomicU64>,
    /// `kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds`: the last change that
    /// called for a sync.
    pub sync_last_queued: Gauge<f64, AtomicU64>,
    /// `kubeproxy_network_programming_duration_seconds`.
    pub network_programming: Histogram,
    /// `kubeproxy_sync_proxy_rules_endpoint_changes_total` and `_pending`.
    pub endpoint_changes: Counter,
    pub endpoint_changes_pending: Gauge,
    /// `kubeproxy_sync_proxy_rules_service_changes_total` and `_pending`.
    pub service_changes: Counter,
    pub service_changes_pending: Gauge,
    /// `rproxy_frontends`, `rproxy_backends`: programmed.
    pub frontends: Gauge,
    pub backends: Gauge,
    /// `rproxy_conntrack_entries{family}` after the last GC pass.
    pub conntrack_entries: Family<FamilyLabel, Gauge>,
    /// `rproxy_snat_ports_in_use{family}` and `rproxy_snat_ports_busiest_backend{family}` after
    /// the last GC pass; `rproxy_snat_port_range_size` (`--snat-port-range`).
    pub snat_ports: Family<FamilyLabel, Gauge>,
    pub snat_ports_busiest: Family<FamilyLabel, Gauge>,
    pub snat_range: Gauge,
    /// `rproxy_rejected_objects`: objects (or parts of them) rejected now.
    pub rejected_objects: Gauge,
    /// `rproxy_rejections_total{kind}`: rejections since start, by object kind.
    pub rejections: Family<KindLabel, Counter>,
    /// `rproxy_map_write_errors_total`.
    pub map_write_errors: Counter,
    /// `rproxy_conntrack_gc_duration_seconds`.
    pub gc_duration: Histogram,
    /// Who each per-Service counter (`rproxy_service_*`, by rev-NAT id) belongs to: set after
    /// every sync.
    pub service_labels: ServiceLabels,
    registry: Arc<Registry>,
}

/// The frontends whose datapath counters `/metrics` shows, with their rev-NAT ids, and the
/// counters (`RPX_SVC_STATS`, the metrics server's own handle).
#[derive(Clone, Debug, Default)]
pub struct ServiceLabels(Arc<Mutex<ServiceCounters>>);

#[derive(Default)]
struct ServiceCounters {
    shown: BTreeMap<Frontend, (u16, ServiceLabel)>,
    map: Option<PerCpuArray<MapData, ServiceStats>>,
}

impl fmt::Debug for ServiceCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServiceCounters({} frontends)", self.shown.len())
    }
}

impl ServiceLabels {
    /// Shows `fe` with rev-NAT id `id` (`Some`), or no longer (`None`): a removed frontend's
    /// counters are zeroed, so that the next frontend given its id starts from zero.
    pub fn update(&self, changes: impl IntoIterator<Item = (Frontend, Option<(u16, ServiceLabel)>)>) {
        let mut c = lock(&self.0);
        for (fe, label) in changes {
            let gone = match label {
                Some(l) => c.shown.insert(fe, l).filter(|(old, _)| c.shown.get(&fe).is_some_and(|(id, _)| id != old)),
                None => c.shown.remove(&fe),
            };
            if let (Some((id, _)), Some(map)) = (gone, c.map.as_mut()) {
                let zero = PerCpuValues::try_from(vec![ServiceStats::default(); map_cpus()]);
                if let Err(e) = zero
                    .map_err(|e| e.to_string())
                    .and_then(|z| map.set(u32::from(id), z, 0).map_err(|e| e.to_string()))
                {
                    warn!(rev_nat_id = id, error = %e, "zeroing a removed frontend's counters");
                }
            }
        }
    }
}

/// Possible CPUs, as per-CPU maps count them.
fn map_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

/// The labels of one frontend's counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabel {
    pub namespace: Arc<str>,
    pub service: Arc<str>,
    /// The Service port's name ("" if unnamed).
    pub port: String,
    /// `address:port/protocol`.
    pub frontend: String,
    /// `ClusterIP`, `NodePort`, `ExternalIP` or `LoadBalancer`.
    pub kind: &'static str,
}

impl ServiceLabel {
    /// The labels of `fe`, a frontend of `entry`.
    #[must_use]
    pub fn of(fe: Frontend, entry: &crate::model::ServiceEntry) -> Self {
        let kind = match entry.flags {
            f if f & SVC_F_CLUSTER_IP != 0 => "ClusterIP",
            f if f & SVC_F_NODE_PORT != 0 => "NodePort",
            f if f & SVC_F_EXTERNAL_IP != 0 => "ExternalIP",
            f if f & SVC_F_LOAD_BALANCER != 0 => "LoadBalancer",
            _ => "",
        };
        Self {
            namespace: entry.service.namespace.clone(),
            service: entry.service.name.clone(),
            port: entry.port_name.clone(),
            frontend: fe.to_string(),
            kind,
        }
    }
}

/// `family="ipv4"` or `"ipv6"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct FamilyLabel {
    pub family: &'static str,
}

/// `kind="Service"`, `"EndpointSlice"`, `"file"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

/// kube-proxy's sync latency buckets: 1 ms to 16 s, doubling.
fn sync_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

impl Metrics {
    /// The metrics, registered with the datapath counters of `stats` (the pinned `RPX_STATS`,
    /// opened by the caller) and the watches' state (`watches`, with a Kubernetes source).
    #[must_use]
    pub fn new(
        stats: Option<PerCpuArray<MapData, u64>>,
        svc_stats: Option<PerCpuArray<MapData, ServiceStats>>,
        watches: Option<Arc<kube::Stats>>,
        sizes: MapSizes,
    ) -> Self {
        let mut registry = Registry::default();
        // kube-proxy's network programming buckets: 0.25 s steps to 0.5 s, then 1 s to a minute,
        // 5 s to two minutes, 30 s to five.
        let network_programming = Histogram::new(
            linear_buckets(0.25, 0.25, 2)
                .chain(linear_buckets(1.0, 1.0, 59))
                .chain(linear_buckets(60.0, 5.0, 12))
                .chain(linear_buckets(120.0, 30.0, 7)),
        );
        let m = Self {
            sync_duration: sync_buckets(),
            sync_full_duration: sync_buckets(),
            sync_partial_duration: sync_buckets(),
            sync_last: Gauge::default(),
            sync_last_queued: Gauge::default(),
            network_programming,
            endpoint_changes: Counter::default(),
            endpoint_changes_pending: Gauge::default(),
            service_changes: Counter::default(),
            service_changes_pending: Gauge::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            conntrack_entries: Family::default(),
            snat_ports: Family::default(),
            snat_ports_busiest: Family::default(),
            snat_range: Gauge::default(),
            rejected_objects: Gauge::default(),
            rejections: Family::default(),
            map_write_errors: Counter::default(),
            gc_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            service_labels: ServiceLabels::default(),
            registry: Arc::new(Registry::default()),
        };
        register_kube_proxy(&mut registry, &m);
        register_rproxy(&mut registry, &m);
        let r = &mut registry;
        r.register_collector(Box::new(Capacities(sizes)));
        if let Some(stats) = stats {
            r.register_collector(Box::new(DatapathCounters { stats: Mutex::new(stats) }));
        }
        if let Some(map) = svc_stats {
            lock(&m.service_labels.0).map = Some(map);
            r.register_collector(Box::new(m.service_labels.clone()));
        }
        if let Some(watches) = watches {
            r.register_collector(Box::new(Watches(watches)));
        }
        Self { registry: Arc::new(registry), ..m }
    }

    /// The `OpenMetrics` text of every metric.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector's error leaves what was written.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The answer to a request for `path`: the metrics on `/metrics`, 404 elsewhere.
    #[must_use]
    pub fn answer(&self, path: &str) -> Response<Full<Bytes>> {
        if path == "/frontends" {
            let mut resp = Response::new(Full::new(Bytes::from(self.frontends_json())));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return resp;
        }
        if path != "/metrics" {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"404 page not found\n")));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            return resp;
        }
        let mut resp = Response::new(Full::new(Bytes::from(self.encode())));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        );
        resp
    }
}

/// One frontend the agent has programmed, as `/frontends` lists it (for `explain` and operators).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendName {
    /// `address:port/PROTO`.
    pub frontend: String,
    pub namespace: String,
    pub service: String,
    /// The Service port's name ("" if unnamed).
    pub port: String,
    pub kind: String,
    pub rev_nat_id: u16,
}

impl Metrics {
    /// `/frontends`: every frontend programmed, with its Service, port name and rev-NAT id.
    #[must_use]
    pub fn frontends_json(&self) -> String {
        let list: Vec<FrontendName> = lock(&self.service_labels.0)
            .shown
            .values()
            .map(|(id, l)| FrontendName {
                frontend: l.frontend.clone(),
                namespace: l.namespace.to_string(),
                service: l.service.to_string(),
                port: l.port.clone(),
                kind: l.kind.to_owned(),
                rev_nat_id: *id,
            })
            .collect();
        serde_json::to_string(&list).unwrap_or_else(|_| "[]".into())
    }
}

/// kube-proxy's metrics, with its names.
fn register_kube_proxy(r: &mut Registry, m: &Metrics) {
    let kp = "kubeproxy_";
    r.register(
        format!("{kp}sync_proxy_rules_duration_seconds"),
        "SyncProxyRules latency in seconds (translation and map writes)",
        m.sync_duration.clone(),
    );
    r.register(
        format!("{kp}sync_full_proxy_rules_duration_seconds"),
        "SyncProxyRules latency in seconds for full resyncs",
        m.sync_full_duration.clone(),
    );
    r.register(
        format!("{kp}sync_partial_proxy_rules_duration_seconds"),
        "SyncProxyRules latency in seconds for partial resyncs",
        m.sync_partial_duration.clone(),
    );
    r.register(
        format!("{kp}sync_proxy_rules_last_timestamp_seconds"),
        "The last time proxy rules were successfully synced",
        m.sync_last.clone(),
    );
    r.register(
        format!("{kp}sync_proxy_rules_last_queued_timestamp_seconds"),
        "The last time a sync of proxy rules was queued",
        m.sync_last_queued.clone(),
    );
    r.register(
        format!("{kp}network_programming_duration_seconds"),
        "In Cluster Network Programming Latency in seconds",
        m.network_programming.clone(),
    );
    // Counters get their `_total` suffix from the encoder.
    r.register(
        format!("{kp}sync_proxy_rules_endpoint_changes"),
        "Cumulative proxy rules Endpoint changes",
        m.endpoint_changes.clone(),
    );
    r.register(
        format!("{kp}sync_proxy_rules_endpoint_changes_pending"),
        "Pending proxy rules Endpoint changes",
        m.endpoint_changes_pending.clone(),
    );
    r.register(
        format!("{kp}sync_proxy_rules_service_changes"),
        "Cumulative proxy rules Service changes",
        m.service_changes.clone(),
    );
    r.register(
        format!("{kp}sync_proxy_rules_service_changes_pending"),
        "Pending proxy rules Service changes",
        m.service_changes_pending.clone(),
    );
}

/// rproxy's own metrics that the agent updates.
fn register_rproxy(r: &mut Registry, m: &Metrics) {
    r.register("rproxy_frontends", "Frontends programmed (address, port, protocol)", m.frontends.clone());
    r.register("rproxy_backends", "Backends programmed (address, port, protocol)", m.backends.clone());
    r.register(
        "rproxy_conntrack_entries",
        "Conntrack entries left after the last GC pass (two per translated flow)",
        m.conntrack_entries.clone(),
    );
    r.register(
        "rproxy_snat_ports_in_use",
        "SNAT ports held by north-south flows to backends on other nodes, after the last GC pass",
        m.snat_ports.clone(),
    );
    r.register(
        "rproxy_snat_ports_busiest_backend",
        "SNAT ports held towards the one backend that holds most (at most the range's size)",
        m.snat_ports_busiest.clone(),
    );
    r.register("rproxy_snat_port_range_size", "Ports in --snat-port-range", m.snat_range.clone());
    r.register("rproxy_rejected_objects", "Objects or parts of objects rejected now", m.rejected_objects.clone());
    r.register("rproxy_rejections", "Rejections since start, by object kind", m.rejections.clone());
    r.register(
        "rproxy_map_write_errors",
        "Map writes that failed (retried until they succeed)",
        m.map_write_errors.clone(),
    );
    r.register("rproxy_conntrack_gc_duration_seconds", "Conntrack GC pass duration", m.gc_duration.clone());
}

/// Seconds since the Unix epoch of `t`, for the timestamp gauges.
#[must_use]
pub fn unix_seconds(t: jiff::Timestamp) -> f64 {
    t.as_duration().as_secs_f64()
}

/// The map capacities the use gauges compare with (`rproxy_map_capacity{map}`: services and
/// backends as `--service-map-max` and `--backend-map-max` sized them, and
/// `{map="conntrack",family}` as `--ct-max` and `--ct-max-ipv6` did).
#[derive(Debug)]
struct Capacities(MapSizes);

impl Collector for Capacities {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "rproxy_map_capacity",
            "Entries each map can hold (per family for the conntrack tables)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (map, cap) in [
            ("services", self.0.services),
            ("backends", self.0.backends - 1),
            ("affinity", limits::AFFINITY_MAX),
            ("routes", limits::ROUTES_MAX),
        ] {
            ConstGauge::new(i64::from(cap)).encode(family.encode_family(&[("map", map)])?)?;
        }
        for (fam, cap) in [("ipv4", self.0.ct4), ("ipv6", self.0.ct6)] {
            ConstGauge::new(i64::from(cap)).encode(family.encode_family(&[("map", "conntrack"), ("family", fam)])?)?;
        }
        Ok(())
    }
}

/// The datapath's counters, summed over CPUs, at each scrape.
struct DatapathCounters {
    stats: Mutex<PerCpuArray<MapData, u64>>,
}

impl fmt::Debug for DatapathCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatapathCounters")
    }
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let totals: Vec<(Stat, u64)> = {
            let stats = lock(&self.stats);
            Stat::ALL.iter().map(|s| (*s, stat_total(&stats, *s))).collect()
        };
        for (kind, name, label, help) in [
            (
                StatKind::Translation,
                "rproxy_datapath_translations",
                "event",
                "Packets the datapath translated or forwarded, by counter",
            ),
            (
                StatKind::Drop,
                "rproxy_datapath_drops",
                "reason",
                "Packets the datapath dropped (or answered with an ICMP error), by reason",
            ),
            (StatKind::Other, "rproxy_datapath_events", "event", "Other datapath events, by counter"),
        ] {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (stat, total) in totals.iter().filter(|(s, _)| stat_kind(*s) == kind) {
                ConstCounter::new(*total).encode(family.encode_family(&[(label, stat.name())])?)?;
            }
        }
        Ok(())
    }
}

/// A per-Service metric: name, help, and its value in the counters.
type ServiceMetric = (&'static str, &'static str, fn(&ServiceStats) -> u64);

/// Each frontend's datapath counters (`RPX_SVC_STATS`), summed over CPUs, at each scrape.
impl Collector for ServiceLabels {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let rows: Vec<(ServiceLabel, ServiceStats)> = {
            let c = lock(&self.0);
            let Some(map) = c.map.as_ref() else { return Ok(()) };
            c.shown
                .values()
                .filter_map(|(id, label)| {
                    // An id beyond the map (`--service-counters=false`) counts nothing.
                    let per_cpu = map.get(&u32::from(*id), 0).ok()?;
                    let total = per_cpu.iter().fold(ServiceStats::default(), |t, s| ServiceStats {
                        packets: t.packets + s.packets,
                        bytes: t.bytes + s.bytes,
                        new_flows: t.new_flows + s.new_flows,
                    });
                    Some((label.clone(), total))
                })
                .collect()
        };
        let metrics: [ServiceMetric; 3] = [
            ("rproxy_service_packets", "Packets the datapath translated for this frontend (both directions)", |s| {
                s.packets
            }),
            ("rproxy_service_bytes", "Bytes (IP packets, headers included) of those packets", |s| s.bytes),
            ("rproxy_service_new_flows", "Flows the datapath opened to this frontend's backends", |s| s.new_flows),
        ];
        for (name, help, value) in metrics {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (l, stats) in &rows {
                let labels = [
                    ("namespace", &*l.namespace),
                    ("service", &*l.service),
                    ("port", l.port.as_str()),
                    ("frontend", l.frontend.as_str()),
                    ("kind", l.kind),
                ];
                ConstCounter::new(value(stats)).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The Kubernetes watches' state.
#[derive(Debug)]
struct Watches(Arc<kube::Stats>);

impl Collector for Watches {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let kinds = [("Service", &self.0.services), ("EndpointSlice", &self.0.slices), ("Node", &self.0.node)];
        let mut synced = encoder.encode_descriptor(
            "rproxy_watch_synced",
            "Whether the watch of this kind has its initial list (1) or not (0)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, stats) in kinds {
            ConstGauge::new(i64::from(stats.synced())).encode(synced.encode_family(&[("kind", kind)])?)?;
        }
        let mut errors = encoder.encode_descriptor(
            "rproxy_watch_errors",
            "Watch errors by kind (each followed by a retry)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, stats) in kinds {
            ConstCounter::new(stats.errors()).encode(errors.encode_family(&[("kind", kind)])?)?;
        }
        let mut relists = encoder.encode_descriptor(
            "rproxy_watch_relists",
            "Complete relists by kind (the first list included)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (kind, stats) in kinds {
            ConstCounter::new(stats.relists()).encode(relists.encode_family(&[("kind", kind)])?)?;
        }
        Ok(())
    }
}

/// Opens the pinned counters in `bpffs` for the metrics server (its own handle).
#[must_use]
pub fn open_stats(bpffs: &Path) -> Option<PerCpuArray<MapData, u64>> {
    open_per_cpu(bpffs, map_names::STATS)
}

/// Opens the pinned per-Service counters in `bpffs` for the metrics server (its own handle);
/// `None` from an eBPF object without them (`--ebpf-object` of an older build).
#[must_use]
pub fn open_service_stats(bpffs: &Path) -> Option<PerCpuArray<MapData, ServiceStats>> {
    open_per_cpu(bpffs, map_names::SVC_STATS)
}

fn open_per_cpu<V: aya::Pod>(bpffs: &Path, name: &str) -> Option<PerCpuArray<MapData, V>> {
    let path = bpffs.join(name);
    let opened = MapData::from_pin(&path)
        .map_err(|e| e.to_string())
        .and_then(|data| PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|e| e.to_string()));
    match opened {
        Ok(stats) => Some(stats),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "these datapath counters are not in /metrics");
            None
        }
    }
}

/// The `/metrics` server (`--metrics-bind-address`), opened like the health server: retried on
/// every rescan until its port binds.
pub struct MetricsServer(Server);

impl MetricsServer {
    /// `addr` `None`: disabled.
    #[must_use]
    pub fn new(addr: Option<SocketAddr>, metrics: Metrics) -> Self {
        Self(Server::new("metrics (/metrics)", addr, Arc::new(move |path: &str| metrics.answer(path))))
    }

    /// Opens the port if it is not open yet.
    pub fn ensure(&mut self) {
        self.0.ensure();
    }
}

/// Records a sync of `elapsed`: the full (first) one or a partial one; the time it ended
/// (`now`) when it wrote everything (`complete`).
pub fn observe_sync(m: &Metrics, elapsed: Duration, full: bool, complete: bool, now: jiff::Timestamp) {
    let secs = elapsed.as_secs_f64();
    m.sync_duration.observe(secs);
    if full { &m.sync_full_duration } else { &m.sync_partial_duration }.observe(secs);
    if complete {
        m.sync_last.set(unix_seconds(now));
        m.endpoint_changes_pending.set(0);
        m.service_changes_pending.set(0);
    }
}

/// Adds `n` changes to a change counter and its pending gauge.
pub fn count_changes(total: &Counter, pending: &Gauge, n: u64) {
    total.inc_by(n);
    pending.inc_by(i64::try_from(n).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text holds kube-proxy's names (counters with `_total`), the histograms' buckets,
    /// the capacities, and no datapath families without a map.
    #[test]
    fn kube_proxy_names_and_rproxy_gauges_are_encoded() {
        let m = Metrics::new(
            None,
            None,
            None,
            MapSizes { ct4: 524_288, ct6: 4096, services: 524_288, backends: 262_144, svc_stats: 65_536 },
        );
        observe_sync(&m, Duration::from_millis(3), true, true, jiff::Timestamp::from_second(1_700_000_000).unwrap());
        count_changes(&m.endpoint_changes, &m.endpoint_changes_pending, 1);
        count_changes(&m.service_changes, &m.service_changes_pending, 1);
        m.network_programming.observe(0.3);
        m.conntrack_entries.get_or_create(&FamilyLabel { family: "ipv6" }).set(42);
        m.rejections.get_or_create(&KindLabel { kind: "Service" }).inc();
        let text = m.encode();
        for want in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.004\"} 1",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1700000000.0",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 1",
            "kubeproxy_sync_proxy_rules_service_changes_total 1",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 1",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"0.25\"} 0",
            "rproxy_conntrack_entries{family=\"ipv6\"} 42",
            "rproxy_rejections_total{kind=\"Service\"} 1",
            "rproxy_map_capacity{map=\"conntrack\",family=\"ipv4\"} 524288",
            "rproxy_map_capacity{map=\"conntrack\",family=\"ipv6\"} 4096",
            "rproxy_map_capacity{map=\"services\"} 524288",
            "rproxy_map_capacity{map=\"backends\"} 262143",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert!(!text.contains("rproxy_datapath_"), "no counters without a map:\n{text}");
        let resp = m.answer("/metrics");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()[header::CONTENT_TYPE].to_str().unwrap().starts_with("application/openmetrics-text"));
        assert_eq!(m.answer("/").status(), StatusCode::NOT_FOUND);
    }

    /// Every datapath counter has a kind, and the drops are the ones the datapath documents as
    /// dropped (or answered with an ICMP error instead of being forwarded).
    #[test]
    fn every_stat_has_a_kind() {
        let drops: Vec<&str> =
            Stat::ALL.iter().filter(|s| stat_kind(**s) == StatKind::Drop).map(|s| s.name()).collect();
        assert_eq!(
            drops,
            [
                "no_backend",
                "ct_insert_fail",
                "rewrite_fail",
                "snat_exhausted",
                "fib_fail",
                "ttl_exceeded",
                "frag_needed",
                "src_range_drop",
                "ct_clash"
            ]
        );
    }
}
