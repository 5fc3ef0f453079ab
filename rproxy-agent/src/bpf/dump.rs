//! `rproxy-agent dump`: the pinned maps in human form (the same data `bpftool map dump pinned`
//! shows as bytes), IPv4's maps then IPv6's; with `-o json`, the same as one JSON object.
use std::{
    collections::BTreeMap,
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use rproxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtState, CtValue, In6, RevNat, RouteKey, RouteValue,
    ServiceKey, ServiceValue, SrcRange, Stat, WireAddr, map_names,
};
use serde::Serialize;

use super::{
    datapath::{stat_total, used_entries},
    gc::monotonic_ns,
};
use crate::{
    Error, Result,
    writer::{scope_name, src_range_of},
};

/// Map `name` pinned under `dir`, as its typed handle (hash, array, LPM trie, …).
pub(crate) fn pinned<M: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str) -> Result<M> {
    let data = MapData::from_pin(dir.join(name)).map_err(|source| Error::Map { name, source })?;
    let map = Map::from_map_data(data).map_err(|source| Error::Map { name, source })?;
    M::try_from(map).map_err(|source| Error::Map { name, source })
}

fn proto(p: u8) -> &'static str {
    match p {
        rproxy_common::proto::TCP => "TCP",
        rproxy_common::proto::UDP => "UDP",
        _ => "?",
    }
}

/// An address and a port as the maps hold them (network byte order), printed.
fn sock<A: WireAddr>(addr: A, port: u16) -> SocketAddr {
    SocketAddr::new(addr.ip().into(), u16::from_be(port))
}

/// The maps of one family.
pub(crate) struct Names {
    pub(crate) services: &'static str,
    pub(crate) backends: &'static str,
    pub(crate) rev_nat: &'static str,
    pub(crate) ct: &'static str,
    pub(crate) src_range: &'static str,
    pub(crate) affinity: &'static str,
    pub(crate) routes: &'static str,
}

pub(crate) const V4: Names = Names {
    services: map_names::SERVICES4,
    backends: map_names::BACKENDS4,
    rev_nat: map_names::REV_NAT4,
    ct: map_names::CT4,
    src_range: map_names::SRC_RANGE4,
    affinity: map_names::AFFINITY4,
    routes: map_names::ROUTE4,
};

pub(crate) const V6: Names = Names {
    services: map_names::SERVICES6,
    backends: map_names::BACKENDS6,
    rev_nat: map_names::REV_NAT6,
    ct: map_names::CT6,
    src_range: map_names::SRC_RANGE6,
    affinity: map_names::AFFINITY6,
    routes: map_names::ROUTE6,
};

/// The pinned maps of an agent, decoded ([`read`]): what `dump` prints as text or JSON.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub config: ConfigView,
    /// `None`: the family's maps are not pinned (an older agent's).
    pub ipv4: Option<FamilyView>,
    pub ipv6: Option<FamilyView>,
    /// The datapath's counters, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    /// `FIRST-LAST`, or `none`.
    pub snat_ports: String,
    pub host_netns_cookie: u64,
    pub external_cluster_ip: bool,
}

/// One family's maps.
#[derive(Debug, Serialize)]
pub struct FamilyView {
    /// Each frontend and scope (slot 0), with its backends' ids.
    pub services: Vec<ServiceView>,
    pub backends: Vec<BackendView>,
    pub rev_nat: Vec<RevNatView>,
    pub source_ranges: Vec<SourceRangeView>,
    pub affinity: Vec<AffinityView>,
    pub conntrack_entries: usize,
    /// Every entry, with `--conntrack`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Vec<CtView>>,
    /// `None`: the route cache is not pinned (an older agent's).
    pub route_cache_entries: Option<usize>,
    /// Every entry, with `--conntrack`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<RouteView>>,
}

#[derive(Debug, Serialize)]
pub struct ServiceView {
    pub frontend: SocketAddr,
    pub protocol: &'static str,
    pub scope: &'static str,
    pub count: u16,
    pub rev_nat_id: u16,
    pub flags: u16,
    pub backends: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: SocketAddr,
    pub protocol: &'static str,
    pub flags: u8,
    /// Named by no slot: kept for the open flows that use it (draining, or gone from its
    /// Services).
    pub in_no_slot: bool,
}

#[derive(Debug, Serialize)]
pub struct RevNatView {
    pub id: u32,
    pub frontend: SocketAddr,
}

