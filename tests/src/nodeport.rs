//! The `NodePort` scenario on the two-node [`Cluster`], shared by the cluster tests and
//! `cargo xtask bench-nodeport`: Service `default/nodeport` (`type: NodePort`,
//! `externalTrafficPolicy: Cluster`), port 80 over TCP and UDP on node port [`NODE_PORT`] →
//! port [`TARGET_PORT`] of backends on both nodes.
//!
//! The benchmark adds a second Service, `default/nodeport-remote` on node port
//! [`REMOTE_NODE_PORT`], whose backends are node 2's only: through node 1 every packet of it is
//! forwarded to the other node (DNAT, SNAT, out of `eth0`), the path its forwarding measurement
//! isolates.
use std::{net::Ipv4Addr, path::Path};

use anyhow::{Result, ensure};

use crate::{
    cluster::{Cluster, NodeId},
    kube_proxy::{self, Frontend},
    manifest::{
        Endpoint, EndpointPort, EndpointSlice, NodePortService, NodePortServicePort, Protocol, ServicePort,
        multi_document, write_atomic,
    },
};

/// Kubernetes namespace of the objects.
pub const NAMESPACE: &str = "default";
/// The Service's name.
pub const SERVICE_NAME: &str = "nodeport";
/// The Service's `ClusterIP`.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The Service's port (TCP and UDP).
pub const PORT: u16 = 80;
/// The node port (TCP and UDP).
pub const NODE_PORT: u16 = 30080;
/// The backends' port (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;

/// The remote-only Service's name.
pub const REMOTE_SERVICE_NAME: &str = "nodeport-remote";
/// The remote-only Service's `ClusterIP`.
pub const REMOTE_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// The remote-only Service's node port (TCP and UDP).
pub const REMOTE_NODE_PORT: u16 = 30081;

/// The Service's ports: (name, protocol).
const PORTS: [(&str, Protocol); 2] = [("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];

/// A backend pod of the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Pod name, `backend-<node>-<i>` (what its servers announce).
    pub name: String,
    pub node: NodeId,
    pub ip: Ipv4Addr,
}

/// `per_node` backends on each node: `backend-1-1`.. at 10.244.1.11.., `backend-2-1`.. at
/// 10.244.2.11.. (at most 200 per node).
#[must_use]
pub fn backends(per_node: u8) -> Vec<Backend> {
    NodeId::ALL
        .into_iter()
        .flat_map(|node| {
            (1..=per_node.min(200)).map(move |i| Backend {
                name: format!("backend-{}-{i}", node.number()),
                node,
                ip: node.pod_ip(10 + i),
            })
        })
        .collect()
}

/// The Service.
#[must_use]
pub fn service() -> NodePortService {
    service_named(SERVICE_NAME, CLUSTER_IP, NODE_PORT)
}

/// The Service's `EndpointSlice`: every backend ready, with its `nodeName`.
#[must_use]
pub fn endpoint_slice(backends: &[Backend]) -> EndpointSlice {
    slice_of(SERVICE_NAME, backends.iter())
}

/// The remote-only Service (see the module doc).
#[must_use]
pub fn remote_service() -> NodePortService {
    service_named(REMOTE_SERVICE_NAME, REMOTE_CLUSTER_IP, REMOTE_NODE_PORT)
}

/// The remote-only Service's `EndpointSlice`: node 2's backends of `backends`.
#[must_use]
pub fn remote_endpoint_slice(backends: &[Backend]) -> EndpointSlice {
    slice_of(REMOTE_SERVICE_NAME, backends.iter().filter(|b| b.node == NodeId::TWO))
}

fn service_named(name: &str, cluster_ip: Ipv4Addr, node_port: u16) -> NodePortService {
    NodePortService {
        namespace: NAMESPACE.into(),
        name: name.into(),
        cluster_ip,
        ports: PORTS
            .iter()
            .map(|&(port_name, protocol)| NodePortServicePort {
                port: ServicePort { name: port_name.into(), protocol, port: PORT, target_port: TARGET_PORT.into() },
                node_port,
            })
            .collect(),
    }
}

fn slice_of<'a>(service: &str, backends: impl Iterator<Item = &'a Backend>) -> EndpointSlice {
    EndpointSlice {
        namespace: NAMESPACE.into(),
        name: format!("{service}-1"),
        service_name: service.into(),
        endpoints: backends.map(|b| Endpoint::ready(b.ip, &b.node.k8s_name())).collect(),
        ports: PORTS
            .iter()
            .map(|&(name, protocol)| EndpointPort { name: name.into(), protocol, port: TARGET_PORT })
            .collect(),
    }
}

/// Service + `EndpointSlice` as one multi-document file.
#[must_use]
pub fn manifest(backends: &[Backend]) -> String {
    multi_document(&[&service(), &endpoint_slice(backends)])
}

/// Writes [`manifest`] to `dir/nodeport.yaml`.
pub fn write_manifests(dir: &Path, backends: &[Backend]) -> Result<()> {
    write_atomic(&dir.join("nodeport.yaml"), &manifest(backends))
}

/// The Service's frontends for the kube-proxy baselines.
pub fn frontends(backends: &[Backend]) -> Result<Vec<Frontend>> {
    kube_proxy::frontends(&service(), &endpoint_slice(backends))
}

/// Writes the remote-only Service and its `EndpointSlice` to `dir/nodeport-remote.yaml`.
pub fn write_remote_manifests(dir: &Path, backends: &[Backend]) -> Result<()> {
    let manifest = multi_document(&[&remote_service(), &remote_endpoint_slice(backends)]);
    write_atomic(&dir.join("nodeport-remote.yaml"), &manifest)
}

/// The remote-only Service's frontends for the kube-proxy baselines.
pub fn remote_frontends(backends: &[Backend]) -> Result<Vec<Frontend>> {
    kube_proxy::frontends(&remote_service(), &remote_endpoint_slice(backends))
}

/// A cluster with `backends` added as pods (no servers started: the caller chooses them).
pub fn build_cluster(backends: &[Backend]) -> Result<Cluster> {
    ensure!(!backends.is_empty(), "no backends");
    let mut cluster = Cluster::new()?;
    for b in backends {
        cluster.add_pod(b.node, &b.name, b.ip)?;
    }
    Ok(cluster)
}
