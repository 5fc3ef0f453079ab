//! kube-proxy-shaped baselines: the NAT rules kube-proxy's `iptables` and `nftables` modes
//! generate for `NodePort` Services (`externalTrafficPolicy: Cluster`), as text from pure
//! functions, and their installation in a node's namespace ([`Installed`], removed on drop).
//!
//! **iptables** ([`iptables_rules`], for `iptables-restore --noflush`), table `nat`:
//! `PREROUTING`/`OUTPUT` → `KUBE-SERVICES` (one rule per `ClusterIP`, ending in
//! `-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS`) → `KUBE-NODEPORTS` (one rule per node port)
//! → `KUBE-EXT-<hash>` (`KUBE-MARK-MASQ`, then `KUBE-SVC-<hash>`) → `KUBE-SVC-<hash>`
//! (`-m statistic --mode random --probability 1/(n-i)` for endpoint `i` of `n`, the last one
//! unconditional) → `KUBE-SEP-<hash>` (hairpin `KUBE-MARK-MASQ`, `DNAT --to-destination ip:port`).
//! `KUBE-MARK-MASQ` ors mark 0x4000 in; `KUBE-POSTROUTING` (from `POSTROUTING`) returns unless
//! the mark is set, clears it and masquerades (`--random-fully`). Table `filter` gets kube-proxy's
//! `KUBE-FORWARD` (from `FORWARD`), which every forwarded packet goes through: drop conntrack
//! `INVALID`, accept marked packets, accept `RELATED,ESTABLISHED`.
//!
//! **nftables** ([`nftables_rules`], for `nft -f`): table `ip kube-proxy-bench` with the chains of
//! kube-proxy's nftables mode: `nat-prerouting`/`nat-output` (nat hooks, priority dstnat = -100) jump
//! to `services`, which looks `daddr . l4proto . dport` up in the `service-ips` verdict map and,
//! for a destination in the `nodeport-ips` set, `l4proto . dport` in `service-nodeports`;
//! `external-*` chains mark and go to `service-*`, which picks an endpoint with
//! `numgen random mod n vmap`; `endpoint-*` chains `dnat to ip:port`; `nat-postrouting` (priority
//! srcnat) jumps to `masquerading` (marked packets: clear the mark, `masquerade fully-random`).
//! `filter-forward` (priority filter - 10) jumps to `service-endpoints-check` for new
//! connections (an empty `no-endpoint-services` map here, since every Service has endpoints).
//!
//! **`ClusterIP` Services** (east-west, `cargo xtask bench-clusterip`) get the rules kube-proxy
//! writes for pods reaching a `ClusterIP` with `--cluster-cidr` set (its local-traffic detector):
//! [`cluster_ip_iptables_rules`] has, in `nat`, `PREROUTING`/`OUTPUT` → `KUBE-SERVICES` (one
//! `-m tcp -p tcp -d VIP/32 --dport P -j KUBE-SVC-<hash>` rule per Service port, in the order
//! given, then the `KUBE-NODEPORTS` rule, that chain empty) → `KUBE-SVC-<hash>` (first the
//! `! -s <cluster CIDR> -j KUBE-MARK-MASQ` rule for off-cluster sources, then the statistic rules)
//! → `KUBE-SEP-<hash>` (DNAT); in `filter`, the chains `FORWARD` jumps to:
//! `KUBE-PROXY-FIREWALL`, `KUBE-FORWARD`, `KUBE-SERVICES` and `KUBE-EXTERNAL-SERVICES` (the
//! others empty, as they are while every Service has endpoints and no source ranges).
//! [`cluster_ip_nftables_rules`] has kube-proxy's nftables base chains on the forward path
//! (`filter-prerouting` → `firewall-check`; `filter-forward` → `service-endpoints-check` and
//! `cluster-ips-check`, which rejects other ports of a cluster IP in `cluster-ips` and drops
//! unallocated addresses of the service CIDR; both filter chains at priority dstnat - 10), the
//! `service-ips` verdict map with `VIP . tcp . P : goto service-<…>` per Service port,
//! `service-*` chains (the off-cluster masquerade rule, then `numgen random mod n vmap`) and
//! `endpoint-*` chains (`dnat to`). Chains of the input and output hooks are left out: forwarded
//! traffic never meets them. A Service port without endpoints gets kube-proxy's rejection
//! instead: a `REJECT` rule in `filter`'s `KUBE-SERVICES`, and `VIP . tcp . P : goto
//! reject-chain` in the `no-endpoint-services` map.
//!
//! Hashes in chain names are not kube-proxy's (SHA-256, base32) but a stable 128-bit FNV-1a in
//! the same alphabet and length: only the shape matters for the cost.
use std::{
    fmt::{self, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    cmd::{run, run_with_input},
    manifest::{EndpointSlice, NodePortService, Protocol, Service, ServicePort, TargetPort},
    netns,
};

/// kube-proxy's masquerade mark.
pub const MASQ_MARK: u32 = 0x4000;
/// The nftables table the baseline installs.
pub const NFT_TABLE: &str = "kube-proxy-bench";

/// One Service port as kube-proxy programs it: its frontends and its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub namespace: String,
    pub service: String,
    /// The Service port's name (may be empty).
    pub port_name: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: u16,
    /// Ready endpoints with the resolved target port, in slice order.
    pub endpoints: Vec<SocketAddrV4>,
}

