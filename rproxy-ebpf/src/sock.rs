//! Sockets: cgroup socket hooks translate a service address when a socket connects to it, so
//! that the packets leave for the backend directly and no per-packet NAT is needed; replies and
//! `getpeername` show the service address again. Which sockets ([`scope`]):
//! - the node's own network namespace (host-network processes): TCP and connected UDP at
//!   `connect()`, unconnected UDP at every `sendmsg()`;
//! - pods' namespaces, as `Config::flags` say (`--pod-sockets`): every namespace other than the
//!   node's (`CONFIG_F_POD_SOCKETS`), or those the agent lists (`CONFIG_F_POD_NETNS_LISTED`),
//!   TCP only, and not to frontends with `ClientIP` affinity or source ranges
//!   (`Origin::PodSocket`). Pods' UDP stays on the pod path: a connected UDP socket would keep
//!   a backend that is gone, where conntrack's entry is cleared.
//!
//! Everything else is left alone: its traffic is translated on the pod's device. A TCP connect
//! to a service without endpoints fails with `ECONNREFUSED`.
//!
//! Each translation leaves an entry in `RPX_SK_RNAT4`/`6` (socket cookie and backend → service)
//! for the replies and `getpeername`. When a connected socket (TCP, connected UDP) closes,
//! `sock_release` deletes its entry: the table then holds the live sockets only. An unconnected
//! UDP socket may have sent to many services; its entries stay until the LRU table evicts them
//! (refreshed while the socket receives replies). Each translation counts as a new flow of its
//! frontend (`RPX_SVC_STATS`) and is one event for the monitor (`observe::connected`); its
//! packets are not counted, nor seen by conntrack.
//!
//! The IPv6 hooks serve IPv6 services, and IPv4 services for IPv4-mapped addresses
//! (`::ffff:a.b.c.d`, what a dual-stack socket uses to reach an IPv4 address).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_addr},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::{SockAddrContext, SockContext},
};
use rproxy_common::{
    Backend, CONFIG_F_POD_NETNS_LISTED, CONFIG_F_POD_SOCKETS, In6, RevNat4, RevNat6, SockRevKey4, SockRevKey6, Stat,
    proto,
};

use crate::{
    family::{Family, V4, V6},
    lb::{self, Decision, Origin},
    maps::{CONFIG, POD_NETNS, SK_RNAT4, SK_RNAT6},
    observe,
};

/// Socket programs return 1 to let the call go on.
pub const ALLOW: i32 = 1;
/// `ECONNREFUSED` (Linux).
const ECONNREFUSED: i32 = 111;
/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), wire order; the first two
/// are zero.
const V4_MAPPED_W2: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Whether `addr` is IPv4-mapped (word by word: a slice comparison would be a `memcmp` call).
#[inline(always)]
fn v4_mapped(addr: &In6) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_W2
}

/// Whose socket a hook runs for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// The node's own namespace: a host-network process.
    Host,
    /// A pod's namespace (see the module doc).
    Pod,
}

/// The scope of the socket of context `ctx` (a `bpf_sock_addr` or `bpf_sock`), of protocol
/// `protocol` (as the context gives it); `None`: the hooks leave it alone (not this agent's, or
/// a pod's socket that is not TCP).
#[inline(always)]
fn scope(ctx: *mut c_void, protocol: u32) -> Option<Scope> {
    let cfg = CONFIG.get(0)?;
    if cfg.host_netns_cookie == 0 {
        return None;
    }
    // SAFETY: the helper reads the context's socket's namespace.
    let cookie = unsafe { bpf_get_netns_cookie(ctx) };
    if cookie == cfg.host_netns_cookie {
        Some(Scope::Host)
    } else if protocol == u32::from(proto::TCP)
        && (cfg.flags & CONFIG_F_POD_SOCKETS != 0
            // SAFETY: only the presence is used.
            || (cfg.flags & CONFIG_F_POD_NETNS_LISTED != 0 && unsafe { POD_NETNS.get(cookie) }.is_some()))
    {
        Some(Scope::Pod)
    } else {
        None
    }
}

/// The service decision's origin for a `connect` or `sendmsg` of protocol `p` by the socket
/// of `ctx`; `None`: left alone.
#[inline(always)]
fn origin(ctx: &SockAddrContext, p: u8) -> Option<Origin> {
    Some(match scope(ctx.sock_addr.cast(), u32::from(p))? {
        Scope::Host => Origin::Host,
        Scope::Pod => Origin::PodSocket,
    })
}

