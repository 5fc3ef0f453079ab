//! Moving pinned maps to new ones, without dropping a connection. Two things call for it:
//!
//! - **maps without BTF.** Agents before BTF maps pinned maps whose key and value types the
//!   kernel does not know (bpftool printed bytes). This agent's maps carry BTF, and a pinned map
//!   cannot gain it.
//! - **a new size.** `--ct-max`, `--ct-max-ipv6`, `--service-map-max` and `--backend-map-max`
//!   size tables that are pinned, and a map's size is fixed when it is created. A smaller
//!   service or backend table must still hold what the pinned one does (else the start is
//!   refused, naming the map); a smaller conntrack table keeps what fits (it is an LRU).
//!
//! In both cases the agent replaces each such map by a new one with the same contents:
//!
//! 1. before loading, the old pins are moved aside into `legacy/` in the pin directory (a crash
//!    from here on loses nothing: the next start resumes from them), and the loader creates the
//!    new maps at the usual paths;
//! 2. still before anything is attached, every entry of the old maps is copied into the new ones
//!    (services, backends, rev-NAT, filters, source ranges, affinity, conntrack, socket rev-NAT,
//!    counters), so the agent adopts the same ids and the new programs find every flow;
//! 3. just before the new programs are attached (`Legacy::top_up`), and again once they have
//!    replaced the old ones on every device (`Legacy::finish`), the flows the old programs
//!    created meanwhile are copied too (entries not in the new maps yet); then the old pins are
//!    removed, and the old maps die with the last program that held them.
//!
//! The route cache and the per-CPU scratch state start afresh; the program arrays are filled at
//! every start anyway (the old ones stay open until step 3 so that the old programs keep their
//! tail calls meanwhile).
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
};

use aya::{
    Pod,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray},
};
use rproxy_common::{
    AffinityKey4, AffinityKey6, AffinityMatch, AffinityValue, Backend4, Backend6, Config, CtKey4, CtKey6, CtValue4,
    CtValue6, RevNat4, RevNat6, ServiceKey4, ServiceKey6, ServiceValue, SockRevKey4, SockRevKey6, SrcRange4, SrcRange6,
    map_names as n,
};
use tracing::{info, warn};

use super::datapath::MapSizes;
use crate::{Error, Result};

/// Where the old pins wait, inside the pin directory.
pub const LEGACY_DIR: &str = "legacy";

/// How a map's entries move to its successor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Copied before the programs are swapped; the agent owns the contents.
    State,
    /// Copied before the swap and topped up after it: the programs write them (flows).
    Flows,
    /// Not copied: rebuilt by the agent or the programs.
    Fresh,
    /// Never replaced: a ring buffer has no key or value for BTF to describe (the kernel
    /// creates it without), so it is no older agent's mark.
    Keep,
}

/// Every pinned map and how it migrates.
const PLAN: [(&str, Kind); 30] = [
    (n::SERVICES4, Kind::State),
    (n::BACKENDS4, Kind::State),
    (n::REV_NAT4, Kind::State),
    (n::CT4, Kind::Flows),
    (n::STATS, Kind::State),
    (n::SOCK_REV_NAT4, Kind::Flows),
    (n::CONFIG, Kind::State),
    (n::SNAT_CURSOR, Kind::Fresh),
    (n::ICMP_LIMIT, Kind::Fresh),
    (n::SVC_FILTER, Kind::State),
    (n::BE_FILTER, Kind::State),
    (n::SRC_RANGE4, Kind::State),
    (n::AFFINITY4, Kind::Flows),
    (n::AFFINITY_MATCH, Kind::State),
    (n::ROUTE4, Kind::Fresh),
    (n::SERVICES6, Kind::State),
    (n::BACKENDS6, Kind::State),
    (n::REV_NAT6, Kind::State),
    (n::CT6, Kind::Flows),
    (n::SOCK_REV_NAT6, Kind::Flows),
    (n::SRC_RANGE6, Kind::State),
    (n::AFFINITY6, Kind::Flows),
    (n::ROUTE6, Kind::Fresh),
    (n::CALLS_TC, Kind::Fresh),
    (n::CALLS_XDP, Kind::Fresh),
    (n::SVC_STATS, Kind::Fresh),
    (n::MONITOR, Kind::Fresh),
    (n::EVENTS, Kind::Keep),
    (n::POD_NETNS, Kind::Fresh),
    // The programs' marks: copied (a mark lost would leave a direct flow's packets untranslated),
    // never topped up (an array has no absent keys; the new programs mark what they open).
    (n::DIRECT_FILTER, Kind::State),
];

