//! The kernel/user ABI of rproxy: every BPF map key and value, shared by `rproxy-ebpf` and
//! `rproxy-agent`. Nothing else in the project may describe these layouts.
//!
//! Rules for every type here:
//! - `#[repr(C)]`, no implicit padding (explicit `_pad` fields, zeroed by the writer), size
//!   asserted at compile time;
//! - addresses and ports in **network byte order** exactly as they appear on the wire, so the
//!   datapath never swaps bytes; the userspace constructors take host values and convert;
//! - one layout for both address families: the types that hold an address are generic over it,
//!   `A` = `u32` for IPv4 and [`In6`] for IPv6 (the `…4` and `…6` aliases), so the datapath's
//!   code is written once for both (`rproxy-ebpf`'s `Family`); each family has its own maps
//!   (`RPX_SVC4`, `RPX_SVC6`, …), and the IPv4 layouts are unchanged from before IPv6, so pinned
//!   maps of an earlier agent are adopted as they are. Backend and rev-NAT ids are one id space
//!   for both families (a Service's families share nothing else). Types without an address
//!   (`ServiceValue`, `RouteValue`, `Config`, …) serve both.
//!
//! Layout of a service (after Cilium's `lb4_service`): slot 0 of `(vip, port, proto)` is the
//! service itself (`count` backends, flags, rev-NAT id); slots `1..=count` hold backend ids.
#![no_std]
#![expect(clippy::pub_underscore_fields, reason = "explicit, zeroed padding is part of the ABI")]
#![expect(clippy::inline_always, reason = "the eBPF side must inline everything it calls")]

pub mod csum;

/// Map names, as pinned under the agent's bpffs directory. The eBPF side declares maps with
/// exactly these symbol names.
pub mod map_names {
    pub const SERVICES4: &str = "RPX_SVC4";
    pub const BACKENDS4: &str = "RPX_BE4";
    pub const REV_NAT4: &str = "RPX_RNAT4";
    pub const CT4: &str = "RPX_CT4";
    pub const STATS: &str = "RPX_STATS";
    pub const SOCK_REV_NAT4: &str = "RPX_SK_RNAT4";
    pub const CONFIG: &str = "RPX_CONFIG";
    /// Per-CPU cursor of the SNAT port allocation (`snat`): a per-CPU array of one `u32`.
    pub const SNAT_CURSOR: &str = "RPX_SNAT_CURSOR";
    /// Per-CPU rate limit of the ICMP errors the north-south path sends (`icmp`): a per-CPU
    /// array of one `u64`.
    pub const ICMP_LIMIT: &str = "RPX_ICMP_LIMIT";
    /// Bitmap over service frontends (`filter`): an array of `u64` words.
    pub const SVC_FILTER: &str = "RPX_SVC_FILTER";
    /// Bitmap over backends (`filter`): an array of `u64` words.
    pub const BE_FILTER: &str = "RPX_BE_FILTER";
    /// The datapath's own marks over backends (`filter::WORDS` `u64` words, indexed by a
    /// backend's filter bit `>> 6`): a word that is not 0 says that a pod may have a connection
    /// straight to one of its backends whose source port the datapath translated
    /// (`CT_NAT_DIRECT`), so that the pod path looks such packets up in conntrack. Set by the
    /// programs, never cleared (a stale mark costs a lookup).
    pub const DIRECT_FILTER: &str = "RPX_DIRECT_FILTER";
    /// `loadBalancerSourceRanges`: an LPM trie of `SrcRange4` (see there).
    pub const SRC_RANGE4: &str = "RPX_SRC_RANGE4";
    /// `sessionAffinity: ClientIP`: the backend each client last got (LRU hash
    /// `AffinityKey4` → `AffinityValue`).
    pub const AFFINITY4: &str = "RPX_AFFINITY4";
    /// Which backends may serve a frontend's affinity (hash `AffinityMatch` → `u8`).
    pub const AFFINITY_MATCH: &str = "RPX_AFFINITY_MATCH";
    /// The north-south forwarding's route cache (`route`): an LRU hash `RouteKey4` →
    /// `RouteValue`.
    pub const ROUTE4: &str = "RPX_ROUTE4";
    /// The IPv6 twins of the maps above, with the `…6` layouts (sized like them).
    pub const SERVICES6: &str = "RPX_SVC6";
    pub const BACKENDS6: &str = "RPX_BE6";
    pub const REV_NAT6: &str = "RPX_RNAT6";
    pub const CT6: &str = "RPX_CT6";
    pub const SOCK_REV_NAT6: &str = "RPX_SK_RNAT6";
    pub const SRC_RANGE6: &str = "RPX_SRC_RANGE6";
    pub const AFFINITY6: &str = "RPX_AFFINITY6";
    pub const ROUTE6: &str = "RPX_ROUTE6";
    /// The program arrays of the tail calls (`super::calls`), TC's and XDP's. Pinned like the
    /// other maps: the kernel empties a program array once no file descriptor or pin holds it,
    /// and the programs attached must keep their IPv6 half while the agent restarts.
    pub const CALLS_TC: &str = "RPX_CALLS_TC";
    pub const CALLS_XDP: &str = "RPX_CALLS_XDP";
    /// Per-Service counters (`super::ServiceStats`): a per-CPU array indexed by rev-NAT id.
    pub const SVC_STATS: &str = "RPX_SVC_STATS";
    /// The drop and translation monitor's switch (`super::monitor`): an array of one `u32`.
    pub const MONITOR: &str = "RPX_MONITOR";
    /// The monitor's events (`super::MonitorEvent`): a ring buffer.
    pub const EVENTS: &str = "RPX_EVENTS";
    /// Network namespaces whose TCP sockets the socket hooks translate as pods' under
    /// `super::CONFIG_F_POD_NETNS_LISTED`: a hash of netns cookies (`u64` → `u32`, 0).
    pub const POD_NETNS: &str = "RPX_POD_NETNS";
    /// Every map the agent pins, in the order in which `cleanup` removes them.
    pub const ALL: [&str; 30] = [
        SERVICES4,
        BACKENDS4,
        REV_NAT4,
        CT4,
        STATS,
        SOCK_REV_NAT4,
        CONFIG,
        SNAT_CURSOR,
        ICMP_LIMIT,
        SVC_FILTER,
        BE_FILTER,
        SRC_RANGE4,
        AFFINITY4,
        AFFINITY_MATCH,
        ROUTE4,
        SERVICES6,
        BACKENDS6,
        REV_NAT6,
        CT6,
        SOCK_REV_NAT6,
        SRC_RANGE6,
        AFFINITY6,
        ROUTE6,
        CALLS_TC,
        CALLS_XDP,
        SVC_STATS,
        MONITOR,
        EVENTS,
        POD_NETNS,
        DIRECT_FILTER,
    ];
}

