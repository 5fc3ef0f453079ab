//! Reading a whole BPF hash map in chunks with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6): one system
//! call per chunk of entries, where aya's iterator makes two per entry (`get_next_key`, then
//! `lookup`) and, on a hash map, starts again from the first key whenever the key it stands on
//! was deleted meanwhile (the datapath's LRU evictions and the closing of flows do that all the
//! time on a busy conntrack table). aya has no batch operations; this is the one call it lacks.
//! Arrays answer it too (every index, used or not), which makes reading a backend array of
//! 500,000 entries at start a few hundred calls instead of a million.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;
use aya_obj::generated::{bpf_attr__bindgen_ty_3 as BatchAttr, bpf_cmd};

/// Entries asked for per call. A call fails with `ENOSPC` when one hash bucket holds more than
/// that; the chunk is then doubled for the rest of the walk.
pub const CHUNK: u32 = 4096;
/// Largest chunk tried (a bucket of that many entries means a broken hash).
const MAX_CHUNK: u32 = 1 << 20;
/// `ENOTSUPP`, the kernel-internal errno some map types return for operations they lack.
const ENOTSUPP: i32 = 524;

/// `bpf(cmd, attr, size_of::<A>())`: the calls aya does not make for us. `Err`: the errno.
///
/// # Safety
/// `attr` must be a valid attribute structure for `cmd`, and every pointer in it must point to
/// memory that stays valid, of the sizes the command reads or writes, for the call.
pub unsafe fn sys_bpf<A>(cmd: bpf_cmd, attr: &mut A) -> io::Result<()> {
    // SAFETY: the caller's contract.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_int, std::ptr::from_mut(attr), size_of::<A>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Every entry of the hash map `fd`, whose keys are `K` and values `V` (the caller's word: the
/// map must have been created with those sizes), read chunk by chunk; `pace` runs after each
/// chunk (the GC sleeps there, so a walk over a large table never holds a CPU for long).
/// `Ok(None)`: this kernel or map type has no batch lookup (the caller walks the map key by key).
pub fn lookup_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>, pace: impl FnMut()) -> io::Result<Option<Vec<(K, V)>>> {
    let mut out = Vec::new();
    Ok(lookup_each(fd, pace, |k, v| out.push((k, v)))?.map(|()| out))
}

/// [`lookup_all`], handing each entry to `each` instead of collecting them (an array's batch
/// lookup returns every index, used or not: the caller keeps what it wants). `Ok(None)`: no
/// batch lookup here, and `each` was not called.
pub fn lookup_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    mut pace: impl FnMut(),
    mut each: impl FnMut(K, V),
) -> io::Result<Option<()>> {
    let (ks, vs) = (size_of::<K>(), size_of::<V>());
    let map_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut chunk = CHUNK;
    let mut seen = 0usize;
    // The position between calls: opaque to user space (a bucket index for hash maps). Wide
    // enough for any key, as the generic batch code of other map types uses a key there.
    let (mut position, mut next) = ([0u64; 8], [0u64; 8]);
    let mut first = true;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    loop {
        let n = usize::try_from(chunk).unwrap_or(usize::MAX);
        keys.resize(n * ks, 0u8);
        values.resize(n * vs, 0u8);
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { position.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk,
            map_fd,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: a valid attr for the command; `keys` and `values` hold `count` keys and values
        // of the map's sizes, `position` and `next` 64 bytes (a hash map's position is 4), and
        // all outlive the call.
        let err = unsafe { sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        // The kernel writes back how many entries it copied, on success and at the end alike.
        let got = usize::try_from(attr.count).unwrap_or(0).min(n);
        for i in 0..got {
            // SAFETY: `K` and `V` are `Pod` (any bytes are a value), and entry `i` lies within the
            // buffers (`i < count`); the buffers have no alignment, hence the unaligned reads.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * ks).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * vs).cast::<V>()),
                )
            };
            each(k, v);
        }
        seen += got;
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None => {
                position = next;
                first = false;
                pace();
            }
            Some(libc::ENOENT) => return Ok(Some(())),
            Some(libc::ENOSPC) if got == 0 && chunk < MAX_CHUNK => chunk *= 2,
            Some(libc::EINTR | libc::EAGAIN) => {}
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first && seen == 0 => return Ok(None),
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("BPF_MAP_LOOKUP_BATCH failed"))),
        }
    }
}

