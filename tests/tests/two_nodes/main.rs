//! The two-node lab (`rproxy_tests::Cluster`), one test binary: `cluster_lab` (the lab itself),
//! `nodeport_baselines` (kube-proxy-shaped iptables and nftables rules), `wire` (the `NodePort`
//! benchmark's wire sink) and `north_south` (the agents end to end, over both families).
mod cluster_lab;
mod nodeport_baselines;
mod north_south;
mod wire;
