//! The two-node lab for north-south traffic: two nodes routed to each other over a shared L2
//! segment, and an external client on that segment.
//!
//! ```text
//!            switch namespace: bridge <prefix>br
//!        ┌──────────────┬──────────────┬───────────────┐
//!   <prefix>s1      <prefix>s2      <prefix>sc          (bridge side of each veth)
//!        │              │              │
//!   node1 eth0      node2 eth0     client eth0
//!   172.31.0.1/24   172.31.0.2/24  172.31.0.100/24
//!   fd00:172:31::1/64  ::2/64      fd00:172:31::100/64
//!   pods 10.244.1.0/24   pods 10.244.2.0/24
//!        fd00:244:1::/64      fd00:244:2::/64
//! ```
//!
//! Both families everywhere: each external device has an IPv4 and an IPv6 address, each node
//! routes the other's pod CIDRs of both families, and [`Cluster::add_pod_dual`] makes
//! dual-stack pods (IPv4-only ones with [`Cluster::add_pod`]).
//!
//! Each node is a [`Node`] (Calico-style routed pods, see [`crate::lab`]) with an external device
//! `eth0` on the shared /24 and a route to the other node's pod CIDR via the other node's `eth0`
//! address. Nodes send no ICMP redirects: a node port whose backend is on the other node is
//! forwarded out of the `eth0` it came in on, and the client must keep sending to the node. The client has only its address on the /24: no route to any pod, as for a client
//! outside the cluster. Host-side pod devices are `<prefix>a<n>` on node 1 and `<prefix>b<n>` on
//! node 2. Every lab uses the same addresses: they exist only inside its own namespaces.
//!
//! **Offloads.** TX checksum offload is off on both ends of the three external veths
//! (`ethtool -K <dev> tx off`). With it on, the kernel hands a veth `CHECKSUM_PARTIAL` packets
//! whose L4 checksum field holds only the pseudo-header sum, to be completed "by the hardware"
//! later; veth never completes it, and the receiving skb just carries the partial state along.
//! An XDP program sees raw bytes without that skb metadata: an incremental checksum update
//! over a partial sum, then `XDP_TX`/`XDP_REDIRECT`, would put a wrong checksum on the wire. With
//! TX offload off the sender computes complete checksums, so the frames look like frames from a
//! real wire. GRO stays off on the bridge-side peers (`ethtool -K <peer> gro off`): GRO would
//! merge segments into super-packets whose L4 checksum field holds a `CHECKSUM_PARTIAL` seed,
//! and XDP on the next node would see neither wire frames nor complete checksums.
//!
//! **XDP on the switch ports.** Every bridge-side peer runs rproxy's `XDP_PASS` program
//! (`rpx_xdp_noop`, [`crate::xdp::PassProgram`]) in driver mode, in every use of the lab. Veth
//! runs a NAPI poll on a device only with GRO or an XDP program, and native `XDP_TX` /
//! `XDP_REDIRECT` out of a veth hands frames to the peer's NAPI ring: without a program there,
//! a node's native XDP (`--xdp-mode native`) would transmit into nothing. With it, frames from
//! the nodes cross the switch port's ring and its program, and native XDP works end to end. GRO
//! is turned off after the program is attached (some kernels turn GRO on with a veth's first XDP
//! program). The links are the cluster's and detach when it is dropped.
//!
//! **Queues.** Each end of an external veth has one queue per CPU each way, and transmit queue
//! `i` is pinned to CPU `i` (XPS): a frame sent on CPU `i` lands in receive queue `i` of the
//! other end and is polled by CPU `i`'s NAPI, as a multi-queue NIC with RSS spreads its work. With
//! a single queue, one CPU's NAPI would poll every frame native XDP receives while the stack's
//! path (no NAPI: `netif_rx` on the sending CPU) used every CPU, and the packet generator's
//! frames from the other CPUs would overflow that one ring.
//!
//! Dropping a [`Cluster`] (also while a test panics) stops both agents, runs
//! `rproxy-agent cleanup` for each, removes their pin dirs and deletes every namespace.
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};
use aya::programs::xdp::XdpLink;
use tempfile::TempDir;

