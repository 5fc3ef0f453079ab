//! North-south end to end on the two-node lab (`rproxy_tests::Cluster`), with an rproxy agent on
//! each node serving `--devices eth0`, once per `--xdp-mode`: native XDP, generic XDP and the TC
//! fallback. Native `XDP_TX` from a node's `eth0` reaches the bridge because the lab runs an
//! `XDP_PASS` program on the bridge side of every external veth (see `rproxy_tests::cluster`);
//! the native case also checks, from the veths' counters, that the nodes did transmit with
//! `XDP_TX` and the switch received it.
//!
//! The lab, its pods and every Service are dual-stack (clusterIPs, externalIPs, ingress IPs and
//! source ranges of both families, an `EndpointSlice` per family), and every check below runs
//! over IPv4 and then over IPv6, on the same agents:
//! - a client outside the cluster reaches backends on both nodes through either node's `NodePort`,
//!   over TCP (64 KiB echoed intact) and UDP; a remote backend sees the node's address (SNAT,
//!   with ports from the default `--snat-port-range`, which `rproxy-agent dump` shows), a local
//!   one the client's;
//! - an `externalIP` and a `LoadBalancer` ingress IP routed to node 1 work, the latter with
//!   `loadBalancerSourceRanges` that hold the client; one whose ranges leave it out drops it;
//! - `sessionAffinity: ClientIP`: every connection of the client goes to one backend;
//! - `externalTrafficPolicy: Local`: node 1 (with the endpoint) always picks it and the backend
//!   sees the client, node 2 (without) does not answer, and the health check node port answers
//!   200 with the count on node 1 and 503 on node 2;
//! - a `NodePort` without endpoints refuses connections at once on both nodes (ICMP or ICMPv6
//!   port unreachable), and a UDP one whose backend does not listen gets the backend's port
//!   unreachable to the client (through node 1's SNAT, and node 2's own backend);
//! - each agent answers kube-proxy's `/healthz` and `/livez` on port 10256;
//! - a pod and a host-network process of node 1 (the socket hooks) reach the `NodePorts` and
//!   the `ClusterIP`;
//! - with a smaller MTU on node 2's link (and node 1's routes to it), 64 KiB still go through
//!   node 1's `NodePort` to both backends: path MTU discovery works on node 1's ICMP
//!   fragmentation-needed and ICMPv6 packet-too-big messages.
//!
//! Needs root; skipped without it unless `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rproxy_agent::node::snat::PortRange;
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    client::{self, Reply},
    cluster::{CLIENT_IP, CLIENT_IP6},
    cmd::ip,
    netns::ethtool_stats,
    serial_or_skip,
};

const NODE_PORT: u16 = 30080;
const LOCAL_NODE_PORT: u16 = 30090;
const STICKY_NODE_PORT: u16 = 30085;
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

/// An address family of the dual-stack lab: the addresses each check uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    const BOTH: [Self; 2] = [Self::V4, Self::V6];

    /// Address `n` of the Services' range: `10.96.0.n`, `fd00:96::n`.
    fn cluster_ip(self, n: u8) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(10, 96, 0, n).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, u16::from(n)).into(),
        }
    }

    /// External address `n` (externalIPs, ingress IPs), routed to node 1: `172.31.1.n`,
    /// `fd00:172:99::n`.
    fn vip(self, n: u8) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::new(172, 31, 1, n).into(),
            Self::V6 => Ipv6Addr::new(0xfd00, 0x172, 0x99, 0, 0, 0, 0, u16::from(n)).into(),
        }
    }

    fn external_ip(self) -> IpAddr {
        self.vip(50)
    }

    fn lb_ip(self) -> IpAddr {
        self.vip(60)
    }

    fn local_lb_ip(self) -> IpAddr {
        self.vip(61)
    }

    fn fenced_lb_ip(self) -> IpAddr {
        self.vip(62)
    }

    fn node(self, id: NodeId) -> IpAddr {
        match self {
            Self::V4 => id.ip().into(),
            Self::V6 => id.ip6().into(),
        }
    }

    fn client(self) -> IpAddr {
        match self {
            Self::V4 => CLIENT_IP.into(),
            Self::V6 => CLIENT_IP6.into(),
        }
    }

    /// Node `id`'s pod CIDR, as a route destination.
    fn pod_cidr(self, id: NodeId) -> String {
        match self {
            Self::V4 => format!("{}/24", id.pod_cidr()),
            Self::V6 => format!("{}/64", id.pod_cidr6()),
        }
    }

    /// `ip`'s argument for this family.
    fn ip_flag(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }
}