/// Writes `entries` into the map `fd` (keys `K`, values `V`: the caller's word, as for
/// [`lookup_all`]) with `BPF_MAP_UPDATE_BATCH`, in order, a chunk per call. `Err((n, e))`: the
/// first `n` entries were written and entry `n` failed with `e`. Where the kernel or map type has
/// no batch update, the entries are written one by one (`BPF_MAP_UPDATE_ELEM`), with the same
/// result.
pub fn update_all<K: Pod, V: Pod>(fd: BorrowedFd<'_>, entries: &[(K, V)]) -> Result<(), (usize, io::Error)> {
    let map_fd = u32::try_from(fd.as_raw_fd()).map_err(|_| (0, io::Error::from(io::ErrorKind::InvalidInput)))?;
    let (mut keys, mut values) = (Vec::new(), Vec::new());
    let mut done = 0;
    for chunk in entries.chunks(CHUNK as usize) {
        keys.clear();
        values.clear();
        keys.extend(chunk.iter().map(|(k, _)| *k));
        values.extend(chunk.iter().map(|(_, v)| *v));
        let mut written = 0usize;
        while written < chunk.len() {
            let count = u32::try_from(chunk.len() - written).unwrap_or(CHUNK);
            let mut attr = BatchAttr {
                in_batch: 0,
                out_batch: 0,
                keys: keys[written..].as_ptr() as u64,
                values: values[written..].as_ptr() as u64,
                count,
                map_fd,
                elem_flags: 0,
                flags: 0,
            };
            // SAFETY: a valid attr for the command; `keys` and `values` hold `count` keys and
            // values from `written` on, of the map's sizes (`Pod`, laid out as the kernel reads
            // them), and outlive the call, which only reads them.
            let result = unsafe { sys_bpf(bpf_cmd::BPF_MAP_UPDATE_BATCH, &mut attr) };
            // The kernel writes back how many entries it wrote, on success and on failure alike.
            let got = usize::try_from(attr.count).unwrap_or(0).min(chunk.len() - written);
            let Err(err) = result else {
                written = chunk.len();
                continue;
            };
            written += got;
            match err.raw_os_error() {
                Some(libc::EINTR | libc::EAGAIN) => {}
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if done + written == 0 && got == 0 => {
                    return update_each(map_fd, entries);
                }
                _ => return Err((done + written, err)),
            }
        }
        done += chunk.len();
    }
    Ok(())
}