use crate::{
    cmd::{ip, run, run_with_input},
    lab::{IFNAMSIZ_MAX, Node, NodeSpec, Pod, next_prefix},
    netns::{self, NetNs, in_netns},
    wire::WireSink,
    xdp::PassProgram,
};

/// The external device of each node and of the client.
pub const EXTERNAL_DEV: &str = "eth0";
/// The client's address on the shared segment.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 100);
/// The client's IPv6 address on the shared segment.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, 0x100);
/// The client's address on the lab's VLAN ([`Cluster::add_vlan`]).
pub const CLIENT_VLAN_IP: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 100);
/// The client's IPv6 address on the lab's VLAN.
pub const CLIENT_VLAN_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, 0x100);
/// Prefix length of the shared segment (172.31.0.0/24).
pub const EXTERNAL_PREFIX_LEN: u8 = 24;
/// Prefix length of the shared segment's IPv6 subnet (`fd00:172:31::/64`).
pub const EXTERNAL_PREFIX_LEN6: u8 = 64;
/// Most queues an external veth gets (one per CPU up to this).
const MAX_QUEUES: usize = 64;

/// One of the cluster's nodes, numbered from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(u8);

impl NodeId {
    pub const ONE: Self = Self(1);
    pub const TWO: Self = Self(2);
    /// Both nodes of the two-node lab ([`Cluster::new`]).
    pub const ALL: [Self; 2] = [Self::ONE, Self::TWO];

    /// Node `number` (1 to [`MAX_NODES`]).
    ///
    /// # Panics
    /// Outside that range.
    #[must_use]
    pub fn new(number: u8) -> Self {
        assert!((1..=MAX_NODES).contains(&number), "node number {number} not in 1..={MAX_NODES}");
        Self(number)
    }

    /// 1, 2, …
    #[must_use]
    pub fn number(self) -> u8 {
        self.0
    }

    /// The other node of the two-node lab.
    #[must_use]
    pub fn peer(self) -> Self {
        if self == Self::ONE { Self::TWO } else { Self::ONE }
    }

    /// The Kubernetes node name: `node-1`, `node-2`, … (`--node-name`, endpoints' `nodeName`).
    #[must_use]
    pub fn k8s_name(self) -> String {
        format!("node-{}", self.0)
    }

    /// The address of the node's `eth0`: 172.31.0.N (/24).
    #[must_use]
    pub fn ip(self) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, 0, self.0)
    }

    /// The node's address on the lab's VLAN ([`Cluster::add_vlan`]): 172.30.0.N (/24).
    #[must_use]
    pub fn vlan_ip(self) -> Ipv4Addr {
        Ipv4Addr::new(172, 30, 0, self.0)
    }

    /// The node's IPv6 address on the lab's VLAN: `fd00:172:30::N` (/64).
    #[must_use]
    pub fn vlan_ip6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x172, 0x30, 0, 0, 0, 0, u16::from(self.0))
    }

    /// The node's pod CIDR, /24: 10.244.N.0.
    #[must_use]
    pub fn pod_cidr(self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.0, 0)
    }

    /// Address `host` (1..=254) in the node's pod CIDR.
    #[must_use]
    pub fn pod_ip(self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.0, host)
    }

    /// The IPv6 address of the node's `eth0`: `fd00:172:31::N` (/64).
    #[must_use]
    pub fn ip6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x172, 0x31, 0, 0, 0, 0, u16::from(self.0))
    }

    /// The node's IPv6 pod CIDR, /64: `fd00:244:N::`.
    #[must_use]
    pub fn pod_cidr6(self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x244, u16::from(self.0), 0, 0, 0, 0, 0)
    }

    /// IPv6 address `host` in the node's pod CIDR: `fd00:244:N::host`.
    #[must_use]
    pub fn pod_ip6(self, host: u8) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x244, u16::from(self.0), 0, 0, 0, 0, u16::from(host))
    }

    /// The letter of the node's host-side pod devices (`<prefix>a<n>` on node 1, …).
    fn device_letter(self) -> char {
        char::from(b'a' + self.0 - 1)
    }

    fn index(self) -> usize {
        usize::from(self.0 - 1)
    }
}

/// Most nodes a [`Cluster`] has.
pub const MAX_NODES: u8 = 16;

