//! External devices of other kinds than the lab's veth, end to end on the two-node lab
//! (`rproxy_tests::Cluster`), an agent on each node with `--devices` naming them:
//! - a VLAN device `eth0.100` on each node and the client ([`Cluster::add_vlan`], the routes
//!   between the nodes on the VLAN too), a macvlan `mv0` on each node ([`Cluster::add_macvlan`])
//!   and a bond `bond0` over each node's `eth0` ([`Cluster::bond_external`], `active-backup`):
//!   with `--xdp-mode auto`, `generic` and `tc` (and `native` on the bond), the client reaches
//!   the backends on both nodes through either node's `NodePort` on that device, over TCP (64 KiB
//!   echoed intact) and UDP; the local backend sees the client, the remote one the forwarding
//!   node (SNAT);
//! - with `--xdp-mode native`, the VLAN and the macvlan (no native XDP in their drivers) and a
//!   `balance-rr` bond (no native XDP in that mode) are refused: each agent logs an error naming
//!   the device and `--xdp-mode generic`/`tc`, and the device is left without programs (a
//!   `NodePort` connection reaches the node's own stack, which refuses it);
//! - frames tagged with a VLAN arriving on a listed `eth0` that has no VLAN device must not be
//!   translated with `--xdp-mode tc`: TC reads the skb's `vlan_present` (the kernel took the tag
//!   off before TC) and passes them (XDP cannot tell where the tag is already gone: see the test).
//!
//! The kernel must have 802.1Q VLAN and bonding support for those tests: without it (a kernel
//! built without `CONFIG_VLAN_8021Q` or `CONFIG_BONDING`, which `ip link add` reports as
//! "Unknown device type") they say so and pass. Needs root; skipped without it unless
//! `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    cluster::{CLIENT_IP, CLIENT_VLAN_IP},
    serial_or_skip,
};

use crate::north_south::{client_tcp, client_udp, reach_both};

const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const BACKEND_1: &str = "backend-1";
const BACKEND_2: &str = "backend-2";
/// How long the agents get to serve the first request, or to log a refusal.
const START_LIMIT: Duration = Duration::from_secs(20);
const VLAN_ID: u16 = 100;

/// The external device of each node under test.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// `eth0.100` on the nodes and the client.
    Vlan,
    /// `mv0` over each node's `eth0`.
    Macvlan,
    /// `bond0` over each node's `eth0`, in this mode.
    Bond(&'static str),
}

impl Kind {
    /// Node `id`'s address on the device (its `NodePort` address, and its source towards the
    /// other node).
    fn node_ip(self, id: NodeId) -> Ipv4Addr {
        match self {
            Self::Vlan | Self::Macvlan => id.vlan_ip(),
            Self::Bond(_) => id.ip(),
        }
    }

    fn client_ip(self) -> Ipv4Addr {
        match self {
            Self::Vlan | Self::Macvlan => CLIENT_VLAN_IP,
            Self::Bond(_) => CLIENT_IP,
        }
    }

    /// Puts the device on the lab; `None` when the kernel has no such device kind.
    fn build(self, cluster: &mut Cluster) -> Result<Option<String>> {
        let built = match self {
            Self::Vlan => cluster.add_vlan(VLAN_ID),
            Self::Macvlan => cluster.add_macvlan("mv0").map(|()| String::from("mv0")),
            Self::Bond(mode) => NodeId::ALL
                .iter()
                .map(|id| cluster.bond_external(*id, mode))
                .collect::<Result<Vec<_>>>()
                .map(|mut names| names.pop().unwrap_or_default()),
        };
        match built {
            Err(e) if format!("{e:#}").contains("Unknown device type") => {
                eprintln!("skipping the {self:?} device: this kernel has no such device kind ({e:#})");
                Ok(None)
            }
            other => other.map(Some),
        }
    }
}