impl Frontend {
    /// `namespace/service:port` (kube-proxy's `ServicePortName`).
    #[must_use]
    pub fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.service, self.port_name)
    }

    fn proto(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }

    fn svc_chain(&self) -> String {
        format!("KUBE-SVC-{}", hash(&[&self.port_name(), self.proto()], 16))
    }

    fn ext_chain(&self) -> String {
        format!("KUBE-EXT-{}", hash(&[&self.port_name(), self.proto()], 16))
    }

    fn sep_chain(&self, endpoint: SocketAddrV4) -> String {
        format!("KUBE-SEP-{}", hash(&[&self.port_name(), self.proto(), &endpoint.to_string()], 16))
    }

    /// kube-proxy's nftables chain name suffix: `<hash>-<ns>/<svc>/<proto>/<port name>`.
    fn nft_base(&self) -> String {
        format!(
            "{}-{}/{}/{}/{}",
            hash(&[&self.port_name(), self.proto()], 8),
            self.namespace,
            self.service,
            self.proto(),
            self.port_name
        )
    }

    fn nft_endpoint(&self, endpoint: SocketAddrV4) -> String {
        let h = hash(&[&self.port_name(), self.proto(), &endpoint.to_string()], 8);
        format!(
            "endpoint-{h}-{}/{}/{}/{}__{}/{}",
            self.namespace,
            self.service,
            self.proto(),
            self.port_name,
            endpoint.ip(),
            endpoint.port()
        )
    }
}

/// The frontends of `service` with the ready endpoints of `slice`: one per Service port, target
/// ports resolved (a named target port through the slice's port names, as kube-proxy does).
pub fn frontends(service: &NodePortService, slice: &EndpointSlice) -> Result<Vec<Frontend>> {
    service
        .ports
        .iter()
        .map(|p| frontend(&service.namespace, &service.name, service.cluster_ip, &p.port, p.node_port, slice))
        .collect()
}

/// [`frontends`] of a `type: ClusterIP` Service: no node port (`node_port` 0, which only the
/// `NodePort` rules read).
pub fn cluster_ip_frontends(service: &Service, slice: &EndpointSlice) -> Result<Vec<Frontend>> {
    service.ports.iter().map(|p| frontend(&service.namespace, &service.name, service.cluster_ip, p, 0, slice)).collect()
}

/// One Service port's [`Frontend`] with the ready IPv4 endpoints of `slice`.
fn frontend(
    namespace: &str,
    name: &str,
    cluster_ip: Ipv4Addr,
    port: &ServicePort,
    node_port: u16,
    slice: &EndpointSlice,
) -> Result<Frontend> {
    let target = match &port.target_port {
        TargetPort::Number(n) => *n,
        TargetPort::Name(target) => {
            slice
                .ports
                .iter()
                .find(|ep| &ep.name == target && ep.protocol == port.protocol)
                .with_context(|| format!("no slice port named {target}"))?
                .port
        }
    };
    Ok(Frontend {
        namespace: namespace.to_owned(),
        service: name.to_owned(),
        port_name: port.name.clone(),
        protocol: port.protocol,
        cluster_ip,
        port: port.port,
        node_port,
        endpoints: slice
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| match e.address {
                // The kube-proxy-shaped rules of the baselines are IPv4 ones.
                std::net::IpAddr::V4(a) => Some(SocketAddrV4::new(a, target)),
                std::net::IpAddr::V6(_) => None,
            })
            .collect(),
    })
}