/// The lab of nodes on one segment (two by default; see the module doc).
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    // Drop order: nodes (agents, pods, node namespaces), the switch ports' XDP links, the
    // program, client, switch, then the work dir.
    nodes: Vec<Node>,
    switch_xdp: Vec<XdpLink>,
    pass: PassProgram,
    client: NetNs,
    switch: NetNs,
    work: TempDir,
}

impl Cluster {
    /// Builds the switch, both nodes and the client (see the module doc).
    pub fn new() -> Result<Self> {
        Self::with_nodes(2)
    }

    /// Builds the switch, `count` nodes (1 to [`MAX_NODES`]) and the client.
    pub fn with_nodes(count: u8) -> Result<Self> {
        ensure!((1..=MAX_NODES).contains(&count), "{count} nodes: 1 to {MAX_NODES} are supported");
        let prefix = next_prefix()?;
        let work = tempfile::Builder::new().prefix(&format!("{prefix}-")).tempdir()?;
        let mut reserved: Vec<String> = ["switch", "client"].map(String::from).into();
        reserved.extend((1..=count).map(|n| format!("node{n}")));
        let node = |id: NodeId| {
            let n = id.number();
            Node::create(NodeSpec {
                ns: format!("{prefix}-node{n}"),
                name: id.k8s_name(),
                // Each node's pods have a prefix of their own: the node's agent lists its pods'
                // namespaces by it (`Node::pod_netns_glob`).
                ns_prefix: format!("{prefix}-n{n}"),
                dev_prefix: format!("{prefix}{}", id.device_letter()),
                reserved: reserved.clone(),
                pin_dir: Path::new("/sys/fs/bpf").join(format!("{prefix}-node{n}")),
                log: work.path().join(format!("agent-node{n}.log")),
            })
        };
        let nodes = (1..=count).map(|n| node(NodeId::new(n))).collect::<Result<Vec<_>>>()?;
        let client = NetNs::create(&format!("{prefix}-client"))?;
        let switch = NetNs::create(&format!("{prefix}-switch"))?;
        let pass = PassProgram::load()?;
        let mut cluster = Self { prefix, nodes, switch_xdp: Vec::new(), pass, client, switch, work };
        cluster.wire().with_context(|| format!("wiring cluster {}", cluster.prefix))?;
        Ok(cluster)
    }

    /// The nodes' ids, in order.
    #[must_use]
    pub fn node_ids(&self) -> Vec<NodeId> {
        (1..=u8::try_from(self.nodes.len()).unwrap_or(MAX_NODES)).map(NodeId::new).collect()
    }

    /// The bridge in the switch namespace.
    #[must_use]
    pub fn bridge(&self) -> String {
        format!("{}br", self.prefix)
    }

    /// The bridge, the external veths (with `XDP_PASS` on their bridge side), addresses and
    /// routes.
    fn wire(&mut self) -> Result<()> {
        let bridge = format!("{}br", self.prefix);
        let sw = Some(self.switch.name());
        ip(sw, &["link", "add", &bridge, "type", "bridge"])?;
        ip(sw, &["link", "set", &bridge, "up"])?;
        let mut ends: Vec<(&str, String, Ipv4Addr, Ipv6Addr)> = self
            .node_ids()
            .into_iter()
            .map(|id| (self.nodes[id.index()].ns(), format!("s{}", id.number()), id.ip(), id.ip6()))
            .collect();
        ends.push((self.client.name(), String::from("sc"), CLIENT_IP, CLIENT_IP6));
        let queues = external_queues();
        let q = queues.to_string();
        let multi = ["numtxqueues", q.as_str(), "numrxqueues", q.as_str()];
        for (ns, suffix, addr, addr6) in ends {
            let peer = format!("{}{suffix}", self.prefix);
            ensure!(peer.len() <= IFNAMSIZ_MAX, "interface name {peer} is too long");
            let mut add = vec!["link", "add", peer.as_str()];
            add.extend(multi);
            add.extend(["type", "veth", "peer", "name", EXTERNAL_DEV, "netns", ns]);
            add.extend(multi);
            ip(sw, &add)?;
            ip(sw, &["link", "set", &peer, "master", &bridge, "up"])?;
            let link = self.pass.attach_native(self.switch.name(), &peer)?;
            self.switch_xdp.push(link);
            run(netns::command(self.switch.name(), "ethtool").args(["-K", &peer, "tx", "off", "gro", "off"]))?;
            run(netns::command(ns, "ethtool").args(["-K", EXTERNAL_DEV, "tx", "off"]))?;
            set_xps(self.switch.name(), &peer, queues)?;
            set_xps(ns, EXTERNAL_DEV, queues)?;
            let cidr = format!("{addr}/{EXTERNAL_PREFIX_LEN}");
            ip(Some(ns), &["addr", "add", &cidr, "dev", EXTERNAL_DEV])?;
            // No duplicate address detection: the address is usable at once.
            let cidr6 = format!("{addr6}/{EXTERNAL_PREFIX_LEN6}");
            ip(Some(ns), &["-6", "addr", "add", &cidr6, "dev", EXTERNAL_DEV, "nodad"])?;
            ip(Some(ns), &["link", "set", EXTERNAL_DEV, "up"])?;
        }
        for id in self.node_ids() {
            for other in self.node_ids().into_iter().filter(|other| *other != id) {
                let cidr = format!("{}/24", other.pod_cidr());
                let via = other.ip().to_string();
                ip(Some(self.node(id).ns()), &["route", "add", &cidr, "via", &via, "dev", EXTERNAL_DEV])?;
                let cidr6 = format!("{}/64", other.pod_cidr6());
                let via6 = other.ip6().to_string();
                ip(Some(self.node(id).ns()), &["-6", "route", "add", &cidr6, "via", &via6, "dev", EXTERNAL_DEV])?;
            }
        }
        Ok(())
    }

