//! Host-network processes: cgroup socket hooks translate a service address when a socket of the
//! node's own network namespace connects to it (TCP, connected UDP) or sends to it (unconnected
//! UDP), so the packets leave for the backend directly and no per-packet NAT is needed; replies
//! and `getpeername` show the service address again. A TCP connect to a service without
//! endpoints fails with `ECONNREFUSED`. Sockets of other namespaces (pods) are left alone: their
//! traffic is translated on their devices.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use rproxy_common::{RevNat4, SockRevKey4, proto};

use crate::{
    family::V4,
    lb::{self, Decision, Origin},
    maps::{CONFIG, SK_RNAT4},
};

/// Socket programs return 1 to let the call go on.
pub const ALLOW: i32 = 1;
/// `ECONNREFUSED` (Linux).
const ECONNREFUSED: i32 = 111;

#[inline(always)]
fn own_namespace(ctx: &SockAddrContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else { return false };
    // SAFETY: the helper reads the context's socket's namespace.
    cfg.host_netns_cookie != 0 && unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) } == cfg.host_netns_cookie
}

#[inline(always)]
fn l4_proto(sa: &bpf_sock_addr) -> Option<u8> {
    match sa.protocol {
        6 => Some(proto::TCP),
        17 => Some(proto::UDP),
        _ => None,
    }
}

/// `connect4` and `sendmsg4`: a service address becomes a backend's.
#[inline(always)]
pub fn translate(ctx: &SockAddrContext) -> i32 {
    if !own_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the whole run; fields are read with 4-byte loads.
    let sa = unsafe { &mut *ctx.sock_addr };
    let Some(p) = l4_proto(sa) else { return ALLOW };
    let (vip, vport) = (sa.user_ip4, low16(sa.user_port));
    // Affinity: this node's sockets count as one client (they would leave from its address).
    let be = match lb::decide_new::<V4>(vip, vport, p, 0, Origin::Host, crate::conntrack::now_ns()) {
        Decision::New { be, .. } => be,
        // No endpoints: a TCP connect fails at once, as kube-proxy's REJECT makes it fail.
        // UDP goes on untranslated (a connected socket learns nothing before it sends).
        Decision::NoBackend { svc } => return if p == proto::TCP && svc.count == 0 { refuse() } else { ALLOW },
        Decision::Pass | Decision::Drop | Decision::Established { .. } => return ALLOW,
    };
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevKey4 { cookie, addr: be.addr, port: be.port, _pad: 0 };
    // Without the entry the call still goes to the backend; only getpeername and UDP reply
    // addresses would show it. Not worth failing the call for.
    let _ = SK_RNAT4.insert(rk, RevNat4 { addr: vip, port: vport, _pad: 0 }, 0);
    sa.user_ip4 = be.addr;
    sa.user_port = u32::from(be.port);
    ALLOW
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
pub fn reverse(ctx: &SockAddrContext) -> i32 {
    if !own_namespace(ctx) {
        return ALLOW;
    }
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: helper on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let rk = SockRevKey4 { cookie, addr: sa.user_ip4, port: low16(sa.user_port), _pad: 0 };
    // SAFETY: copied out at once.
    if let Some(rn) = unsafe { SK_RNAT4.get(rk) }.copied() {
        sa.user_ip4 = rn.addr;
        sa.user_port = u32::from(rn.port);
    }
    ALLOW
}

/// The port in `user_port`: network byte order in the low 16 bits of the field.
#[inline(always)]
fn low16(v: u32) -> u16 {
    #[expect(clippy::cast_possible_truncation, reason = "the port is the low 16 bits")]
    let p = v as u16;
    p
}