/// Old maps set aside for a migration, held open until it is finished.
pub struct Legacy {
    dir: PathBuf,
    maps: Vec<(&'static str, MapData)>,
}

/// `bpf_attr` for `BPF_OBJ_GET_INFO_BY_FD`.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Whether the kernel knows the key and value types of a map (it was created with BTF).
pub fn has_btf(map: &MapData) -> Result<bool> {
    // SAFETY: a plain C struct of integers, for which all zeroes is a valid value.
    let mut info: aya_obj::generated::bpf_map_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(map.fd().as_fd().as_raw_fd()).unwrap_or(u32::MAX),
        info_len: u32::try_from(size_of_val(&info)).unwrap_or(0),
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: a valid attr for the command, `info` outlives the call and is `info_len` bytes.
    unsafe { super::batch::sys_bpf(aya_obj::generated::bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr) }
        .map_err(|source| Error::Io { what: "reading a map's info (BPF_OBJ_GET_INFO_BY_FD)".into(), source })?;
    Ok(info.btf_value_type_id != 0)
}

/// Whether a pinned map of another size than wanted is migrated to one of the wanted size (its
/// contents move with it) rather than refused or started afresh.
#[must_use]
pub fn resizable(name: &str) -> bool {
    PLAN.iter().any(|(n, kind)| *n == name && matches!(kind, Kind::State | Kind::Flows))
}

/// Moves aside the pinned maps of `dir` that must move to new ones: those this object defines
/// with BTF and that were created without it, and the resizable ones whose size differs from
/// `sizes`. Returns them (with any left aside by an interrupted migration). `None`: nothing to
/// migrate. A service or backend table that would not fit in its new size is refused before
/// anything moves.
pub fn set_aside(object: &aya_obj::Object, dir: &Path, sizes: MapSizes) -> Result<Option<Legacy>> {
    let legacy_dir = dir.join(LEGACY_DIR);
    let mut moves = Vec::new();
    for (name, kind) in PLAN {
        if kind == Kind::Keep {
            continue;
        }
        let (path, aside) = (dir.join(name), legacy_dir.join(name));
        if aside.exists() || !path.exists() {
            continue;
        }
        let old = MapData::from_pin(&path).map_err(|source| Error::Map { name, source })?;
        let wants_btf = matches!(object.maps.get(name), Some(aya_obj::maps::Map::Btf(_)));
        if wants_btf && !has_btf(&old)? {
            info!(map = name, "pinned without BTF (an agent before BTF maps): moving it to a new map");
            moves.push((name, path, aside));
            continue;
        }
        let Some(want) = sizes.of(name).filter(|_| resizable(name)) else { continue };
        let have = old.info().map_err(|source| Error::Map { name, source })?.max_entries();
        if have != want {
            if want < have {
                fits(name, &old, want).map_err(|detail| Error::MapTooSmall {
                    name,
                    dir: dir.to_path_buf(),
                    size: want,
                    detail,
                })?;
            }
            info!(map = name, from = have, to = want, "resizing a pinned map: moving it to a new map");
            moves.push((name, path, aside));
        }
    }
    if !moves.is_empty() {
        std::fs::create_dir_all(&legacy_dir)
            .map_err(|source| Error::Io { what: format!("creating {}", legacy_dir.display()), source })?;
    }
    for (_, path, aside) in &moves {
        std::fs::rename(path, aside).map_err(|source| Error::Io {
            what: format!("moving {} aside to {}", path.display(), aside.display()),
            source,
        })?;
    }
    let mut maps = Vec::new();
    for (name, kind) in PLAN {
        let aside = legacy_dir.join(name);
        if kind != Kind::Keep && aside.exists() {
            maps.push((name, MapData::from_pin(&aside).map_err(|source| Error::Map { name, source })?));
        }
    }
    if maps.is_empty() {
        return Ok(None);
    }
    info!(maps = maps.len(), dir = %legacy_dir.display(), "migrating pinned maps to new maps");
    Ok(Some(Legacy { dir: dir.to_path_buf(), maps }))
}

/// Whether the contents of `old` (map `name`) fit in a map of `size` entries; if not, what it
/// holds. Conntrack and affinity memory are LRU tables: they keep what fits.
fn fits(name: &str, old: &MapData, size: u32) -> std::result::Result<(), String> {
    let old = reopen(old).and_then(Map::from_map_data).map_err(|e| format!("reading it: {e}"))?;
    let held = match name {
        n::SERVICES4 => count::<ServiceKey4, ServiceValue>(&old),
        n::SERVICES6 => count::<ServiceKey6, ServiceValue>(&old),
        n::AFFINITY_MATCH => count::<AffinityMatch, u8>(&old),
        n::BACKENDS4 => highest_used::<Backend4>(&old, size),
        n::BACKENDS6 => highest_used::<Backend6>(&old, size),
        _ => return Ok(()),
    }
    .map_err(|e| format!("reading it: {e}"))?;
    check_fit(name, held, size)
}

/// What a table holds, for [`check_fit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Entries of a hash table.
    Entries(u32),
    /// The highest id in use in an array (0: none).
    HighestId(u32),
}