/// Program names (the `#[classifier]` function names in rproxy-ebpf).
pub mod prog_names {
    /// TC ingress on the host side of a pod veth: packets leaving the pod. Service DNAT.
    pub const FROM_POD: &str = "rpx_from_pod";
    /// TC egress on the host side of a pod veth: packets entering the pod. Reverse NAT.
    pub const TO_POD: &str = "rpx_to_pod";
    /// Does nothing but return `TC_ACT_OK`: the baseline of the datapath benchmark.
    pub const NOOP: &str = "rpx_tc_noop";
    /// XDP on an external device: north-south service traffic (`NodePort`, externalIPs,
    /// `LoadBalancer` ingress IPs) and the replies of the flows forwarded to remote backends.
    pub const XDP_EXT: &str = "rpx_xdp_ext";
    /// The same as a TC ingress program on an external device (`--xdp-mode tc`).
    pub const EXT_INGRESS: &str = "rpx_ext_ingress";
    /// TC egress on an external device: reverse NAT of north-south replies from this node's
    /// backends.
    pub const EXT_EGRESS: &str = "rpx_ext_egress";
    /// XDP program returning `XDP_PASS` at once: the XDP baseline of the benchmarks.
    pub const XDP_NOOP: &str = "rpx_xdp_noop";
    /// cgroup `connect4`: a host-network socket connecting to a service address is connected to
    /// a backend instead.
    pub const SOCK_CONNECT4: &str = "rpx_sock_connect4";
    /// cgroup `sendmsg4`: the same for unconnected UDP sends.
    pub const SOCK_SENDMSG4: &str = "rpx_sock_sendmsg4";
    /// cgroup `recvmsg4`: replies to translated UDP sends appear to come from the service.
    pub const SOCK_RECVMSG4: &str = "rpx_sock_recvmsg4";
    /// cgroup `getpeername4`: a translated socket's peer is the service address.
    pub const SOCK_GETPEERNAME4: &str = "rpx_sock_getpeername4";
    /// The IPv6 socket hooks (IPv4-mapped addresses go to the IPv4 services).
    pub const SOCK_CONNECT6: &str = "rpx_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "rpx_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "rpx_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "rpx_sock_getpeername6";
    /// `cgroup/sock_release`: a closing socket's socket-level reverse-NAT entry goes with it.
    pub const SOCK_RELEASE: &str = "rpx_sock_release";
    /// The IPv6 halves of the packet programs, entered by tail call (`super::calls`).
    pub const FROM_POD6: &str = "rpx_from_pod6";
    pub const TO_POD6: &str = "rpx_to_pod6";
    pub const EXT_INGRESS6: &str = "rpx_ext_ingress6";
    pub const EXT_EGRESS6: &str = "rpx_ext_egress6";
    pub const XDP_EXT6: &str = "rpx_xdp_ext6";
    /// A new north-south IPv6 flow to another node's backend (FIB lookup, SNAT port,
    /// forwarding), entered by tail call from `rpx_ext_ingress6` and `rpx_xdp_ext6`.
    pub const EXT_INGRESS6_SNAT: &str = "rpx_ext_ingress6_snat";
    pub const XDP_EXT6_SNAT: &str = "rpx_xdp_ext6_snat";
    /// An ICMPv6 error arriving on an external device, perhaps about a flow this node
    /// source-translated (forwarded to the client), entered by tail call from the same two.
    pub const EXT_INGRESS6_ICMP: &str = "rpx_ext_ingress6_icmp";
    pub const XDP_EXT6_ICMP: &str = "rpx_xdp_ext6_icmp";
}

/// Tail calls. A BPF call chain has 512 bytes of stack; the IPv4 path of each packet program
/// fits, the IPv6 path (addresses four times as wide, and as many registers to spill) does
/// not fit beside it. So each packet program handles IPv4 itself and tail-calls its IPv6 half,
/// a program of its own with a fresh stack; the north-south IPv6 path tail-calls once more for
/// a new flow to another node's backend, and for an ICMPv6 error. The agent fills the program arrays
/// (`map_names::CALLS_TC`, `map_names::CALLS_XDP`) at these indices when it loads the object;
/// a tail call into an empty slot falls through, and the packet passes (counted as
/// `Stat::TailCallFail`).
pub mod calls {
    use super::prog_names;

    pub const FROM_POD6: u32 = 0;
    pub const TO_POD6: u32 = 1;
    pub const EXT_INGRESS6: u32 = 2;
    pub const EXT_EGRESS6: u32 = 3;
    pub const EXT_INGRESS6_SNAT: u32 = 4;
    pub const EXT_INGRESS6_ICMP: u32 = 5;
    /// Slots of `RPX_CALLS_TC`.
    pub const TC_SLOTS: u32 = 8;
    /// The TC programs and their slots.
    pub const TC: [(u32, &str); 6] = [
        (FROM_POD6, prog_names::FROM_POD6),
        (TO_POD6, prog_names::TO_POD6),
        (EXT_INGRESS6, prog_names::EXT_INGRESS6),
        (EXT_EGRESS6, prog_names::EXT_EGRESS6),
        (EXT_INGRESS6_SNAT, prog_names::EXT_INGRESS6_SNAT),
        (EXT_INGRESS6_ICMP, prog_names::EXT_INGRESS6_ICMP),
    ];

    pub const XDP_EXT6: u32 = 0;
    pub const XDP_EXT6_SNAT: u32 = 1;
    pub const XDP_EXT6_ICMP: u32 = 2;
    /// Slots of `RPX_CALLS_XDP`.
    pub const XDP_SLOTS: u32 = 4;
    /// The XDP programs and their slots.
    pub const XDP: [(u32, &str); 3] = [
        (XDP_EXT6, prog_names::XDP_EXT6),
        (XDP_EXT6_SNAT, prog_names::XDP_EXT6_SNAT),
        (XDP_EXT6_ICMP, prog_names::XDP_EXT6_ICMP),
    ];
}

/// Map capacities. The agent checks desired state against these before it writes.
pub mod limits {
    /// Service map entries: one per (vip, port, proto) for slot 0 plus one per backend slot.
    pub const SERVICES_MAX: u32 = 262_144;
    /// Size of the backend array: backend ids are `1..BACKENDS_MAX` (0 is never used).
    pub const BACKENDS_MAX: u32 = 131_072;
    /// Size of the rev-NAT array: rev-NAT ids are `1..=u16::MAX` (0 is never used).
    pub const REV_NAT_MAX: u32 = 65_536;
    /// Conntrack entries (LRU): two per translated flow (forward + reply).
    pub const CT_MAX: u32 = 524_288;
    /// Sockets the socket hooks translated (host-network processes' and pods'), remembered
    /// for `getpeername` and UDP replies (LRU: a connected socket's entry goes when it closes).
    pub const SOCK_REV_NAT_MAX: u32 = 65_536;
    /// `loadBalancerSourceRanges` entries (source CIDRs of all frontends together).
    pub const SRC_RANGES_MAX: u32 = 65_536;
    /// Clients remembered for `ClientIP` affinity (LRU: the least recently used go first).
    pub const AFFINITY_MAX: u32 = 131_072;
    /// (frontend, backend) pairs that affinity may use: one per slot of a frontend with
    /// affinity.
    pub const AFFINITY_MATCH_MAX: u32 = 262_144;
    /// Largest backend set of one service port. Slots are `u16`; this bound also keeps the
    /// agent's writes per update bounded.
    pub const BACKENDS_PER_SERVICE_MAX: u16 = 16_384;
    /// Pod network namespaces listed for the socket hooks (`CONFIG_F_POD_NETNS_LISTED`).
    pub const POD_NETNS_MAX: u32 = 16_384;
    /// Routes remembered by the north-south forwarding (`route`, LRU): one per (ingress
    /// device, source, destination, protocol) of the packets it forwards, i.e. per remote node
    /// (client side) and per client address (reply side).
    pub const ROUTES_MAX: u32 = 65_536;
}

