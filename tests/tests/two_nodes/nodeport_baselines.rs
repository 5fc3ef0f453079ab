//! The kube-proxy-shaped baselines (`rproxy_tests::kube_proxy`) really translate: installed in
//! node 1 of the two-node lab, a client outside the cluster reaches backends on both nodes
//! through node 1's address and the node port, over TCP and UDP, data intact, with the source
//! masqueraded to node 1's address; removing them leaves nothing behind. Needs root; skipped
//! without it unless `RPROXY_REQUIRE_KERNEL=1`.
use std::{collections::BTreeSet, time::Duration};

use anyhow::{Result, ensure};
use rproxy_tests::{
    Cluster, NodeId,
    client::{self, Reply},
    kube_proxy::{Baseline, Installed, NFT_TABLE, dump},
    nodeport::{self, Backend, NODE_PORT, TARGET_PORT},
    serial_or_skip,
    server::Peers,
};

/// Requests tried until every backend has answered.
const MAX_REQUESTS: usize = 60;

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// One request from the client to node 1's address and the node port.
fn request(cluster: &Cluster, proto: Proto, payload: &[u8]) -> Result<Reply> {
    let (addr, timeout) = (NodeId::ONE.ip(), Duration::from_secs(2));
    cluster.in_client(|| match proto {
        Proto::Tcp => client::tcp_request(addr, NODE_PORT, payload, timeout),
        Proto::Udp => client::udp_request(addr, NODE_PORT, payload, timeout),
    })?
}

/// Requests (at most [`MAX_REQUESTS`]) until every backend has answered, each echoing `payload`.
fn reach_every_backend(cluster: &Cluster, backends: &[Backend], proto: Proto, payload: &[u8]) -> Result<()> {
    let mut unseen: BTreeSet<&str> = backends.iter().map(|b| b.name.as_str()).collect();
    for attempt in 1..=MAX_REQUESTS {
        let (name, echo) = request(cluster, proto, payload)
            .map_err(|e| e.context(format!("{proto:?} request {attempt} to {}:{NODE_PORT}", NodeId::ONE.ip())))?;
        ensure!(echo == payload, "{proto:?}: {name} echoed {} bytes, not the {} sent", echo.len(), payload.len());
        unseen.remove(name.as_str());
        if unseen.is_empty() {
            return Ok(());
        }
    }
    anyhow::bail!("{proto:?}: {unseen:?} never answered in {MAX_REQUESTS} requests")
}

fn peers(cluster: &Cluster, backend: &Backend, proto: Proto) -> Vec<std::net::SocketAddr> {
    let Peers { tcp, udp } = cluster.pod(&backend.name).peers_on(TARGET_PORT);
    match proto {
        Proto::Tcp => tcp,
        Proto::Udp => udp,
    }
}

fn baseline_translates(test: &str, baseline: Baseline) {
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    let run = || -> Result<()> {
        let backends = nodeport::backends(2);
        let mut cluster = nodeport::build_cluster(&backends)?;
        for b in &backends {
            cluster.pod_mut(&b.name).serve(TARGET_PORT)?;
        }
        let node1 = cluster.node(NodeId::ONE).ns().to_owned();

        // Without rules nothing listens on the node port.
        ensure!(request(&cluster, Proto::Tcp, b"x").is_err(), "the node port answered before {baseline} was installed");

        let installed = Installed::new(baseline, &node1, &nodeport::frontends(&backends)?, &[NodeId::ONE.ip()])?;
        for (proto, payload) in [(Proto::Tcp, payload(64 * 1024)), (Proto::Udp, payload(1200))] {
            reach_every_backend(&cluster, &backends, proto, &payload)?;
            for b in &backends {
                let seen = peers(&cluster, b, proto);
                ensure!(
                    !seen.is_empty() && seen.iter().all(|p| p.ip() == NodeId::ONE.ip()),
                    "{baseline} {proto:?}: {} (on {}) saw {seen:?}, expected only node 1's {} (masquerade)",
                    b.name,
                    b.node.k8s_name(),
                    NodeId::ONE.ip()
                );
            }
        }

        installed.remove()?;
        let left = dump(baseline, &node1)?;
        ensure!(!left.contains("KUBE-") && !left.contains(NFT_TABLE), "{baseline} rules left after removal:\n{left}");
        ensure!(request(&cluster, Proto::Tcp, b"x").is_err(), "the node port still answers after removing {baseline}");
        Ok(())
    };
    if let Err(e) = run() {
        panic!("{test}: {e:?}");
    }
}

#[test]
fn iptables_baseline_translates_the_node_port() {
    baseline_translates("iptables_baseline_translates_the_node_port", Baseline::Iptables);
}

#[test]
fn nftables_baseline_translates_the_node_port() {
    baseline_translates("nftables_baseline_translates_the_node_port", Baseline::Nftables);
}
