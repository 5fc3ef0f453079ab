//! The demo service shared by the e2e tests, the interactive lab and `lab/manifests/demo.yaml`:
//! Service `default/demo` on 10.96.0.10:80 (TCP `http`, UDP `dns`) → port 8080 of three backend
//! pods, and a client pod. Pod addresses are fixed so that the bundled manifests match.
use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

use crate::{
    lab::Lab,
    manifest::{Endpoint, EndpointPort, EndpointSlice, Protocol, Service, ServicePort, multi_document},
};

/// Kubernetes node name of the lab's node (`--node-name`, endpoints' `nodeName`).
pub const NODE_NAME: &str = "lab-node";
/// Kubernetes namespace of the demo objects.
pub const NAMESPACE: &str = "default";
/// The Service's name.
pub const SERVICE_NAME: &str = "demo";
/// The Service's `ClusterIP`.
pub const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service's port (TCP and UDP).
pub const PORT: u16 = 80;
/// The backends' port (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;
/// Backend pods: name and address.
pub const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("backend-a", Ipv4Addr::new(10, 244, 1, 11)),
    ("backend-b", Ipv4Addr::new(10, 244, 1, 12)),
    ("backend-c", Ipv4Addr::new(10, 244, 1, 13)),
];
/// The client pod: name and address.
pub const CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(10, 244, 1, 100));

/// The service's ports: (name, protocol).
const PORTS: [(&str, Protocol); 2] = [("http", Protocol::Tcp), ("dns", Protocol::Udp)];

/// The demo Service.
#[must_use]
pub fn service() -> Service {
    Service { namespace: NAMESPACE.into(), name: SERVICE_NAME.into(), cluster_ip: CLUSTER_IP, ports: service_ports() }
}

/// The demo Service's ports: [`PORTS`] on [`PORT`], to [`TARGET_PORT`].
#[must_use]
pub fn service_ports() -> Vec<ServicePort> {
    PORTS
        .iter()
        .map(|&(name, protocol)| ServicePort {
            name: name.into(),
            protocol,
            port: PORT,
            target_port: TARGET_PORT.into(),
        })
        .collect()
}

/// The demo `EndpointSlice` with the named backends (from [`BACKENDS`]), all ready.
///
/// # Panics
/// On a name not in [`BACKENDS`].
#[must_use]
pub fn endpoint_slice(backends: &[&str]) -> EndpointSlice {
    let address =
        |name: &str| BACKENDS.iter().find(|b| b.0 == name).unwrap_or_else(|| panic!("no demo backend {name}")).1;
    EndpointSlice {
        namespace: NAMESPACE.into(),
        name: format!("{SERVICE_NAME}-1"),
        service_name: SERVICE_NAME.into(),
        endpoints: backends.iter().map(|b| Endpoint::ready(address(b), NODE_NAME)).collect(),
        ports: endpoint_ports(),
    }
}

/// The demo `EndpointSlice`'s ports: [`PORTS`] on [`TARGET_PORT`].
#[must_use]
pub fn endpoint_ports() -> Vec<EndpointPort> {
    PORTS.iter().map(|&(name, protocol)| EndpointPort { name: name.into(), protocol, port: TARGET_PORT }).collect()
}

/// Names of all backends.
#[must_use]
pub fn backend_names() -> Vec<&'static str> {
    BACKENDS.iter().map(|b| b.0).collect()
}

/// Service + `EndpointSlice` with every backend, as one multi-document file: the content of
/// `lab/manifests/demo.yaml` (a unit test keeps them equal).
#[must_use]
pub fn manifest() -> String {
    multi_document(&[&service(), &endpoint_slice(&backend_names())])
}

/// A lab with the node, the three backends serving TCP and UDP on [`TARGET_PORT`], and the client.
pub fn build_lab() -> Result<Lab> {
    let mut lab = Lab::new(NODE_NAME)?;
    for (name, ip) in BACKENDS {
        lab.add_pod(name, ip)?.serve(TARGET_PORT)?;
    }
    lab.add_pod(CLIENT.0, CLIENT.1)?;
    Ok(lab)
}

/// How long [`wait_ready`] waits for the agent.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent's log line once its first sync is complete: the maps written, the devices and the
/// socket hooks attached (with a manifests directory, it follows that sync).
pub const RUNNING_LINE: &str = "agent running";

/// Waits (at most [`READY_TIMEOUT`], polling every 20 ms) until the agent has logged
/// [`RUNNING_LINE`] and then a TCP request from the client to the `ClusterIP` gets an answer;
/// fails at once, with the agent's log, if the agent exits. No request is sent before that line:
/// the devices answer a moment before the socket hooks are attached, and a test that tells the
/// two paths apart (or counts what each translated) must not see a connection of that moment.
pub fn wait_ready(lab: &mut Lab) -> Result<()> {
    wait_ready_on(lab, PORT)
}

/// [`wait_ready`] with the request to the `ClusterIP`'s TCP port `port`.
pub fn wait_ready_on(lab: &mut Lab, port: u16) -> Result<()> {
    let start = Instant::now();
    loop {
        lab.ensure_agent_running()?;
        if !lab.agent_log().contains(RUNNING_LINE) {
            ensure!(
                start.elapsed() < READY_TIMEOUT,
                "the agent has not logged {RUNNING_LINE:?} within {READY_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(20));
            continue;
        }
        match lab.pod(CLIENT.0).tcp_request_timeout(CLUSTER_IP, port, b"", Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if start.elapsed() >= READY_TIMEOUT => {
                return Err(
                    e.context(format!("the agent has not made {CLUSTER_IP}:{port} answer within {READY_TIMEOUT:?}"))
                );
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}