/// Source ports the north-south path allocates when it SNATs a flow to a node address (a
/// backend on another node, `externalTrafficPolicy: Cluster`). The range is the agent's
/// `--snat-port-range`, in `Config`; ports are unique per (backend address, backend port,
/// protocol, node address): the allocation inserts the reply entry with `BPF_NOEXIST`.
///
/// **Why the range is wide, and where it lies.** A backend keeps each connection it closed
/// first in `TIME_WAIT` for 60 s, and a SYN that reuses its tuple may be refused (a timestamp
/// older than the one it remembers, `PAWSTimewait`): the client then waits for a retransmission.
/// So a port should come round to the same backend no sooner than 60 s later, which a range of
/// `n` ports allows up to `n / 60` new flows per second and backend. The default,
/// `DEFAULT_PORT_MIN..=DEFAULT_PORT_MAX` (28,976 ports: ~480/s), lies below the `NodePort` range
/// (30000–32767) and the kernel's default ephemeral range (32768–60999), so that the node's own
/// connections never take a tuple that a translated flow holds: the kernel does not know the
/// datapath's ports. The agent refuses a range that overlaps the node's `net.ipv4.ip_local_port_range`
/// unless `net.ipv4.ip_local_reserved_ports` covers the overlap. (kube-proxy's masquerading
/// takes ports from 1024–65535 and avoids the node's tuples through conntrack.)
pub mod snat {
    pub const DEFAULT_PORT_MIN: u16 = 1_024;
    pub const DEFAULT_PORT_MAX: u16 = 29_999;
    /// Lowest port `--snat-port-range` may start at: below are the privileged ports (NFS and
    /// other clients bind them explicitly).
    pub const PORT_FLOOR: u16 = 1_024;
    /// Ports tried for one new flow before it is dropped and counted (`Stat::SnatExhausted`).
    ///
    /// Each CPU walks the range from a cursor (`map_names::SNAT_CURSOR`, started at a random
    /// port), trying the next ports in turn and leaving the cursor after the port it took, like
    /// the kernel's ephemeral port search. A port is taken again only after the whole range has
    /// gone by (range / new-flow rate), as late as the range allows, which keeps new flows off
    /// the tuples whose `TIME_WAIT` the backends still hold.
    pub const TRIES: u32 = 32;
    /// Of those, the first ones are also taken over if their flow is quietly closed (see
    /// `REUSE_AFTER_NS`). Each such try is program code the verifier checks on every load:
    /// with all 32 the agent took 1.3 s instead of 0.14 s to load its programs.
    pub const RECLAIM_TRIES: u32 = 4;
    /// A closed flow's port may be taken by a new flow this long after it closed (its last
    /// packets have arrived by then); before that, and for flows still open, never.
    pub const REUSE_AFTER_NS: u64 = 1_000_000_000;
}

/// Hairpin: a pod whose connection to a service is translated to the pod itself. Its packets
/// would come back to it from its own address, which its stack drops (a martian source), so
/// the datapath also translates the source, to `ADDR`, a link-local address no pod or node has,
/// like Cilium's loopback address (kube-proxy masquerades such connections to the node). The
/// pod sees the connection come from `ADDR`; its replies go to its default gateway, the host
/// side of its veth, where `rpx_from_pod` translates them back (`CT_NAT_SNAT` without
/// `CT_NAT_EXTERNAL`).
pub mod hairpin {
    /// 169.254.42.1, network byte order as in packets.
    pub const ADDR: u32 = u32::from_ne_bytes([169, 254, 42, 1]);
    /// `fd72:7078:7900::1`, the IPv6 twin: a unique local address (RFC 4193) whose global ID
    /// spells "rpxy", routed like any other through the pod's default gateway. (A link-local
    /// address would need neighbour discovery on the pod's link.)
    pub const ADDR6: super::In6 = [
        u32::from_ne_bytes([0xfd, 0x72, 0x70, 0x78]),
        u32::from_ne_bytes([0x79, 0x00, 0x00, 0x00]),
        0,
        u32::from_ne_bytes([0, 0, 0, 1]),
    ];
}

/// ICMP errors the datapath sends, back out of the device the packet came in on, from the
/// address the packet was sent to, quoting its IPv4 header and first 8 bytes of payload (headers
/// with options get no message):
/// - for north-south packets the node cannot forward, as a router sends them: time exceeded (the
///   TTL would reach 0) and fragmentation needed (too big for the route, with "don't fragment"
///   set; the message carries the route's MTU, for path MTU discovery);
/// - port unreachable for a new flow to a frontend without any backend, from a pod or from
///   outside, like kube-proxy's `REJECT` rule for a Service without endpoints: the client's
///   connect fails at once (`ECONNREFUSED`) instead of timing out.
///
/// Each CPU sends at most one per `INTERVAL_NS` on average, with bursts of `BURST`: the state
/// is the time the next one may go (`map_names::ICMP_LIMIT`), kept no further than `BURST`
/// intervals in the past. The kernel limits its own ICMP errors likewise
/// (`net.ipv4.icmp_msgs_per_sec`, 1000 by default).
pub mod icmp {
    /// 1,000 per second per CPU.
    pub const INTERVAL_NS: u64 = 1_000_000;
    pub const BURST: u64 = 50;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const DEST_UNREACH: u8 = 3;
    pub const FRAG_NEEDED: u8 = 4;
    pub const PORT_UNREACH: u8 = 3;
    pub const PARAM_PROBLEM: u8 = 12;
    /// ICMPv6 (RFC 4443): the same errors, the same budget.
    pub const V6_DEST_UNREACH: u8 = 1;
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    pub const V6_TIME_EXCEEDED: u8 = 3;
    pub const V6_PARAM_PROBLEM: u8 = 4;
    /// Destination unreachable's "port unreachable" code in ICMPv6.
    pub const V6_PORT_UNREACH: u8 = 4;
}

/// The route cache of the north-south forwarding at XDP (`map_names::ROUTE4`).
///
/// Forwarding a packet from the hook needs the kernel's FIB lookup (`bpf_fib_lookup`): the
/// egress device, the next hop's MAC and the route's MTU. It is the largest single cost of a
/// forwarded packet (about a third of the program's time in the two-node benchmark's profile).
/// The packets of established flows (client side and reply side) therefore use the result of a
/// lookup made at most `VALID_NS` earlier for the same ingress device, source, destination and
/// protocol (`RouteKey4`); an older or missing entry means a new lookup, whose successful result
/// replaces the entry. Only complete results are kept: an unresolved next hop, no route or a
/// packet too big for the route are looked up again on every packet, as before.
///
/// **Staleness.** A change of route, neighbour MAC or MTU reaches the forwarding within
/// `VALID_NS` (the kernel's own neighbour entries stay reachable for tens of seconds). A
/// packet bigger than the remembered MTU is still answered with "fragmentation needed". The
/// cache is used at XDP only: the TC twin (`--xdp-mode tc`) looks up every packet, since on an
/// skb the FIB lookup checks the MTU only when it fails and so cannot report it.
pub mod route {
    /// 100 ms: at a million packets per second per destination, one lookup in 100,000.
    pub const VALID_NS: u64 = 100_000_000;
}

/// Bitmaps that let the programs skip every map lookup for packets that cannot concern them,
/// which is most traffic. One bit per hash value of `(address, port, protocol)`: a set bit may
/// be a collision (the lookups then find nothing), a clear bit never belongs to an entry.
/// - `map_names::SVC_FILTER`, over the frontends: a packet leaving a pod, or arriving on an
///   external device, whose destination's bit is clear is not for a service.
/// - `map_names::BE_FILTER`, over the backends: a packet entering a pod (or leaving through an
///   external device) whose source's bit is clear is not a backend's reply.
///
/// The agent sets an entry's bit before it writes the entry, and clears it (when no other entry
/// shares it) after removing the entry.
pub mod filter {
    /// 4,096 words of 64 bits: 262,144 bits, 32 KiB.
    pub const WORDS: u32 = 4096;
    /// The bit of a frontend or backend; `addr` and `port` in wire order, as in the map keys
    /// and values.
    #[inline(always)]
    #[must_use]
    pub const fn bit(addr: u32, port: u16, proto: u8) -> u32 {
        // Multiplicative hashing; the top 18 bits index 2^18 = WORDS * 64 bits.
        (addr ^ ((port as u32) << 16) ^ proto as u32).wrapping_mul(0x9e37_79b1) >> 14
    }
    /// The bit of an IPv6 frontend or backend: its address's words folded into one (the same
    /// bitmaps serve both families).
    #[inline(always)]
    #[must_use]
    pub const fn bit6(addr: &super::In6, port: u16, proto: u8) -> u32 {
        bit(addr[0] ^ addr[1] ^ addr[2] ^ addr[3], port, proto)
    }
    const _: () = assert!(WORDS * 64 == 1 << 18);
}

/// IP protocol numbers as carried in keys.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const ICMPV6: u8 = 58;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// An IPv6 address as the maps carry it: its 16 wire bytes as four 32-bit words in memory order
/// (network byte order, like IPv4's `u32`). Words, not bytes: the checksum arithmetic and the
/// comparisons work on words, and the keys stay 4-byte aligned like IPv4's.
pub type In6 = [u32; 4];