/// 128-bit FNV-1a of `parts` (joined by NUL), in base32 (RFC 4648 alphabet), `len` ≤ 25 chars.
fn hash(parts: &[&str], len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for (i, part) in parts.iter().enumerate() {
        let sep: &[u8] = if i == 0 { &[] } else { &[0] };
        for &b in sep.iter().chain(part.as_bytes()) {
            h = (h ^ u128::from(b)).wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
        }
    }
    (0..len.min(25)).map(|i| char::from(ALPHABET[usize::try_from((h >> (123 - 5 * i)) & 31).unwrap_or(0)])).collect()
}

/// `1/(n-i)` with ten decimals, as kube-proxy writes `--probability`.
fn probability(n: usize, i: usize) -> String {
    let left = u32::try_from(n - i).unwrap_or(u32::MAX);
    format!("{:.10}", 1.0 / f64::from(left))
}

/// Jump rules from the built-in chains: (table, chain, rule).
const IPT_JUMPS: [(&str, &str, &str); 4] = [
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
];

/// The custom chains of each table, in declaration order.
fn ipt_chains(frontends: &[Frontend]) -> (Vec<String>, Vec<String>) {
    let mut nat: Vec<String> =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].map(String::from).into();
    for f in frontends {
        nat.push(f.svc_chain());
        nat.push(f.ext_chain());
        nat.extend(f.endpoints.iter().map(|&e| f.sep_chain(e)));
    }
    (nat, vec!["KUBE-FORWARD".to_owned()])
}

/// The kube-proxy-shaped ruleset for `iptables-restore --noflush` (see the module doc).
#[must_use]
pub fn iptables_rules(frontends: &[Frontend]) -> String {
    let (nat, filter) = ipt_chains(frontends);
    let mut out = String::new();
    let mut line = |args: fmt::Arguments<'_>| {
        out.write_fmt(args).expect("writing to a String");
        out.push('\n');
    };
    ipt_table_head(&mut line, "nat", &nat, &IPT_JUMPS);
    ipt_masquerade_rules(&mut line);
    for f in frontends {
        ipt_cluster_ip_rule(&mut line, f);
    }
    ipt_nodeports_rule(&mut line);
    for f in frontends {
        let (name, proto, ext, svc) = (f.port_name(), f.proto(), f.ext_chain(), f.svc_chain());
        line(format_args!(
            "-A KUBE-NODEPORTS -m comment --comment {name} -m {proto} -p {proto} --dport {} -j {ext}",
            f.node_port
        ));
        line(format_args!(
            "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
        ));
        line(format_args!("-A {ext} -j {svc}"));
        ipt_endpoint_rules(&mut line, f);
    }
    line(format_args!("COMMIT"));
    ipt_table_head(&mut line, "filter", &filter, &IPT_JUMPS);
    ipt_forward_rules(&mut line);
    line(format_args!("COMMIT"));
    out
}

