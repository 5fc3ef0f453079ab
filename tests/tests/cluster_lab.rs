//! The two-node lab (`rproxy_tests::cluster`) on its own: the client reaches the nodes' external
//! addresses, pods reach each other across the nodes without NAT, the client has no way to pods,
//! the offloads are set, the load tools count right, agents start in both nodes, and dropping
//! the lab (also in a panic) removes everything. Needs root; skipped without it unless
//! `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    net::SocketAddrV4,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    client::{self, DEFAULT_TIMEOUT},
    cmd::{ip, run},
    load::{self, LoadServer},
    nodeport::{self, CLUSTER_IP, PORT, TARGET_PORT},
    serial_or_skip,
    server::Server,
};

/// A port served in the node namespaces themselves.
const NODE_SERVER_PORT: u16 = 9000;

/// A payload that shows reordering or corruption: bytes 0..=250 repeated.
fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Runs `body` holding the serial lock; skipped when not root. An error panics while the
/// cluster built by `body` is still alive, so that its drop prints the agents' logs.
fn serially(test: &str, body: impl FnOnce() -> Result<()>) {
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    if let Err(e) = body() {
        panic!("{test}: {e:?}");
    }
}

/// A cluster with `pod-1` (10.244.1.11) on node 1 and `pod-2` (10.244.2.11) on node 2, both
/// serving the echo protocol on [`TARGET_PORT`].
fn two_pods() -> Result<Cluster> {
    let mut cluster = Cluster::new()?;
    cluster.add_pod(NodeId::One, "pod-1", NodeId::One.pod_ip(11))?.serve(TARGET_PORT)?;
    cluster.add_pod(NodeId::Two, "pod-2", NodeId::Two.pod_ip(11))?.serve(TARGET_PORT)?;
    Ok(cluster)
}

#[test]
fn client_reaches_the_nodes_and_pods_reach_each_other_across_nodes() {
    serially("client_reaches_the_nodes_and_pods_reach_each_other_across_nodes", || {
        let cluster = two_pods()?;
        let big = payload(64 * 1024);

        // Client → each node's eth0 address: a server in the node namespace answers.
        let _node_servers = NodeId::ALL
            .map(|id| Server::start(cluster.node(id).ns(), id.k8s_name(), NODE_SERVER_PORT))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        for id in NodeId::ALL {
            let (name, echo) =
                cluster.in_client(|| client::tcp_request(id.ip(), NODE_SERVER_PORT, &big, DEFAULT_TIMEOUT))??;
            ensure!(name == id.k8s_name(), "{} answered as {name}", id.ip());
            ensure!(echo == big, "{}: the 64 KiB echo differs", id.ip());
        }

        // Pod → pod across the nodes, both ways, TCP and UDP, no NAT on the way.
        for (from, to) in [("pod-1", "pod-2"), ("pod-2", "pod-1")] {
            let (src, dst) = (cluster.pod(from), cluster.pod(to));
            let (name, echo) = src.tcp_request(dst.ip(), TARGET_PORT, &big)?;
            ensure!(name == to && echo == big, "TCP {from} → {to}: answered by {name}, echo intact: {}", echo == big);
            let small = payload(1024);
            let (name, echo) = src.udp_request(dst.ip(), TARGET_PORT, &small)?;
            ensure!(name == to && echo == small, "UDP {from} → {to}: answered by {name}");
            let peers = dst.peers();
            ensure!(
                peers.tcp.iter().chain(&peers.udp).all(|p| p.ip() == src.ip()) && peers.tcp.len() == 1,
                "{to} saw peers {peers:?}, expected only {from}'s own address {}",
                src.ip()
            );
        }

        // The client is outside the cluster: no route to pods.
        let direct = cluster.in_client(|| {
            client::tcp_request(cluster.pod("pod-2").ip(), TARGET_PORT, b"x", Duration::from_millis(500))
        })?;
        ensure!(direct.is_err(), "the client reached a pod directly: {direct:?}");
        let routes = ip(Some(cluster.client_ns()), &["route", "show"])?;
        ensure!(!routes.contains("10.244."), "the client has a pod route:\n{routes}");
        Ok(())
    });
}