/// Key of a service map (`RPX_SVC4`, `RPX_SVC6`): `(vip, dport, proto, scope, slot)`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey<A> {
    /// Service IP, network byte order.
    pub addr: A,
    /// Service port, network byte order.
    pub port: u16,
    /// Backend slot: 0 is the service itself, `1..=count` are backends.
    pub slot: u16,
    /// IP protocol (`proto::TCP`, `proto::UDP`).
    pub proto: u8,
    /// `SCOPE_EXTERNAL` or `SCOPE_LOCAL`.
    pub scope: u8,
    pub _pad: [u8; 2],
}
pub type ServiceKey4 = ServiceKey<u32>;
pub type ServiceKey6 = ServiceKey<In6>;

/// The frontend's backend set for all traffic, except north-south traffic to a frontend with
/// `SVC_F_ETP_LOCAL`.
pub const SCOPE_EXTERNAL: u8 = 0;
/// Only for frontends with `SVC_F_ETP_LOCAL`: the backend set for traffic from outside the
/// cluster (arriving on an external device), kube-proxy's local endpoints. Its slot 0 carries
/// the same rev-NAT id and flags; a count of 0 means this node does not serve the frontend to
/// outside clients (packets are dropped, like kube-proxy). Traffic from pods and from the node
/// itself keeps using `SCOPE_EXTERNAL` (kube-proxy's short-circuit to all endpoints).
pub const SCOPE_LOCAL: u8 = 1;

/// Value of the service map. In slot 0 it describes the service, in slots `1..=count` only
/// `backend_id` is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Slot ≥ 1: the backend id at this slot. Slot 0: 0.
    pub backend_id: u32,
    /// Slot 0: number of backend slots (0 = no endpoints for this traffic: a new flow is
    /// rejected, like kube-proxy's REJECT, unless `SVC_F_NO_LOCAL_ENDPOINTS`: see `rejects`).
    pub count: u16,
    /// Slot 0: id of the rev-NAT entry (original VIP and port) used for replies.
    pub rev_nat_id: u16,
    /// Slot 0: `SVC_F_*` bits.
    pub flags: u16,
    pub _pad: u16,
    /// Slot 0: `ClientIP` session affinity timeout in seconds (0 = none).
    pub affinity_timeout: u32,
}

/// The service is a `ClusterIP`.
pub const SVC_F_CLUSTER_IP: u16 = 1 << 0;
/// The service is a `NodePort` (address is a node IP or the `NodePort` wildcard).
pub const SVC_F_NODE_PORT: u16 = 1 << 1;
/// The service address is an externalIP.
pub const SVC_F_EXTERNAL_IP: u16 = 1 << 2;
/// The service address is a `LoadBalancer` ingress IP.
pub const SVC_F_LOAD_BALANCER: u16 = 1 << 3;
/// externalTrafficPolicy: Local.
pub const SVC_F_ETP_LOCAL: u16 = 1 << 4;
/// internalTrafficPolicy: Local.
pub const SVC_F_ITP_LOCAL: u16 = 1 << 5;
/// `sessionAffinity: ClientIP`.
pub const SVC_F_AFFINITY: u16 = 1 << 6;
/// `loadBalancerSourceRanges`: new flows only from the sources that `RPX_SRC_RANGE4` holds
/// under the frontend's rev-NAT id (none: every new flow is dropped).
pub const SVC_F_SOURCE_RANGE: u16 = 1 << 7;
/// `internalTrafficPolicy: Local` on a node without a local endpoint while the Service has
/// endpoints elsewhere (`count` 0): a new flow is dropped, not rejected, as kube-proxy drops it
/// ("has no local endpoints"); the client's connection times out.
pub const SVC_F_NO_LOCAL_ENDPOINTS: u16 = 1 << 8;
/// The policies that go by the client's address (affinity, source ranges): a pod's TCP connect
/// to a frontend with one is left by the socket hooks to the pod's device, where the packets
/// carry that address.
pub const SVC_F_BY_CLIENT_ADDRESS: u16 = SVC_F_AFFINITY | SVC_F_SOURCE_RANGE;

impl ServiceValue {
    /// Whether a new flow to this frontend (slot 0) is rejected (ICMP port unreachable,
    /// `ECONNREFUSED`) for want of endpoints, as kube-proxy's `REJECT`: it has none at all.
    #[inline(always)]
    #[must_use]
    pub const fn rejects(&self) -> bool {
        self.count == 0 && self.flags & SVC_F_NO_LOCAL_ENDPOINTS == 0
    }
}

/// The data of an `RPX_SRC_RANGE4` key (an LPM trie): a source CIDR allowed to open flows to the
/// frontend with rev-NAT id `rev_nat_id` (`SVC_F_SOURCE_RANGE`). The full key is the trie's
/// `prefixlen: u32` followed by this struct (aya's `lpm_trie::Key<SrcRange4>` on both sides):
/// `SrcRange4::ID_BITS` + the CIDR's length, so the id (and the zero pad) always match exactly.
/// A lookup uses the packet's source with `ID_BITS + 32`. The value is a `u8`, 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SrcRange<A> {
    /// Host order, like ids elsewhere: every prefix covers it whole, so the trie's bit order
    /// does not matter for it.
    pub rev_nat_id: u16,
    pub _pad: u16,
    /// The CIDR's address (network byte order), host bits zero.
    pub addr: A,
}
pub type SrcRange4 = SrcRange<u32>;
pub type SrcRange6 = SrcRange<In6>;

impl<A> SrcRange<A> {
    /// Key bits before the address: `rev_nat_id` and `_pad`.
    pub const ID_BITS: u32 = 32;
}

/// Key of `RPX_AFFINITY4`: a client address (network byte order) of the frontend with rev-NAT
/// id `rev_nat_id` (`SVC_F_AFFINITY`, kube-proxy's `sessionAffinity: ClientIP`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey<A> {
    pub client: A,
    pub rev_nat_id: u16,
    pub _pad: u16,
}
pub type AffinityKey4 = AffinityKey<u32>;
pub type AffinityKey6 = AffinityKey<In6>;

/// Value of `RPX_AFFINITY4`: the backend the client's last new flow got, and when
/// (`CLOCK_MONOTONIC_COARSE` ns). A new flow within the frontend's `affinity_timeout` of that
/// goes to the same backend while `RPX_AFFINITY_MATCH` says it still serves the frontend, as
/// kube-proxy's `recent` match (`--rcheck --seconds timeout`, `--set` by each new connection).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Key of `RPX_AFFINITY_MATCH`: backend `backend_id` is one of the slots of the frontend with
/// rev-NAT id `rev_nat_id` (either scope). The agent writes an entry before the slot that
/// needs it is published and deletes it after the slot is gone; the value is a `u8`, 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatch {
    pub backend_id: u32,
    pub rev_nat_id: u16,
    pub _pad: u16,
}

/// Value of the IPv4 backend array, indexed by backend id (`u32`, never 0). An all-zero entry
/// (no `BE_F_ACTIVE` nor `BE_F_TERMINATING`) is a free id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Backend<A> {
    /// Backend (pod) IP, network byte order.
    pub addr: A,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    /// `BE_F_*` bits.
    pub flags: u8,
}
pub type Backend4 = Backend<u32>;
pub type Backend6 = Backend<In6>;

/// The endpoint is ready.
pub const BE_F_ACTIVE: u8 = 1 << 0;
/// The endpoint is terminating (kept for existing connections and as a fallback).
pub const BE_F_TERMINATING: u8 = 1 << 1;
/// The endpoint runs on this node.
pub const BE_F_LOCAL: u8 = 1 << 2;