/// `AF_INET`, `AF_INET6` (Linux).
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// `sock_release`: a socket in scope that the hooks translated (its peer is a backend) takes
/// its reverse-NAT entry with it. The peer of a connected socket is the backend its connect was
/// sent to; an unconnected one has none (see the module doc).
#[inline(always)]
pub fn release(ctx: &SockContext) -> i32 {
    let sk: *mut bpf_sock = ctx.sock;
    // SAFETY: the context's fields, read in place (the verifier takes no other form).
    let (family, protocol, port) = unsafe {
        (
            (&raw const (*sk).family).read_volatile(),
            (&raw const (*sk).protocol).read_volatile(),
            (&raw const (*sk).dst_port).read_volatile(),
        )
    };
    // Unconnected sockets and other protocols first: no helper call for them.
    if port == 0 || (protocol != u32::from(proto::TCP) && protocol != u32::from(proto::UDP)) {
        return ALLOW;
    }
    if scope(sk.cast(), protocol).is_none() {
        return ALLOW;
    }
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(sk.cast()) };
    if family == AF_INET {
        // SAFETY: as above.
        let addr = unsafe { (&raw const (*sk).dst_ip4).read_volatile() };
        let _ = SK_RNAT4.remove(SockRevKey4 { cookie, addr, port, _pad: 0 });
    } else if family == AF_INET6 {
        // SAFETY: as above, word by word (see `user_ip6`).
        let addr: In6 = core::array::from_fn(|i| unsafe { (&raw const (*sk).dst_ip6[i]).read_volatile() });
        if v4_mapped(&addr) {
            let _ = SK_RNAT4.remove(SockRevKey4 { cookie, addr: addr[3], port, _pad: 0 });
        } else {
            let _ = SK_RNAT6.remove(SockRevKey6 { cookie, addr, port, _pad: [0, 0, 0] });
        }
    }
    ALLOW
}

#[inline(always)]
fn l4_proto(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        6 => Some(proto::TCP),
        17 => Some(proto::UDP),
        _ => None,
    }
}

/// What a `connect` or `sendmsg` to `(addr, port)` becomes.
enum Choice<A> {
    /// Not a frontend, or a UDP send to one without endpoints: as it is.
    Keep,
    /// A TCP connect to a frontend without endpoints: refused, as kube-proxy's REJECT refuses.
    Refuse,
    /// To this backend.
    To(Backend<A>),
}

/// The service decision for a socket of `origin` (`Host`: affinity counts the node as one
/// client, address zero; `PodSocket`: frontends that need the client's address pass).
#[inline(always)]
fn choose<F: Family>(addr: F::Addr, port: u16, p: u8, origin: Origin) -> Choice<F::Addr> {
    match lb::decide_new::<F>(addr, port, p, F::Addr::default(), origin, crate::conntrack::now_ns()) {
        Decision::New(flow) => {
            observe::connected::<F>(Stat::NewFlow, p, flow.be.addr, flow.be.port, flow.svc.rev_nat_id, flow.backend_id);
            Choice::To(flow.be)
        }
        // A TCP connect to a frontend without any endpoint: refused. UDP goes on untranslated
        // (a connected socket learns nothing before it sends); so does TCP without a local
        // endpoint under internalTrafficPolicy Local, and the device path drops its packets,
        // as kube-proxy does.
        Decision::NoBackend { svc } if p == proto::TCP && svc.rejects() => {
            observe::connected::<F>(Stat::NoBackend, p, addr, port, svc.rev_nat_id, 0);
            Choice::Refuse
        }
        _ => Choice::Keep,
    }
}

/// `connect4` and `sendmsg4`: a service address becomes a backend's.
#[inline(always)]
pub fn translate4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the context pointer is valid for the whole run; fields are read with 4-byte loads.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(p) = l4_proto(sa) else { return ALLOW };
    let Some(origin) = origin(ctx, p) else { return ALLOW };
    let (vip, vport) = (sa.user_ip4, low16(sa.user_port));
    match choose::<V4>(vip, vport, p, origin) {
        Choice::Keep => ALLOW,
        Choice::Refuse => refuse(),
        Choice::To(be) => {
            remember4(ctx, &be, vip, vport);
            sa.user_ip4 = be.addr;
            sa.user_port = u32::from(be.port);
            ALLOW
        }
    }
}

/// The context's `user_ip6`, read word by word at constant offsets from the context pointer:
/// the verifier takes context accesses in no other form (a copy of the array becomes 8-byte
/// accesses through a moved pointer).
#[inline(always)]
fn user_ip6(sa: *const bpf_sock_addr) -> In6 {
    // SAFETY: the context's fields, read in place.
    core::array::from_fn(|i| unsafe { (&raw const (*sa).user_ip6[i]).read_volatile() })
}

