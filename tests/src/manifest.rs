//! Kubernetes manifests for the agent: v1 Service and discovery.k8s.io/v1 `EndpointSlice`, rendered
//! as the YAML `kubectl apply` accepts (the `Display` impls), and written atomically.
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result};

/// L4 protocol of a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
        })
    }
}

/// A Service port's `targetPort`: a number, or the name of the backends' port (resolved through
/// the `EndpointSlices`' port names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

impl From<u16> for TargetPort {
    fn from(port: u16) -> Self {
        Self::Number(port)
    }
}

impl fmt::Display for TargetPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(port) => write!(f, "{port}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// One port of a Service.
#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
}

/// A `type: ClusterIP` Service without selector (its `EndpointSlices` are written by hand).
#[derive(Clone, Debug)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_header(f, "v1", "Service", &self.namespace, &self.name)?;
        writeln!(f, "spec:")?;
        writeln!(f, "  type: ClusterIP")?;
        writeln!(f, "  clusterIP: {}", self.cluster_ip)?;
        writeln!(f, "  clusterIPs:\n  - {}", self.cluster_ip)?;
        writeln!(f, "  ipFamilies:\n  - IPv4")?;
        write_service_ports(f, self.ports.iter().map(|p| (p, None)))
    }
}

/// A dual-stack `type: ClusterIP` Service without selector: a cluster IP per family, the first
/// one's family primary (`ipFamilyPolicy: RequireDualStack` with two).
#[derive(Clone, Debug)]
pub struct DualStackService {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

impl fmt::Display for DualStackService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = |ip: &IpAddr| if ip.is_ipv6() { "IPv6" } else { "IPv4" };
        write_header(f, "v1", "Service", &self.namespace, &self.name)?;
        writeln!(f, "spec:")?;
        writeln!(f, "  type: ClusterIP")?;
        if let Some(first) = self.cluster_ips.first() {
            writeln!(f, "  clusterIP: {first}")?;
        }
        writeln!(f, "  clusterIPs:")?;
        for ip in &self.cluster_ips {
            writeln!(f, "  - {ip}")?;
        }
        writeln!(f, "  ipFamilies:")?;
        for ip in &self.cluster_ips {
            writeln!(f, "  - {}", family(ip))?;
        }
        let policy = if self.cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" };
        writeln!(f, "  ipFamilyPolicy: {policy}")?;
        write_service_ports(f, self.ports.iter().map(|p| (p, None)))
    }
}

/// One port of a [`NodePortService`]: a Service port and its fixed `nodePort`.
#[derive(Clone, Debug)]
pub struct NodePortServicePort {
    pub port: ServicePort,
    pub node_port: u16,
}

/// A `type: NodePort` Service without selector, with `externalTrafficPolicy: Cluster` (backends
/// on every node, external traffic masqueraded to the node's address when forwarded).
#[derive(Clone, Debug)]
pub struct NodePortService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<NodePortServicePort>,
}

impl fmt::Display for NodePortService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_header(f, "v1", "Service", &self.namespace, &self.name)?;
        writeln!(f, "spec:")?;
        writeln!(f, "  type: NodePort")?;
        writeln!(f, "  clusterIP: {}", self.cluster_ip)?;
        writeln!(f, "  clusterIPs:\n  - {}", self.cluster_ip)?;
        writeln!(f, "  ipFamilies:\n  - IPv4")?;
        writeln!(f, "  externalTrafficPolicy: Cluster")?;
        write_service_ports(f, self.ports.iter().map(|p| (&p.port, Some(p.node_port))))
    }
}

/// A `type: ExternalName` Service: a DNS alias, with no `ClusterIP` and nothing to translate.
#[derive(Clone, Debug)]
pub struct ExternalNameService {
    pub namespace: String,
    pub name: String,
    pub external_name: String,
    pub ports: Vec<ServicePort>,
}

impl ExternalNameService {
    /// `service` turned into an `ExternalName` Service for `external_name`: same name and ports,
    /// the `ClusterIP` dropped (what `kubectl edit` of the type requires).
    #[must_use]
    pub fn from_service(service: &Service, external_name: &str) -> Self {
        Self {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
            external_name: external_name.to_owned(),
            ports: service.ports.clone(),
        }
    }
}

impl fmt::Display for ExternalNameService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_header(f, "v1", "Service", &self.namespace, &self.name)?;
        writeln!(f, "spec:")?;
        writeln!(f, "  type: ExternalName")?;
        writeln!(f, "  externalName: {}", self.external_name)?;
        write_service_ports(f, self.ports.iter().map(|p| (p, None)))
    }
}

