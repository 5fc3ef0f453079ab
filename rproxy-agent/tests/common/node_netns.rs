//! The node side of the north-south paths in a network namespace of the caller's own: what the
//! XDP and TC programs' FIB lookups need. Shared by the packet tests
//! (`tests/datapath/north_south.rs`, through `common`) and the datapath benchmark
//! (`examples/datapath-bench.rs`, by path).
//!
//! The node's external device `dev` (a veth with peer `peer`, MAC 02:00:00:00:00:01,
//! 172.31.0.1/24), permanent neighbours for a second node (172.31.0.2, 02:00:00:00:00:02) and a
//! client (172.31.0.100, 02:00:00:00:00:64), a route to the second node's pods (10.244.2.0/24
//! via 172.31.0.2) and one to a third node whose MAC is unknown (10.244.3.0/24 via 172.31.0.3),
//! and IPv4 forwarding on; the same over IPv6 (`fd00:31::1/64` on the device, the second node
//! `fd00:31::2`, the client `fd00:31::64`, its pods `fd00:244:2::/64`, the third node's pods
//! `fd00:244:3::/64` via `fd00:31::3`), IPv6 forwarding on.
use std::process::Command;

/// Moves the calling thread into a new, anonymous network namespace (`unshare`; it disappears,
/// devices and all, when the last thread in it ends), builds the node side there and returns
/// `dev`'s index. Needs root.
pub fn enter(dev: &str, peer: &str) -> u32 {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) (root needed)");
    for args in [
        format!("link add {dev} address 02:00:00:00:00:01 type veth peer name {peer}"),
        format!("addr add 172.31.0.1/24 dev {dev}"),
        format!("link set {dev} up"),
        format!("link set {peer} up"),
        format!("neigh add 172.31.0.2 lladdr 02:00:00:00:00:02 dev {dev} nud permanent"),
        format!("neigh add 172.31.0.100 lladdr 02:00:00:00:00:64 dev {dev} nud permanent"),
        format!("route add 10.244.2.0/24 via 172.31.0.2 dev {dev}"),
        format!("route add 10.244.3.0/24 via 172.31.0.3 dev {dev}"),
        format!("-6 addr add fd00:31::1/64 dev {dev} nodad"),
        format!("-6 neigh add fd00:31::2 lladdr 02:00:00:00:00:02 dev {dev} nud permanent"),
        format!("-6 neigh add fd00:31::64 lladdr 02:00:00:00:00:64 dev {dev} nud permanent"),
        format!("-6 route add fd00:244:2::/64 via fd00:31::2 dev {dev}"),
        format!("-6 route add fd00:244:3::/64 via fd00:31::3 dev {dev}"),
    ] {
        ip(&args);
    }
    // /proc/sys/net is the opening thread's namespace.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").expect("IPv6 forwarding");
    nix::net::if_::if_nametoindex(dev).expect("ifindex of the external device")
}

/// Runs `ip ARGS` (split at spaces) in the calling thread's network namespace.
pub fn ip(args: &str) {
    let out = Command::new("ip").args(args.split(' ')).output().expect("running ip");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}