/// Value of the IPv4 rev-NAT array, indexed by rev-NAT id (`u16`, never 0): the original service
/// address a reply must appear to come from. An all-zero entry is a free id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNat<A> {
    /// Service IP, network byte order.
    pub addr: A,
    /// Service port, network byte order.
    pub port: u16,
    pub _pad: u16,
}
pub type RevNat4 = RevNat<u32>;
pub type RevNat6 = RevNat<In6>;

/// Key of `RPX_SK_RNAT4` (LRU): a socket translated by the socket hooks, and the
/// backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey4 {
    /// `bpf_get_socket_cookie`.
    pub cookie: u64,
    /// Backend address and port, network byte order.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `SockRevKey4` for IPv6 sockets (`RPX_SK_RNAT6`); its own type, as the alignment of the
/// cookie needs explicit padding after an IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr: In6,
    pub port: u16,
    pub _pad: [u16; 3],
}

/// `RPX_CONFIG[0]`: settings the agent writes before attaching anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Network namespace cookie (`SO_NETNS_COOKIE`) of the node's own namespace: the socket hooks
    /// translate this namespace's sockets (host-network processes) and, as the
    /// `CONFIG_F_POD_*` bits say, pods' TCP sockets (every other namespace's, or the listed
    /// ones'). 0 disables the socket hooks.
    pub host_netns_cookie: u64,
    /// The SNAT port range (`snat`), first and last port. **Host byte order**, unlike the
    /// ports in keys: the programs count and compare in it, they never copy it into a header.
    /// An empty range (`snat_port_count` 0, as before the agent writes it) SNATs nothing: such
    /// flows are dropped and counted as `Stat::SnatExhausted`.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u32,
}

/// `Config::flags`: `ClusterIP` frontends take traffic arriving on the external devices (routed
/// to the node from outside), as kube-proxy's rules do (`--external-cluster-ip`).
pub const CONFIG_F_EXTERNAL_CLUSTER_IP: u32 = 1 << 0;
/// `Config::flags`: the socket hooks translate a TCP `connect()` to a service in any network
/// namespace other than the node's (its pods': a node's kernel, or a cgroup subtree of its
/// own) to a backend, so that the pod's packets need no per-packet NAT (`--pod-sockets all`).
pub const CONFIG_F_POD_SOCKETS: u32 = 1 << 1;
/// `Config::flags`: as `CONFIG_F_POD_SOCKETS`, but only in the network namespaces listed in
/// `RPX_POD_NETNS` (nodes that share one kernel and cgroup, as in a lab:
/// `--pod-sockets <glob>`). Without either bit pods' sockets are left alone and their traffic is
/// translated on their devices.
pub const CONFIG_F_POD_NETNS_LISTED: u32 = 1 << 2;

impl Config {
    /// Number of ports in the SNAT range; 0 if it is empty or unset.
    #[inline(always)]
    #[must_use]
    pub const fn snat_port_count(&self) -> u32 {
        if self.snat_port_min == 0 || self.snat_port_max < self.snat_port_min {
            0
        } else {
            (self.snat_port_max - self.snat_port_min) as u32 + 1
        }
    }
}

/// Conntrack key (IPv4): the packet's own 5-tuple plus the direction of the entry.
///
/// A translated flow owns two entries:
/// - `CT_DIR_SERVICE`: `(client, vip, cport, vport)` as sent by the client → chosen backend;
/// - `CT_DIR_REPLY`: `(backend, client, bport, cport)` as sent by the backend → rev-NAT id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `CT_DIR_*`.
    pub dir: u8,
    pub _pad: [u8; 2],
}
pub type CtKey4 = CtKey<u32>;
pub type CtKey6 = CtKey<In6>;

pub const CT_DIR_SERVICE: u8 = 1;
pub const CT_DIR_REPLY: u8 = 2;
/// A lock held for nanoseconds while the datapath takes over a closed flow's SNAT port (the
/// reply key with this direction; see the eBPF `conntrack::reclaim_snat`). A dump may catch one.
pub const CT_DIR_RECLAIM: u8 = 3;

/// Conntrack value. The TCP state is kept in both entries of a flow: packets carrying SYN, FIN
/// or RST update the entry they hit and its pair; other packets only refresh their own entry.
///
/// Each entry says how to rewrite the packets that hit it, and with its key it names the other
/// entry of the flow (`CtKey4::pair`). For a flow `client:cport → vip:vport` translated to
/// `backend:bport`, with the source translated to `nat` (the client itself unless the flow is
/// translated to a node address, `CT_NAT_SNAT`, or the hairpin address, or the pod path gave
/// the client another source port because a live flow held its reply tuple, `Stat::PortRemapped`):
///
/// | entry | key | `pair_*` | `nat_*` |
/// |---|---|---|---|
/// | service | `(client, vip, cport, vport)` | backend (new destination) | nat (new source) |
/// | reply | `(backend, nat, bport, nport)` | vip (new source) | client (new destination) |
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue<A> {
    /// Absolute expiry, `bpf_ktime_get_coarse_ns()` clock (`CLOCK_MONOTONIC_COARSE`, nanoseconds).
    pub expires_ns: u64,
    /// Service entry: the backend chosen for this flow. Reply entry: the same backend.
    pub backend_id: u32,
    /// The service's rev-NAT id (original VIP and port).
    pub rev_nat_id: u16,
    /// `CT_F_*` bits: TCP flags seen in each direction.
    pub flags: u8,
    /// `CtState` as `u8`.
    pub state: u8,
    /// Service entry: the backend's address; reply entry: the VIP's.
    pub pair_addr: A,
    /// Service entry: the source address the backend sees; reply entry: the client's address.
    pub nat_addr: A,
    pub pair_port: u16,
    pub nat_port: u16,
    /// `CT_NAT_*` bits.
    pub nat_flags: u8,
    pub _pad: [u8; 3],
}
pub type CtValue4 = CtValue<u32>;
pub type CtValue6 = CtValue<In6>;

/// The flow's source is translated to a node address and port (north-south to a remote
/// backend); the reply entry's key holds that address and port.
pub const CT_NAT_SNAT: u8 = 1 << 0;
/// The flow arrived on an external device (north-south).
pub const CT_NAT_EXTERNAL: u8 = 1 << 1;
/// A pod's connection straight to a backend's own address, whose source port the datapath
/// translated: a live flow held the tuple its replies would come back on (see
/// `Stat::PortRemapped`). Its entries' pair is the backend itself, its rev-NAT id 0.
pub const CT_NAT_DIRECT: u8 = 1 << 2;

/// What a translated flow is, from its entries' `CT_NAT_*` bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowKind {
    /// From a pod (or the node) to a service: the backend sees the client.
    EastWest,
    /// A pod to a service whose chosen backend is that pod: the source is translated to
    /// `hairpin::ADDR`.
    Hairpin,
    /// From an external device to a backend on this node (or any under
    /// `externalTrafficPolicy: Local`): the backend sees the client.
    External,
    /// From an external device to a backend on another node: the source is translated to a
    /// node address and SNAT port, and the node forwards both ways.
    ExternalSnat,
    /// A pod's connection straight to a backend (no frontend), translated only because its
    /// source port had to change (`CT_NAT_DIRECT`).
    Direct,
}

impl FlowKind {
    /// The kind of a flow whose entries carry `nat_flags`.
    #[inline(always)]
    #[must_use]
    pub const fn of(nat_flags: u8) -> Self {
        if nat_flags & CT_NAT_DIRECT != 0 {
            return Self::Direct;
        }
        match (nat_flags & CT_NAT_EXTERNAL != 0, nat_flags & CT_NAT_SNAT != 0) {
            (false, false) => Self::EastWest,
            (false, true) => Self::Hairpin,
            (true, false) => Self::External,
            (true, true) => Self::ExternalSnat,
        }
    }
}

/// SYN seen from the client.
pub const CT_F_SYN_FWD: u8 = 1 << 0;
/// SYN seen from the backend (SYN-ACK).
pub const CT_F_SYN_REV: u8 = 1 << 1;
/// FIN seen from the client.
pub const CT_F_FIN_FWD: u8 = 1 << 2;
/// FIN seen from the backend.
pub const CT_F_FIN_REV: u8 = 1 << 3;
/// RST seen in either direction.
pub const CT_F_RST: u8 = 1 << 4;
/// Any packet seen from the backend.
pub const CT_F_SEEN_REV: u8 = 1 << 5;