/// The `ethtool -k` line for `feature` (e.g. `tx-checksumming: off`).
fn feature(ns: &str, dev: &str, feature: &str) -> Result<String> {
    let out = run(rproxy_tests::netns::command(ns, "ethtool").args(["-k", dev]))?;
    out.lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{feature}:")))
        .map(str::to_owned)
        .with_context(|| format!("no {feature} in ethtool -k {dev}:\n{out}"))
}

#[test]
fn external_veths_have_tx_checksum_offload_and_gro_off() {
    serially("external_veths_have_tx_checksum_offload_and_gro_off", || {
        let cluster = Cluster::new()?;
        let ends = [
            (cluster.node(NodeId::One).ns(), cluster.switch_port(NodeId::One)),
            (cluster.node(NodeId::Two).ns(), cluster.switch_port(NodeId::Two)),
            (cluster.client_ns(), cluster.client_switch_port()),
        ];
        for (ns, port) in &ends {
            ensure!(feature(ns, "eth0", "tx-checksumming")?.starts_with("tx-checksumming: off"), "{ns} eth0");
            let sw = cluster.switch_ns();
            ensure!(feature(sw, port, "tx-checksumming")?.starts_with("tx-checksumming: off"), "{port}");
            ensure!(
                feature(sw, port, "generic-receive-offload")?.starts_with("generic-receive-offload: off"),
                "{port}"
            );
        }
        Ok(())
    });
}

#[test]
fn load_tools_count_connections_and_datagrams() {
    serially("load_tools_count_connections_and_datagrams", || {
        let cluster = two_pods()?;
        let (src, dst) = (cluster.pod("pod-1"), cluster.pod("pod-2"));
        let server = LoadServer::start(dst.ns(), "sink", 8081)?;
        let target = [SocketAddrV4::new(dst.ip(), 8081)];

        let tcp = load::tcp_connection_rate(src.ns(), &target, 2, Duration::from_millis(300), DEFAULT_TIMEOUT)?;
        ensure!(tcp.ok > 0 && tcp.failed == 0, "TCP: {tcp:?}");
        ensure!(tcp.by_server.keys().collect::<Vec<_>>() == ["sink"], "answered by {:?}", tcp.by_server);
        ensure!(tcp.elapsed >= Duration::from_millis(300), "stopped early: {tcp:?}");
        ensure!(
            server.tcp_answered() == tcp.ok,
            "server answered {}, client counted {}",
            server.tcp_answered(),
            tcp.ok
        );

        let udp = load::udp_blast(src.ns(), &target, 1, 4, 16, Duration::from_millis(200))?;
        ensure!(udp.sent > 0 && udp.errors == 0, "UDP: {udp:?}");
        // The counter may still be draining its socket: wait (bounded) until it stops moving.
        let mut received = server.udp_received();
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(20));
            let now = server.udp_received();
            if now == received {
                break;
            }
            received = now;
        }
        ensure!(received > 0 && received <= udp.sent, "received {received} of {} sent", udp.sent);

        // Nothing listens on 8082: every connection fails, and is counted as failed.
        let refused = [SocketAddrV4::new(dst.ip(), 8082)];
        let tcp = load::tcp_connection_rate(src.ns(), &refused, 1, Duration::from_millis(100), DEFAULT_TIMEOUT)?;
        ensure!(tcp.ok == 0 && tcp.failed > 0 && tcp.first_error.is_some(), "to a closed port: {tcp:?}");
        Ok(())
    });
}

/// Whether namespace `name` exists.
fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// What a cluster leaves to check after its drop: namespaces, pin dirs, work dir, prefix.
struct Footprint {
    namespaces: Vec<String>,
    pin_dirs: Vec<PathBuf>,
    work_dir: PathBuf,
    prefix: String,
}

impl Footprint {
    fn of(cluster: &Cluster) -> Self {
        Self {
            namespaces: cluster.namespaces(),
            pin_dirs: cluster.pin_dirs(),
            work_dir: cluster.work_dir().to_owned(),
            prefix: cluster.prefix().to_owned(),
        }
    }

