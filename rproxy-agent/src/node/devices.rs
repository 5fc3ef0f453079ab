//! Devices: which pod interfaces get the programs, the node addresses of the external devices,
//! and noticing when either changes.
//!
//! A netlink socket subscribed to link and address notifications (`RTNLGRP_LINK`,
//! `RTNLGRP_IPV4_IFADDR`, `RTNLGRP_IPV6_IFADDR`) wakes the agent whenever an interface appears, changes or disappears,
//! or an address is added or removed; the agent then rescans the interface list, attaches to
//! every new device matching `--pod-devices`, and re-reads the addresses of `--devices`
//! ([`node_addresses`]). A periodic rescan covers a missed notification (socket buffer overrun).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use globset::{Glob, GlobSet, GlobSetBuilder};
use ipnet::IpNet;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{Error, Result};

/// `--pod-devices`: one or more comma-separated globs over interface names.
#[derive(Clone, Debug)]
pub struct DevicePattern {
    set: GlobSet,
    text: String,
}

impl DevicePattern {
    pub fn parse(text: &str) -> Result<Self> {
        let mut b = GlobSetBuilder::new();
        let mut any = false;
        for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            b.add(Glob::new(p).map_err(|source| Error::Glob { pattern: p.to_owned(), source })?);
            any = true;
        }
        if !any {
            return Err(Error::Interface {
                name: text.to_owned(),
                reason: String::from("empty --pod-devices pattern"),
            });
        }
        let set = b.build().map_err(|source| Error::Glob { pattern: text.to_owned(), source })?;
        Ok(Self { set, text: text.to_owned() })
    }

    #[must_use]
    pub fn matches(&self, ifname: &str) -> bool {
        self.set.is_match(ifname)
    }

    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// One `--nodeport-addresses` entry: an IPv4 or IPv6 CIDR (`10.0.0.0/8`, `2001:db8::/64`; host
/// bits may be set, as kube-proxy allows).
pub fn parse_cidr(text: &str) -> Result<IpNet> {
    let text = text.trim();
    let invalid = |reason: &str| Error::Cidr { value: text.to_owned(), reason: reason.to_owned() };
    match text.parse::<IpNet>() {
        Ok(net) => Ok(net),
        Err(_) if text.parse::<IpAddr>().is_ok() => Err(invalid("a CIDR needs a prefix length, e.g. 192.0.2.7/32")),
        Err(_) => Err(invalid("not a CIDR such as 10.0.0.0/8")),
    }
}

/// The node's `NodePort` addresses, and the external devices that do not exist.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Sorted, without duplicates.
    pub addresses: Vec<IpAddr>,
    /// Devices of `--devices` that are not in this network namespace, in the order given.
    pub missing: Vec<String>,
}

/// The addresses of `devices` (from `addresses`: interface name → address, as `getifaddrs`
/// lists them) that are inside one of `filter`'s CIDRs; with an empty `filter`, every address
/// but IPv6 link-local ones (`fe80::/10`: a `NodePort` is reached on a routable address; a
/// filter that names them selects them). `present` is the set of interface names that exist.
#[must_use]
pub fn select_node_addresses(
    devices: &[String],
    present: &BTreeSet<String>,
    addresses: &[(String, IpAddr)],
    filter: &[IpNet],
) -> NodeAddresses {
    let wanted: BTreeSet<&str> = devices.iter().map(String::as_str).collect();
    let link_local = |addr: &IpAddr| matches!(addr, IpAddr::V6(a) if a.is_unicast_link_local());
    let selected: BTreeSet<IpAddr> = addresses
        .iter()
        .filter(|(ifname, addr)| {
            let chosen =
                if filter.is_empty() { !link_local(addr) } else { filter.iter().any(|net| net.contains(addr)) };
            wanted.contains(ifname.as_str()) && chosen
        })
        .map(|(_, addr)| *addr)
        .collect();
    let mut missing: Vec<String> = Vec::new();
    for device in devices.iter().filter(|d| !present.contains(*d)) {
        if !missing.contains(device) {
            missing.push(device.clone());
        }
    }
    NodeAddresses { addresses: selected.into_iter().collect(), missing }
}