/// [`update_all`] one entry at a time.
fn update_each<K: Pod, V: Pod>(map_fd: u32, entries: &[(K, V)]) -> Result<(), (usize, io::Error)> {
    for (i, (k, v)) in entries.iter().enumerate() {
        // SAFETY: a valid attr for the command; `k` and `v` are of the map's key and value sizes
        // and outlive the call.
        unsafe {
            let mut attr: aya_obj::generated::bpf_attr = std::mem::zeroed();
            attr.__bindgen_anon_2.map_fd = map_fd;
            attr.__bindgen_anon_2.key = std::ptr::from_ref(k) as u64;
            attr.__bindgen_anon_2.__bindgen_anon_1.value = std::ptr::from_ref(v) as u64;
            sys_bpf(bpf_cmd::BPF_MAP_UPDATE_ELEM, &mut attr)
        }
        .map_err(|e| (i, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd as _, OwnedFd};

    use aya::maps::{Array, HashMap, Map, MapData};
    use aya_obj::generated::bpf_map_type;

    use super::*;

    /// A hash map (`lru`: an LRU hash, as the conntrack tables are) of `n` entries `k → 3k` made
    /// for the test, and a descriptor of it (root and BPF needed: `None` without them).
    fn hash_map(n: u32, lru: bool) -> Option<(HashMap<MapData, u32, u64>, OwnedFd)> {
        let kind = if lru { bpf_map_type::BPF_MAP_TYPE_LRU_HASH } else { bpf_map_type::BPF_MAP_TYPE_HASH };
        // An LRU hash evicts before it is full (per-CPU free lists): room to spare.
        let obj = aya_obj::Map::new_from_params(kind as u32, 4, 8, 2 * n.max(64), 0);
        let data = MapData::create(obj, "rpx_batch_test", None).ok()?;
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        let map = if lru { Map::LruHashMap(data) } else { Map::HashMap(data) };
        let mut map = HashMap::<_, u32, u64>::try_from(map).ok()?;
        for k in 0..n {
            map.insert(k, u64::from(k) * 3, 0).ok()?;
        }
        Some((map, fd))
    }

    /// An array of `n` zeroed `u64`s made for the test (named `name`), and a descriptor of it
    /// (root and BPF needed: `None` without them).
    fn array_map(n: u32, name: &str) -> Option<(Array<MapData, u64>, OwnedFd)> {
        let obj = aya_obj::Map::new_from_params(bpf_map_type::BPF_MAP_TYPE_ARRAY as u32, 4, 8, n, 0);
        let data = MapData::create(obj, name, None).ok()?;
        let fd = data.fd().as_fd().try_clone_to_owned().ok()?;
        Some((Array::try_from(Map::Array(data)).ok()?, fd))
    }

    /// A batch update writes every entry in order across chunks, on arrays and hashes; a full
    /// hash stops it at the first entry that does not fit, which it names.
    #[test]
    fn a_batch_update_writes_in_order_and_names_the_first_entry_that_fails() {
        let n = 2 * CHUNK + 3;
        let Some((array, fd)) = array_map(n, "rpx_batch_upd") else {
            eprintln!("skipped: cannot create a BPF map here (not root?)");
            return;
        };
        let entries: Vec<(u32, u64)> = (1..n).map(|i| (i, u64::from(i) + 1)).collect();
        update_all(fd.as_fd(), &entries).expect("batch update of an array");
        assert!((1..n).all(|i| array.get(&i, 0).expect("get") == u64::from(i) + 1));
        // One past the end: the entries before it are written, it is named.
        let over: [(u32, u64); 3] = [(3, 30), (n, 1), (4, 40)];
        let (at, _) = update_all(fd.as_fd(), &over).expect_err("index past the end");
        assert_eq!((at, array.get(&3, 0).unwrap(), array.get(&4, 0).unwrap()), (1, 30, 5));

        let (mut hash, hfd) = hash_map(0, false).expect("hash map");
        // `hash_map` makes room for 128 entries.
        let entries: Vec<(u32, u64)> = (0..200).map(|k| (k, u64::from(k) * 3)).collect();
        let (at, e) = update_all(hfd.as_fd(), &entries).expect_err("more than the hash holds");
        assert_eq!((at, e.raw_os_error()), (128, Some(libc::E2BIG)));
        assert_eq!(hash.iter().count(), 128);
        hash.remove(&0).expect("remove");
        update_all(hfd.as_fd(), &[(0, 0)]).expect("room again");
    }

    /// An array answers the batch lookup with every index, used or not, across chunks.
    #[test]
    fn an_array_comes_back_whole_index_by_index() {
        let n = 3 * CHUNK + 5;
        let Some((mut array, fd)) = array_map(n, "rpx_batch_arr") else {
            eprintln!("skipped: cannot create a BPF map here (not root?)");
            return;
        };
        for i in [1, CHUNK, n - 1] {
            array.set(i, u64::from(i) * 7, 0).expect("set");
        }
        let (mut seen, mut used) = (0, Vec::new());
        lookup_each::<u32, u64>(
            fd.as_fd(),
            || {},
            |i, v| {
                seen += 1;
                if v != 0 {
                    used.push((i, v));
                }
            },
        )
        .unwrap()
        .expect("batch lookup on an array");
        assert_eq!(seen, n);
        assert_eq!(used, [(1, 7), (CHUNK, u64::from(CHUNK) * 7), (n - 1, u64::from(n - 1) * 7)]);
    }

    #[test]
    fn every_entry_comes_back_once_across_chunks() {
        for (n, lru) in [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 17].into_iter().flat_map(|n| [(n, false), (n, true)]) {
            let Some((_map, fd)) = hash_map(n, lru) else {
                eprintln!("skipped: cannot create a BPF map here (not root?)");
                return;
            };
            let mut paces = 0;
            let mut all =
                lookup_all::<u32, u64>(fd.as_fd(), || paces += 1).unwrap().expect("batch lookup on a hash map");
            all.sort_unstable();
            assert_eq!(all.len(), usize::try_from(n).unwrap(), "{n} entries, lru {lru}");
            assert!(all.iter().zip(0..).all(|(&(k, v), i)| k == i && v == u64::from(k) * 3), "{n} entries, lru {lru}");
            // Full chunks pace; the last call, which ends the walk, does not.
            assert!(paces <= usize::try_from(n / CHUNK).unwrap() + 1, "{paces} pauses for {n} entries");
        }
    }
}