/// Connection state, derived from `CtValue::flags`; it selects the entry's lifetime.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtState {
    /// TCP: SYN sent, no answer yet.
    SynSent = 1,
    /// TCP: the backend answered.
    Established = 2,
    /// TCP: FIN seen both ways, or RST.
    Closing = 3,
    /// UDP (and other datagram protocols).
    Datagram = 4,
}

impl CtState {
    /// Derives the state of a TCP flow from its flags.
    #[inline(always)]
    #[must_use]
    pub const fn from_tcp_flags(flags: u8) -> Self {
        if flags & CT_F_RST != 0 || flags & (CT_F_FIN_FWD | CT_F_FIN_REV) == (CT_F_FIN_FWD | CT_F_FIN_REV) {
            Self::Closing
        } else if flags & (CT_F_SYN_REV | CT_F_SEEN_REV) != 0 {
            Self::Established
        } else {
            Self::SynSent
        }
    }

    /// Lifetime of an entry in this state, in nanoseconds. Kept as constants of the ABI so the
    /// datapath and the garbage collector agree (values follow Cilium's defaults).
    #[inline(always)]
    #[must_use]
    pub const fn lifetime_ns(self) -> u64 {
        const S: u64 = 1_000_000_000;
        match self {
            Self::SynSent | Self::Datagram => 60 * S,
            Self::Established => 6 * 3600 * S,
            Self::Closing => 10 * S,
        }
    }

    #[must_use]
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::SynSent),
            2 => Some(Self::Established),
            3 => Some(Self::Closing),
            4 => Some(Self::Datagram),
            _ => None,
        }
    }
}

/// Per-CPU counters (`RPX_STATS`, a per-CPU array indexed by `Stat as u32`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// Packets of a new flow translated to a backend.
    NewFlow = 0,
    /// Packets of an existing flow translated to a backend.
    Established = 1,
    /// Replies reverse-translated.
    RevNat = 2,
    /// Packets of a new flow to a frontend with no backend: rejected with ICMP port unreachable
    /// (`icmp`) when the service has no endpoint at all, else dropped.
    NoBackend = 3,
    /// A conntrack entry pointed at a backend that no longer exists; a new one was chosen.
    BackendGone = 4,
    /// Conntrack insert failed.
    CtInsertFail = 5,
    /// A helper that rewrites the packet failed; the packet was dropped.
    RewriteFail = 6,
    /// IPv4 fragments to a service (not translated; passed).
    Fragment = 7,
    /// North-south new flow to a remote backend dropped: every SNAT port towards that backend
    /// is taken.
    SnatExhausted = 8,
    /// North-south packet that needed forwarding from XDP/TC but the FIB lookup found no
    /// usable route or neighbour: handed to the stack instead (new flows: dropped).
    FibFail = 9,
    /// North-south packets transmitted from the hook to another node or back to the client.
    Forwarded = 10,
    /// North-south packets that would have been forwarded with a TTL of 1 or less: dropped, as
    /// a router would, with an ICMP time-exceeded message (`icmp`).
    TtlExceeded = 11,
    /// North-south packets too big for the route to their next hop: dropped; with "don't
    /// fragment" set, answered with ICMP fragmentation-needed (`icmp`). No fragmentation.
    FragNeeded = 12,
    /// ICMP errors sent (time exceeded, fragmentation needed, port unreachable); fewer than the
    /// packets that called for one when the rate limit (`icmp`) held some back.
    IcmpSent = 13,
    /// ICMP errors about a packet of a translated flow (a backend's port unreachable, a router's
    /// fragmentation needed…), translated back on their way to the client: the quoted packet's
    /// destination becomes the service address again, and so does the error's source when the
    /// backend sent it (conntrack's "related" packets).
    IcmpRelated = 14,
    /// New flows to a frontend with `loadBalancerSourceRanges` from a source outside them:
    /// dropped, as kube-proxy's firewall chain does.
    SourceRangeDrop = 15,
    /// New connections dropped because a live translated flow holds the tuple their replies
    /// would come back on and no other source port was free for them (see `PortRemapped`):
    /// taking it would send that flow's replies to the wrong socket. A closing or expired
    /// holder is replaced instead.
    CtClash = 16,
    /// Tail calls that found their program array slot empty (`calls`): the packet passed
    /// untranslated. Never expected; the agent fills the slots before it attaches anything.
    TailCallFail = 17,
    /// New connections whose source port was translated as netfilter's NAT does for a
    /// clashing tuple: a live translated flow held the tuple their replies would come back on
    /// (a client handed out one source port again towards one backend: a pod's UDP through two
    /// frontends, or its TCP straight to a backend that a flow kept with its own port; an
    /// external client through two frontends of a local backend). The port is taken from
    /// `--snat-port-range`, on the client's own address. (A pod's TCP flows through a frontend
    /// take their own port folded into that range, and are counted here only when a live flow
    /// holds that one.)
    PortRemapped = 18,
}

impl Stat {
    pub const COUNT: u32 = 19;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Self::NewFlow,
        Self::Established,
        Self::RevNat,
        Self::NoBackend,
        Self::BackendGone,
        Self::CtInsertFail,
        Self::RewriteFail,
        Self::Fragment,
        Self::SnatExhausted,
        Self::FibFail,
        Self::Forwarded,
        Self::TtlExceeded,
        Self::FragNeeded,
        Self::IcmpSent,
        Self::IcmpRelated,
        Self::SourceRangeDrop,
        Self::CtClash,
        Self::TailCallFail,
        Self::PortRemapped,
    ];

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NewFlow => "new_flow",
            Self::Established => "established",
            Self::RevNat => "rev_nat",
            Self::NoBackend => "no_backend",
            Self::BackendGone => "backend_gone",
            Self::CtInsertFail => "ct_insert_fail",
            Self::RewriteFail => "rewrite_fail",
            Self::Fragment => "fragment",
            Self::SnatExhausted => "snat_exhausted",
            Self::FibFail => "fib_fail",
            Self::Forwarded => "forwarded",
            Self::TtlExceeded => "ttl_exceeded",
            Self::FragNeeded => "frag_needed",
            Self::IcmpSent => "icmp_sent",
            Self::IcmpRelated => "icmp_related",
            Self::SourceRangeDrop => "src_range_drop",
            Self::CtClash => "ct_clash",
            Self::TailCallFail => "tail_call_fail",
            Self::PortRemapped => "port_remapped",
        }
    }
}

/// Value of `RPX_SVC_STATS`, per CPU, indexed by a frontend's rev-NAT id: what the datapath
/// translated for it. `packets` and `bytes` (IP packet lengths, headers included) count both
/// directions of its flows; `new_flows` the flows it opened.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// The drop and translation monitor (`rproxy-agent monitor`): `RPX_MONITOR[0]` holds `ON_*`
/// bits, which the programs read where they drop or translate a packet; while it is 0 they
/// emit nothing.
pub mod monitor {
    /// Emit an event for every packet dropped (or rejected) for a reason `Stat` counts.
    pub const ON_DROPS: u32 = 1 << 0;
    /// Emit an event for every packet translated (new flow, established, reply).
    pub const ON_TRANSLATIONS: u32 = 1 << 1;
    /// Size of the events ring buffer, bytes (a power of two, a multiple of the page size).
    pub const RING_BYTES: u32 = 1 << 20;
    /// `MonitorEvent::kind`.
    pub const KIND_DROP: u8 = 1;
    pub const KIND_TRANSLATION: u8 = 2;
    /// `MonitorEvent::hook`: where the packet was seen.
    pub const HOOK_FROM_POD: u8 = 1;
    pub const HOOK_TO_POD: u8 = 2;
    pub const HOOK_EXTERNAL_IN: u8 = 3;
    pub const HOOK_EXTERNAL_OUT: u8 = 4;
    /// The socket hooks: a `connect()` (or an unconnected UDP send) translated to a backend, or
    /// refused. No packet: the source is unknown (zero), `ip_len` 0.
    pub const HOOK_CONNECT: u8 = 5;
}