/// The start of table `table` in an `iptables-restore` file: its `chains` declared, then the
/// `jumps` into them from the built-in chains.
fn ipt_table_head(
    line: &mut impl FnMut(fmt::Arguments<'_>),
    table: &str,
    chains: &[String],
    jumps: &[(&str, &str, &str)],
) {
    line(format_args!("*{table}"));
    for chain in chains {
        line(format_args!(":{chain} - [0:0]"));
    }
    for (_, chain, rule) in jumps.iter().filter(|j| j.0 == table) {
        line(format_args!("-A {chain} {rule}"));
    }
}

/// A frontend's rule in `KUBE-SERVICES`: its cluster IP and port to its `KUBE-SVC-*` chain.
fn ipt_cluster_ip_rule(line: &mut impl FnMut(fmt::Arguments<'_>), f: &Frontend) {
    let (name, proto) = (f.port_name(), f.proto());
    line(format_args!(
        "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} -j {}",
        f.cluster_ip,
        f.port,
        f.svc_chain()
    ));
}

/// `KUBE-SERVICES`' last rule: node-local destinations to `KUBE-NODEPORTS`.
fn ipt_nodeports_rule(line: &mut impl FnMut(fmt::Arguments<'_>)) {
    line(format_args!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in \
         this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    ));
}

/// A frontend's `KUBE-SVC-*` endpoint picks (`1/(n-i)` for endpoint `i` of `n`, the last one
/// unconditional) and its `KUBE-SEP-*` chains' rules (hairpin mark, DNAT).
fn ipt_endpoint_rules(line: &mut impl FnMut(fmt::Arguments<'_>), f: &Frontend) {
    let (name, proto, svc) = (f.port_name(), f.proto(), f.svc_chain());
    let n = f.endpoints.len();
    for (i, &e) in f.endpoints.iter().enumerate() {
        let statistic = if i + 1 < n {
            format!(" -m statistic --mode random --probability {}", probability(n, i))
        } else {
            String::new()
        };
        line(format_args!("-A {svc} -m comment --comment \"{name} -> {e}\"{statistic} -j {}", f.sep_chain(e)));
    }
    for &e in &f.endpoints {
        let sep = f.sep_chain(e);
        line(format_args!("-A {sep} -m comment --comment {name} -s {}/32 -j KUBE-MARK-MASQ", e.ip()));
        line(format_args!("-A {sep} -m comment --comment {name} -m {proto} -p {proto} -j DNAT --to-destination {e}"));
    }
}

/// `KUBE-POSTROUTING` (masquerade marked packets, clearing the mark) and `KUBE-MARK-MASQ`.
fn ipt_masquerade_rules(line: &mut impl FnMut(fmt::Arguments<'_>)) {
    line(format_args!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} -j RETURN"));
    line(format_args!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK:#x}"));
    line(format_args!(
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE \
         --random-fully"
    ));
    line(format_args!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK:#x}"));
}

/// `KUBE-FORWARD`: drop conntrack `INVALID`, accept marked packets, accept `RELATED,ESTABLISHED`.
fn ipt_forward_rules(line: &mut impl FnMut(fmt::Arguments<'_>)) {
    line(format_args!("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"));
    line(format_args!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK:#x}/{MASQ_MARK:#x} \
         -j ACCEPT"
    ));
    line(format_args!(
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate \
         RELATED,ESTABLISHED -j ACCEPT"
    ));
}

/// Removes what [`iptables_rules`] installed (for `iptables-restore --noflush`): the jumps from
/// the built-in chains, then every custom chain flushed (declaring it does that) and deleted.
#[must_use]
pub fn iptables_removal(frontends: &[Frontend]) -> String {
    let (nat, filter) = ipt_chains(frontends);
    ipt_removal(&IPT_JUMPS, [("nat", nat), ("filter", filter)])
}

/// For `iptables-restore --noflush`: per table, `-D` of its `jumps`, then its `chains` flushed
/// (declaring a chain does that) and deleted.
fn ipt_removal(jumps: &[(&str, &str, &str)], tables: [(&str, Vec<String>); 2]) -> String {
    let mut out = String::new();
    for (table, chains) in tables {
        let _ = writeln!(out, "*{table}");
        for (_, chain, rule) in jumps.iter().filter(|j| j.0 == table) {
            let _ = writeln!(out, "-D {chain} {rule}");
        }
        for chain in &chains {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for chain in &chains {
            let _ = writeln!(out, "-X {chain}");
        }
        out.push_str("COMMIT\n");
    }
    out
}

/// An IPv4 CIDR, such as kube-proxy's `--cluster-cidr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Cidr {
    /// `addr/prefix`: a prefix over 32 counts as 32, and the host bits of `addr` are cleared.
    #[must_use]
    pub const fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = if prefix > 32 { 32 } else { prefix };
        Self { addr: Ipv4Addr::from_bits(addr.to_bits() & Self::mask(prefix)), prefix }
    }

    const fn mask(prefix: u8) -> u32 {
        if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
    }

    /// The network address.
    #[must_use]
    pub const fn addr(self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    #[must_use]
    pub const fn prefix(self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is inside.
    #[must_use]
    pub const fn contains(self, ip: Ipv4Addr) -> bool {
        ip.to_bits() & Self::mask(self.prefix) == self.addr.to_bits()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The kube-proxy settings the `ClusterIP` rules depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterIpConfig {
    /// `--cluster-cidr`: the pods' addresses. Traffic to a cluster IP from elsewhere is
    /// masqueraded (`! -s <cidr> -j KUBE-MARK-MASQ`, `ip saddr != <cidr> jump mark-for-masquerade`).
    pub cluster_cidr: Ipv4Cidr,
    /// The service CIDR (nftables: addresses in it that are no cluster IP are dropped).
    pub service_cidr: Ipv4Cidr,
}

/// Jump rules from the built-in chains of the `ClusterIP` rules: (table, chain, rule).
const CLUSTER_IP_JUMPS: [(&str, &str, &str); 7] = [
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL",
    ),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j \
         KUBE-EXTERNAL-SERVICES",
    ),
];

/// The custom chains of each table of the `ClusterIP` rules, in declaration order.
fn cluster_ip_chains(frontends: &[Frontend]) -> (Vec<String>, Vec<String>) {
    let mut nat: Vec<String> =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].map(String::from).into();
    nat.reserve(frontends.iter().map(|f| 1 + f.endpoints.len()).sum());
    for f in frontends.iter().filter(|f| !f.endpoints.is_empty()) {
        nat.push(f.svc_chain());
        nat.extend(f.endpoints.iter().map(|&e| f.sep_chain(e)));
    }
    let filter = ["KUBE-PROXY-FIREWALL", "KUBE-FORWARD", "KUBE-SERVICES", "KUBE-EXTERNAL-SERVICES"].map(String::from);
    (nat, filter.into())
}

/// kube-proxy's iptables rules for `ClusterIP` Service ports (see the module doc), for
/// `iptables-restore --noflush`. `KUBE-SERVICES` holds one rule per frontend in the order given.
#[must_use]
pub fn cluster_ip_iptables_rules(frontends: &[Frontend], config: ClusterIpConfig) -> String {
    let (nat, filter) = cluster_ip_chains(frontends);
    // About 600 bytes per frontend with one endpoint.
    let mut out = String::with_capacity(1024 + frontends.len() * 640);
    let mut line = |args: fmt::Arguments<'_>| {
        out.write_fmt(args).expect("writing to a String");
        out.push('\n');
    };
    ipt_table_head(&mut line, "nat", &nat, &CLUSTER_IP_JUMPS);
    ipt_masquerade_rules(&mut line);
    let served = || frontends.iter().filter(|f| !f.endpoints.is_empty());
    for f in served() {
        ipt_cluster_ip_rule(&mut line, f);
    }
    ipt_nodeports_rule(&mut line);
    for f in served() {
        let (name, proto) = (f.port_name(), f.proto());
        line(format_args!(
            "-A {} -m comment --comment \"{name} cluster IP\" -m {proto} -p {proto} -d {}/32 --dport {} ! -s {} -j \
             KUBE-MARK-MASQ",
            f.svc_chain(),
            f.cluster_ip,
            f.port,
            config.cluster_cidr
        ));
        ipt_endpoint_rules(&mut line, f);
    }
    line(format_args!("COMMIT"));
    ipt_table_head(&mut line, "filter", &filter, &CLUSTER_IP_JUMPS);
    ipt_forward_rules(&mut line);
    for f in frontends.iter().filter(|f| f.endpoints.is_empty()) {
        let (name, proto) = (f.port_name(), f.proto());
        line(format_args!(
            "-A KUBE-SERVICES -m comment --comment \"{name} has no endpoints\" -m {proto} -p {proto} -d {}/32 --dport {} \
             -j REJECT",
            f.cluster_ip, f.port
        ));
    }
    line(format_args!("COMMIT"));
    out
}

/// Removes what [`cluster_ip_iptables_rules`] installed (see [`iptables_removal`]).
#[must_use]
pub fn cluster_ip_iptables_removal(frontends: &[Frontend]) -> String {
    let (nat, filter) = cluster_ip_chains(frontends);
    ipt_removal(&CLUSTER_IP_JUMPS, [("nat", nat), ("filter", filter)])
}

/// kube-proxy's nftables rules for `ClusterIP` Service ports (see the module doc), for `nft -f`,
/// in table [`NFT_TABLE`]; removed by [`nftables_removal`].
#[must_use]
pub fn cluster_ip_nftables_rules(frontends: &[Frontend], config: ClusterIpConfig) -> String {
    // About 700 bytes per frontend with one endpoint.
    let mut o = String::with_capacity(4096 + frontends.len() * 768);
    let mut w = |s: fmt::Arguments<'_>| {
        o.write_fmt(s).expect("writing to a String");
        o.push('\n');
    };
    let mark = format!("{MASQ_MARK:#010x}");
    w(format_args!("table ip {NFT_TABLE} {{"));
    w(format_args!("\tcomment \"rules for kube-proxy (rproxy benchmark baseline)\""));
    for (chain, kind, hook, priority, body) in [
        ("filter-prerouting", "filter", "prerouting", "-110", "ct state new jump firewall-check"),
        (
            "filter-forward",
            "filter",
            "forward",
            "-110",
            "ct state new jump service-endpoints-check\n\t\tct state new jump cluster-ips-check",
        ),
        ("nat-prerouting", "nat", "prerouting", "dstnat", "jump services"),
        ("nat-output", "nat", "output", "-100", "jump services"),
        ("nat-postrouting", "nat", "postrouting", "srcnat", "jump masquerading"),
    ] {
        w(format_args!(
            "\tchain {chain} {{\n\t\ttype {kind} hook {hook} priority {priority}; policy accept;\n\t\t{body}\n\t}}"
        ));
    }
    w(format_args!("\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {mark}\n\t}}"));
    w(format_args!(
        "\tchain masquerading {{\n\t\tmeta mark & {mark} == 0 return\n\t\tmeta mark set meta mark ^ {mark}\n\t\t\
         masquerade fully-random\n\t}}"
    ));
    let mut cluster_ips: Vec<Ipv4Addr> = frontends.iter().map(|f| f.cluster_ip).collect();
    cluster_ips.sort_unstable();
    cluster_ips.dedup();
    w(format_args!(
        "\tset cluster-ips {{\n\t\ttype ipv4_addr{}\n\t}}",
        nft_elements(cluster_ips.iter().map(ToString::to_string))
    ));
    w(format_args!(
        "\tchain cluster-ips-check {{\n\t\tip daddr @cluster-ips reject\n\t\tip daddr {{ {} }} drop\n\t}}",
        config.service_cidr
    ));
    w(format_args!("\tmap firewall-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}}"));
    w(format_args!("\tchain firewall-check {{\n\t\tip daddr . meta l4proto . th dport vmap @firewall-ips\n\t}}"));
    w(format_args!("\tchain reject-chain {{\n\t\treject\n\t}}"));
    w(format_args!(
        "\tmap no-endpoint-services {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict{}\n\t}}",
        nft_elements(frontends.iter().filter(|f| f.endpoints.is_empty()).map(|f| format!(
            "{} . {} . {} : goto reject-chain",
            f.cluster_ip,
            f.proto(),
            f.port
        )))
    ));
    w(format_args!(
        "\tchain service-endpoints-check {{\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}}"
    ));
    w(format_args!("\tset nodeport-ips {{\n\t\ttype ipv4_addr\n\t}}"));
    w(format_args!(
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict{}\n\t}}",
        nft_elements(frontends.iter().filter(|f| !f.endpoints.is_empty()).map(|f| format!(
            "{} . {} . {} : goto service-{}",
            f.cluster_ip,
            f.proto(),
            f.port,
            f.nft_base()
        )))
    ));
    w(format_args!("\tmap service-nodeports {{\n\t\ttype inet_proto . inet_service : verdict\n\t}}"));
    w(format_args!(
        "\tchain services {{\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\t\
         ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\t}}"
    ));
    for f in frontends.iter().filter(|f| !f.endpoints.is_empty()) {
        nft_cluster_ip_chains(&mut w, f, config.cluster_cidr);
    }
    w(format_args!("}}"));
    o
}

/// A served `ClusterIP` frontend's `service-*` chain (off-cluster masquerade, then a random
/// endpoint) and its `endpoint-*` chains (hairpin mark, DNAT).
fn nft_cluster_ip_chains(w: &mut impl FnMut(fmt::Arguments<'_>), f: &Frontend, cluster_cidr: Ipv4Cidr) {
    let (base, proto) = (f.nft_base(), f.proto());
    let masquerade = format!(
        "ip daddr {} {proto} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade",
        f.cluster_ip, f.port
    );
    let picks: Vec<String> =
        f.endpoints.iter().enumerate().map(|(i, &e)| format!("{i} : goto {}", f.nft_endpoint(e))).collect();
    let pick = format!("numgen random mod {} vmap {{ {} }}", picks.len(), picks.join(", "));
    w(format_args!("\tchain service-{base} {{\n\t\t{masquerade}\n\t\t{pick}\n\t}}"));
    for &e in &f.endpoints {
        w(format_args!(
            "\tchain {} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto {proto} dnat to {e}\n\t}}",
            f.nft_endpoint(e),
            e.ip(),
        ));
    }
}

/// `\n\t\telements = { a,\n\t\t\tb }` for a set or map declaration ("" for no items).
fn nft_elements(items: impl Iterator<Item = String>) -> String {
    let mut all = String::new();
    for (i, item) in items.enumerate() {
        all.push_str(if i == 0 { "\n\t\telements = { " } else { ",\n\t\t\t" });
        all.push_str(&item);
    }
    if !all.is_empty() {
        all.push_str(" }");
    }
    all
}

/// The kube-proxy-shaped nftables ruleset for `nft -f` (see the module doc); `node_ips` fill
/// the `nodeport-ips` set (kube-proxy's default: the node's primary addresses).
#[must_use]
pub fn nftables_rules(frontends: &[Frontend], node_ips: &[Ipv4Addr]) -> String {
    let mut o = String::new();
    let mut w = |s: &str| {
        o.push_str(s);
        o.push('\n');
    };
    let mark = format!("{MASQ_MARK:#010x}");
    w(&format!("table ip {NFT_TABLE} {{"));
    w("\tcomment \"rules for kube-proxy (rproxy benchmark baseline)\"");
    for (chain, hook, priority, body) in [
        ("nat-prerouting", "prerouting", "dstnat", "jump services"),
        ("nat-output", "output", "-100", "jump services"),
        ("nat-postrouting", "postrouting", "srcnat", "jump masquerading"),
        ("filter-forward", "forward", "filter - 10", "ct state new jump service-endpoints-check"),
    ] {
        let kind = if chain.starts_with("nat") { "nat" } else { "filter" };
        w(&format!(
            "\tchain {chain} {{\n\t\ttype {kind} hook {hook} priority {priority}; policy accept;\n\t\t{body}\n\t}}"
        ));
    }
    w(&format!("\tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {mark}\n\t}}"));
    w(&format!(
        "\tchain masquerading {{\n\t\tmeta mark & {mark} == 0 return\n\t\tmeta mark set meta mark ^ {mark}\n\t\t\
         masquerade fully-random\n\t}}"
    ));
    let ips: Vec<String> = node_ips.iter().map(ToString::to_string).collect();
    w(&format!("\tset nodeport-ips {{\n\t\ttype ipv4_addr\n\t\telements = {{ {} }}\n\t}}", ips.join(", ")));
    let elements = |items: Vec<String>| {
        if items.is_empty() { String::new() } else { format!("\n\t\telements = {{ {} }}", items.join(",\n\t\t\t")) }
    };
    let service_ips = frontends
        .iter()
        .map(|f| format!("{} . {} . {} : goto service-{}", f.cluster_ip, f.proto(), f.port, f.nft_base()))
        .collect();
    w(&format!(
        "\tmap service-ips {{\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict{}\n\t}}",
        elements(service_ips)
    ));
    let nodeports =
        frontends.iter().map(|f| format!("{} . {} : goto external-{}", f.proto(), f.node_port, f.nft_base())).collect();
    w(&format!(
        "\tmap service-nodeports {{\n\t\ttype inet_proto . inet_service : verdict{}\n\t}}",
        elements(nodeports)
    ));
    w("\tmap no-endpoint-services {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}");
    w("\tchain service-endpoints-check {\n\t\tip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\t}");
    w("\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t\t\
       ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\t}");
    for f in frontends {
        let base = f.nft_base();
        w(&format!("\tchain external-{base} {{\n\t\tjump mark-for-masquerade\n\t\tgoto service-{base}\n\t}}"));
        let picks: Vec<String> =
            f.endpoints.iter().enumerate().map(|(i, &e)| format!("{i} : goto {}", f.nft_endpoint(e))).collect();
        let body = if picks.is_empty() {
            "drop".to_owned()
        } else {
            format!("numgen random mod {} vmap {{ {} }}", picks.len(), picks.join(", "))
        };
        w(&format!("\tchain service-{base} {{\n\t\t{body}\n\t}}"));
        for &e in &f.endpoints {
            w(&format!(
                "\tchain {} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto {} dnat to {e}\n\t}}",
                f.nft_endpoint(e),
                e.ip(),
                f.proto()
            ));
        }
    }
    w("}");
    o
}

/// Removes what [`nftables_rules`] installed.
#[must_use]
pub fn nftables_removal() -> String {
    format!("delete table ip {NFT_TABLE}\n")
}

/// Which baseline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    Iptables,
    Nftables,
}

impl fmt::Display for Baseline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        })
    }
}