/// Writes `addr` to the context's `user_ip6` (see [`user_ip6`]).
#[inline(always)]
fn set_user_ip6(sa: *mut bpf_sock_addr, addr: In6) {
    for (i, w) in addr.into_iter().enumerate() {
        // SAFETY: the context's fields, written in place.
        unsafe { (&raw mut (*sa).user_ip6[i]).write_volatile(w) };
    }
}

/// `connect6` and `sendmsg6`: an IPv6 service address, or an IPv4-mapped IPv4 one, becomes a
/// backend's.
#[inline(always)]
pub fn translate6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(p) = l4_proto(sa) else { return ALLOW };
    let Some(origin) = origin(ctx, p) else { return ALLOW };
    let (vip, vport) = (user_ip6(sa), low16(sa.user_port));
    if v4_mapped(&vip) {
        return match choose::<V4>(vip[3], vport, p, origin) {
            Choice::Keep => ALLOW,
            Choice::Refuse => refuse(),
            Choice::To(be) => {
                remember4(ctx, &be, vip[3], vport);
                // SAFETY: the context's field, written in place.
                unsafe { (&raw mut sa.user_ip6[3]).write_volatile(be.addr) };
                sa.user_port = u32::from(be.port);
                ALLOW
            }
        };
    }
    match choose::<V6>(vip, vport, p, origin) {
        Choice::Keep => ALLOW,
        Choice::Refuse => refuse(),
        Choice::To(be) => {
            // SAFETY: helper on this program's context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
            let rk = SockRevKey6 { cookie, addr: be.addr, port: be.port, _pad: [0, 0, 0] };
            let _ = SK_RNAT6.insert(rk, RevNat6 { addr: vip, port: vport, _pad: 0 }, 0);
            set_user_ip6(sa, be.addr);
            sa.user_port = u32::from(be.port);
            ALLOW
        }
    }
}

/// Remembers that this socket's `(backend)` is service `(vip, vport)`, for its replies and
/// `getpeername`. Without the entry the call still goes to the backend; only getpeername and UDP
/// reply addresses would show it. Not worth failing the call for.
#[inline(always)]
fn remember4(ctx: &SockAddrContext, be: &Backend<u32>, vip: u32, vport: u16) {
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevKey4 { cookie, addr: be.addr, port: be.port, _pad: 0 };
    let _ = SK_RNAT4.insert(rk, RevNat4 { addr: vip, port: vport, _pad: 0 }, 0);
}

/// Fails the call with `ECONNREFUSED` (a socket program's 0 means "fail"; the error is
/// `EPERM` unless the program sets another).
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: helper without pointers.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    0
}

/// `recvmsg4` and `getpeername4`: a backend address of a translated socket becomes the
/// service's.
#[inline(always)]
pub fn reverse4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if scope(ctx.sock_addr.cast(), sa.protocol).is_none() {
        return ALLOW;
    }
    if let Some(rn) = reverse_of4(ctx, sa.user_ip4, low16(sa.user_port)) {
        sa.user_ip4 = rn.addr;
        sa.user_port = u32::from(rn.port);
    }
    ALLOW
}

/// `recvmsg6` and `getpeername6`: likewise for IPv6 sockets (IPv4-mapped addresses too).
#[inline(always)]
pub fn reverse6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if scope(ctx.sock_addr.cast(), sa.protocol).is_none() {
        return ALLOW;
    }
    let (addr, port): (In6, u16) = (user_ip6(sa), low16(sa.user_port));
    if v4_mapped(&addr) {
        if let Some(rn) = reverse_of4(ctx, addr[3], port) {
            // SAFETY: the context's field, written in place.
            unsafe { (&raw mut sa.user_ip6[3]).write_volatile(rn.addr) };
            sa.user_port = u32::from(rn.port);
        }
        return ALLOW;
    }
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevKey6 { cookie, addr, port, _pad: [0, 0, 0] };
    // SAFETY: copied out at once.
    if let Some(rn) = unsafe { SK_RNAT6.get(rk) }.copied() {
        set_user_ip6(sa, rn.addr);
        sa.user_port = u32::from(rn.port);
    }
    ALLOW
}

/// The service this socket's backend `(addr, port)` stands for, if it was translated.
#[inline(always)]
fn reverse_of4(ctx: &SockAddrContext, addr: u32, port: u16) -> Option<RevNat4> {
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: copied out at once.
    unsafe { SK_RNAT4.get(SockRevKey4 { cookie, addr, port, _pad: 0 }) }.copied()
}

/// The port in `user_port`: network byte order in the low 16 bits of the field.
#[inline(always)]
fn low16(v: u32) -> u16 {
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits")]
    let p = v as u16;
    p
}