/// One event of `RPX_EVENTS`: the packet's tuple as the hook lets it go (after a translation,
/// as it came for a drop) and why. Addresses are in network byte order in 16-byte slots (an
/// IPv4 address in the first word, `family` 4); ports in network byte order. `reason` is the
/// `Stat` that counted the packet: `NewFlow`, `Established` or `RevNat` for a translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MonitorEvent {
    /// `bpf_ktime_get_ns()`.
    pub time_ns: u64,
    pub saddr: In6,
    pub daddr: In6,
    pub sport: u16,
    pub dport: u16,
    /// The flow's backend (0: none, or not known at this point).
    pub backend_id: u32,
    /// The flow's frontend, by rev-NAT id (0: none, or not known at this point).
    pub rev_nat_id: u16,
    /// The IP packet's length, headers included (host order).
    pub ip_len: u16,
    /// `monitor::KIND_*`.
    pub kind: u8,
    /// `Stat` as `u8`.
    pub reason: u8,
    /// 4 or 6.
    pub family: u8,
    pub proto: u8,
    /// `monitor::HOOK_*`.
    pub hook: u8,
    pub _pad: [u8; 7],
}

/// Key of `RPX_ROUTE4` (see `route`): what a FIB lookup of the north-south forwarding depends
/// on. Addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteKey<A> {
    /// The device the packet arrived on.
    pub ifindex: u32,
    pub saddr: A,
    pub daddr: A,
    pub proto: u8,
    pub _pad: [u8; 3],
}
pub type RouteKey4 = RouteKey<u32>;
pub type RouteKey6 = RouteKey<In6>;

/// Value of `RPX_ROUTE4`: a successful FIB lookup's result and when it was made
/// (`CLOCK_MONOTONIC_COARSE` ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RouteValue {
    pub checked_ns: u64,
    /// The egress device.
    pub ifindex: u32,
    /// The route's MTU (host byte order).
    pub mtu: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 6],
}

// Sizes are part of the ABI: a change here is a change on both sides and of pinned maps. Each
// type's size also equals the sum of its fields' sizes: no implicit padding. The IPv4 layouts
// are those of the agents before IPv6 (their pinned maps are adopted).
const _: () = assert!(core::mem::size_of::<ServiceKey4>() == 12);
const _: () = assert!(4 + 2 + 2 + 1 + 1 + 2 == core::mem::size_of::<ServiceKey4>());
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 24);
const _: () = assert!(16 + 2 + 2 + 1 + 1 + 2 == core::mem::size_of::<ServiceKey6>());
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);
const _: () = assert!(4 + 2 + 2 + 2 + 2 + 4 == core::mem::size_of::<ServiceValue>());
const _: () = assert!(core::mem::size_of::<Backend4>() == 8);
const _: () = assert!(4 + 2 + 1 + 1 == core::mem::size_of::<Backend4>());
const _: () = assert!(core::mem::size_of::<Backend6>() == 20);
const _: () = assert!(16 + 2 + 1 + 1 == core::mem::size_of::<Backend6>());
const _: () = assert!(core::mem::size_of::<RevNat4>() == 8);
const _: () = assert!(4 + 2 + 2 == core::mem::size_of::<RevNat4>());
const _: () = assert!(core::mem::size_of::<RevNat6>() == 20);
const _: () = assert!(16 + 2 + 2 == core::mem::size_of::<RevNat6>());
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);
const _: () = assert!(4 + 4 + 2 + 2 + 1 + 1 + 2 == core::mem::size_of::<CtKey4>());
const _: () = assert!(core::mem::size_of::<CtKey6>() == 40);
const _: () = assert!(16 + 16 + 2 + 2 + 1 + 1 + 2 == core::mem::size_of::<CtKey6>());
const _: () = assert!(core::mem::size_of::<CtValue4>() == 32);
const _: () = assert!(8 + 4 + 2 + 1 + 1 + 4 + 4 + 2 + 2 + 1 + 3 == core::mem::size_of::<CtValue4>());
const _: () = assert!(core::mem::size_of::<CtValue6>() == 56);
const _: () = assert!(8 + 4 + 2 + 1 + 1 + 16 + 16 + 2 + 2 + 1 + 3 == core::mem::size_of::<CtValue6>());
const _: () = assert!(core::mem::size_of::<SockRevKey4>() == 16);
const _: () = assert!(8 + 4 + 2 + 2 == core::mem::size_of::<SockRevKey4>());
const _: () = assert!(core::mem::size_of::<SockRevKey6>() == 32);
const _: () = assert!(8 + 16 + 2 + 6 == core::mem::size_of::<SockRevKey6>());
const _: () = assert!(core::mem::size_of::<SrcRange4>() == 8);
const _: () = assert!(2 + 2 + 4 == core::mem::size_of::<SrcRange4>());
const _: () = assert!(core::mem::size_of::<SrcRange6>() == 20);
const _: () = assert!(2 + 2 + 16 == core::mem::size_of::<SrcRange6>());
const _: () = assert!(core::mem::size_of::<AffinityKey4>() == 8);
const _: () = assert!(4 + 2 + 2 == core::mem::size_of::<AffinityKey4>());
const _: () = assert!(core::mem::size_of::<AffinityKey6>() == 20);
const _: () = assert!(16 + 2 + 2 == core::mem::size_of::<AffinityKey6>());
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
const _: () = assert!(8 + 4 + 4 == core::mem::size_of::<AffinityValue>());
const _: () = assert!(core::mem::size_of::<AffinityMatch>() == 8);
const _: () = assert!(4 + 2 + 2 == core::mem::size_of::<AffinityMatch>());
const _: () = assert!(core::mem::size_of::<Config>() == 16);
const _: () = assert!(8 + 2 + 2 + 4 == core::mem::size_of::<Config>());
const _: () = assert!(core::mem::size_of::<RouteKey4>() == 16);
const _: () = assert!(4 + 4 + 4 + 1 + 3 == core::mem::size_of::<RouteKey4>());
const _: () = assert!(core::mem::size_of::<RouteKey6>() == 40);
const _: () = assert!(4 + 16 + 16 + 1 + 3 == core::mem::size_of::<RouteKey6>());
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 24);
const _: () = assert!(8 + 8 + 8 == core::mem::size_of::<ServiceStats>());
const _: () = assert!(core::mem::size_of::<MonitorEvent>() == 64);
const _: () = assert!(8 + 16 + 16 + 2 + 2 + 4 + 2 + 2 + 1 + 1 + 1 + 1 + 1 + 7 == core::mem::size_of::<MonitorEvent>());
const _: () = assert!(core::mem::size_of::<RouteValue>() == 32);
const _: () = assert!(8 + 4 + 2 + 6 + 6 + 6 == core::mem::size_of::<RouteValue>());

