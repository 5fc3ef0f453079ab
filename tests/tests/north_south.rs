//! North-south end to end on the two-node lab (`rproxy_tests::Cluster`), with an rproxy agent on
//! each node serving `--devices eth0`, once per `--xdp-mode`: native XDP, generic XDP and the TC
//! fallback. Native `XDP_TX` from a node's `eth0` reaches the bridge because the lab runs an
//! `XDP_PASS` program on the bridge side of every external veth (see `rproxy_tests::cluster`);
//! the native case also checks, from the veths' counters, that the nodes did transmit with
//! `XDP_TX` and the switch received it.
//! - a client outside the cluster reaches backends on both nodes through either node's `NodePort`,
//!   over TCP (64 KiB echoed intact) and UDP; a remote backend sees the node's address (SNAT,
//!   with ports from the default `--snat-port-range`, which `rproxy-agent dump` shows), a local
//!   one the client's;
//! - an `externalIP` and a `LoadBalancer` ingress IP routed to node 1 work, the latter with
//!   `loadBalancerSourceRanges` that hold the client; one whose ranges leave it out drops it;
//! - `externalTrafficPolicy: Local`: node 1 (with the endpoint) always picks it and the backend
//!   sees the client, node 2 (without) does not answer, and the health check node port answers
//!   200 with the count on node 1 and 503 on node 2;
//! - a `NodePort` without endpoints refuses connections at once on both nodes, and a UDP one
//!   whose backend does not listen gets the backend's port unreachable to the client (through
//!   node 1's SNAT, and node 2's own backend);
//! - each agent answers kube-proxy's `/healthz` and `/livez` on port 10256;
//! - with a smaller MTU on node 2's link (and node 1's route to it), 64 KiB still go through
//!   node 1's `NodePort` to both backends: path MTU discovery works on node 1's ICMP
//!   fragmentation-needed messages;
//! - a pod and a host-network process of node 1 reach the `NodePorts` (and the `ClusterIP`).
//!
//! Needs root; skipped without it unless `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rproxy_agent::node::snat::PortRange;
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    client::{self, Reply},
    cluster::CLIENT_IP,
    cmd::ip,
    netns::ethtool_stats,
    serial_or_skip,
};

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 50);
const LB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 60);
const LOCAL_LB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 61);
const FENCED_LB_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 62);
const NODE_PORT: u16 = 30080;
const LOCAL_NODE_PORT: u16 = 30090;
const HEALTH_PORT: u16 = 32100;
const EMPTY_NODE_PORT: u16 = 30095;
const CLOSED_NODE_PORT: u16 = 30096;
/// A port backend 2 does not serve.
const CLOSED_PORT: u16 = 9090;
const TARGET_PORT: u16 = 8080;
const BACKEND_1: &str = "backend-1";
const BACKEND_2: &str = "backend-2";
const POD_CLIENT: &str = "client-1";
const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests tried until every expected backend has answered.
const MAX_REQUESTS: usize = 60;