    /// Puts VLAN `vid` on the segment: a device `eth0.<vid>` (802.1Q) over `eth0` on every node
    /// and on the client, with the node's [`NodeId::vlan_ip`] and [`NodeId::vlan_ip6`] (the
    /// client's [`CLIENT_VLAN_IP`], [`CLIENT_VLAN_IP6`]), checksum offload off like `eth0`'s. Each
    /// node's routes to the other nodes' pod CIDRs move onto the VLAN (via their VLAN
    /// addresses), so that traffic between nodes is tagged too, as on a node whose network is
    /// the VLAN; `eth0` keeps its untagged addresses. The bridge forwards tagged frames as they
    /// are. Returns the device name. Needs a kernel with 802.1Q support ([`vlan_supported`]).
    pub fn add_vlan(&mut self, vid: u16) -> Result<String> {
        ensure!((1..4095).contains(&vid), "VLAN id {vid} not in 1..=4094");
        let dev = format!("{EXTERNAL_DEV}.{vid}");
        let vid = vid.to_string();
        self.add_upper(&dev, &["type", "vlan", "id", &vid], true)?;
        Ok(dev)
    }

    /// Like [`Cluster::add_vlan`] with a macvlan device `name` (bridge mode) over each node's
    /// `eth0` instead of a VLAN: untagged frames to the macvlan's own MAC. The client takes its
    /// second address on its `eth0`.
    pub fn add_macvlan(&mut self, name: &str) -> Result<()> {
        self.add_upper(name, &["type", "macvlan", "mode", "bridge"], false)
    }