/// A baseline installed in a namespace; removed on drop (errors printed).
#[derive(Debug)]
pub struct Installed {
    ns: String,
    baseline: Baseline,
    removal: String,
    removed: bool,
    load_time: Duration,
}

impl Installed {
    /// Installs `baseline` for `frontends` in namespace `ns` (`node_ips` for the nftables
    /// `nodeport-ips` set).
    pub fn new(baseline: Baseline, ns: &str, frontends: &[Frontend], node_ips: &[Ipv4Addr]) -> Result<Self> {
        let (rules, removal) = match baseline {
            Baseline::Iptables => (iptables_rules(frontends), iptables_removal(frontends)),
            Baseline::Nftables => (nftables_rules(frontends, node_ips), nftables_removal()),
        };
        Self::install(baseline, ns, &rules, removal)
    }

    /// Installs `baseline`'s `ClusterIP` rules for `frontends` in namespace `ns`
    /// ([`cluster_ip_iptables_rules`], [`cluster_ip_nftables_rules`]).
    pub fn cluster_ip(baseline: Baseline, ns: &str, frontends: &[Frontend], config: ClusterIpConfig) -> Result<Self> {
        let (rules, removal) = match baseline {
            Baseline::Iptables => {
                (cluster_ip_iptables_rules(frontends, config), cluster_ip_iptables_removal(frontends))
            }
            Baseline::Nftables => (cluster_ip_nftables_rules(frontends, config), nftables_removal()),
        };
        Self::install(baseline, ns, &rules, removal)
    }