/// An `EndpointSlice` of each family for Service `service`: `endpoints` are (node, pod host
/// number) pairs, `ports` (name, protocol, port) triples.
fn slices(service: &str, endpoints: &[(NodeId, u8)], ports: &[(&str, &str, u16)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for (fam, kind) in [(Fam::V4, "IPv4"), (Fam::V6, "IPv6")] {
        let _ = write!(
            out,
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {service}-{kind}, namespace: default, labels: {{kubernetes.io/service-name: {service}}}}}\n\
             addressType: {kind}\nendpoints:\n"
        );
        for (node, host) in endpoints {
            let addr: IpAddr = if fam == Fam::V4 { node.pod_ip(*host).into() } else { node.pod_ip6(*host).into() };
            let _ = writeln!(
                out,
                "- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {}}}",
                node.k8s_name()
            );
        }
        out.push_str("ports:\n");
        for (name, proto, port) in ports {
            let _ = writeln!(out, "- {{name: {name}, protocol: {proto}, port: {port}}}");
        }
    }
    out
}

/// A dual-stack Service's family fields: cluster IP `n` of both families.
fn dual(n: u8) -> String {
    format!(
        "  ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  clusterIP: {v4}\n  clusterIPs: [{v4}, \"{v6}\"]\n",
        v4 = Fam::V4.cluster_ip(n),
        v6 = Fam::V6.cluster_ip(n),
    )
}

/// Ingress IPs of both families.
fn ingress(f: fn(Fam) -> IpAddr) -> String {
    format!("status:\n  loadBalancer:\n    ingress: [{{ip: {}}}, {{ip: \"{}\"}}]\n", f(Fam::V4), f(Fam::V6))
}

