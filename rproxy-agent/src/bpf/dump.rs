//! `rproxy-agent dump`: the pinned maps in human form (the same data `bpftool map dump pinned`
//! shows as bytes).
use std::{io::Write, path::Path};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use rproxy_common::{
    AffinityKey4, AffinityValue, Backend4, Config, CtKey4, CtState, CtValue4, RevNat4, RouteKey4, RouteValue,
    ServiceKey4, ServiceValue, SrcRange4, Stat, map_names,
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

fn ip(be: u32) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from_be(be))
}

fn proto(p: u8) -> &'static str {
    match p {
        rproxy_common::proto::TCP => "TCP",
        rproxy_common::proto::UDP => "UDP",
        _ => "?",
    }
}

/// Writes the pinned maps under `dir` to `out`, decoded: the configuration, every service entry
/// (with its scope, `external` or `local`) and its backend ids, backends, rev-NAT entries, the
/// source ranges (`loadBalancerSourceRanges`) by rev-NAT id, the clients `ClientIP` affinity
/// remembers, the conntrack size (and with `conntrack` every entry), the route cache's (likewise),
/// and the counters summed over CPUs.
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
    let services: HashMap<_, ServiceKey4, ServiceValue> = pinned(dir, map_names::SERVICES4)?;
    let backends: Array<_, Backend4> = pinned(dir, map_names::BACKENDS4)?;
    let rev_nat: Array<_, RevNat4> = pinned(dir, map_names::REV_NAT4)?;
    let ct: HashMap<_, CtKey4, CtValue4> = pinned(dir, map_names::CT4)?;

    let mut svcs: Vec<(ServiceKey4, ServiceValue)> = services.iter().filter_map(std::result::Result::ok).collect();
    svcs.sort_by_key(|(k, _)| (k.addr, k.port, k.proto, k.scope, k.slot));
    writeln!(out, "services ({}):", map_names::SERVICES4).map_err(io)?;
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
            "  {}:{}/{}  scope={} count={} rev_nat={} flags={:#06x} backends=[{}]",
            ip(k.addr),
            u16::from_be(k.port),
            proto(k.proto),
            scope_name(k.scope),
            v.count,
            v.rev_nat_id,
            v.flags,
            ids.join(",")
        )
        .map_err(io)?;
    }
    let bes: Vec<(u32, Backend4)> = used_entries(&backends);
    // A backend no slot names (draining, or gone from its Services) stays for its open flows.
    let named: std::collections::HashSet<u32> =
        svcs.iter().filter(|(k, _)| k.slot != 0).map(|(_, v)| v.backend_id).collect();
    writeln!(out, "backends ({}):", map_names::BACKENDS4).map_err(io)?;
    for (id, b) in bes {
        let orphan = if named.contains(&id) { "" } else { " (in no slot: kept for open flows)" };
        writeln!(out, "  {id}: {}:{}/{} flags={:#04x}{orphan}", b.ip(), b.host_port(), proto(b.proto), b.flags)
            .map_err(io)?;
    }
    let rns: Vec<(u32, RevNat4)> = used_entries(&rev_nat);
    writeln!(out, "rev-NAT ({}):", map_names::REV_NAT4).map_err(io)?;
    for (id, r) in rns {
        writeln!(out, "  {id}: {}:{}", ip(r.addr), u16::from_be(r.port)).map_err(io)?;
    }
    per_frontend(dir, out)?;
    let entries: Vec<(CtKey4, CtValue4)> = ct.iter().filter_map(std::result::Result::ok).collect();
    writeln!(out, "conntrack ({}): {} entries", map_names::CT4, entries.len()).map_err(io)?;
    if conntrack {
        let now = monotonic_ns();
        for (k, v) in entries {
            let dir = if k.dir == rproxy_common::CT_DIR_SERVICE { "svc" } else { "reply" };
            let state = CtState::from_u8(v.state).map_or_else(|| String::from("?"), |s| format!("{s:?}"));
            let ttl = i128::from(v.expires_ns) - i128::from(now);
            writeln!(
                out,
                "  {dir:5} {} {}:{} -> {}:{} backend={} rev_nat={} state={state} flags={:#04x} expires_in={}s",
                proto(k.proto),
                ip(k.saddr),
                u16::from_be(k.sport),
                ip(k.daddr),
                u16::from_be(k.dport),
                v.backend_id,
                v.rev_nat_id,
                v.flags,
                ttl / 1_000_000_000
            )
            .map_err(io)?;
        }
    }
    routes(dir, conntrack, out)?;
    let stats: PerCpuArray<_, u64> = pinned(dir, map_names::STATS)?;
    writeln!(out, "counters ({}):", map_names::STATS).map_err(io)?;
    for s in Stat::ALL {
        let total = stat_total(&stats, s);
        writeln!(out, "  {:15} {total}", s.name()).map_err(io)?;
    }
    Ok(())
}

/// The north-south forwarding's route cache: its size, and with `list` every entry (ingress
/// device, source, destination and protocol → egress device, next hop's MAC, MTU, age). Pins
/// of an agent from before the cache have none: said so, and the rest is still printed.
fn routes(dir: &Path, list: bool, out: &mut impl Write) -> Result<()> {
    let io = |source| Error::Io { what: String::from("writing output"), source };
    if !dir.join(map_names::ROUTE4).exists() {
        return writeln!(out, "route cache ({}): not pinned", map_names::ROUTE4).map_err(io);
    }
    let routes: HashMap<_, RouteKey4, RouteValue> = pinned(dir, map_names::ROUTE4)?;
    let mut entries: Vec<(RouteKey4, RouteValue)> = routes.iter().filter_map(std::result::Result::ok).collect();
    writeln!(out, "route cache ({}): {} entries", map_names::ROUTE4, entries.len()).map_err(io)?;
    if list {
        entries.sort_unstable_by_key(|(k, _)| (k.ifindex, u32::from_be(k.daddr), u32::from_be(k.saddr), k.proto));
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
fn per_frontend(dir: &Path, out: &mut impl Write) -> Result<()> {
    let io = |source| Error::Io { what: String::from("writing output"), source };
    let trie: LpmTrie<_, SrcRange4, u8> = pinned(dir, map_names::SRC_RANGE4)?;
    let mut ranges: Vec<(u16, ipnet::IpNet)> =
        trie.keys().filter_map(std::result::Result::ok).filter_map(|k| src_range_of(&k)).collect();
    ranges.sort_unstable();
    writeln!(out, "source ranges ({}), by rev-NAT id:", map_names::SRC_RANGE4).map_err(io)?;
    for (id, net) in ranges {
        writeln!(out, "  {id}: {net}").map_err(io)?;
    }
    let affinity: HashMap<_, AffinityKey4, AffinityValue> = pinned(dir, map_names::AFFINITY4)?;
    let now = monotonic_ns();
    let mut clients: Vec<(u16, std::net::Ipv4Addr, u32, u64)> = affinity
        .iter()
        .filter_map(std::result::Result::ok)
        .map(|(k, v)| (k.rev_nat_id, ip(k.client), v.backend_id, now.saturating_sub(v.last_used_ns) / 1_000_000_000))
        .collect();
    clients.sort_unstable();
    writeln!(out, "session affinity ({}): {} clients", map_names::AFFINITY4, clients.len()).map_err(io)?;
    for (id, client, backend, age) in clients {
        writeln!(out, "  rev_nat {id}: {client} -> backend {backend}, last new flow {age}s ago").map_err(io)?;
    }
    Ok(())
}