    fn install(baseline: Baseline, ns: &str, rules: &str, removal: String) -> Result<Self> {
        let started = Instant::now();
        apply(baseline, ns, rules).with_context(|| {
            // The whole text for small rulesets; the start of a large one.
            let shown: String = rules.lines().take(200).collect::<Vec<_>>().join("\n");
            let more = if rules.lines().nth(200).is_some() { "\n..." } else { "" };
            format!("installing the {baseline} baseline in {ns}:\n{shown}{more}")
        })?;
        let load_time = started.elapsed();
        Ok(Self { ns: ns.to_owned(), baseline, removal, removed: false, load_time })
    }

    /// Which baseline this is.
    #[must_use]
    pub fn baseline(&self) -> Baseline {
        self.baseline
    }

    /// How long `iptables-restore` or `nft -f` took to load the rules.
    #[must_use]
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Leaves the rules to the namespace, whose deletion deletes them (its tables are its own),
    /// instead of removing them: for a namespace about to go, with tens of thousands of chains
    /// whose removal would take as long as their loading.
    pub fn leave_to_namespace(mut self) {
        self.removed = true;
    }

    /// Removes the rules now (dropping does it otherwise, printing errors).
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        apply(self.baseline, &self.ns, &self.removal)
            .with_context(|| format!("removing the {} baseline from {}", self.baseline, self.ns))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = apply(self.baseline, &self.ns, &self.removal)
        {
            eprintln!("rproxy-tests: removing the {} baseline from {}: {e:#}", self.baseline, self.ns);
        }
    }
}