fn check_fit(name: &str, held: Held, size: u32) -> std::result::Result<(), String> {
    match held {
        Held::Entries(n) if n > size => Err(format!("{name} holds {n} entries")),
        Held::HighestId(id) if id >= size => {
            Err(format!("{name} has backend id {id} in use (ids must stay below the size)"))
        }
        _ => Ok(()),
    }
}

fn count<K: Pod, V: Pod>(old: &Map) -> std::result::Result<Held, aya::maps::MapError> {
    let map = HashMap::<_, K, V>::try_from(old)?;
    let n = map.keys().flatten().count();
    Ok(Held::Entries(u32::try_from(n).unwrap_or(u32::MAX)))
}

/// The highest id at or above `from` whose entry is in use (not all zeroes), or 0.
fn highest_used<V: Pod + Default + PartialEq>(old: &Map, from: u32) -> std::result::Result<Held, aya::maps::MapError> {
    let map = Array::<_, V>::try_from(old)?;
    for id in (from..map.len()).rev() {
        if map.get(&id, 0)? != V::default() {
            return Ok(Held::HighestId(id));
        }
    }
    Ok(Held::HighestId(0))
}

impl Legacy {
    /// Step 2: every entry of the old maps into the new ones (pinned in the pin directory by
    /// the load). Returns the number of entries copied.
    pub fn copy(&self) -> Result<usize> {
        self.copy_kinds(&[Kind::State, Kind::Flows], 0)
    }

    /// The flows the old programs created since the copy (entries the new maps lack): just
    /// before the new programs are attached, which narrows the window in which a new program
    /// meets a flow it has no entry for to the attach itself.
    pub fn top_up(&self) -> Result<usize> {
        self.copy_kinds(&[Kind::Flows], BPF_NOEXIST)
    }

    /// Step 3, once the new programs are attached everywhere: the flows the old programs
    /// created meanwhile, then the old pins go. The old maps are released when `self` drops.
    pub fn finish(self) -> Result<()> {
        let copied = self.top_up()?;
        let legacy_dir = self.dir.join(LEGACY_DIR);
        std::fs::remove_dir_all(&legacy_dir)
            .map_err(|source| Error::Io { what: format!("removing {}", legacy_dir.display()), source })?;
        info!(late_flows = copied, maps = self.maps.len(), "map migration finished; old maps released");
        Ok(())
    }

    fn copy_kinds(&self, kinds: &[Kind], flags: u64) -> Result<usize> {
        let mut total = 0;
        for (name, old) in &self.maps {
            let kind = PLAN.iter().find(|(n, _)| n == name).map_or(Kind::Fresh, |(_, k)| *k);
            if !kinds.contains(&kind) {
                continue;
            }
            let new_path = self.dir.join(name);
            let new = MapData::from_pin(&new_path).map_err(|source| Error::Map { name, source })?;
            let copied = copy_map(name, old, new, flags).map_err(|source| Error::Map { name, source })?;
            if copied.failed > 0 {
                warn!(map = *name, failed = copied.failed, "entries not copied to the new map");
            }
            total += copied.done;
        }
        Ok(total)
    }
}

/// `BPF_NOEXIST`: insert only where the key is absent.
const BPF_NOEXIST: u64 = 1;

#[derive(Default)]
struct Copied {
    done: usize,
    failed: usize,
}

/// Copies the entries of `old` into `new`, both `name`'s layout.
fn copy_map(name: &str, old: &MapData, new: MapData, flags: u64) -> std::result::Result<Copied, aya::maps::MapError> {
    let old = Map::from_map_data(reopen(old)?)?;
    let mut new = Map::from_map_data(new)?;
    match name {
        n::SERVICES4 => hash::<ServiceKey4, ServiceValue>(&old, &mut new, flags),
        n::SERVICES6 => hash::<ServiceKey6, ServiceValue>(&old, &mut new, flags),
        n::CT4 => hash::<CtKey4, CtValue4>(&old, &mut new, flags),
        n::CT6 => hash::<CtKey6, CtValue6>(&old, &mut new, flags),
        n::SOCK_REV_NAT4 => hash::<SockRevKey4, RevNat4>(&old, &mut new, flags),
        n::SOCK_REV_NAT6 => hash::<SockRevKey6, RevNat6>(&old, &mut new, flags),
        n::AFFINITY4 => hash::<AffinityKey4, AffinityValue>(&old, &mut new, flags),
        n::AFFINITY6 => hash::<AffinityKey6, AffinityValue>(&old, &mut new, flags),
        n::AFFINITY_MATCH => hash::<AffinityMatch, u8>(&old, &mut new, flags),
        n::BACKENDS4 => array::<Backend4>(&old, &mut new),
        n::BACKENDS6 => array::<Backend6>(&old, &mut new),
        n::REV_NAT4 => array::<RevNat4>(&old, &mut new),
        n::REV_NAT6 => array::<RevNat6>(&old, &mut new),
        n::CONFIG => array::<Config>(&old, &mut new),
        n::SVC_FILTER | n::BE_FILTER => array::<u64>(&old, &mut new),
        n::SRC_RANGE4 => lpm::<SrcRange4>(&old, &mut new),
        n::SRC_RANGE6 => lpm::<SrcRange6>(&old, &mut new),
        n::STATS => per_cpu::<u64>(&old, &mut new),
        _ => Ok(Copied::default()),
    }
}