/// Reads the node's `NodePort` addresses: [`select_node_addresses`] over this network
/// namespace's interfaces and their addresses of both families.
pub fn node_addresses(devices: &[String], filter: &[IpNet]) -> Result<NodeAddresses> {
    let present: BTreeSet<String> = interfaces()?.into_keys().collect();
    let list = nix::ifaddrs::getifaddrs().map_err(|e| Error::Io {
        what: String::from("listing interface addresses"),
        source: std::io::Error::from(e),
    })?;
    let addresses: Vec<(String, IpAddr)> = list
        .filter_map(|ifa| {
            let sa = ifa.address.as_ref()?;
            let addr = match (sa.as_sockaddr_in(), sa.as_sockaddr_in6()) {
                (Some(v4), _) => IpAddr::V4(v4.ip()),
                (_, Some(v6)) => IpAddr::V6(v6.ip()),
                _ => return None,
            };
            Some((ifa.interface_name, addr))
        })
        .collect();
    Ok(select_node_addresses(devices, &present, &addresses, filter))
}

/// The kernel driver of network device `ifname` (`ethtool -i`'s `driver`: `veth`, `virtio_net`,
/// `mlx5_core`…), or `None` when the device does not say (no such device, no ethtool support).
#[must_use]
pub fn driver(ifname: &str) -> Option<String> {
    /// `struct ethtool_drvinfo` (linux/ethtool.h), of which only `driver` is read.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return None;
    }
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: an all-zero ifreq is valid (a name and a union of integers and pointers).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // SAFETY: plain socket call; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: SIOCETHTOOL with a valid ifreq whose data points at a DrvInfo that outlives the
    // call, as the ioctl expects for ETHTOOL_GDRVINFO.
    let r = unsafe { libc::ioctl(fd, libc::SIOCETHTOOL, &raw mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if r < 0 {
        return None;
    }
    let len = info.driver.iter().position(|&b| b == 0).unwrap_or(info.driver.len());
    Some(String::from_utf8_lossy(&info.driver[..len]).into_owned())
}

/// Interfaces of this network namespace: name → ifindex.
pub fn interfaces() -> Result<BTreeMap<String, u32>> {
    let list = nix::net::if_::if_nameindex()
        .map_err(|e| Error::Io { what: String::from("listing interfaces"), source: std::io::Error::from(e) })?;
    Ok(list.iter().filter_map(|i| Some((i.name().to_str().ok()?.to_owned(), i.index()))).collect())
}

/// What netlink says about one interface: its kind (`IFLA_INFO_KIND`: `veth`, `vlan`, `bond`,
/// `macvlan`…; `None` for a physical NIC's driver), the device it sits on (`IFLA_LINK`: a
/// VLAN's or macvlan's lower device), its master (`IFLA_MASTER`: the bond or bridge it is a
/// port of), and a bond's mode (`IFLA_BOND_MODE`: 0 `balance-rr`, 1 `active-backup`, 2
/// `balance-xor`, 3 `broadcast`, 4 `802.3ad`, 5 `balance-tlb`, 6 `balance-alb`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub kind: Option<String>,
    pub lower: Option<u32>,
    pub master: Option<u32>,
    pub bond_mode: Option<u8>,
}

