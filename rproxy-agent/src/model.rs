//! The desired state: what the BPF maps must hold, computed from Kubernetes objects by pure
//! functions (no I/O), so it is table-tested without a kernel.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use ipnet::IpNet;

/// L4 protocol of a service port. SCTP is refused by the translation for now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as in the map keys.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => rproxy_common::proto::TCP,
            Self::Udp => rproxy_common::proto::UDP,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// An address family. The maps come in one set per family; frontends and backends of one
/// family only ever meet (a Service's IPv6 frontends get its IPv6 endpoints).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    #[must_use]
    pub fn of(addr: IpAddr) -> Self {
        if addr.is_ipv6() { Self::V6 } else { Self::V4 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

/// Rebuilds `map` from its sorted entries. Filled in ascending key order, as the agent's first
/// sync fills its large maps, a B-tree's nodes stay little more than half full (each split
/// leaves the left node for good); rebuilt in bulk they are full, which at 30,000 Services and
/// 300,000 backends is some 15 MB less. Worth it only for a map that was built from empty.
pub fn pack<K: Ord, V>(map: &mut BTreeMap<K, V>) {
    *map = std::mem::take(map).into_iter().collect();
}

/// `namespace/name` of a Kubernetes object.
///
/// Shared strings: the store, the translation, the writer and the metrics each keep the
/// references of what they hold (a Service's appears some eight times, a slice's twice), and a
/// clone costs no allocation (at 30,000 Services, some 20 MB less than two `String`s a copy).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service frontend: the address a client sends to, of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.proto)
    }
}

/// A backend address: one endpoint address and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.addr, self.port), self.proto)
    }
}

/// Endpoint condition as the datapath needs it. A property of the endpoint, the same in every
/// entry that lists it (the backend map holds one value per backend address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready (or published because of publishNotReadyAddresses): takes new connections.
    Active,
    /// Not ready and terminating (serving or not): takes new connections only as kube-proxy's
    /// fallback when no endpoint is ready (then it is serving), and keeps its existing
    /// connections in every case.
    Terminating,
}

/// One backend of one service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: BackendAddr,
    pub state: BackendState,
    /// The endpoint's nodeName is this node.
    pub local: bool,
}

/// What one frontend must translate to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// The Service this frontend belongs to, and its port name ("" if unnamed).
    pub service: ObjectRef,
    pub port_name: String,
    /// `rproxy_common::SVC_F_*` bits: the kind of frontend (`SVC_F_CLUSTER_IP`,
    /// `SVC_F_EXTERNAL_IP`, `SVC_F_LOAD_BALANCER` or `SVC_F_NODE_PORT`, exactly one) and its
    /// policies (`SVC_F_ITP_LOCAL` on cluster IPs, with `SVC_F_NO_LOCAL_ENDPOINTS` when no local
    /// endpoint but others exist; `SVC_F_ETP_LOCAL` on the others; `SVC_F_AFFINITY`).
    pub flags: u16,
    /// `ClientIP` affinity timeout in seconds, 0 if none.
    pub affinity_timeout: u32,
    /// Backends that take new connections from pods (east-west), sorted, without duplicates:
    /// they fill slots `1..=len`. kube-proxy's endpoints for this traffic: the Service's
    /// cluster endpoints (ready ones if any, else serving+terminating ones), or with
    /// `SVC_F_ITP_LOCAL` its local endpoints (the same on this node only).
    pub slots: Vec<Backend>,
    /// Only with `SVC_F_ETP_LOCAL` (else empty): the backends that take new connections from
    /// outside the cluster (north-south), kube-proxy's local endpoints: local ready ones if any,
    /// else local serving+terminating ones. Sorted, without duplicates, a subset of
    /// `slots` ∪ `draining` (so the backend map already holds them). Not the same as the local
    /// backends of `slots` when remote endpoints are ready and local ones only terminating.
    pub local_slots: Vec<Backend>,
    /// Backends kept in the backend map only so that existing connections to them keep working
    /// (terminating endpoints not in `slots`). Sorted, without duplicates, disjoint from `slots`.
    pub draining: Vec<Backend>,
    /// Only with `SVC_F_SOURCE_RANGE` (else empty): the sources that may open new flows, the
    /// Service's `loadBalancerSourceRanges` of the frontend's family (host bits cleared), sorted,
    /// without duplicates. Empty with the flag: none may.
    pub source_ranges: Vec<IpNet>,
}

/// A Service's health check node port (`externalTrafficPolicy: Local` `LoadBalancer` Services):
/// what it must answer on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// The count kube-proxy's health check server reports: distinct addresses of the Service's
    /// ready endpoints on this node, over all its (translated) ports. publishNotReadyAddresses
    /// makes every endpoint ready; terminating ones are not counted, so that a node left with
    /// only terminating endpoints fails the check. 0 means the node answers 503.
    pub local_endpoints: usize,
}

/// What the translation needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name: endpoints whose `nodeName` matches are local ([`Backend::local`]).
    pub name: String,
    /// The addresses `NodePort`s answer on (the addresses of `--devices`, filtered by
    /// `--nodeport-addresses`), sorted, without duplicates. Empty: no `NodePort` frontend.
    pub addresses: Vec<IpAddr>,
    /// This node's zone, its Node's `topology.kubernetes.io/zone` label: endpoints whose zone
    /// hints name it are preferred (`trafficDistribution`, topology-aware routing). `None`
    /// without a Node object or label: zone hints are ignored, as kube-proxy does.
    pub zone: Option<String>,
}

impl NodeContext {
    /// A node without `NodePort` addresses or zone.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self { name: name.to_owned(), addresses: Vec::new(), zone: None }
    }
}

/// Everything the maps must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub services: BTreeMap<Frontend, ServiceEntry>,
    /// Services with a `healthCheckNodePort`.
    pub health_checks: BTreeMap<ObjectRef, HealthCheck>,
}

/// An object (or part of one) that was rejected or skipped, and why. Logged with the object's
/// kind and name; never stops the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `"Service"`, `"EndpointSlice"`, or for a file-level error "file".
    pub kind: &'static str,
    /// `namespace/name`, or the file path for a file-level error.
    pub object: String,
    pub reason: String,
    /// A state that normally passes by itself within seconds (a slice seen before its Service,
    /// or after it was deleted): logged at debug, and warned about only if it lasts.
    pub transient: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}