/// Feeds `text` to `iptables-restore --noflush` or `nft -f -` in namespace `ns`.
fn apply(baseline: Baseline, ns: &str, text: &str) -> Result<()> {
    let mut cmd = match baseline {
        Baseline::Iptables => netns::command(ns, "iptables-restore"),
        Baseline::Nftables => netns::command(ns, "nft"),
    };
    match baseline {
        Baseline::Iptables => cmd.arg("--noflush"),
        Baseline::Nftables => cmd.args(["-f", "-"]),
    };
    run_with_input(&mut cmd, text).map(drop)
}

/// What the namespace's rules hold: `iptables-save` output (nat and filter) or `nft list ruleset`.
pub fn dump(baseline: Baseline, ns: &str) -> Result<String> {
    match baseline {
        Baseline::Iptables => {
            let mut all = String::new();
            for table in ["nat", "filter"] {
                all.push_str(&run(netns::command(ns, "iptables-save").args(["-t", table]))?);
            }
            Ok(all)
        }
        Baseline::Nftables => run(netns::command(ns, "nft").args(["list", "ruleset"])),
    }
}

/// `iptables -V` and `nft -v`, e.g. `iptables v1.8.9 (nf_tables); nftables v1.0.6 (Lester Gooch #5)`.
pub fn versions() -> Result<String> {
    let ipt = run(std::process::Command::new("iptables").arg("-V"))?;
    let nft = run(std::process::Command::new("nft").arg("-v"))?;
    Ok(format!("{}; {}", ipt.trim(), nft.trim()))
}

#[cfg(test)]
mod tests;
