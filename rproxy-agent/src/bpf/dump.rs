//! `rproxy-agent dump`: the pinned maps in human form (the same data `bpftool map dump pinned`
//! shows as bytes), IPv4's maps then IPv6's.
use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use rproxy_common::{
    AffinityKey, AffinityValue, Backend, Config, CtKey, CtState, CtValue, In6, RevNat, RouteKey, RouteValue,
    ServiceKey, ServiceValue, SrcRange, Stat, WireAddr, map_names,
};

use super::{
    datapath::{stat_total, used_entries},
    gc::monotonic_ns,
};
use crate::{
    Error, Result,
    writer::{scope_name, src_range_of},
};

/// Map `name` pinned under `dir`, as its typed handle (hash, array, LPM trie, …).
fn pinned<M: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &'static str) -> Result<M> {
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
struct Names {
    services: &'static str,
    backends: &'static str,
    rev_nat: &'static str,
    ct: &'static str,
    src_range: &'static str,
    affinity: &'static str,
    routes: &'static str,
}

const V4: Names = Names {
    services: map_names::SERVICES4,
    backends: map_names::BACKENDS4,
    rev_nat: map_names::REV_NAT4,
    ct: map_names::CT4,
    src_range: map_names::SRC_RANGE4,
    affinity: map_names::AFFINITY4,
    routes: map_names::ROUTE4,
};

const V6: Names = Names {
    services: map_names::SERVICES6,
    backends: map_names::BACKENDS6,
    rev_nat: map_names::REV_NAT6,
    ct: map_names::CT6,
    src_range: map_names::SRC_RANGE6,
    affinity: map_names::AFFINITY6,
    routes: map_names::ROUTE6,
};

/// Writes the pinned maps under `dir` to `out`, decoded: the configuration; for each family every
/// service entry (with its scope, `external` or `local`) and its backend ids, backends, rev-NAT
/// entries, the source ranges (`loadBalancerSourceRanges`) by rev-NAT id, the clients `ClientIP`
/// affinity remembers, the conntrack size (and with `conntrack` every entry), the route cache's
/// (likewise); and the counters summed over CPUs. The maps of a family an older agent did not
/// pin are said to be missing, and the rest is still printed.
pub fn dump(dir: &Path, conntrack: bool, out: &mut impl Write) -> Result<()> {
    let io = |source| Error::Io { what: String::from("writing output"), source };
    let config: Array<_, Config> = pinned(dir, map_names::CONFIG)?;
    let config = config.get(&0, 0).map_err(|source| Error::Map { name: map_names::CONFIG, source })?;
    writeln!(out, "config ({}):", map_names::CONFIG).map_err(io)?;
    let snat = if config.snat_port_count() == 0 {
        String::from("none")
    } else {
        format!("{}-{}", config.snat_port_min, config.snat_port_max)
    };
    writeln!(out, "  snat ports {snat}; host netns cookie {}", config.host_netns_cookie).map_err(io)?;
    family::<u32>(dir, &V4, conntrack, out)?;
    family::<In6>(dir, &V6, conntrack, out)?;
    let stats: PerCpuArray<_, u64> = pinned(dir, map_names::STATS)?;
    writeln!(out, "counters ({}):", map_names::STATS).map_err(io)?;
    for s in Stat::ALL {
        let total = stat_total(&stats, s);
        writeln!(out, "  {:15} {total}", s.name()).map_err(io)?;
    }
    Ok(())
}

