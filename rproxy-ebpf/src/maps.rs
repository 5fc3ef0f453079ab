//! Map definitions. Names and value types come from `rproxy_common`. Every map is a BTF map
//! (`aya_ebpf::btf_maps`): the object carries its key and value types, so the kernel knows
//! them and `bpftool map dump` prints their fields. The agent pins them by name (it gives the
//! loader one path per map) so that a restart reuses them.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    macros::btf_map,
};
use rproxy_common::{
    AffinityKey, AffinityMatch, AffinityValue, Backend, Config, CtKey, CtValue, In6, MonitorEvent, RevNat, RouteKey,
    RouteValue, ServiceKey, ServiceStats, ServiceValue, SockRevKey4, SockRevKey6, SrcRange, Stat, calls, filter,
    limits::{
        AFFINITY_MATCH_MAX, AFFINITY_MAX, BACKENDS_MAX, CT_MAX, POD_NETNS_MAX, REV_NAT_MAX, ROUTES_MAX, SERVICES_MAX,
        SOCK_REV_NAT_MAX, SRC_RANGES_MAX,
    },
    monitor,
};

use crate::conntrack::Entry;

/// Written by userspace while packets read them: elements are allocated on update so that a
/// reader never sees a recycled element (the kernel's caveat for preallocated hash maps).
const BPF_F_NO_PREALLOC: usize = 1;

// The maps' types, one per kind for both families (`Family` hands out the family's).
pub type ServiceMap<A> = HashMap<ServiceKey<A>, ServiceValue, { SERVICES_MAX as usize }, BPF_F_NO_PREALLOC>;
pub type BackendMap<A> = Array<Backend<A>, { BACKENDS_MAX as usize }>;
pub type RevNatMap<A> = Array<RevNat<A>, { REV_NAT_MAX as usize }>;
/// Sized at load time by `--ct-max` / `--ct-max-ipv6`; `CT_MAX` is the default.
pub type ConntrackMap<A> = LruHashMap<CtKey<A>, CtValue<A>, { CT_MAX as usize }>;
pub type SockRevNatMap<K, A> = LruHashMap<K, RevNat<A>, { SOCK_REV_NAT_MAX as usize }>;
pub type SrcRangeMap<A> = LpmTrie<SrcRange<A>, u8, { SRC_RANGES_MAX as usize }>;
pub type AffinityMap<A> = LruHashMap<AffinityKey<A>, AffinityValue, { AFFINITY_MAX as usize }>;
pub type RouteMap<A> = LruHashMap<RouteKey<A>, RouteValue, { ROUTES_MAX as usize }>;
pub type FilterMap = Array<u64, { filter::WORDS as usize }>;

#[btf_map(name = "RPX_SVC4")]
pub static SVC4: ServiceMap<u32> = ServiceMap::new();

/// Backends by id. An array: ids are small integers the agent allocates, and the verifier inlines
/// array lookups, so the per-packet backend lookup costs a bounds check and a load.
#[btf_map(name = "RPX_BE4")]
pub static BE4: BackendMap<u32> = BackendMap::new();

/// Original service address by rev-NAT id; an array for the same reason.
#[btf_map(name = "RPX_RNAT4")]
pub static RNAT4: RevNatMap<u32> = RevNatMap::new();

/// Conntrack: an LRU hash with the kernel's common LRU list (flags 0). Each CPU pops new
/// elements from a local free list refilled in batches, so an insert rarely takes the shared
/// lock. `BPF_F_NO_COMMON_LRU` was measured slower (`cargo xtask bench`, 10,000 services: new
/// flow 787–836 ns net against 694–728 ns with the common list): a per-CPU list rotates up to
/// `nr_scans` nodes of its active and inactive lists on every insert.
#[btf_map(name = "RPX_CT4")]
pub static CT4: ConntrackMap<u32> = ConntrackMap::new();

/// Sockets translated by the socket hooks → the service address to report back.
/// LRU: `rpx_sock_release` deletes a connected socket's entry when the socket goes; an
/// unconnected UDP socket's entries (one per backend it sent to) stay until evicted.
#[btf_map(name = "RPX_SK_RNAT4")]
pub static SK_RNAT4: SockRevNatMap<SockRevKey4, u32> = SockRevNatMap::new();

/// Pod network namespaces (cookies) whose TCP sockets the socket hooks translate under
/// `CONFIG_F_POD_NETNS_LISTED`; the agent keeps it equal to the namespaces `--pod-sockets` names.
#[btf_map(name = "RPX_POD_NETNS")]
pub static POD_NETNS: HashMap<u64, u32, { POD_NETNS_MAX as usize }, BPF_F_NO_PREALLOC> = HashMap::new();

#[btf_map(name = "RPX_CONFIG")]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Where each CPU's next SNAT port search starts (see `rproxy_common::snat`).
#[btf_map(name = "RPX_SNAT_CURSOR")]
pub static SNAT_CURSOR: PerCpuArray<u32, 1> = PerCpuArray::new();

/// When each CPU may send its next ICMP error (see `rproxy_common::icmp`).
#[btf_map(name = "RPX_ICMP_LIMIT")]
pub static ICMP_LIMIT: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Which frontends may exist (see `rproxy_common::filter`); an array, so the check is a
/// few instructions and a load.
#[btf_map(name = "RPX_SVC_FILTER")]
pub static SVC_FILTER: FilterMap = FilterMap::new();