#[derive(Debug, Serialize)]
pub struct SourceRangeView {
    pub rev_nat_id: u16,
    pub cidr: ipnet::IpNet,
}

#[derive(Debug, Serialize)]
pub struct AffinityView {
    pub rev_nat_id: u16,
    pub client: IpAddr,
    pub backend_id: u32,
    pub last_new_flow_s_ago: u64,
}

#[derive(Debug, Serialize)]
pub struct CtView {
    /// `svc` (client to frontend) or `reply`.
    pub dir: &'static str,
    pub protocol: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub state: String,
    pub flags: u8,
    pub expires_in_s: i128,
}

#[derive(Debug, Serialize)]
pub struct RouteView {
    pub ingress_ifindex: u32,
    pub protocol: &'static str,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub egress_ifindex: u32,
    pub next_hop_mac: String,
    pub mtu: u16,
    pub looked_up_ms_ago: u64,
}

/// Reads the pinned maps under `dir` (every conntrack entry and cached route with `conntrack`).
pub fn read(dir: &Path, conntrack: bool) -> Result<Snapshot> {
    let config: Array<_, Config> = pinned(dir, map_names::CONFIG)?;
    let config = config.get(&0, 0).map_err(|source| Error::Map { name: map_names::CONFIG, source })?;
    let snat_ports = if config.snat_port_count() == 0 {
        String::from("none")
    } else {
        format!("{}-{}", config.snat_port_min, config.snat_port_max)
    };
    let stats: PerCpuArray<_, u64> = pinned(dir, map_names::STATS)?;
    Ok(Snapshot {
        config: ConfigView {
            snat_ports,
            host_netns_cookie: config.host_netns_cookie,
            external_cluster_ip: config.flags & rproxy_common::CONFIG_F_EXTERNAL_CLUSTER_IP != 0,
        },
        ipv4: family::<u32>(dir, &V4, conntrack)?,
        ipv6: family::<In6>(dir, &V6, conntrack)?,
        counters: Stat::ALL.iter().map(|s| (s.name(), stat_total(&stats, *s))).collect(),
    })
}

/// Writes the pinned maps under `dir` to `out`, decoded (see [`read`]): as text, or as one JSON
/// object (`json`). Text: the configuration; for each family every service entry (with its
/// scope, `external` or `local`) and its backend ids, backends, rev-NAT entries, the source
/// ranges (`loadBalancerSourceRanges`) by rev-NAT id, the clients `ClientIP` affinity remembers,
/// the conntrack size (and with `conntrack` every entry), the route cache's (likewise); and the
/// counters summed over CPUs. The maps of a family an older agent did not pin are said to be
/// missing, and the rest is still printed.
pub fn dump(dir: &Path, conntrack: bool, json: bool, out: &mut impl Write) -> Result<()> {
    let io = |source| Error::Io { what: String::from("writing output"), source };
    let snapshot = read(dir, conntrack)?;
    if json {
        serde_json::to_writer_pretty(&mut *out, &snapshot)
            .map_err(|e| Error::Io { what: String::from("writing output"), source: e.into() })?;
        return writeln!(out).map_err(io);
    }
    render(&snapshot, out).map_err(io)
}

/// The text form of a snapshot.
fn render(s: &Snapshot, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "config ({}):", map_names::CONFIG)?;
    writeln!(out, "  snat ports {}; host netns cookie {}", s.config.snat_ports, s.config.host_netns_cookie)?;
    for (f, names) in [(&s.ipv4, &V4), (&s.ipv6, &V6)] {
        match f {
            Some(f) => render_family(f, names, out)?,
            None => writeln!(out, "{} and the other maps of its family: not pinned", names.services)?,
        }
    }
    writeln!(out, "counters ({}):", map_names::STATS)?;
    for name in Stat::ALL.map(Stat::name) {
        writeln!(out, "  {name:15} {}", s.counters.get(name).copied().unwrap_or(0))?;
    }
    Ok(())
}