/// Every Service is dual-stack. `web`: `LoadBalancer`, externalTrafficPolicy Cluster, TCP and
/// UDP, an `externalIP` and an ingress IP of each family, backends on both nodes,
/// `loadBalancerSourceRanges` that hold the client. `sticky`: a `NodePort` with session
/// affinity, backends on both nodes. `local`: `LoadBalancer`, externalTrafficPolicy Local, its
/// only endpoint on node 1. `fenced`: a `LoadBalancer` whose source ranges leave the client
/// out. `closed`: a UDP `NodePort` whose only endpoint (on node 2) does not listen. `empty`: a
/// `NodePort` without endpoints.
fn manifests() -> String {
    let both = [(NodeId::ONE, 11), (NodeId::TWO, 11)];
    let tcp = [("tcp", "TCP", TARGET_PORT)];
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: LoadBalancer
{web}  externalIPs: [{ext4}, "{ext6}"]
  externalTrafficPolicy: Cluster
  loadBalancerSourceRanges: [{CLIENT_IP}/28, "{CLIENT_IP6}/124"]
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
  - {{name: udp, protocol: UDP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
{web_ingress}{web_slices}---
apiVersion: v1
kind: Service
metadata: {{name: sticky, namespace: default}}
spec:
  type: NodePort
{sticky}  sessionAffinity: ClientIP
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {STICKY_NODE_PORT}}}
{sticky_slices}---
apiVersion: v1
kind: Service
metadata: {{name: local, namespace: default}}
spec:
  type: LoadBalancer
{local}  externalTrafficPolicy: Local
  healthCheckNodePort: {HEALTH_PORT}
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {LOCAL_NODE_PORT}}}
{local_ingress}{local_slices}---
apiVersion: v1
kind: Service
metadata: {{name: fenced, namespace: default}}
spec:
  type: LoadBalancer
{fenced}  loadBalancerSourceRanges: [192.0.2.0/24, "2001:db8::/64"]
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}}}
{fenced_ingress}{fenced_slices}---
apiVersion: v1
kind: Service
metadata: {{name: closed, namespace: default}}
spec:
  type: NodePort
{closed}  ports:
  - {{name: udp, protocol: UDP, port: 80, targetPort: {CLOSED_PORT}, nodePort: {CLOSED_NODE_PORT}}}
{closed_slices}---
apiVersion: v1
kind: Service
metadata: {{name: empty, namespace: default}}
spec:
  type: NodePort
{empty}  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {EMPTY_NODE_PORT}}}
"#,
        web = dual(20),
        ext4 = Fam::V4.external_ip(),
        ext6 = Fam::V6.external_ip(),
        web_ingress = ingress(Fam::lb_ip),
        web_slices = slices("web", &both, &[("tcp", "TCP", TARGET_PORT), ("udp", "UDP", TARGET_PORT)]),
        sticky = dual(25),
        sticky_slices = slices("sticky", &both, &tcp),
        local = dual(21),
        local_ingress = ingress(Fam::local_lb_ip),
        local_slices = slices("local", &[(NodeId::ONE, 11)], &tcp),
        fenced = dual(23),
        fenced_ingress = ingress(Fam::fenced_lb_ip),
        fenced_slices = slices("fenced", &[(NodeId::ONE, 11)], &tcp),
        closed = dual(24),
        closed_slices = slices("closed", &[(NodeId::TWO, 11)], &[("udp", "UDP", CLOSED_PORT)]),
        empty = dual(22),
    )
}

fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Builds the cluster, starts the agents with `--xdp-mode mode` and waits until node 1's and
/// node 2's `NodePort`s answer over both families.
fn setup(mode: &str) -> Result<(Cluster, tempfile::TempDir)> {
    let mut cluster = Cluster::new()?;
    for (id, name, host) in [(NodeId::ONE, BACKEND_1, 11), (NodeId::TWO, BACKEND_2, 11), (NodeId::ONE, POD_CLIENT, 50)]
    {
        let pod = cluster.add_pod_dual(id, name, id.pod_ip(host), id.pod_ip6(host))?;
        if name != POD_CLIENT {
            pod.serve(TARGET_PORT)?;
        }
    }
    // The externalIPs and the LoadBalancer IPs are routed to node 1, as a router would.
    for fam in Fam::BOTH {
        for vip in [fam.external_ip(), fam.lb_ip(), fam.local_lb_ip(), fam.fenced_lb_ip()] {
            let via = fam.node(NodeId::ONE).to_string();
            ip(Some(cluster.client_ns()), &[fam.ip_flag(), "route", "add", &vip.to_string(), "via", &via])?;
        }
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("services.yaml"), manifests())?;
    cluster.start_agents(&agent_bin()?, dir.path(), &["--devices", "eth0", "--xdp-mode", mode])?;
    let started = Instant::now();
    for fam in Fam::BOTH {
        for node in NodeId::ALL {
            loop {
                cluster.ensure_agents_running()?;
                if client_tcp(&cluster, fam.node(node), NODE_PORT, b"hello").is_ok() {
                    break;
                }
                ensure!(started.elapsed() < Duration::from_secs(20), "{node:?}'s {fam:?} NodePort never answered");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Ok((cluster, dir))
}

pub(crate) fn client_tcp(cluster: &Cluster, addr: IpAddr, port: u16, payload: &[u8]) -> Result<Reply> {
    cluster.in_client(|| client::tcp_request(addr, port, payload, TIMEOUT))?
}

pub(crate) fn client_udp(cluster: &Cluster, addr: IpAddr, port: u16, payload: &[u8]) -> Result<Reply> {
    cluster.in_client(|| client::udp_request(addr, port, payload, TIMEOUT))?
}

/// Requests until both backends answered, each echo intact.
pub(crate) fn reach_both(what: &str, mut request: impl FnMut() -> Result<Reply>, sent: &[u8]) -> Result<()> {
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

/// The TCP peers `pod`'s server on the target port has seen.
fn tcp_peers(cluster: &Cluster, pod: &str) -> Vec<SocketAddr> {
    cluster.pod(pod).peers_on(TARGET_PORT).tcp
}

/// `GET path` on `addr:port`: (status code, body).
fn http_get(addr: IpAddr, port: u16, path: &str) -> Result<(u16, String)> {
    client::http_get(addr, port, path, TIMEOUT)
}

/// Through node 1 the remote backend saw node 1's address of the family, with ports of the
/// SNAT range, and through node 2 node 2's; local backends saw the client.
fn ensure_translated_sources(cluster: &Cluster, fam: Fam) -> Result<()> {
    for (pod, local, remote) in [(BACKEND_1, NodeId::ONE, NodeId::TWO), (BACKEND_2, NodeId::TWO, NodeId::ONE)] {
        let peers = tcp_peers(cluster, pod);
        let seen: BTreeSet<IpAddr> = peers.iter().map(SocketAddr::ip).collect();
        ensure!(seen.contains(&fam.client()), "{pod} never saw the client through {local:?} ({fam:?}): {seen:?}");
        ensure!(seen.contains(&fam.node(remote)), "{pod} never saw {remote:?}'s {fam:?} address (SNAT): {seen:?}");
        ensure!(!seen.contains(&fam.node(local)), "{pod} saw its own node's {fam:?} address: {seen:?}");
        let snat = PortRange::DEFAULT;
        let ports: Vec<u16> = peers.iter().filter(|a| a.ip() == fam.node(remote)).map(SocketAddr::port).collect();
        ensure!(
            ports.iter().all(|p| snat.ports().contains(p)),
            "{pod} saw {remote:?}'s {fam:?} address with ports outside --snat-port-range {snat}: {ports:?}"
        );
    }
    Ok(())
}

/// What the datapath turns away, and how: a source outside `loadBalancerSourceRanges` is
/// dropped (a timeout, not a refusal); a backend's port unreachable reaches the client's
/// connected UDP socket; a Service without endpoints refuses at once.
fn ensure_turned_away(cluster: &Cluster, fam: Fam) -> Result<()> {
    // loadBalancerSourceRanges without the client: dropped (a timeout, not a refusal).
    let to = SocketAddr::new(fam.fenced_lb_ip(), 80);
    let tried = cluster.in_client(|| TcpStream::connect_timeout(&to, Duration::from_secs(1)))?;
    ensure!(
        tried.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::ConnectionRefused),
        "{to}, whose source ranges leave the client out, did not drop it: {tried:?}"
    );
    // The backend's port unreachable reaches the client's connected UDP socket, through node 1
    // (SNAT, forwarded back) and node 2 (its own backend).
    for node in NodeId::ALL {
        let to = SocketAddr::new(fam.node(node), CLOSED_NODE_PORT);
        let tried = cluster.in_client(|| -> std::io::Result<usize> {
            let socket = std::net::UdpSocket::bind(SocketAddr::new(unspecified(fam), 0))?;
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
    // No endpoints at all: refused at once (port unreachable), as kube-proxy rejects.
    for node in NodeId::ALL {
        let to = SocketAddr::new(fam.node(node), EMPTY_NODE_PORT);
        let tried = cluster.in_client(|| TcpStream::connect_timeout(&to, TIMEOUT))?;
        ensure!(
            tried.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{to} without endpoints was not refused: {tried:?}"
        );
    }
    Ok(())
}

fn unspecified(fam: Fam) -> IpAddr {
    match fam {
        Fam::V4 => Ipv4Addr::UNSPECIFIED.into(),
        Fam::V6 => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// `externalTrafficPolicy: Local` and its health check node port.
fn ensure_local_policy(cluster: &Cluster, fam: Fam) -> Result<()> {
    let before = tcp_peers(cluster, BACKEND_1).len();
    for (addr, port) in [(fam.node(NodeId::ONE), LOCAL_NODE_PORT), (fam.local_lb_ip(), 80)] {
        for _ in 0..8 {
            let (name, _) = client_tcp(cluster, addr, port, b"local")?;
            ensure!(name == BACKEND_1, "ETP Local via {addr} reached {name}");
        }
    }
    let after = tcp_peers(cluster, BACKEND_1);
    ensure!(after[before..].iter().all(|a| a.ip() == fam.client()), "ETP Local lost the client address ({fam:?})");
    let node2 = fam.node(NodeId::TWO);
    let refused = cluster.in_client(|| client::tcp_request(node2, LOCAL_NODE_PORT, b"x", Duration::from_secs(1)))?;
    ensure!(refused.is_err(), "node 2 has no local endpoint but served the ETP Local NodePort: {refused:?}");
    let (status, body) = cluster.in_client(|| http_get(fam.node(NodeId::ONE), HEALTH_PORT, "/healthz"))??;
    ensure!(
        status == 200 && body.contains("\"localEndpoints\":1") && body.contains("\"serviceProxyHealthy\":true"),
        "node 1 health check ({fam:?}): {status} {body}"
    );
    let (status, body) = cluster.in_client(|| http_get(node2, HEALTH_PORT, "/healthz"))??;
    ensure!(status == 503 && body.contains("\"localEndpoints\":0"), "node 2 health check ({fam:?}): {status} {body}");
    // Each agent's own health, on kube-proxy's port.
    for node in NodeId::ALL {
        for path in ["/healthz", "/livez"] {
            let (status, body) = cluster.in_client(|| http_get(fam.node(node), 10256, path))??;
            ensure!(status == 200 && body.contains("\"lastUpdated\""), "{node:?} {path} ({fam:?}): {status} {body}");
        }
        let (_, body) = cluster.in_client(|| http_get(fam.node(node), 10256, "/healthz"))??;
        ensure!(body.contains("\"nodeEligible\":true"), "{node:?} /healthz: {body}");
    }
    Ok(())
}

/// Everything but path MTU, over family `fam`.
fn family_checks(cluster: &Cluster, fam: Fam) -> Result<()> {
    let big = payload(64 * 1024);
    for node in NodeId::ALL {
        let addr = fam.node(node);
        reach_both(&format!("TCP to {addr}:{NODE_PORT}"), || client_tcp(cluster, addr, NODE_PORT, &big), &big)?;
        let small = payload(1200);
        reach_both(&format!("UDP to {addr}:{NODE_PORT}"), || client_udp(cluster, addr, NODE_PORT, &small), &small)?;
    }
    ensure_translated_sources(cluster, fam)?;
    for vip in [fam.external_ip(), fam.lb_ip()] {
        reach_both(&format!("TCP to {vip}:80"), || client_tcp(cluster, vip, 80, b"vip"), b"vip")?;
    }
    // Session affinity: every connection through either node goes to one backend (each node
    // keeps its own affinity, and the client is the same).
    for node in NodeId::ALL {
        let addr = fam.node(node);
        let picked: BTreeSet<String> = (0..8)
            .map(|_| client_tcp(cluster, addr, STICKY_NODE_PORT, b"sticky").map(|(name, _)| name))
            .collect::<Result<_>>()?;
        ensure!(picked.len() == 1, "sessionAffinity ClientIP via {addr}: the client reached {picked:?}");
    }
    ensure_turned_away(cluster, fam)?;
    ensure_local_policy(cluster, fam)?;

    // From a pod and from the host network of node 1.
    for node in NodeId::ALL {
        let addr = fam.node(node);
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
    let cluster_ip = fam.cluster_ip(20);
    reach_both(
        &format!("host of node 1 to the ClusterIP {cluster_ip} over UDP"),
        || cluster.in_node(NodeId::ONE, || client::udp_request(cluster_ip, 80, b"dns?", TIMEOUT))?,
        b"dns?",
    )?;
    reach_both(
        &format!("host of node 1 to the ClusterIP {cluster_ip} over TCP"),
        || cluster.in_node(NodeId::ONE, || client::tcp_request(cluster_ip, 80, b"host", TIMEOUT))?,
        b"host",
    )
}

fn scenario(mode: &str) -> Result<()> {
    let (cluster, _dir) = setup(mode)?;
    for fam in Fam::BOTH {
        family_checks(&cluster, fam).with_context(|| format!("over {fam:?}"))?;
    }
    if mode == "native" {
        ensure_native_xdp_tx(&cluster)?;
    }

    // Path MTU discovery through the datapath: node 2's link gets a smaller MTU (1300), and
    // node 1's routes to node 2's pods say so (a locked route MTU, as for a smaller inter-node
    // path). The client's full-size segments for node 2's backend no longer fit: node 1's hook
    // answers them with ICMP fragmentation needed (ICMPv6 packet too big), the client's TCP
    // lowers its path MTU, and 64 KiB still reach both backends intact. Without the message
    // node 2's link would drop them and the transfer would stall.
    ip(Some(cluster.node(NodeId::TWO).ns()), &["link", "set", "eth0", "mtu", "1300"])?;
    let big = payload(64 * 1024);
    let mut sent = 0;
    for fam in Fam::BOTH {
        let to_node2_pods = fam.pod_cidr(NodeId::TWO);
        let via = fam.node(NodeId::TWO).to_string();
        let route =
            [fam.ip_flag(), "route", "change", &to_node2_pods, "via", &via, "dev", "eth0", "mtu", "lock", "1300"];
        ip(Some(cluster.node(NodeId::ONE).ns()), &route)?;
        let addr = fam.node(NodeId::ONE);
        reach_both(
            &format!("TCP through a 1300-byte path to {addr}"),
            || client_tcp(&cluster, addr, NODE_PORT, &big),
            &big,
        )?;
        let now = icmp_sent(&cluster)?;
        ensure!(now > sent, "node 1 sent no fragmentation-needed message over {fam:?} (icmp_sent {now})");
        sent = now;
    }
    let dump = dump(&cluster)?;
    let snat = format!("snat ports {};", PortRange::DEFAULT);
    ensure!(dump.lines().any(|l| l.trim().starts_with(&snat)), "dump does not show '{snat}':\n{dump}");
    Ok(())
}

/// Node 1's `rproxy-agent dump`.
fn dump(cluster: &Cluster) -> Result<String> {
    let dump = std::process::Command::new(agent_bin()?)
        .args(["dump", "--bpffs"])
        .arg(cluster.node(NodeId::ONE).pin_dir())
        .output()?;
    Ok(String::from_utf8_lossy(&dump.stdout).into_owned())
}

/// Node 1's count of ICMP messages the datapath sent about packets too big for the path
/// (`frag_needed`, both families); checks that `icmp_sent` counted at least as many.
fn icmp_sent(cluster: &Cluster) -> Result<u64> {
    let dump = dump(cluster)?;
    let counter = |name: &str| -> u64 {
        dump.lines().find_map(|l| l.trim().strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
    };
    let (frag_needed, sent) = (counter("frag_needed"), counter("icmp_sent"));
    ensure!(sent >= frag_needed, "icmp_sent {sent} < frag_needed {frag_needed}:\n{dump}");
    Ok(frag_needed)
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