    /// Device `dev` over `eth0` (`ip link add link eth0 name <dev> <kind>...`) on every node
    /// (and the client when `on_client`; otherwise the client's `eth0` takes the address), with
    /// the lab's second subnet, and the routes between nodes moved onto it.
    fn add_upper(&mut self, dev: &str, kind: &[&str], on_client: bool) -> Result<()> {
        ensure!(dev.len() <= IFNAMSIZ_MAX, "interface name {dev} is too long");
        let mut ends: Vec<(String, Ipv4Addr, Ipv6Addr)> = self
            .node_ids()
            .into_iter()
            .map(|id| (self.node(id).ns().to_owned(), id.vlan_ip(), id.vlan_ip6()))
            .collect();
        ends.push((self.client.name().to_owned(), CLIENT_VLAN_IP, CLIENT_VLAN_IP6));
        let client = self.client.name().to_owned();
        for (ns_name, addr, addr6) in &ends {
            let ns = Some(ns_name.as_str());
            let target = if *ns_name == client && !on_client {
                EXTERNAL_DEV
            } else {
                let mut add = vec!["link", "add", "link", EXTERNAL_DEV, "name", dev];
                add.extend(kind);
                ip(ns, &add)?;
                run(netns::command(ns_name, "ethtool").args(["-K", dev, "tx", "off"]))?;
                // Only the device holding an address answers ARP for it: `eth0` must not answer
                // for the upper device's address (a macvlan has a MAC of its own).
                run(netns::command(ns_name, "sysctl").args(["-qw", "net.ipv4.conf.all.arp_ignore=1"]))?;
                dev
            };
            ip(ns, &["addr", "add", &format!("{addr}/{EXTERNAL_PREFIX_LEN}"), "dev", target])?;
            ip(ns, &["-6", "addr", "add", &format!("{addr6}/{EXTERNAL_PREFIX_LEN6}"), "dev", target, "nodad"])?;
            ip(ns, &["link", "set", target, "up"])?;
        }
        for id in self.node_ids() {
            let ns = Some(self.node(id).ns());
            for other in self.node_ids().into_iter().filter(|other| *other != id) {
                let (cidr, via) = (format!("{}/24", other.pod_cidr()), other.vlan_ip().to_string());
                ip(ns, &["route", "replace", &cidr, "via", &via, "dev", dev])?;
                let (cidr6, via6) = (format!("{}/64", other.pod_cidr6()), other.vlan_ip6().to_string());
                ip(ns, &["-6", "route", "replace", &cidr6, "via", &via6, "dev", dev])?;
            }
        }
        Ok(())
    }

    /// Enslaves node `id`'s `eth0` to a new bond `bond0` in `mode` (`active-backup`,
    /// `balance-xor`, `balance-rr`, …; miimon 100): `eth0`'s addresses and its routes to the
    /// other nodes' pod CIDRs move to the bond, which takes `eth0`'s MAC, with checksum offload
    /// off like `eth0`'s. Returns the bond's name. The bond goes with the namespace.
    pub fn bond_external(&mut self, id: NodeId, mode: &str) -> Result<String> {
        let dev = String::from("bond0");
        let ns_name = self.node(id).ns().to_owned();
        let ns = Some(ns_name.as_str());
        ip(ns, &["link", "add", &dev, "type", "bond", "mode", mode, "miimon", "100"])?;
        ip(ns, &["addr", "flush", "dev", EXTERNAL_DEV])?;
        ip(ns, &["link", "set", EXTERNAL_DEV, "down"])?;
        ip(ns, &["link", "set", EXTERNAL_DEV, "master", &dev])?;
        ip(ns, &["link", "set", &dev, "up"])?;
        ip(ns, &["link", "set", EXTERNAL_DEV, "up"])?;
        run(netns::command(&ns_name, "ethtool").args(["-K", &dev, "tx", "off"]))?;
        ip(ns, &["addr", "add", &format!("{}/{EXTERNAL_PREFIX_LEN}", id.ip()), "dev", &dev])?;
        ip(ns, &["-6", "addr", "add", &format!("{}/{EXTERNAL_PREFIX_LEN6}", id.ip6()), "dev", &dev, "nodad"])?;
        for other in self.node_ids().into_iter().filter(|other| *other != id) {
            let (cidr, via) = (format!("{}/24", other.pod_cidr()), other.ip().to_string());
            ip(ns, &["route", "replace", &cidr, "via", &via, "dev", &dev])?;
            let (cidr6, via6) = (format!("{}/64", other.pod_cidr6()), other.ip6().to_string());
            ip(ns, &["-6", "route", "replace", &cidr6, "via", &via6, "dev", &dev])?;
        }
        Ok(dev)
    }

    /// Queues of each external veth (each end): one per CPU (see the module doc).
    #[must_use]
    pub fn external_queues(&self) -> usize {
        external_queues()
    }