/// Service `web`: a `NodePort` over TCP and UDP with a backend on each node.
fn manifests() -> String {
    use std::fmt::Write as _;
    let mut endpoints = String::new();
    for id in NodeId::ALL {
        let (addr, node) = (id.pod_ip(11), id.k8s_name());
        let _ = writeln!(endpoints, "- {{addresses: [\"{addr}\"], conditions: {{ready: true}}, nodeName: {node}}}");
    }
    format!(
        r"apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  type: NodePort
  clusterIP: {CLUSTER_IP}
  ports:
  - {{name: tcp, protocol: TCP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
  - {{name: udp, protocol: UDP, port: 80, targetPort: {TARGET_PORT}, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-ipv4, namespace: default, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
endpoints:
{endpoints}ports:
- {{name: tcp, protocol: TCP, port: {TARGET_PORT}}}
- {{name: udp, protocol: UDP, port: {TARGET_PORT}}}
"
    )
}

fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// The lab with a backend on each node, the device of `kind`, and agents serving it with
/// `--xdp-mode mode`; `None` when the kernel has no such device.
fn setup(kind: Kind, mode: &str) -> Result<Option<(Cluster, String, tempfile::TempDir)>> {
    let mut cluster = Cluster::new()?;
    for (id, name) in [(NodeId::ONE, BACKEND_1), (NodeId::TWO, BACKEND_2)] {
        cluster.add_pod(id, name, id.pod_ip(11))?.serve(TARGET_PORT)?;
    }
    let Some(dev) = kind.build(&mut cluster)? else { return Ok(None) };
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("services.yaml"), manifests())?;
    cluster.start_agents(&agent_bin()?, dir.path(), &["--devices", &dev, "--xdp-mode", mode])?;
    Ok(Some((cluster, dev, dir)))
}

/// The lines of both agents' logs that say how the external device went.
fn device_log(cluster: &Cluster) -> String {
    NodeId::ALL
        .iter()
        .flat_map(|id| {
            cluster
                .node(*id)
                .agent_log()
                .lines()
                .filter(|l| l.contains("external") || l.contains("XDP"))
                .map(|l| format!("{id:?}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `NodePort` TCP and UDP through the device of `kind` on both nodes reach both backends, and
/// the backends saw the client (through their own node) and the other node (SNAT).
fn serves(kind: Kind, mode: &str) -> Result<()> {
    let Some((mut cluster, _dev, _dir)) = setup(kind, mode)? else { return Ok(()) };
    let started = Instant::now();
    for id in NodeId::ALL {
        let addr = kind.node_ip(id);
        while let Err(e) = client_tcp(&cluster, addr.into(), NODE_PORT, b"hello") {
            cluster.ensure_agents_running()?;
            ensure!(
                started.elapsed() < START_LIMIT,
                "{id:?}'s NodePort {addr}:{NODE_PORT} never answered: {e:#}\n{}",
                device_log(&cluster)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let (big, small) = (payload(64 * 1024), payload(1200));
    for id in NodeId::ALL {
        let addr = kind.node_ip(id);
        reach_both(&format!("TCP to {addr}:{NODE_PORT}"), || client_tcp(&cluster, addr.into(), NODE_PORT, &big), &big)?;
        reach_both(
            &format!("UDP to {addr}:{NODE_PORT}"),
            || client_udp(&cluster, addr.into(), NODE_PORT, &small),
            &small,
        )?;
    }
    for (pod, local, remote) in [(BACKEND_1, NodeId::ONE, NodeId::TWO), (BACKEND_2, NodeId::TWO, NodeId::ONE)] {
        let seen: BTreeSet<IpAddr> = cluster.pod(pod).peers_on(TARGET_PORT).tcp.iter().map(SocketAddr::ip).collect();
        let (client, snat) = (IpAddr::from(kind.client_ip()), IpAddr::from(kind.node_ip(remote)));
        ensure!(seen.contains(&client), "{pod} never saw the client through {local:?}: {seen:?}");
        ensure!(seen.contains(&snat), "{pod} never saw {remote:?}'s address {snat} (SNAT): {seen:?}");
    }
    cluster.ensure_agents_running()
}

/// Both agents refuse the device of `kind` under `--xdp-mode mode` with an error naming it and
/// the modes to use, keep running, and leave it without programs.
fn refuses(kind: Kind, mode: &str) -> Result<()> {
    let Some((mut cluster, dev, _dir)) = setup(kind, mode)? else { return Ok(()) };
    let wanted = format!("external device not served: {dev} is a ");
    let started = Instant::now();
    for id in NodeId::ALL {
        loop {
            cluster.ensure_agents_running()?;
            let log = cluster.node(id).agent_log();
            if let Some(line) = log.lines().find(|l| l.contains(&wanted)) {
                ensure!(
                    line.contains("ERROR") && line.contains("--xdp-mode generic") && line.contains("tc"),
                    "{id:?}'s refusal does not say what to do: {line}"
                );
                break;
            }
            ensure!(started.elapsed() < START_LIMIT, "{id:?} never refused {dev}:\n{}", device_log(&cluster));
            std::thread::sleep(Duration::from_millis(200));
        }
        ensure!(
            !cluster.node(id).agent_log().contains("external device attached"),
            "{id:?} attached to {dev} after refusing it:\n{}",
            device_log(&cluster)
        );
        // Not translated: the node's own stack, with nothing on the port, refuses.
        let addr = kind.node_ip(id);
        let tried = client_tcp(&cluster, addr.into(), NODE_PORT, b"hello");
        ensure!(tried.is_err(), "{id:?} served {addr}:{NODE_PORT} on a refused device: {tried:?}");
    }
    for pod in [BACKEND_1, BACKEND_2] {
        let peers = cluster.pod(pod).peers_on(TARGET_PORT).tcp;
        ensure!(peers.is_empty(), "{pod} was reached through a refused device: {peers:?}");
    }
    cluster.ensure_agents_running()
}

fn run(what: &str, test: impl FnOnce() -> Result<()>) {
    let Some(_serial) = serial_or_skip(&format!("devices {what}")) else { return };
    if let Err(e) = test() {
        panic!("{what}: {e:#}");
    }
}

#[test]
fn devices_vlan_serves_nodeports_in_auto_generic_and_tc() {
    for mode in ["auto", "generic", "tc"] {
        run(&format!("VLAN, --xdp-mode {mode}"), || serves(Kind::Vlan, mode));
    }
}

#[test]
fn devices_vlan_native_is_refused() {
    run("VLAN, --xdp-mode native", || refuses(Kind::Vlan, "native"));
}

#[test]
fn devices_macvlan_serves_nodeports_in_auto_generic_and_tc() {
    for mode in ["auto", "generic", "tc"] {
        run(&format!("macvlan, --xdp-mode {mode}"), || serves(Kind::Macvlan, mode));
    }
}

#[test]
fn devices_macvlan_native_is_refused() {
    run("macvlan, --xdp-mode native", || refuses(Kind::Macvlan, "native"));
}

#[test]
fn devices_bond_serves_nodeports_in_every_mode() {
    for mode in ["auto", "native", "generic", "tc"] {
        run(&format!("active-backup bond, --xdp-mode {mode}"), || serves(Kind::Bond("active-backup"), mode));
    }
}

#[test]
fn devices_bond_without_native_xdp_is_refused_in_native_mode() {
    run("balance-rr bond, --xdp-mode native", || refuses(Kind::Bond("balance-rr"), "native"));
}

/// One UDP datagram in an 802.1Q-tagged Ethernet frame (VLAN `vid`), with its checksums.
fn tagged_udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vid: u16,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ports: (u16, u16),
) -> Vec<u8> {
    fn sum(bytes: &[u8]) -> u16 {
        let mut total: u32 =
            bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
        while total > 0xffff {
            total = (total & 0xffff) + (total >> 16);
        }
        !u16::try_from(total).unwrap_or(0)
    }
    let body = b"tagged?";
    let udp_len = u16::try_from(8 + body.len()).unwrap_or(0);
    let mut udp = [ports.0.to_be_bytes(), ports.1.to_be_bytes(), udp_len.to_be_bytes(), [0, 0]].concat();
    udp.extend_from_slice(body);
    let pseudo = [&src.octets()[..], &dst.octets(), &[0, 17], &udp_len.to_be_bytes(), &udp].concat();
    let udp_sum = sum(&pseudo).to_be_bytes();
    udp[6..8].copy_from_slice(&udp_sum);
    let mut ip =
        [&[0x45, 0][..], &(20 + udp_len).to_be_bytes(), &[0, 1, 0x40, 0, 64, 17, 0, 0], &src.octets(), &dst.octets()]
            .concat();
    let ip_sum = sum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&ip_sum);
    [&dst_mac[..], &src_mac, &[0x81, 0x00], &vid.to_be_bytes(), &[0x08, 0x00], &ip, &udp].concat()
}

/// Sends `frame` as it is out of `ifname` of the current network namespace (`AF_PACKET`).
fn send_raw(ifname: &str, frame: &[u8]) -> Result<()> {
    let index = nix::net::if_::if_nametoindex(ifname)?;
    // SAFETY: plain socket call; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a new descriptor nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = u16::try_from(libc::AF_PACKET)?;
    addr.sll_ifindex = i32::try_from(index)?;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
    // SAFETY: a valid frame buffer and sockaddr_ll of the right size.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            u32::try_from(size_of::<libc::sockaddr_ll>())?,
        )
    };
    ensure!(usize::try_from(sent).ok() == Some(frame.len()), "sendto: {}", std::io::Error::last_os_error());
    Ok(())
}

/// The MAC address of `dev` on node `id` (the client's with `None`), from `ip` (under nsenter,
/// `/sys` is the host's).
fn mac_of(cluster: &Cluster, id: Option<NodeId>, dev: &str) -> Result<[u8; 6]> {
    let mut ip = match id {
        Some(id) => cluster.node_command(id, "ip"),
        None => cluster.client_command("ip"),
    };
    let out = ip.args(["-br", "link", "show", dev]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mac = text.split_whitespace().nth(2).with_context(|| format!("no MAC in {text:?}"))?;
    let bytes: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect::<Result<_, _>>()?;
    bytes.try_into().map_err(|b| anyhow::anyhow!("MAC {b:?}"))
}

/// Frames tagged with VLAN 100 reach node 1's `eth0` (listed, no VLAN device on it), addressed
/// to its `NodePort` and to the `ClusterIP`: they are not the node's untagged traffic, and the
/// datapath must leave them alone (no conntrack entry; the stack drops them).
fn tagged_frames_pass(mode: &str) -> Result<()> {
    let mut cluster = Cluster::new()?;
    for (id, name) in [(NodeId::ONE, BACKEND_1), (NodeId::TWO, BACKEND_2)] {
        cluster.add_pod(id, name, id.pod_ip(11))?.serve(TARGET_PORT)?;
    }
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("services.yaml"), manifests())?;
    cluster.start_agents(&agent_bin()?, dir.path(), &["--devices", "eth0", "--xdp-mode", mode])?;
    let node1 = NodeId::ONE.ip();
    let started = Instant::now();
    while client_tcp(&cluster, node1.into(), NODE_PORT, b"hello").is_err() {
        cluster.ensure_agents_running()?;
        ensure!(started.elapsed() < START_LIMIT, "node 1's NodePort never answered:\n{}", device_log(&cluster));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (node_mac, client_mac) = (mac_of(&cluster, Some(NodeId::ONE), "eth0")?, mac_of(&cluster, None, "eth0")?);
    for (sport, dst, dport) in [(40001, node1, NODE_PORT), (40002, CLUSTER_IP, 80)] {
        let frame = tagged_udp_frame(node_mac, client_mac, VLAN_ID, CLIENT_IP, dst, (sport, dport));
        cluster.in_client(|| send_raw("eth0", &frame))??;
    }
    std::thread::sleep(Duration::from_millis(300));
    let dump = std::process::Command::new(agent_bin()?)
        .args(["dump", "--conntrack", "--bpffs"])
        .arg(cluster.node(NodeId::ONE).pin_dir())
        .output()?;
    let dump = String::from_utf8_lossy(&dump.stdout);
    let translated: Vec<&str> = dump.lines().filter(|l| l.contains(":40001") || l.contains(":40002")).collect();
    ensure!(
        translated.is_empty(),
        "tagged frames were translated on node 1's eth0 (--xdp-mode {mode}): {translated:#?}"
    );
    cluster.ensure_agents_running()
}

/// TC only: XDP runs where the tag may already be gone (here the bridge's port moved it into the
/// skb's metadata, and neither generic XDP nor the veth's native XDP puts it back into the
/// frame), and `xdp_md` has no field for it: the program sees an untagged frame
/// (docs/datapath.md, "External devices of other kinds").
#[test]
fn devices_tagged_frames_on_a_listed_lower_device_are_not_translated() {
    run("tagged frames, --xdp-mode tc", || tagged_frames_pass("tc"));
}