/// Which backends may exist (see `rproxy_common::filter`).
#[btf_map(name = "RPX_BE_FILTER")]
pub static BE_FILTER: FilterMap = FilterMap::new();

/// Backends a pod may have a port-translated direct connection to (`rproxy_common::map_names::DIRECT_FILTER`):
/// written by the pod path only.
#[btf_map(name = "RPX_DIRECT_FILTER")]
pub static DIRECT_FILTER: FilterMap = FilterMap::new();

/// `loadBalancerSourceRanges` (see `rproxy_common::SrcRange4`). aya adds `BPF_F_NO_PREALLOC`,
/// which LPM tries require.
#[btf_map(name = "RPX_SRC_RANGE4")]
pub static SRC_RANGE4: SrcRangeMap<u32> = SrcRangeMap::new();

/// `sessionAffinity: ClientIP` (see `rproxy_common::AffinityValue`).
#[btf_map(name = "RPX_AFFINITY4")]
pub static AFFINITY4: AffinityMap<u32> = AffinityMap::new();

/// The (frontend, backend) pairs affinity may use (see `rproxy_common::AffinityMatch`).
#[btf_map(name = "RPX_AFFINITY_MATCH")]
pub static AFFINITY_MATCH: HashMap<AffinityMatch, u8, { AFFINITY_MATCH_MAX as usize }, BPF_F_NO_PREALLOC> =
    HashMap::new();

/// The north-south forwarding's route cache (see `rproxy_common::route`). LRU: routes to
/// clients gone quiet make room by themselves.
#[btf_map(name = "RPX_ROUTE4")]
pub static ROUTE4: RouteMap<u32> = RouteMap::new();

// The IPv6 twins of the maps above (`rproxy_common`'s `…6` layouts), sized alike.

#[btf_map(name = "RPX_SVC6")]
pub static SVC6: ServiceMap<In6> = ServiceMap::new();

#[btf_map(name = "RPX_BE6")]
pub static BE6: BackendMap<In6> = BackendMap::new();

#[btf_map(name = "RPX_RNAT6")]
pub static RNAT6: RevNatMap<In6> = RevNatMap::new();

#[btf_map(name = "RPX_CT6")]
pub static CT6: ConntrackMap<In6> = ConntrackMap::new();

#[btf_map(name = "RPX_SK_RNAT6")]
pub static SK_RNAT6: SockRevNatMap<SockRevKey6, In6> = SockRevNatMap::new();

#[btf_map(name = "RPX_SRC_RANGE6")]
pub static SRC_RANGE6: SrcRangeMap<In6> = SrcRangeMap::new();

#[btf_map(name = "RPX_AFFINITY6")]
pub static AFFINITY6: AffinityMap<In6> = AffinityMap::new();

#[btf_map(name = "RPX_ROUTE6")]
pub static ROUTE6: RouteMap<In6> = RouteMap::new();

/// The tail calls' program arrays (`rproxy_common::calls`), filled by the agent.
#[btf_map(name = "RPX_CALLS_TC")]
pub static CALLS_TC: ProgramArray<{ calls::TC_SLOTS as usize }> = ProgramArray::new();

#[btf_map(name = "RPX_CALLS_XDP")]
pub static CALLS_XDP: ProgramArray<{ calls::XDP_SLOTS as usize }> = ProgramArray::new();

/// Working memory of new flows, their conntrack entries built here rather than on the stack: the IPv6
/// north-south SNAT stage's (`nodeport::snat_stage`: what the path hands it with the tail call,
/// the new flow's backend and frontend, and the flow's conntrack entry), and the entries of the
/// other new flows (`conntrack::create_nat`, `conntrack::open_remapped`,
/// `Family::entry_scratch`).
/// Per CPU: nothing else runs on this CPU between the tail call and the stage's end, or while a
/// program builds an entry (the TC and XDP programs do not nest).
pub struct SnatScratch {
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub entry: Entry<In6>,
    pub entry4: Entry<u32>,
}

#[btf_map(name = "RPX_SNAT_SCRATCH")]
pub static SNAT_SCRATCH: PerCpuArray<SnatScratch, 1> = PerCpuArray::new();

#[btf_map(name = "RPX_STATS")]
pub static STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Per-Service counters by rev-NAT id (`rproxy_common::ServiceStats`; `observe`). Sized at
/// load time (`--service-counters`): a map of one entry counts nothing.
#[btf_map(name = "RPX_SVC_STATS")]
pub static SVC_STATS: PerCpuArray<ServiceStats, { REV_NAT_MAX as usize }> = PerCpuArray::new();

/// The monitor's switch (`rproxy_common::monitor`): 0 unless `rproxy-agent monitor` runs.
#[btf_map(name = "RPX_MONITOR")]
pub static MONITOR: Array<u32, 1> = Array::new();

/// The monitor's events (`rproxy_common::MonitorEvent`).
#[btf_map(name = "RPX_EVENTS")]
pub static EVENTS: RingBuf<MonitorEvent, { monitor::RING_BYTES as usize }> = RingBuf::new();

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(p) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *p += 1 };
    }
}