    /// `rpx<pid><counter>`: the start of every name this lab creates.
    #[must_use]
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Node `id` (its namespace, pods and agent).
    #[must_use]
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    /// Node `id`, mutable (to add pods or drive its agent).
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.index()]
    }

    /// The address of node `id`'s `eth0` (what external clients connect to).
    #[must_use]
    pub fn node_ip(&self, id: NodeId) -> Ipv4Addr {
        id.ip()
    }

    /// The client's network namespace.
    #[must_use]
    pub fn client_ns(&self) -> &str {
        self.client.name()
    }

    /// The client's address.
    #[must_use]
    pub fn client_ip(&self) -> Ipv4Addr {
        CLIENT_IP
    }

    /// The switch's network namespace (the bridge and the bridge side of every external veth).
    #[must_use]
    pub fn switch_ns(&self) -> &str {
        self.switch.name()
    }

    /// The bridge-side peer of node `id`'s `eth0`, in the switch namespace.
    #[must_use]
    pub fn switch_port(&self, id: NodeId) -> String {
        format!("{}s{}", self.prefix, id.number())
    }

    /// The bridge-side peer of the client's `eth0`, in the switch namespace.
    #[must_use]
    pub fn client_switch_port(&self) -> String {
        format!("{}sc", self.prefix)
    }

    /// rproxy's `XDP_PASS` program, as attached to the switch ports (for
    /// [`crate::pktgen::LiveFrames`]).
    pub fn pass_program(&mut self) -> &mut PassProgram {
        &mut self.pass
    }

    /// Replaces the `XDP_PASS` program on node `id`'s switch port with the wire sink for `mac`
    /// ([`crate::wire`]): from then on, frames node `id` sends to `mac` are counted and dropped
    /// there instead of crossing the bridge. For the rest of the cluster's life.
    pub fn sink_switch_port(&mut self, id: NodeId, mac: [u8; 6]) -> Result<()> {
        let mut sink = WireSink::load(mac)?;
        // Ports were attached in the order of `wire`'s ends: node 1, node 2, client. One device
        // takes one XDP link, so the pass program's goes first.
        drop(self.switch_xdp.remove(id.index()));
        let link = sink.attach_native(self.switch.name(), &self.switch_port(id))?;
        self.switch_xdp.insert(id.index(), link);
        Ok(())
    }

    /// Every namespace of the cluster: switch, client, nodes, pods.
    #[must_use]
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = vec![self.switch.name().to_owned(), self.client.name().to_owned()];
        for node in &self.nodes {
            all.push(node.ns().to_owned());
            all.extend(node.pods().iter().map(|p| p.ns().to_owned()));
        }
        all
    }

    /// A scratch directory removed with the cluster (holds the agents' logs).
    #[must_use]
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Adds pod `name` with address `ip_addr` (in node `id`'s pod CIDR) on node `id`. Pod names
    /// are unique across the cluster.
    pub fn add_pod(&mut self, id: NodeId, name: &str, ip_addr: Ipv4Addr) -> Result<&mut Pod> {
        self.check_new_pod(id, name, ip_addr)?;
        self.node_mut(id).add_pod(name, ip_addr)
    }

    fn check_new_pod(&self, id: NodeId, name: &str, ip_addr: Ipv4Addr) -> Result<()> {
        ensure!(
            ip_addr.octets()[..3] == id.pod_cidr().octets()[..3],
            "{ip_addr} is not in {}'s pod CIDR {}/24",
            id.k8s_name(),
            id.pod_cidr()
        );
        ensure!(self.find_pod(name).is_none(), "pod {name} exists already");
        Ok(())
    }

    /// [`Cluster::add_pod`] with an IPv6 address too (in node `id`'s IPv6 pod CIDR): a
    /// dual-stack pod.
    pub fn add_pod_dual(&mut self, id: NodeId, name: &str, ip_addr: Ipv4Addr, ip6: Ipv6Addr) -> Result<&mut Pod> {
        ensure!(
            ip6.segments()[..4] == id.pod_cidr6().segments()[..4],
            "{ip6} is not in {}'s IPv6 pod CIDR {}/64",
            id.k8s_name(),
            id.pod_cidr6()
        );
        self.check_new_pod(id, name, ip_addr)?;
        self.node_mut(id).add_pod_dual(name, ip_addr, ip6)
    }

    /// The pod named `name`, on either node, if any.
    #[must_use]
    pub fn find_pod(&self, name: &str) -> Option<&Pod> {
        self.nodes.iter().find_map(|n| n.find_pod(name))
    }

    /// The pod named `name`, on either node.
    ///
    /// # Panics
    /// If there is none.
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.find_pod(name).unwrap_or_else(|| panic!("no pod {name} in cluster {}", self.prefix))
    }

    /// The pod named `name`, on either node, mutable (to start servers in it).
    ///
    /// # Panics
    /// If there is none.
    pub fn pod_mut(&mut self, name: &str) -> &mut Pod {
        let prefix = &self.prefix;
        self.nodes
            .iter_mut()
            .find_map(|n| n.find_pod_mut(name))
            .unwrap_or_else(|| panic!("no pod {name} in cluster {prefix}"))
    }

    /// Runs `f` in the client's namespace (see [`in_netns`]).
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.client.name(), f)
    }

    /// Runs `f` in node `id`'s namespace (see [`in_netns`]).
    pub fn in_node<T: Send>(&self, id: NodeId, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(self.node(id).ns(), f)
    }

    /// A command running `program` in the client's namespace (see [`netns::command`]).
    #[must_use]
    pub fn client_command(&self, program: &str) -> Command {
        netns::command(self.client.name(), program)
    }

    /// A command running `program` in node `id`'s namespace (see [`netns::command`]).
    #[must_use]
    pub fn node_command(&self, id: NodeId, program: &str) -> Command {
        netns::command(self.node(id).ns(), program)
    }

    /// Starts `rproxy-agent run` in both nodes on the manifests in `manifests`, each with its own
    /// pin dir and log, and `extra_args` appended (such as `--devices eth0`).
    pub fn start_agents(&mut self, agent_bin: &Path, manifests: &Path, extra_args: &[&str]) -> Result<()> {
        for node in &mut self.nodes {
            node.start_agent(agent_bin, manifests, extra_args).with_context(|| format!("on {}", node.name()))?;
        }
        Ok(())
    }

    /// Fails, with the log of the first agent that exited, unless both are running.
    pub fn ensure_agents_running(&mut self) -> Result<()> {
        for node in &mut self.nodes {
            let name = node.name().to_owned();
            node.ensure_agent_running().with_context(|| format!("agent on {name}"))?;
        }
        Ok(())
    }

    /// Stops both agents and removes their datapath (`rproxy-agent cleanup`) and pin dirs.
    pub fn remove_agents(&mut self) -> Result<()> {
        let results: Vec<Result<()>> = self.nodes.iter_mut().map(Node::remove_agent).collect();
        results.into_iter().collect()
    }

    /// The agents' pin dirs, node 1's first.
    #[must_use]
    pub fn pin_dirs(&self) -> Vec<PathBuf> {
        self.nodes.iter().map(|n| n.pin_dir().to_owned()).collect()
    }
}

