//! The desired state: what the BPF maps must hold, computed from Kubernetes objects by pure
//! functions (no I/O), so it is table-tested without a kernel.
use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

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

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A service frontend: the address a client sends to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// A backend address: one endpoint address and target port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Endpoint condition as the datapath needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackendState {
    /// Ready (or published because of publishNotReadyAddresses): takes new connections.
    Active,
    /// Serving but terminating: takes new connections only when no endpoint is ready
    /// (kube-proxy's fallback), and keeps its existing connections in every case.
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
    /// `rproxy_common::SVC_F_*` bits.
    pub flags: u16,
    /// `ClientIP` affinity timeout in seconds, 0 if none.
    pub affinity_timeout: u32,
    /// Backends that take new connections, sorted, without duplicates: they fill slots
    /// `1..=len`. Ready endpoints if any; otherwise serving+terminating ones.
    pub slots: Vec<Backend>,
    /// Backends kept in the backend map only so that existing connections to them keep working
    /// (terminating endpoints not in `slots`). Sorted, without duplicates, disjoint from `slots`.
    pub draining: Vec<Backend>,
}

/// A Service's health check node port (`externalTrafficPolicy: Local` `LoadBalancer` Services):
/// what it must answer on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub node_port: u16,
    /// Ready endpoints of the Service on this node (the count kube-proxy reports); 0 means the
    /// node answers 503.
    pub local_endpoints: usize,
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
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}