fn render_family(f: &FamilyView, names: &Names, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "services ({}):", names.services)?;
    for v in &f.services {
        let ids: Vec<String> = v.backends.iter().map(ToString::to_string).collect();
        writeln!(
            out,
            "  {}/{}  scope={} count={} rev_nat={} flags={:#06x} backends=[{}]",
            v.frontend,
            v.protocol,
            v.scope,
            v.count,
            v.rev_nat_id,
            v.flags,
            ids.join(",")
        )?;
    }
    writeln!(out, "backends ({}):", names.backends)?;
    for b in &f.backends {
        let orphan = if b.in_no_slot { " (in no slot: kept for open flows)" } else { "" };
        writeln!(out, "  {}: {}/{} flags={:#04x}{orphan}", b.id, b.address, b.protocol, b.flags)?;
    }
    writeln!(out, "rev-NAT ({}):", names.rev_nat)?;
    for r in &f.rev_nat {
        writeln!(out, "  {}: {}", r.id, r.frontend)?;
    }
    writeln!(out, "source ranges ({}), by rev-NAT id:", names.src_range)?;
    for r in &f.source_ranges {
        writeln!(out, "  {}: {}", r.rev_nat_id, r.cidr)?;
    }
    writeln!(out, "session affinity ({}): {} clients", names.affinity, f.affinity.len())?;
    for a in &f.affinity {
        writeln!(
            out,
            "  rev_nat {}: {} -> backend {}, last new flow {}s ago",
            a.rev_nat_id, a.client, a.backend_id, a.last_new_flow_s_ago
        )?;
    }
    writeln!(out, "conntrack ({}): {} entries", names.ct, f.conntrack_entries)?;
    for c in f.conntrack.iter().flatten() {
        writeln!(
            out,
            "  {:5} {} {} -> {} backend={} rev_nat={} state={} flags={:#04x} expires_in={}s",
            c.dir, c.protocol, c.src, c.dst, c.backend_id, c.rev_nat_id, c.state, c.flags, c.expires_in_s
        )?;
    }
    match f.route_cache_entries {
        None => writeln!(out, "route cache ({}): not pinned", names.routes)?,
        Some(n) => writeln!(out, "route cache ({}): {n} entries", names.routes)?,
    }
    for r in f.routes.iter().flatten() {
        writeln!(
            out,
            "  if{} {} {} -> {}: out if{} to {} mtu {} (looked up {} ms ago)",
            r.ingress_ifindex, r.protocol, r.src, r.dst, r.egress_ifindex, r.next_hop_mac, r.mtu, r.looked_up_ms_ago
        )?;
    }
    Ok(())
}

/// One family's maps (see [`read`]); `None` when they are not pinned.
fn family<A>(dir: &Path, names: &Names, conntrack: bool) -> Result<Option<FamilyView>>
where
    A: WireAddr + Ord + std::fmt::Debug,
    ServiceKey<A>: aya::Pod,
    Backend<A>: aya::Pod + Default + PartialEq,
    RevNat<A>: aya::Pod + Default + PartialEq,
    CtKey<A>: aya::Pod,
    CtValue<A>: aya::Pod,
    SrcRange<A>: aya::Pod,
    AffinityKey<A>: aya::Pod,
    RouteKey<A>: aya::Pod,
{
    if !dir.join(names.services).exists() {
        return Ok(None);
    }
    let services: HashMap<_, ServiceKey<A>, ServiceValue> = pinned(dir, names.services)?;
    let backends: Array<_, Backend<A>> = pinned(dir, names.backends)?;
    let rev_nat: Array<_, RevNat<A>> = pinned(dir, names.rev_nat)?;
    let ct: HashMap<_, CtKey<A>, CtValue<A>> = pinned(dir, names.ct)?;

    let mut svcs: Vec<(ServiceKey<A>, ServiceValue)> = services.iter().filter_map(std::result::Result::ok).collect();
    svcs.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.scope, k.slot));
    let services = svcs
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| ServiceView {
            frontend: sock(k.addr, k.port),
            protocol: proto(k.proto),
            scope: scope_name(k.scope),
            count: v.count,
            rev_nat_id: v.rev_nat_id,
            flags: v.flags,
            backends: svcs
                .iter()
                .filter(|(s, _)| {
                    s.addr == k.addr && s.port == k.port && s.proto == k.proto && s.scope == k.scope && s.slot != 0
                })
                .map(|(_, sv)| sv.backend_id)
                .collect(),
        })
        .collect();
    // A backend no slot names (draining, or gone from its Services) stays for its open flows.
    let in_slots: std::collections::HashSet<u32> =
        svcs.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
    let backends = used_entries(&backends)
        .into_iter()
        .map(|(id, b)| BackendView {
            id,
            address: sock(b.addr, b.port),
            protocol: proto(b.proto),
            flags: b.flags,
            in_no_slot: !in_slots.contains(&id),
        })
        .collect();
    let rev_nat =
        used_entries(&rev_nat).into_iter().map(|(id, r)| RevNatView { id, frontend: sock(r.addr, r.port) }).collect();
    let (source_ranges, affinity) = per_frontend::<A>(dir, names)?;
    let entries: Vec<(CtKey<A>, CtValue<A>)> = ct.iter().filter_map(std::result::Result::ok).collect();
    let conntrack_entries = entries.len();
    let now = monotonic_ns();
    let conntrack = conntrack.then(|| {
        entries
            .into_iter()
            .map(|(k, v)| CtView {
                dir: if k.dir == rproxy_common::CT_DIR_SERVICE { "svc" } else { "reply" },
                protocol: proto(k.proto),
                src: sock(k.saddr, k.sport),
                dst: sock(k.daddr, k.dport),
                backend_id: v.backend_id,
                rev_nat_id: v.rev_nat_id,
                state: CtState::from_u8(v.state).map_or_else(|| String::from("?"), |s| format!("{s:?}")),
                flags: v.flags,
                expires_in_s: (i128::from(v.expires_ns) - i128::from(now)) / 1_000_000_000,
            })
            .collect()
    });
    let (route_cache_entries, routes) = routes::<A>(dir, names.routes, conntrack.is_some())?;
    Ok(Some(FamilyView {
        services,
        backends,
        rev_nat,
        source_ranges,
        affinity,
        conntrack_entries,
        conntrack,
        route_cache_entries,
        routes,
    }))
}