/// `web`: `LoadBalancer`, externalTrafficPolicy Cluster, TCP and UDP, an `externalIP` and an ingress
/// IP, backends on both nodes, `loadBalancerSourceRanges` that hold the client. `local`:
/// `LoadBalancer`, externalTrafficPolicy Local, its only endpoint on node 1. `fenced`: a
/// `LoadBalancer` whose source ranges leave the client out. `closed`: a UDP `NodePort` whose only
/// endpoint (on node 2) does not listen. `empty`: a `NodePort` without endpoints.
fn manifests() -> String {
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: {CLUSTER_IP}
  externalIPs: [{EXTERNAL_IP}]
  externalTrafficPolicy: Cluster
  loadBalancerSourceRanges: [{CLIENT_IP}/28]
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
  - {{name: udp, protocol: UDP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
status:
  loadBalancer:
    ingress: [{{ip: {LB_IP}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
- {{addresses: [{b1}], conditions: {{ready: true}}, nodeName: node-1}}
- {{addresses: [{b2}], conditions: {{ready: true}}, nodeName: node-2}}
ports:
- {{name: tcp, protocol: TCP, port: {TARGET_PORT}}}
- {{name: udp, protocol: UDP, port: {TARGET_PORT}}}
---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.21
  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {LOCAL_NODE_PORT}}}
status:
  loadBalancer:
    ingress: [{{ip: {LOCAL_LB_IP}}}]
{local_slice}---
apiVersion: v1
kind: Service
metadata: {{name: fenced, namespace: default}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.23
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}}}
status:
  loadBalancer:
    ingress: [{{ip: {FENCED_LB_IP}}}]
{fenced_slice}---
apiVersion: v1
kind: Service
metadata: {{name: closed, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.24
  ports:
  - {{name: udp, protocol: UDP, port: 80, targetPort: {CLOSED_PORT}, nodePort: {CLOSED_NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: closed-1, namespace: default, labels: {{kubernetes.io/service-name: closed}}}}
addressType: IPv4
endpoints:
- {{addresses: [{b2}], conditions: {{ready: true}}, nodeName: node-2}}
ports:
- {{name: udp, protocol: UDP, port: {CLOSED_PORT}}}
---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  type: NodePort
  clusterIP: 10.96.0.22
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {EMPTY_NODE_PORT}}}
",
        b1 = NodeId::ONE.pod_ip(11),
        b2 = NodeId::TWO.pod_ip(11),
        local_slice = backend_1_slice("local"),
        fenced_slice = backend_1_slice("fenced"),
    )
}

/// The `EndpointSlice` of Service `service` whose only endpoint is backend 1 (node 1), TCP.
fn backend_1_slice(service: &str) -> String {
    format!(
        r"---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {service}-1, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}
addressType: IPv4
endpoints:
- {{addresses: [{b1}], conditions: {{ready: true}}, nodeName: node-1}}
ports:
- {{name: tcp, protocol: TCP, port: {TARGET_PORT}}}
",
        b1 = NodeId::ONE.pod_ip(11),
    )
}

fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Builds the cluster, starts the agents with `--xdp-mode mode` and waits until node 1's and
/// node 2's `NodePort`s answer.
fn setup(mode: &str) -> Result<(Cluster, tempfile::TempDir)> {
    let mut cluster = Cluster::new()?;
    cluster.add_pod(NodeId::ONE, BACKEND_1, NodeId::ONE.pod_ip(11))?.serve(TARGET_PORT)?;
    cluster.add_pod(NodeId::TWO, BACKEND_2, NodeId::TWO.pod_ip(11))?.serve(TARGET_PORT)?;
    cluster.add_pod(NodeId::ONE, POD_CLIENT, NodeId::ONE.pod_ip(50))?;
    // The externalIP and the LoadBalancer IPs are routed to node 1, as a router would.
    for vip in [EXTERNAL_IP, LB_IP, LOCAL_LB_IP, FENCED_LB_IP] {
        ip(Some(cluster.client_ns()), &["route", "add", &format!("{vip}/32"), "via", &NodeId::ONE.ip().to_string()])?;
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("services.yaml"), manifests())?;
    cluster.start_agents(&agent_bin()?, dir.path(), &["--devices", "eth0", "--xdp-mode", mode])?;
    let started = Instant::now();
    for node in NodeId::ALL {
        loop {
            cluster.ensure_agents_running()?;
            if client_tcp(&cluster, node.ip(), NODE_PORT, b"hello").is_ok() {
                break;
            }
            ensure!(started.elapsed() < Duration::from_secs(20), "{node:?}'s NodePort never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok((cluster, dir))
}

fn client_tcp(cluster: &Cluster, addr: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Reply> {
    cluster.in_client(|| client::tcp_request(addr, port, payload, TIMEOUT))?
}

fn client_udp(cluster: &Cluster, addr: Ipv4Addr, port: u16, payload: &[u8]) -> Result<Reply> {
    cluster.in_client(|| client::udp_request(addr, port, payload, TIMEOUT))?
}

/// Requests until both backends answered, each echo intact.
fn reach_both(what: &str, mut request: impl FnMut() -> Result<Reply>, sent: &[u8]) -> Result<()> {
    let mut unseen = BTreeSet::from([BACKEND_1, BACKEND_2]);
    for attempt in 1..=MAX_REQUESTS {
        let (name, echo) = request().with_context(|| format!("{what}: request {attempt}"))?;
        ensure!(echo == sent, "{what}: {name} echoed {} bytes, not the {} sent", echo.len(), sent.len());
        unseen.remove(name.as_str());
        if unseen.is_empty() {
            return Ok(());
        }
    }
    bail!("{what}: {unseen:?} never answered in {MAX_REQUESTS} requests")
}

fn tcp_peers(cluster: &Cluster, pod: &str) -> BTreeSet<Ipv4Addr> {
    cluster
        .pod(pod)
        .peers_on(TARGET_PORT)
        .tcp
        .iter()
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

/// A plain HTTP/1.1 GET: (status code, body).
fn http_get(addr: Ipv4Addr, port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&(addr, port).into(), TIMEOUT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// Through node 1 the remote backend saw node 1's address, with ports of the SNAT range, and
/// through node 2 node 2's; local backends saw the client.
fn ensure_translated_sources(cluster: &Cluster) -> Result<()> {
    for (pod, local, remote) in [(BACKEND_1, NodeId::ONE, NodeId::TWO), (BACKEND_2, NodeId::TWO, NodeId::ONE)] {
        let peers = tcp_peers(cluster, pod);
        ensure!(peers.contains(&CLIENT_IP), "{pod} never saw the client through {local:?}: {peers:?}");
        ensure!(peers.contains(&remote.ip()), "{pod} never saw {remote:?}'s address (SNAT): {peers:?}");
        ensure!(!peers.contains(&local.ip()), "{pod} saw its own node's address: {peers:?}");
        let snat = PortRange::DEFAULT;
        let ports: Vec<u16> = cluster
            .pod(pod)
            .peers_on(TARGET_PORT)
            .tcp
            .iter()
            .filter(|a| a.ip() == std::net::IpAddr::V4(remote.ip()))
            .map(SocketAddr::port)
            .collect();
        ensure!(
            ports.iter().all(|p| snat.ports().contains(p)),
            "{pod} saw {remote:?}'s address with ports outside --snat-port-range {snat}: {ports:?}"
        );
    }
    Ok(())
}

/// What the datapath turns away, and how: a source outside `loadBalancerSourceRanges` is
/// dropped (a timeout, not a refusal); a backend's port unreachable reaches the client's
/// connected UDP socket; a Service without endpoints refuses at once.
fn ensure_turned_away(cluster: &Cluster) -> Result<()> {
    // loadBalancerSourceRanges without the client: dropped (a timeout, not a refusal).
    let to = SocketAddr::from((FENCED_LB_IP, 80));
    let tried = cluster.in_client(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))?;
    ensure!(
        tried.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused),
        "{to}, whose source ranges leave the client out, did not drop it: {tried:?}"
    );
    // The backend's port unreachable reaches the client's connected UDP socket, through node 1
    // (SNAT, forwarded back) and node 2 (its own backend).
    for node in NodeId::ALL {
        let to = SocketAddr::from((node.ip(), CLOSED_NODE_PORT));
        let tried = cluster.in_client(|| -> std::io::Result<usize> {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(to)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send(b"anyone?")?;
            socket.recv(&mut [0u8; 64])
        })?;
        ensure!(
            tried.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{to}: the backend's port unreachable did not reach the client: {tried:?}"
        );
    }
    // No endpoints at all: refused at once (ICMP port unreachable), as kube-proxy rejects.
    for node in NodeId::ALL {
        let to = SocketAddr::from((node.ip(), EMPTY_NODE_PORT));
        let tried = cluster.in_client(|| TcpStream::connect_timeout(&to, TIMEOUT))?;
        ensure!(
            tried.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{to} without endpoints was not refused: {tried:?}"
        );
    }
    Ok(())
}

fn scenario(mode: &str) -> Result<()> {
    let (cluster, _dir) = setup(mode)?;
    let big = payload(64 * 1024);
    for node in NodeId::ALL {
        let addr = node.ip();
        reach_both(&format!("TCP to {addr}:{NODE_PORT}"), || client_tcp(&cluster, addr, NODE_PORT, &big), &big)?;
        let small = payload(1200);
        reach_both(&format!("UDP to {addr}:{NODE_PORT}"), || client_udp(&cluster, addr, NODE_PORT, &small), &small)?;
    }
    ensure_translated_sources(&cluster)?;
    for vip in [EXTERNAL_IP, LB_IP] {
        reach_both(&format!("TCP to {vip}:80"), || client_tcp(&cluster, vip, 80, b"vip"), b"vip")?;
    }
    ensure_turned_away(&cluster)?;

    // externalTrafficPolicy Local.
    let before = cluster.pod(BACKEND_1).peers_on(TARGET_PORT).tcp.len();
    for addr in [NodeId::ONE.ip(), LOCAL_LB_IP] {
        for _ in 0..8 {
            let port = if addr == LOCAL_LB_IP { 80 } else { LOCAL_NODE_PORT };
            let (name, _) = client_tcp(&cluster, addr, port, b"local")?;
            ensure!(name == BACKEND_1, "ETP Local via {addr} reached {name}");
        }
    }
    let after = cluster.pod(BACKEND_1).peers_on(TARGET_PORT).tcp;
    ensure!(
        after[before..].iter().all(|a| a.ip() == std::net::IpAddr::V4(CLIENT_IP)),
        "ETP Local lost the client address"
    );
    let refused =
        cluster.in_client(|| client::tcp_request(NodeId::TWO.ip(), LOCAL_NODE_PORT, b"x", Duration::from_secs(1)))?;
    ensure!(refused.is_err(), "node 2 has no local endpoint but served the ETP Local NodePort: {refused:?}");
    let (status, body) = cluster.in_client(|| http_get(NodeId::ONE.ip(), HEALTH_PORT, "/healthz"))??;
    ensure!(
        status == 200 && body.contains("\"localEndpoints\":1") && body.contains("\"serviceProxyHealthy\":true"),
        "node 1 health check: {status} {body}"
    );
    let (status, body) = cluster.in_client(|| http_get(NodeId::TWO.ip(), HEALTH_PORT, "/healthz"))??;
    ensure!(status == 503 && body.contains("\"localEndpoints\":0"), "node 2 health check: {status} {body}");
    // Each agent's own health, on kube-proxy's port.
    for node in NodeId::ALL {
        for path in ["/healthz", "/livez"] {
            let (status, body) = cluster.in_client(|| http_get(node.ip(), 10256, path))??;
            ensure!(status == 200 && body.contains("\"lastUpdated\""), "{node:?} {path}: {status} {body}");
        }
        let (_, body) = cluster.in_client(|| http_get(node.ip(), 10256, "/healthz"))??;
        ensure!(body.contains("\"nodeEligible\":true"), "{node:?} /healthz: {body}");
    }

    // From a pod and from the host network of node 1.
    for node in NodeId::ALL {
        let addr = node.ip();
        reach_both(
            &format!("pod to {addr}:{NODE_PORT}"),
            || cluster.pod(POD_CLIENT).tcp_request(addr, NODE_PORT, b"pod"),
            b"pod",
        )?;
        reach_both(
            &format!("host of node 1 to {addr}:{NODE_PORT}"),
            || cluster.in_node(NodeId::ONE, || client::tcp_request(addr, NODE_PORT, b"host", TIMEOUT))?,
            b"host",
        )?;
    }
    reach_both(
        "host of node 1 to the ClusterIP over UDP",
        || cluster.in_node(NodeId::ONE, || client::udp_request(CLUSTER_IP, 80, b"dns?", TIMEOUT))?,
        b"dns?",
    )?;
    if mode == "native" {
        ensure_native_xdp_tx(&cluster)?;
    }

    // Path MTU discovery through the datapath: node 2's link gets a smaller MTU (1300), and
    // node 1's route to node 2's pods says so (a locked route MTU, as for a smaller inter-node
    // path). The client's full-size segments for node 2's backend no longer fit: node 1's hook
    // answers them with ICMP fragmentation needed, the client's TCP lowers its path MTU, and
    // 64 KiB still reach both backends intact. Without the message node 2's link would drop
    // them and the transfer would stall.
    ip(Some(cluster.node(NodeId::TWO).ns()), &["link", "set", "eth0", "mtu", "1300"])?;
    let to_node2_pods = format!("{}/24", NodeId::TWO.pod_cidr());
    let via = NodeId::TWO.ip().to_string();
    let route = ["route", "change", &to_node2_pods, "via", &via, "dev", "eth0", "mtu", "lock", "1300"];
    ip(Some(cluster.node(NodeId::ONE).ns()), &route)?;
    let addr = NodeId::ONE.ip();
    reach_both("TCP through a 1300-byte path", || client_tcp(&cluster, addr, NODE_PORT, &big), &big)?;
    let dump = std::process::Command::new(agent_bin()?)
        .args(["dump", "--bpffs"])
        .arg(cluster.node(NodeId::ONE).pin_dir())
        .output()?;
    let dump = String::from_utf8_lossy(&dump.stdout);
    let counter = |name: &str| -> u64 {
        dump.lines().find_map(|l| l.trim().strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    };
    ensure!(
        counter("frag_needed") > 0 && counter("icmp_sent") > 0,
        "node 1 sent no fragmentation-needed message:\n{dump}"
    );
    let snat = format!("snat ports {};", PortRange::DEFAULT);
    ensure!(dump.lines().any(|l| l.trim().starts_with(&snat)), "dump does not show '{snat}':\n{dump}");
    Ok(())
}

/// Native mode: each node's XDP program sent frames back out of its `eth0` (`XDP_TX`: new
/// flows to the remote backend, and their replies to the client) without a transmit error, and
/// the switch port received at least that many frames on its XDP path.
fn ensure_native_xdp_tx(cluster: &Cluster) -> Result<()> {
    let sum = |stats: &BTreeMap<String, u64>, suffix: &str| -> u64 {
        stats.iter().filter(|(name, _)| name.starts_with("rx_queue_") && name.ends_with(suffix)).map(|(_, n)| n).sum()
    };
    for id in NodeId::ALL {
        let node = ethtool_stats(cluster.node(id).ns(), "eth0")?;
        let port = ethtool_stats(cluster.switch_ns(), &cluster.switch_port(id))?;
        let (tx, errors, received) = (sum(&node, "_xdp_tx"), sum(&node, "_xdp_tx_errors"), sum(&port, "_xdp_packets"));
        if tx == 0 {
            // What the agent says about attaching, for a failure that does not reproduce alone.
            let log = cluster.node(id).agent_log();
            let attach: Vec<&str> =
                log.lines().filter(|l| l.contains("external device") || l.contains("XDP")).collect();
            bail!("{id:?}'s eth0 sent nothing with XDP_TX: {node:?}\nagent: {attach:#?}");
        }
        ensure!(errors == 0, "{id:?}'s eth0: {errors} XDP_TX errors: {node:?}");
        ensure!(received >= tx, "{id:?}'s switch port received {received} XDP frames, fewer than the {tx} sent");
    }
    Ok(())
}

fn run(mode: &str) {
    let Some(_serial) = serial_or_skip(&format!("north_south {mode}")) else { return };
    if let Err(e) = scenario(mode) {
        panic!("--xdp-mode {mode}: {e:#}");
    }
}

#[test]
fn north_south_through_generic_xdp() {
    run("generic");
}

#[test]
fn north_south_through_tc() {
    run("tc");
}

#[test]
fn north_south_through_native_xdp() {
    run("native");
}