/// One family's maps (see [`dump`]).
fn family<A>(dir: &Path, names: &Names, conntrack: bool, out: &mut impl Write) -> Result<()>
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
    let io = |source| Error::Io { what: String::from("writing output"), source };
    if !dir.join(names.services).exists() {
        return writeln!(out, "{} and the other maps of its family: not pinned", names.services).map_err(io);
    }
    let services: HashMap<_, ServiceKey<A>, ServiceValue> = pinned(dir, names.services)?;
    let backends: Array<_, Backend<A>> = pinned(dir, names.backends)?;
    let rev_nat: Array<_, RevNat<A>> = pinned(dir, names.rev_nat)?;
    let ct: HashMap<_, CtKey<A>, CtValue<A>> = pinned(dir, names.ct)?;

    let mut svcs: Vec<(ServiceKey<A>, ServiceValue)> = services.iter().filter_map(std::result::Result::ok).collect();
    svcs.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.scope, k.slot));
    writeln!(out, "services ({}):", names.services).map_err(io)?;
    for (k, v) in svcs.iter().filter(|(k, _)| k.slot == 0) {
        let ids: Vec<String> = svcs
            .iter()
            .filter(|(s, _)| {
                s.addr == k.addr && s.port == k.port && s.proto == k.proto && s.scope == k.scope && s.slot != 0
            })
            .map(|(_, sv)| sv.backend_id.to_string())
            .collect();
        writeln!(
            out,
            "  {}/{}  scope={} count={} rev_nat={} flags={:#06x} backends=[{}]",
            sock(k.addr, k.port),
            proto(k.proto),
            scope_name(k.scope),
            v.count,
            v.rev_nat_id,
            v.flags,
            ids.join(",")
        )
        .map_err(io)?;
    }
    // A backend no slot names (draining, or gone from its Services) stays for its open flows.
    let in_slots: std::collections::HashSet<u32> =
        svcs.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
    writeln!(out, "backends ({}):", names.backends).map_err(io)?;
    for (id, b) in used_entries(&backends) {
        let orphan = if in_slots.contains(&id) { "" } else { " (in no slot: kept for open flows)" };
        writeln!(out, "  {id}: {}/{} flags={:#04x}{orphan}", sock(b.addr, b.port), proto(b.proto), b.flags)
            .map_err(io)?;
    }
    writeln!(out, "rev-NAT ({}):", names.rev_nat).map_err(io)?;
    for (id, r) in used_entries(&rev_nat) {
        writeln!(out, "  {id}: {}", sock(r.addr, r.port)).map_err(io)?;
    }
    per_frontend::<A>(dir, names, out)?;
    let entries: Vec<(CtKey<A>, CtValue<A>)> = ct.iter().filter_map(std::result::Result::ok).collect();
    writeln!(out, "conntrack ({}): {} entries", names.ct, entries.len()).map_err(io)?;
    if conntrack {
        let now = monotonic_ns();
        for (k, v) in entries {
            let dir = if k.dir == rproxy_common::CT_DIR_SERVICE { "svc" } else { "reply" };
            let state = CtState::from_u8(v.state).map_or_else(|| String::from("?"), |s| format!("{s:?}"));
            let ttl = i128::from(v.expires_ns) - i128::from(now);
            writeln!(
                out,
                "  {dir:5} {} {} -> {} backend={} rev_nat={} state={state} flags={:#04x} expires_in={}s",
                proto(k.proto),
                sock(k.saddr, k.sport),
                sock(k.daddr, k.dport),
                v.backend_id,
                v.rev_nat_id,
                v.flags,
                ttl / 1_000_000_000
            )
            .map_err(io)?;
        }
    }
    routes::<A>(dir, names.routes, conntrack, out)
}

/// The north-south forwarding's route cache: its size, and with `list` every entry (ingress
/// device, source, destination and protocol → egress device, next hop's MAC, MTU, age). Pins
/// of an agent from before the cache have none: said so, and the rest is still printed.
fn routes<A>(dir: &Path, name: &'static str, list: bool, out: &mut impl Write) -> Result<()>
where
    A: WireAddr + Ord,
    RouteKey<A>: aya::Pod,
{
    let io = |source| Error::Io { what: String::from("writing output"), source };
    if !dir.join(name).exists() {
        return writeln!(out, "route cache ({name}): not pinned").map_err(io);
    }
    let routes: HashMap<_, RouteKey<A>, RouteValue> = pinned(dir, name)?;
    let mut entries: Vec<(RouteKey<A>, RouteValue)> = routes.iter().filter_map(std::result::Result::ok).collect();
    writeln!(out, "route cache ({name}): {} entries", entries.len()).map_err(io)?;
    if list {
        let ip = |a: A| -> IpAddr { a.ip().into() };
        entries.sort_unstable_by_key(|(k, _)| (k.ifindex, ip(k.daddr), ip(k.saddr), k.proto));
        let now = monotonic_ns();
        for (k, v) in entries {
            let mac = v.dmac.map(|b| format!("{b:02x}")).join(":");
            writeln!(
                out,
                "  if{} {} {} -> {}: out if{} to {mac} mtu {} (looked up {} ms ago)",
                k.ifindex,
                proto(k.proto),
                ip(k.saddr),
                ip(k.daddr),
                v.ifindex,
                v.mtu,
                now.saturating_sub(v.checked_ns) / 1_000_000
            )
            .map_err(io)?;
        }
    }
    Ok(())
}

/// The per-frontend extras: source ranges and the clients session affinity remembers.
fn per_frontend<A>(dir: &Path, names: &Names, out: &mut impl Write) -> Result<()>
where
    A: WireAddr,
    SrcRange<A>: aya::Pod,
    AffinityKey<A>: aya::Pod,
{
    let io = |source| Error::Io { what: String::from("writing output"), source };
    let trie: LpmTrie<_, SrcRange<A>, u8> = pinned(dir, names.src_range)?;
    let mut ranges: Vec<(u16, ipnet::IpNet)> =
        trie.keys().filter_map(std::result::Result::ok).filter_map(|k| src_range_of(&k)).collect();
    ranges.sort_unstable();
    writeln!(out, "source ranges ({}), by rev-NAT id:", names.src_range).map_err(io)?;
    for (id, net) in ranges {
        writeln!(out, "  {id}: {net}").map_err(io)?;
    }
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
    writeln!(out, "session affinity ({}): {} clients", names.affinity, clients.len()).map_err(io)?;
    for (id, client, backend, age) in clients {
        writeln!(out, "  rev_nat {id}: {client} -> backend {backend}, last new flow {age}s ago").map_err(io)?;
    }
    Ok(())
}