    fn ensure_gone(&self) -> Result<()> {
        for ns in &self.namespaces {
            ensure!(!netns_exists(ns), "namespace {ns} left behind");
        }
        let listed = run(std::process::Command::new("ip").args(["netns", "list"]))?;
        let left: Vec<&str> = listed.lines().filter(|l| l.starts_with(&format!("{}-", self.prefix))).collect();
        ensure!(left.is_empty(), "ip netns list still shows {left:?}");
        for dir in self.pin_dirs.iter().chain([&self.work_dir]) {
            ensure!(!dir.exists(), "{} left behind", dir.display());
        }
        Ok(())
    }
}

#[test]
fn dropping_the_cluster_removes_everything_even_in_a_panic() {
    serially("dropping_the_cluster_removes_everything_even_in_a_panic", || {
        for panics in [false, true] {
            let mut seen = None;
            let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<()> {
                let cluster = two_pods()?;
                let footprint = Footprint::of(&cluster);
                ensure!(footprint.namespaces.len() == 6, "namespaces {:?}", footprint.namespaces);
                for ns in &footprint.namespaces {
                    ensure!(netns_exists(ns), "{ns} was not created");
                }
                // Stand-ins for the agents' pins (the agent test below checks the real ones).
                for dir in &footprint.pin_dirs {
                    std::fs::create_dir(dir).with_context(|| format!("mkdir {}", dir.display()))?;
                }
                seen = Some(footprint);
                assert!(!panics, "a test failing with the cluster alive");
                Ok(())
            }));
            ensure!(outcome.is_err() == panics, "panicked: {}", outcome.is_err());
            if let Ok(result) = outcome {
                result?;
            }
            seen.context("the cluster was not built")?.ensure_gone().with_context(|| format!("panic: {panics}"))?;
        }
        Ok(())
    });
}

#[test]
fn agents_run_in_both_nodes_and_translate_across_them() {
    serially("agents_run_in_both_nodes_and_translate_across_them", || {
        let backends = nodeport::backends(1);
        let mut cluster = nodeport::build_cluster(&backends)?;
        for b in &backends {
            cluster.pod_mut(&b.name).serve(TARGET_PORT)?;
        }
        cluster.add_pod(NodeId::One, "client-pod", NodeId::One.pod_ip(100))?;
        let manifests = cluster.work_dir().join("manifests");
        std::fs::create_dir(&manifests)?;
        nodeport::write_manifests(&manifests, &backends)?;
        // An extra argument the agent knows today, to check that extra arguments reach it.
        cluster.start_agents(&agent_bin()?, &manifests, &["--rescan-interval", "1"])?;
        let footprint = Footprint::of(&cluster);

        // East-west through the agent on node 1: the ClusterIP reaches the backend on each node.
        let mut unseen: Vec<&str> = backends.iter().map(|b| b.name.as_str()).collect();
        let started = Instant::now();
        while !unseen.is_empty() && started.elapsed() < Duration::from_secs(10) {
            cluster.ensure_agents_running()?;
            match cluster.pod("client-pod").tcp_request_timeout(CLUSTER_IP, PORT, b"hello", Duration::from_millis(300))
            {
                Ok((name, echo)) => {
                    ensure!(echo == b"hello", "{name} echoed {echo:?}");
                    unseen.retain(|b| *b != name);
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
        ensure!(unseen.is_empty(), "{unseen:?} never answered on {CLUSTER_IP}:{PORT} within 10 s");
        // Routed to node 2 after the DNAT on node 1, with the client pod's own address.
        let remote = backends.iter().find(|b| b.node == NodeId::Two).context("no backend on node 2")?;
        let seen = cluster.pod(&remote.name).peers_on(TARGET_PORT).tcp;
        let client_ip = cluster.pod("client-pod").ip();
        ensure!(!seen.is_empty() && seen.iter().all(|p| p.ip() == client_ip), "{} saw {seen:?}", remote.name);
        for id in NodeId::ALL {
            let pins = cluster.node(id).pin_dir();
            ensure!(pins.is_dir(), "{}'s agent pinned nothing at {}", id.k8s_name(), pins.display());
        }
        drop(cluster);
        footprint.ensure_gone()
    });
}
