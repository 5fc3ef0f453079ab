//! The two-node lab (`rproxy_tests::Cluster`), one test binary: `cluster_lab` (the lab itself),
//! `nodeport_baselines` (kube-proxy-shaped iptables and nftables rules), `wire` (the `NodePort`
//! benchmark's wire sink), `north_south` (the agents end to end, over both families), `devices`
//! (external devices of other kinds) and `soak` (two minutes of traffic through churn, restarts
//! and upgrades).
mod cluster_lab;
mod devices;
mod nodeport_baselines;
mod north_south;
mod soak;
mod wire;