/// The interfaces in one datagram of an `RTM_GETLINK` dump (`RTM_NEWLINK` messages), and
/// whether the dump is over (`NLMSG_DONE` or `NLMSG_ERROR`). A message that does not parse ends
/// the datagram: what came before it is kept.
#[must_use]
pub fn parse_links(mut buf: &[u8]) -> (Vec<Link>, bool) {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::{
        RouteNetlinkMessage,
        link::{InfoBond, InfoData, LinkAttribute, LinkInfo},
    };
    let mut links = Vec::new();
    while !buf.is_empty() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(buf) else { break };
        let len = usize::try_from(msg.header.length).unwrap_or(0);
        match msg.payload {
            NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return (links, true),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                let index = m.header.index;
                let mut link = Link { index, ..Link::default() };
                for attr in m.attributes {
                    match attr {
                        LinkAttribute::IfName(name) => link.name = name,
                        LinkAttribute::Link(i) => link.lower = Some(i).filter(|&i| i != 0 && i != index),
                        LinkAttribute::Controller(i) => link.master = Some(i).filter(|&i| i != 0),
                        LinkAttribute::LinkInfo(infos) => {
                            for info in infos {
                                match info {
                                    LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                                    LinkInfo::Data(InfoData::Bond(bond)) => {
                                        link.bond_mode = bond.iter().find_map(|b| match b {
                                            InfoBond::Mode(mode) => Some(u8::from(*mode)),
                                            _ => None,
                                        });
                                    }
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                links.push(link);
            }
            _ => {}
        }
        if len == 0 {
            break;
        }
        buf = buf.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    (links, false)
}

/// Every interface of this network namespace with its kind, lower device and master
/// ([`Link`]), from an `RTM_GETLINK` dump.
pub fn links() -> Result<Vec<Link>> {
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_route::{RouteNetlinkMessage, link::LinkMessage};
    use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
    let io = |e: std::io::Error| Error::Io { what: String::from("listing interfaces over netlink"), source: e };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(io)?;
    sock.bind_auto().map_err(io)?;
    sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    let mut req = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut out = vec![0u8; req.buffer_len()];
    req.serialize(&mut out);
    sock.send(&out, 0).map_err(io)?;
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    // A dump of thousands of interfaces takes a few hundred datagrams; bounded all the same.
    for _ in 0..100_000 {
        let n = sock.recv(&mut &mut buf[..], 0).map_err(io)?;
        let (links, done) = parse_links(&buf[..n.min(buf.len())]);
        all.extend(links);
        if done || n == 0 {
            return Ok(all);
        }
    }
    Err(io(std::io::Error::other("the RTM_GETLINK dump did not end")))
}

/// What a rescan must do, given the interfaces present, those attached, and the pattern.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Attach (new device, or same name with a new ifindex).
    pub attach: Vec<(String, u32)>,
    /// Forget and unpin (device gone).
    pub detach: Vec<String>,
}

#[must_use]
pub fn plan(present: &BTreeMap<String, u32>, attached: &BTreeMap<String, u32>, pattern: &DevicePattern) -> Plan {
    let attach = present
        .iter()
        .filter(|(name, idx)| pattern.matches(name) && attached.get(*name) != Some(idx))
        .map(|(n, i)| (n.clone(), *i))
        .collect();
    let detach = attached.keys().filter(|n| !present.contains_key(*n)).cloned().collect();
    Plan { attach, detach }
}

/// Starts a thread that sends `()` on `tx` for every burst of link and IPv4 address
/// notifications. The channel has capacity 1: notifications arriving while a rescan is pending
/// coalesce into it.
pub fn watch_links(tx: mpsc::Sender<()>) -> Result<()> {
    use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
    // From linux/rtnetlink.h (enum rtnetlink_groups).
    const RTNLGRP_LINK: u32 = 1;
    const RTNLGRP_IPV4_IFADDR: u32 = 5;
    const RTNLGRP_IPV6_IFADDR: u32 = 9;
    let watch_err =
        |e: std::io::Error| Error::Watch { what: String::from("netlink link notifications"), reason: e.to_string() };
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(watch_err)?;
    sock.bind_auto().map_err(watch_err)?;
    sock.add_membership(RTNLGRP_LINK).map_err(watch_err)?;
    sock.add_membership(RTNLGRP_IPV4_IFADDR).map_err(watch_err)?;
    sock.add_membership(RTNLGRP_IPV6_IFADDR).map_err(watch_err)?;
    std::thread::Builder::new()
        .name(String::from("link-watch"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match sock.recv(&mut &mut buf[..], 0) {
                    Ok(_) => {}
                    // ENOBUFS: we missed notifications; a rescan sees the current state anyway.
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => debug!("netlink overrun"),
                    Err(e) => {
                        warn!(error = %e, "netlink link watch failed; relying on periodic rescans");
                        return;
                    }
                }
                if tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        })
        .map_err(watch_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(items: &[(&str, u32)]) -> BTreeMap<String, u32> {
        items.iter().map(|(n, i)| ((*n).to_owned(), *i)).collect()
    }

    #[test]
    fn patterns() {
        let p = DevicePattern::parse("veth*, lxc*").unwrap();
        assert!(p.matches("veth1234") && p.matches("lxc0") && !p.matches("eth0"));
        assert!(DevicePattern::parse("").is_err());
        assert!(DevicePattern::parse("a[").is_err());
    }

    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn nodeport_address_cidrs() {
        assert_eq!(parse_cidr(" 10.0.0.0/8").unwrap(), "10.0.0.0/8".parse::<IpNet>().unwrap());
        assert!(parse_cidr("192.0.2.7/24").unwrap().contains(&IpAddr::from([192, 0, 2, 200])));
        assert!(parse_cidr("2001:db8::7/64").unwrap().contains(&"2001:db8::1".parse::<IpAddr>().unwrap()));
        for (bad, reason) in [
            ("10.0.0.0/33", "not a CIDR"),
            ("10.0.0.1", "needs a prefix length"),
            ("fd00::1", "needs a prefix length"),
            ("eth0", "not a CIDR"),
            ("", "not a CIDR"),
        ] {
            let err = parse_cidr(bad).unwrap_err().to_string();
            assert!(err.contains(reason) && err.contains("--nodeport-addresses"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn node_addresses_of_the_devices_filtered_sorted_unique() {
        let devices = vec![String::from("eth1"), String::from("eth0"), String::from("gone"), String::from("gone")];
        let present: BTreeSet<String> = ["lo", "eth0", "eth1", "veth1"].iter().map(|s| (*s).to_owned()).collect();
        let addr = |ifname: &str, a: &str| (ifname.to_owned(), a.parse::<IpAddr>().unwrap());
        let addresses = vec![
            addr("lo", "127.0.0.1"),
            addr("eth0", "192.168.1.5"),
            addr("eth0", "10.0.0.5"),
            addr("eth0", "fe80::1"),
            addr("eth0", "2001:db8::5"),
            addr("eth1", "172.18.0.2"),
            addr("eth1", "10.0.0.5"),
            addr("veth1", "169.254.1.1"),
        ];
        let all = select_node_addresses(&devices, &present, &addresses, &[]);
        let ips = |list: &[[u8; 4]]| list.iter().map(|a| IpAddr::from(Ipv4Addr::from(*a))).collect::<Vec<_>>();
        let v6: IpAddr = "2001:db8::5".parse().unwrap();
        // IPv6 link-local addresses are left out unless a filter names them.
        let mut want = ips(&[[10, 0, 0, 5], [172, 18, 0, 2], [192, 168, 1, 5]]);
        want.push(v6);
        assert_eq!(all.addresses, want);
        let link_local = select_node_addresses(&devices, &present, &addresses, &[parse_cidr("fe80::/10").unwrap()]);
        assert_eq!(link_local.addresses, [IpAddr::from(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))]);
        assert_eq!(all.missing, vec![String::from("gone")]);
        let filter = [parse_cidr("10.0.0.0/8").unwrap(), parse_cidr("192.168.1.5/32").unwrap()];
        let filtered = select_node_addresses(&devices, &present, &addresses, &filter);
        assert_eq!(filtered.addresses, ips(&[[10, 0, 0, 5], [192, 168, 1, 5]]));
        // A filter that matches nothing, and no devices at all.
        let none = select_node_addresses(&devices, &present, &addresses, &[parse_cidr("198.51.100.0/24").unwrap()]);
        assert!(none.addresses.is_empty());
        assert_eq!(select_node_addresses(&[], &present, &addresses, &[]), NodeAddresses::default());
    }

    #[test]
    fn drivers_from_the_kernel() {
        // Loopback has an ethtool driver name on no kernel; a missing device has none either.
        assert_eq!(driver("rpx-no-such-dev"), None);
        assert_eq!(driver(""), None);
        assert_eq!(driver("a-name-longer-than-ifnamsiz"), None);
    }

    #[test]
    fn node_addresses_of_loopback_from_the_kernel() {
        // Every network namespace has `lo` with 127.0.0.1 (once up); `lo` is read like any device.
        let found = node_addresses(&[String::from("lo"), String::from("rpx-no-such-dev")], &[]).unwrap();
        assert_eq!(found.missing, vec![String::from("rpx-no-such-dev")]);
        let filtered = node_addresses(&[String::from("lo")], &[parse_cidr("198.51.100.0/24").unwrap()]).unwrap();
        assert!(filtered.addresses.is_empty() && filtered.missing.is_empty());
        assert!(found.addresses.iter().all(IpAddr::is_loopback), "{found:?}");
    }

    #[test]
    fn rescan_plans() {
        let p = DevicePattern::parse("rpx*").unwrap();
        let present = ifs(&[("lo", 1), ("eth0", 2), ("rpxa", 5), ("rpxb", 6)]);
        let attached = ifs(&[("rpxa", 5), ("rpxgone", 4)]);
        let plan = plan(&present, &attached, &p);
        assert_eq!(plan.attach, vec![(String::from("rpxb"), 6)]);
        assert_eq!(plan.detach, vec![String::from("rpxgone")]);
        // Same name, new ifindex (pod re-created): attach again.
        let plan2 = super::plan(&ifs(&[("rpxa", 9)]), &ifs(&[("rpxa", 5)]), &p);
        assert_eq!(plan2.attach, vec![(String::from("rpxa"), 9)]);
    }

    /// One netlink attribute: length, type, payload, padding to 4 bytes.
    fn nla(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = u16::try_from(4 + payload.len()).unwrap().to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    /// An `RTM_NEWLINK` message for interface `index` with `attrs`.
    fn newlink(index: u32, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let mut out = u32::try_from(32 + body.len()).unwrap().to_ne_bytes().to_vec();
        out.extend_from_slice(&16u16.to_ne_bytes());
        out.extend_from_slice(&[0; 10]);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&index.to_ne_bytes());
        out.extend_from_slice(&[0; 8]);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn links_from_netlink_messages() {
        let name = |n: &str| nla(3, format!("{n}\0").as_bytes());
        let kind = |k: &str| nla(1, format!("{k}\0").as_bytes());
        let mut buf = newlink(2, &[name("eth0"), nla(5, &2u32.to_ne_bytes())]);
        buf.extend(newlink(3, &[name("eth0.100"), nla(5, &2u32.to_ne_bytes()), nla(0x12 | 0x8000, &kind("vlan"))]));
        let bond_data = nla(0x2 | 0x8000, &nla(1, &[2]));
        buf.extend(newlink(5, &[name("bond0"), nla(18, &[kind("bond"), bond_data].concat())]));
        buf.extend(newlink(6, &[name("veth1"), nla(10, &5u32.to_ne_bytes()), nla(18, &kind("veth"))]));
        // A vlan's IFLA_INFO_DATA (IFLA_VLAN_ID 1, u16) is not a bond mode.
        let vlan_data = nla(0x2 | 0x8000, &nla(1, &100u16.to_ne_bytes()));
        buf.extend(newlink(7, &[name("v2"), nla(18, &[kind("vlan"), vlan_data].concat())]));
        let (links, done) = parse_links(&buf);
        assert!(!done);
        let want = |name: &str, index, kind: Option<&str>, lower, master, bond_mode| Link {
            name: name.into(),
            index,
            kind: kind.map(String::from),
            lower,
            master,
            bond_mode,
        };
        assert_eq!(
            links,
            [
                want("eth0", 2, None, None, None, None),
                want("eth0.100", 3, Some("vlan"), Some(2), None, None),
                want("bond0", 5, Some("bond"), None, None, Some(2)),
                want("veth1", 6, Some("veth"), None, Some(5), None),
                want("v2", 7, Some("vlan"), None, None, None),
            ]
        );
        // NLMSG_DONE ends the dump; truncated and garbled input yields what came before it.
        let mut done_msg = 16u32.to_ne_bytes().to_vec();
        done_msg.extend_from_slice(&3u16.to_ne_bytes());
        done_msg.extend_from_slice(&[0; 10]);
        assert_eq!(parse_links(&done_msg), (Vec::new(), true));
        let one = newlink(2, &[name("eth0")]);
        assert_eq!(parse_links(&one[..one.len() - 3]), (Vec::new(), false));
        assert_eq!(parse_links(&[0xff; 40]), (Vec::new(), false));
    }

    #[test]
    fn links_of_this_namespace_from_the_kernel() {
        // Every network namespace has `lo`; netlink gives it no kind.
        let links = links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo");
        assert_eq!((lo.index, lo.kind.as_deref(), lo.master), (1, None, None), "{links:?}");
    }
}