/// The `ports:` list; each port with its `nodePort` if it has one.
fn write_service_ports<'a>(
    f: &mut fmt::Formatter<'_>,
    ports: impl ExactSizeIterator<Item = (&'a ServicePort, Option<u16>)>,
) -> fmt::Result {
    writeln!(f, "  ports:{}", if ports.len() == 0 { " []" } else { "" })?;
    for (p, node_port) in ports {
        writeln!(f, "  - name: {}", p.name)?;
        writeln!(f, "    protocol: {}", p.protocol)?;
        writeln!(f, "    port: {}", p.port)?;
        writeln!(f, "    targetPort: {}", p.target_port)?;
        if let Some(node_port) = node_port {
            writeln!(f, "    nodePort: {node_port}")?;
        }
    }
    Ok(())
}

/// One endpoint (one address) of an `EndpointSlice`.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: IpAddr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: String,
    /// Topology hints: `hints.forNodes[].name` (none when empty).
    pub for_nodes: Vec<String>,
}

impl Endpoint {
    /// A ready, serving, not terminating endpoint on `node_name`.
    #[must_use]
    pub fn ready(address: impl Into<IpAddr>, node_name: &str) -> Self {
        Self {
            address: address.into(),
            ready: true,
            serving: true,
            terminating: false,
            node_name: node_name.to_owned(),
            for_nodes: Vec::new(),
        }
    }
}

/// One port of an `EndpointSlice` (the backends' port).
#[derive(Clone, Debug)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An `EndpointSlice` of Service `service_name`: `addressType` IPv6 if its first endpoint's
/// address is, else IPv4 (a slice holds one family).
#[derive(Clone, Debug)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service_name: String,
    pub endpoints: Vec<Endpoint>,
    pub ports: Vec<EndpointPort>,
}

impl fmt::Display for EndpointSlice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_header(f, "discovery.k8s.io/v1", "EndpointSlice", &self.namespace, &self.name)?;
        writeln!(f, "  labels:\n    kubernetes.io/service-name: {}", self.service_name)?;
        let v6 = self.endpoints.first().is_some_and(|e| e.address.is_ipv6());
        writeln!(f, "addressType: {}", if v6 { "IPv6" } else { "IPv4" })?;
        writeln!(f, "endpoints:{}", if self.endpoints.is_empty() { " []" } else { "" })?;
        for e in &self.endpoints {
            writeln!(f, "- addresses:\n  - {}", e.address)?;
            writeln!(f, "  conditions:")?;
            writeln!(f, "    ready: {}", e.ready)?;
            writeln!(f, "    serving: {}", e.serving)?;
            writeln!(f, "    terminating: {}", e.terminating)?;
            writeln!(f, "  nodeName: {}", e.node_name)?;
            if !e.for_nodes.is_empty() {
                writeln!(f, "  hints:\n    forNodes:")?;
                for node in &e.for_nodes {
                    writeln!(f, "    - name: {node}")?;
                }
            }
        }
        writeln!(f, "ports:{}", if self.ports.is_empty() { " []" } else { "" })?;
        for p in &self.ports {
            writeln!(f, "- name: {}", p.name)?;
            writeln!(f, "  protocol: {}", p.protocol)?;
            writeln!(f, "  port: {}", p.port)?;
        }
        Ok(())
    }
}

fn write_header(f: &mut fmt::Formatter<'_>, api_version: &str, kind: &str, namespace: &str, name: &str) -> fmt::Result {
    writeln!(f, "apiVersion: {api_version}")?;
    writeln!(f, "kind: {kind}")?;
    writeln!(f, "metadata:\n  name: {name}\n  namespace: {namespace}")
}

/// Joins YAML documents into one multi-document file.
#[must_use]
pub fn multi_document(docs: &[&dyn fmt::Display]) -> String {
    let docs: Vec<String> = docs.iter().map(ToString::to_string).collect();
    format!("---\n{}", docs.join("---\n"))
}

/// Writes `contents` to `path` atomically: to a hidden temp name (`.<name>.<pid>-<n>.tmp`, which
/// does not end in `.yaml`) in the same directory, then renamed over `path`.
pub fn write_atomic(path: &Path, contents: &str) -> Result<()> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let name = path.file_name().context("manifest path has no file name")?.to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}-{n}.tmp", std::process::id()));
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename to {}", path.display()))
}