/// One queue per CPU, at most [`MAX_QUEUES`].
fn external_queues() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from).min(MAX_QUEUES)
}

/// Maps transmit queue `i` of device `dev` in namespace `ns` to CPU `i` (XPS), for `queues`
/// queues. `/sys/class/net` shows the namespace of the sysfs instance, so the write runs under
/// `ip netns exec`, which mounts one for `ns`.
fn set_xps(ns: &str, dev: &str, queues: usize) -> Result<()> {
    for (queue, mask) in xps_masks(queues).iter().enumerate() {
        let path = format!("/sys/class/net/{dev}/queues/tx-{queue}/xps_cpus");
        run_with_input(Command::new("ip").args(["netns", "exec", ns, "tee", &path]).stdout(Stdio::null()), mask)
            .with_context(|| format!("setting XPS of {dev} in {ns}"))?;
    }
    Ok(())
}

/// The XPS CPU mask of each of `queues` transmit queues: queue `i` → CPU `i`, in the hex format
/// of `xps_cpus` (32-bit words separated by commas, most significant first).
fn xps_masks(queues: usize) -> Vec<String> {
    (0..queues)
        .map(|cpu| {
            let words = cpu / 32 + 1;
            (0..words)
                .rev()
                .map(|w| if w == cpu / 32 { format!("{:08x}", 1u32 << (cpu % 32)) } else { "00000000".to_owned() })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xps_maps_queue_i_to_cpu_i() {
        assert_eq!(xps_masks(3), ["00000001", "00000002", "00000004"]);
        let masks = xps_masks(MAX_QUEUES);
        assert_eq!(masks[31], "80000000");
        assert_eq!(masks[32], "00000001,00000000");
        assert_eq!(masks.len(), MAX_QUEUES);
    }
}
