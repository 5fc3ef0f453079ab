//! Map definitions. Names and value types come from `rproxy_common`; pinned by name so that an
//! agent restart reuses them (the agent sets the pin directory).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray},
};
use rproxy_common::{
    AffinityKey4, AffinityKey6, AffinityMatch, AffinityValue, Backend4, Backend6, Config, CtKey4, CtKey6, CtValue4,
    CtValue6, In6, RevNat4, RevNat6, RouteKey4, RouteKey6, RouteValue, ServiceKey4, ServiceKey6, ServiceValue,
    SockRevKey4, SockRevKey6, SrcRange4, SrcRange6, Stat, calls, filter,
    limits::{
        AFFINITY_MATCH_MAX, AFFINITY_MAX, BACKENDS_MAX, CT_MAX, REV_NAT_MAX, ROUTES_MAX, SERVICES_MAX,
        SOCK_REV_NAT_MAX, SRC_RANGES_MAX,
    },
};

use crate::conntrack::Entry;

/// Written by userspace while packets read them: elements are allocated on update so that a
/// reader never sees a recycled element (the kernel's caveat for preallocated hash maps).
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "RPX_SVC4")]
pub static SVC4: HashMap<ServiceKey4, ServiceValue> = HashMap::pinned(SERVICES_MAX, BPF_F_NO_PREALLOC);

/// Backends by id. An array: ids are small integers the agent allocates, and the verifier inlines
/// array lookups, so the per-packet backend lookup costs a bounds check and a load.
#[map(name = "RPX_BE4")]
pub static BE4: Array<Backend4> = Array::pinned(BACKENDS_MAX, 0);

/// Original service address by rev-NAT id; an array for the same reason.
#[map(name = "RPX_RNAT4")]
pub static RNAT4: Array<RevNat4> = Array::pinned(REV_NAT_MAX, 0);

/// Conntrack: an LRU hash with the kernel's common LRU list (flags 0). Each CPU pops new
/// elements from a local free list refilled in batches, so an insert rarely takes the shared
/// lock. `BPF_F_NO_COMMON_LRU` was measured slower (`cargo xtask bench`, 10,000 services: new
/// flow 787–836 ns net against 694–728 ns with the common list): a per-CPU list rotates up to
/// `nr_scans` nodes of its active and inactive lists on every insert.
#[map(name = "RPX_CT4")]
pub static CT4: LruHashMap<CtKey4, CtValue4> = LruHashMap::pinned(CT_MAX, 0);

/// Host-network sockets translated by the socket hooks → the service address to report back.
/// LRU: an entry outlives its socket until it is evicted.
#[map(name = "RPX_SK_RNAT4")]
pub static SK_RNAT4: LruHashMap<SockRevKey4, RevNat4> = LruHashMap::pinned(SOCK_REV_NAT_MAX, 0);

#[map(name = "RPX_CONFIG")]
pub static CONFIG: Array<Config> = Array::pinned(1, 0);

/// Where each CPU's next SNAT port search starts (see `rproxy_common::snat`).
#[map(name = "RPX_SNAT_CURSOR")]
pub static SNAT_CURSOR: PerCpuArray<u32> = PerCpuArray::pinned(1, 0);

/// When each CPU may send its next ICMP error (see `rproxy_common::icmp`).
#[map(name = "RPX_ICMP_LIMIT")]
pub static ICMP_LIMIT: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// Which frontends may exist (see `rproxy_common::filter`); an array, so the check is a
/// few instructions and a load.
#[map(name = "RPX_SVC_FILTER")]
pub static SVC_FILTER: Array<u64> = Array::pinned(filter::WORDS, 0);

/// Which backends may exist (see `rproxy_common::filter`).
#[map(name = "RPX_BE_FILTER")]
pub static BE_FILTER: Array<u64> = Array::pinned(filter::WORDS, 0);

/// `loadBalancerSourceRanges` (see `rproxy_common::SrcRange4`). aya adds `BPF_F_NO_PREALLOC`,
/// which LPM tries require.
#[map(name = "RPX_SRC_RANGE4")]
pub static SRC_RANGE4: LpmTrie<SrcRange4, u8> = LpmTrie::pinned(SRC_RANGES_MAX, 0);

/// `sessionAffinity: ClientIP` (see `rproxy_common::AffinityValue`).
#[map(name = "RPX_AFFINITY4")]
pub static AFFINITY4: LruHashMap<AffinityKey4, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

/// The (frontend, backend) pairs affinity may use (see `rproxy_common::AffinityMatch`).
#[map(name = "RPX_AFFINITY_MATCH")]
pub static AFFINITY_MATCH: HashMap<AffinityMatch, u8> = HashMap::pinned(AFFINITY_MATCH_MAX, BPF_F_NO_PREALLOC);

/// The north-south forwarding's route cache (see `rproxy_common::route`). LRU: routes to
/// clients gone quiet make room by themselves.
#[map(name = "RPX_ROUTE4")]
pub static ROUTE4: LruHashMap<RouteKey4, RouteValue> = LruHashMap::pinned(ROUTES_MAX, 0);

// The IPv6 twins of the maps above (`rproxy_common`'s `…6` layouts), sized alike.

#[map(name = "RPX_SVC6")]
pub static SVC6: HashMap<ServiceKey6, ServiceValue> = HashMap::pinned(SERVICES_MAX, BPF_F_NO_PREALLOC);

#[map(name = "RPX_BE6")]
pub static BE6: Array<Backend6> = Array::pinned(BACKENDS_MAX, 0);

#[map(name = "RPX_RNAT6")]
pub static RNAT6: Array<RevNat6> = Array::pinned(REV_NAT_MAX, 0);

#[map(name = "RPX_CT6")]
pub static CT6: LruHashMap<CtKey6, CtValue6> = LruHashMap::pinned(CT_MAX, 0);

#[map(name = "RPX_SK_RNAT6")]
pub static SK_RNAT6: LruHashMap<SockRevKey6, RevNat6> = LruHashMap::pinned(SOCK_REV_NAT_MAX, 0);

#[map(name = "RPX_SRC_RANGE6")]
pub static SRC_RANGE6: LpmTrie<SrcRange6, u8> = LpmTrie::pinned(SRC_RANGES_MAX, 0);

#[map(name = "RPX_AFFINITY6")]
pub static AFFINITY6: LruHashMap<AffinityKey6, AffinityValue> = LruHashMap::pinned(AFFINITY_MAX, 0);

#[map(name = "RPX_ROUTE6")]
pub static ROUTE6: LruHashMap<RouteKey6, RouteValue> = LruHashMap::pinned(ROUTES_MAX, 0);

/// The tail calls' program arrays (`rproxy_common::calls`), filled by the agent.
#[map(name = "RPX_CALLS_TC")]
pub static CALLS_TC: ProgramArray = ProgramArray::pinned(calls::TC_SLOTS, 0);

#[map(name = "RPX_CALLS_XDP")]
pub static CALLS_XDP: ProgramArray = ProgramArray::pinned(calls::XDP_SLOTS, 0);

/// The IPv6 north-south SNAT stage's working memory (`nodeport::snat_stage`): what the path
/// hands it with the tail call (the new flow's backend and frontend), and the flow's conntrack
/// entry, built here rather than on the stack. Per CPU: nothing else runs on this CPU between
/// the tail call and the stage's end.
pub struct SnatScratch {
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub entry: Entry<In6>,
}

#[map(name = "RPX_SNAT_SCRATCH")]
pub static SNAT_SCRATCH: PerCpuArray<SnatScratch> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "RPX_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}