/// The north-south forwarding's route cache: its size, and with `list` every entry. Pins of an
/// agent from before the cache have none (`None`).
fn routes<A>(dir: &Path, name: &'static str, list: bool) -> Result<(Option<usize>, Option<Vec<RouteView>>)>
where
    A: WireAddr + Ord,
    RouteKey<A>: aya::Pod,
{
    if !dir.join(name).exists() {
        return Ok((None, None));
    }
    let routes: HashMap<_, RouteKey<A>, RouteValue> = pinned(dir, name)?;
    let mut entries: Vec<(RouteKey<A>, RouteValue)> = routes.iter().filter_map(std::result::Result::ok).collect();
    let count = entries.len();
    if !list {
        return Ok((Some(count), None));
    }
    let ip = |a: A| -> IpAddr { a.ip().into() };
    entries.sort_unstable_by_key(|(k, _)| (k.ifindex, ip(k.daddr), ip(k.saddr), k.proto));
    let now = monotonic_ns();
    let views = entries
        .into_iter()
        .map(|(k, v)| RouteView {
            ingress_ifindex: k.ifindex,
            protocol: proto(k.proto),
            src: ip(k.saddr),
            dst: ip(k.daddr),
            egress_ifindex: v.ifindex,
            next_hop_mac: v.dmac.map(|b| format!("{b:02x}")).join(":"),
            mtu: v.mtu,
            looked_up_ms_ago: now.saturating_sub(v.checked_ns) / 1_000_000,
        })
        .collect();
    Ok((Some(count), Some(views)))
}

/// The per-frontend extras: source ranges and the clients session affinity remembers.
fn per_frontend<A>(dir: &Path, names: &Names) -> Result<(Vec<SourceRangeView>, Vec<AffinityView>)>
where
    A: WireAddr,
    SrcRange<A>: aya::Pod,
    AffinityKey<A>: aya::Pod,
{
    let trie: LpmTrie<_, SrcRange<A>, u8> = pinned(dir, names.src_range)?;
    let mut ranges: Vec<(u16, ipnet::IpNet)> =
        trie.keys().filter_map(std::result::Result::ok).filter_map(|k| src_range_of(&k)).collect();
    ranges.sort_unstable();
    let affinity: HashMap<_, AffinityKey<A>, AffinityValue> = pinned(dir, names.affinity)?;
    let now = monotonic_ns();
    let mut clients: Vec<(u16, IpAddr, u32, u64)> = affinity
        .iter()
        .filter_map(std::result::Result::ok)
        .map(|(k, v)| {
            (k.rev_nat_id, k.client.ip().into(), v.backend_id, now.saturating_sub(v.last_used_ns) / 1_000_000_000)
        })
        .collect();
    clients.sort_unstable();
    Ok((
        ranges.into_iter().map(|(rev_nat_id, cidr)| SourceRangeView { rev_nat_id, cidr }).collect(),
        clients
            .into_iter()
            .map(|(rev_nat_id, client, backend_id, last_new_flow_s_ago)| AffinityView {
                rev_nat_id,
                client,
                backend_id,
                last_new_flow_s_ago,
            })
            .collect(),
    ))
}