/// A second handle on an open map (`Map` takes its `MapData` by value).
fn reopen(map: &MapData) -> std::result::Result<MapData, aya::maps::MapError> {
    MapData::from_id(map.info()?.id())
}

fn hash<K: Pod, V: Pod>(old: &Map, new: &mut Map, flags: u64) -> std::result::Result<Copied, aya::maps::MapError> {
    let old = HashMap::<_, K, V>::try_from(old)?;
    let mut new = HashMap::<_, K, V>::try_from(new)?;
    let mut c = Copied::default();
    // Entries that vanish while we walk (LRU eviction, the GC, a flow ending) are skipped.
    for (k, v) in old.iter().filter_map(std::result::Result::ok) {
        match new.insert(k, v, flags) {
            Ok(()) => c.done += 1,
            // Already there (the top-up's `BPF_NOEXIST`): the new programs' entry wins.
            Err(aya::maps::MapError::SyscallError(e))
                if flags == BPF_NOEXIST && e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) => c.failed += 1,
        }
    }
    Ok(c)
}

fn array<V: Pod>(old: &Map, new: &mut Map) -> std::result::Result<Copied, aya::maps::MapError> {
    let old = Array::<_, V>::try_from(old)?;
    let mut new = Array::<_, V>::try_from(new)?;
    let mut c = Copied::default();
    for i in 0..old.len().min(new.len()) {
        let v = old.get(&i, 0)?;
        new.set(i, v, 0)?;
        c.done += 1;
    }
    Ok(c)
}

fn lpm<K: Pod>(old: &Map, new: &mut Map) -> std::result::Result<Copied, aya::maps::MapError> {
    let old = LpmTrie::<_, K, u8>::try_from(old)?;
    let mut new = LpmTrie::<_, K, u8>::try_from(new)?;
    let mut c = Copied::default();
    for (k, v) in old.iter().filter_map(std::result::Result::ok) {
        new.insert(&k, v, 0)?;
        c.done += 1;
    }
    Ok(c)
}

fn per_cpu<V: Pod>(old: &Map, new: &mut Map) -> std::result::Result<Copied, aya::maps::MapError> {
    let old = PerCpuArray::<_, V>::try_from(old)?;
    let mut new = PerCpuArray::<_, V>::try_from(new)?;
    let mut c = Copied::default();
    for i in 0..old.len().min(new.len()) {
        new.set(i, old.get(&i, 0)?, 0)?;
        c.done += 1;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_smaller_table_must_hold_what_the_pinned_one_does() {
        assert_eq!(check_fit(n::SERVICES4, Held::Entries(4096), 4096), Ok(()));
        let e = check_fit(n::SERVICES4, Held::Entries(4097), 4096).unwrap_err();
        assert!(e.contains("RPX_SVC4 holds 4097 entries"), "{e}");
        // Ids are 1..size: the highest must stay below the size.
        assert_eq!(check_fit(n::BACKENDS6, Held::HighestId(0), 4096), Ok(()));
        assert_eq!(check_fit(n::BACKENDS6, Held::HighestId(4095), 4096), Ok(()));
        let e = check_fit(n::BACKENDS6, Held::HighestId(4096), 4096).unwrap_err();
        assert!(e.contains("RPX_BE6 has backend id 4096 in use"), "{e}");
    }

    #[test]
    fn every_state_and_flow_table_is_resizable_and_scratch_state_is_not() {
        for name in [n::SERVICES4, n::SERVICES6, n::BACKENDS4, n::BACKENDS6, n::CT4, n::CT6, n::AFFINITY_MATCH] {
            assert!(resizable(name), "{name}");
        }
        for name in [n::SVC_STATS, n::ROUTE4, n::EVENTS, "RPX_UNKNOWN"] {
            assert!(!resizable(name), "{name}");
        }
    }
}