#[cfg(feature = "user")]
mod user {
    use super::{
        AffinityKey, AffinityMatch, AffinityValue, Backend, Config, CtKey, CtValue, In6, MonitorEvent, RevNat,
        RouteKey, RouteValue, ServiceKey, ServiceStats, ServiceValue, SockRevKey4, SockRevKey6, SrcRange,
    };
    // SAFETY: each type is #[repr(C)], made only of integers, with no implicit padding (asserted
    // above for both address types), so every bit pattern is valid and no byte is uninitialised.
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SockRevKey4 {}
    unsafe impl aya::Pod for SockRevKey6 {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatch {}
    unsafe impl aya::Pod for RouteValue {}
    unsafe impl aya::Pod for ServiceStats {}
    unsafe impl aya::Pod for MonitorEvent {}
    macro_rules! both_families {
        ($($t:ident),*) => {$(
            // SAFETY: as above.
            unsafe impl aya::Pod for $t<u32> {}
            // SAFETY: as above.
            unsafe impl aya::Pod for $t<In6> {}
        )*};
    }
    both_families!(ServiceKey, Backend, RevNat, CtKey, CtValue, SrcRange, AffinityKey, RouteKey);
}

/// An address as the maps hold it (`u32` for IPv4, `In6` for IPv6: network byte order), to and
/// from the standard library's address types (agent side).
#[cfg(feature = "user")]
pub trait WireAddr: Copy {
    type Ip: Copy + Into<core::net::IpAddr>;
    /// The map form of `ip`.
    fn wire(ip: Self::Ip) -> Self;
    /// The address this map form holds.
    fn ip(self) -> Self::Ip;
}

#[cfg(feature = "user")]
impl WireAddr for u32 {
    type Ip = core::net::Ipv4Addr;
    fn wire(ip: core::net::Ipv4Addr) -> Self {
        u32::from(ip).to_be()
    }
    fn ip(self) -> core::net::Ipv4Addr {
        core::net::Ipv4Addr::from(u32::from_be(self))
    }
}

#[cfg(feature = "user")]
impl WireAddr for In6 {
    type Ip = core::net::Ipv6Addr;
    fn wire(ip: core::net::Ipv6Addr) -> Self {
        let b = ip.octets();
        core::array::from_fn(|i| u32::from_ne_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]))
    }
    fn ip(self) -> core::net::Ipv6Addr {
        let mut b = [0u8; 16];
        for (i, w) in self.iter().enumerate() {
            b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        core::net::Ipv6Addr::from(b)
    }
}

#[cfg(feature = "user")]
impl<A: WireAddr> ServiceKey<A> {
    /// Builds a key from host-order values (`SCOPE_EXTERNAL`).
    #[must_use]
    pub fn new(addr: A::Ip, port: u16, proto: u8, slot: u16) -> Self {
        Self { addr: A::wire(addr), port: port.to_be(), slot, proto, scope: SCOPE_EXTERNAL, _pad: [0; 2] }
    }
    #[must_use]
    pub fn ip(&self) -> A::Ip {
        self.addr.ip()
    }
    #[must_use]
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[cfg(feature = "user")]
impl<A: WireAddr> Backend<A> {
    #[must_use]
    pub fn new(addr: A::Ip, port: u16, proto: u8, flags: u8) -> Self {
        Self { addr: A::wire(addr), port: port.to_be(), proto, flags }
    }
    #[must_use]
    pub fn ip(&self) -> A::Ip {
        self.addr.ip()
    }
    #[must_use]
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

#[cfg(feature = "user")]
impl<A: WireAddr> RevNat<A> {
    #[must_use]
    pub fn new(addr: A::Ip, port: u16) -> Self {
        Self { addr: A::wire(addr), port: port.to_be(), _pad: 0 }
    }
    #[must_use]
    pub fn ip(&self) -> A::Ip {
        self.addr.ip()
    }
    #[must_use]
    pub fn host_port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

impl<A> CtValue<A> {
    /// The kind of flow this entry belongs to.
    #[inline(always)]
    #[must_use]
    pub const fn kind(&self) -> FlowKind {
        FlowKind::of(self.nat_flags)
    }
}

impl<A: Copy> CtKey<A> {
    /// The key of the other entry of this flow, from the pair and nat fields of this entry's
    /// value (see `CtValue`):
    ///
    /// - service entry `(client → vip)`: reply key is `(pair → nat)`, the backend answering the
    ///   address the flow was translated to;
    /// - reply entry `(backend → nat)`: service key is `(nat → pair)`, the client to the VIP.
    #[inline(always)]
    #[must_use]
    pub fn pair(&self, v: &CtValue<A>) -> Self {
        if self.dir == CT_DIR_SERVICE {
            Self {
                saddr: v.pair_addr,
                daddr: v.nat_addr,
                sport: v.pair_port,
                dport: v.nat_port,
                proto: self.proto,
                dir: CT_DIR_REPLY,
                _pad: [0; 2],
            }
        } else {
            Self {
                saddr: v.nat_addr,
                daddr: v.pair_addr,
                sport: v.nat_port,
                dport: v.pair_port,
                proto: self.proto,
                dir: CT_DIR_SERVICE,
                _pad: [0; 2],
            }
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;

    #[test]
    fn tcp_state_machine() {
        assert_eq!(CtState::from_tcp_flags(CT_F_SYN_FWD), CtState::SynSent);
        assert_eq!(CtState::from_tcp_flags(CT_F_SYN_FWD | CT_F_SYN_REV), CtState::Established);
        assert_eq!(CtState::from_tcp_flags(CT_F_SYN_FWD | CT_F_SYN_REV | CT_F_FIN_FWD), CtState::Established);
        assert_eq!(
            CtState::from_tcp_flags(CT_F_SYN_FWD | CT_F_SYN_REV | CT_F_FIN_FWD | CT_F_FIN_REV),
            CtState::Closing
        );
        assert_eq!(CtState::from_tcp_flags(CT_F_SYN_FWD | CT_F_RST), CtState::Closing);
        assert!(CtState::Closing.lifetime_ns() < CtState::SynSent.lifetime_ns());
        assert!(CtState::SynSent.lifetime_ns() < CtState::Established.lifetime_ns());
    }

    fn key(saddr: [u8; 4], daddr: [u8; 4], sport: u16, dport: u16, dir: u8) -> CtKey4 {
        CtKey4 {
            saddr: u32::from_ne_bytes(saddr),
            daddr: u32::from_ne_bytes(daddr),
            sport: sport.to_be(),
            dport: dport.to_be(),
            proto: proto::TCP,
            dir,
            _pad: [0; 2],
        }
    }

    fn value(pair: &CtKey4, nat_flags: u8) -> CtValue4 {
        // What a datapath stores: the pair entry's source is the new destination or source.
        CtValue4 {
            pair_addr: if pair.dir == CT_DIR_REPLY { pair.saddr } else { pair.daddr },
            pair_port: if pair.dir == CT_DIR_REPLY { pair.sport } else { pair.dport },
            nat_addr: if pair.dir == CT_DIR_REPLY { pair.daddr } else { pair.saddr },
            nat_port: if pair.dir == CT_DIR_REPLY { pair.dport } else { pair.sport },
            nat_flags,
            ..CtValue4::default()
        }
    }

    #[test]
    fn pair_keys_round_trip() {
        // client 10.0.0.1:40000 → vip 10.96.0.10:80, backend 10.0.1.5:8080, no SNAT.
        let svc = key([10, 0, 0, 1], [10, 96, 0, 10], 40000, 80, CT_DIR_SERVICE);
        let reply = key([10, 0, 1, 5], [10, 0, 0, 1], 8080, 40000, CT_DIR_REPLY);
        assert_eq!(svc.pair(&value(&reply, 0)), reply);
        assert_eq!(reply.pair(&value(&svc, 0)), svc);
    }

    #[test]
    fn pair_keys_round_trip_snat() {
        // client 192.0.2.7:5555 → node 172.18.0.2:30080, SNAT to 172.18.0.2:61001, backend on
        // another node 10.0.2.9:8080.
        let svc = key([192, 0, 2, 7], [172, 18, 0, 2], 5555, 30080, CT_DIR_SERVICE);
        let reply = key([10, 0, 2, 9], [172, 18, 0, 2], 8080, 61001, CT_DIR_REPLY);
        let sv = value(&reply, CT_NAT_SNAT);
        let rv = value(&svc, CT_NAT_SNAT);
        assert_eq!(svc.pair(&sv), reply);
        assert_eq!(reply.pair(&rv), svc);
        // The reply entry restores the client as destination and the VIP as source.
        assert_eq!(rv.nat_addr, u32::from_ne_bytes([192, 0, 2, 7]));
        assert_eq!(u16::from_be(rv.pair_port), 30080);
    }
}
