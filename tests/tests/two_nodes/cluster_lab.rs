//! The two-node lab (`rproxy_tests::cluster`) on its own: the client reaches the nodes' external
//! addresses, pods reach each other across the nodes without NAT, the client has no way to pods,
//! the offloads, queues and switch-side XDP programs are set, the load tools count right, the
//! packet generator's frames arrive intact and counted, agents start in both nodes, and dropping
//! the lab (also in a panic) removes everything. Needs root; skipped without it unless
//! `RPROXY_REQUIRE_KERNEL=1`.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::socket::{setsockopt, sockopt};
use rproxy_tests::{
    Cluster, NodeId, agent_bin,
    client::{self, DEFAULT_TIMEOUT},
    cluster::CLIENT_IP,
    cmd::{ip, run},
    in_netns,
    load::{self, LoadServer, UdpCounters},
    netns::mac_address,
    nodeport::{self, CLUSTER_IP, PORT, TARGET_PORT},
    pktgen::{self, LiveFrames, UdpFlow},
    serial_or_skip,
    server::Server,
};

/// A port served in the node namespaces themselves.
const NODE_SERVER_PORT: u16 = 9000;
/// The port of the generator test's receiving socket in pod-2.
const SINK_PORT: u16 = 8090;

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
    cluster.add_pod(NodeId::ONE, "pod-1", NodeId::ONE.pod_ip(11))?.serve(TARGET_PORT)?;
    cluster.add_pod(NodeId::TWO, "pod-2", NodeId::TWO.pod_ip(11))?.serve(TARGET_PORT)?;
    Ok(cluster)
}

#[test]
fn client_reaches_the_nodes_and_pods_reach_each_other_across_nodes() {
    serially("client_reaches_the_nodes_and_pods_reach_each_other_across_nodes", || {
        let cluster = two_pods()?;
        let big = payload(64 * 1024);

        // Client → each node's eth0 address: a server in the node namespace answers.
        let _node_servers = NodeId::ALL
            .map(|id| Server::start(cluster.node(id).ns(), &id.k8s_name(), NODE_SERVER_PORT))
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

/// `ip -d -j link show dev <dev>` in namespace `ns`.
fn link_details(ns: &str, dev: &str) -> Result<serde_json::Value> {
    let out = ip(Some(ns), &["-d", "-j", "link", "show", "dev", dev])?;
    let mut links: Vec<serde_json::Value> = serde_json::from_str(&out).with_context(|| format!("parsing {out}"))?;
    links.pop().with_context(|| format!("no link {dev} in {ns}"))
}

/// Checks that `dev` in `ns` has one queue per CPU each way and transmit queue `i` mapped to
/// CPU `i`.
fn ensure_queue_per_cpu(ns: &str, dev: &str, queues: usize) -> Result<()> {
    let link = link_details(ns, dev)?;
    for key in ["num_tx_queues", "num_rx_queues"] {
        ensure!(link[key].as_u64() == u64::try_from(queues).ok(), "{dev} in {ns}: {key} is {}", link[key]);
    }
    for queue in 0..queues {
        let path = format!("/sys/class/net/{dev}/queues/tx-{queue}/xps_cpus");
        let mask = run(std::process::Command::new("ip").args(["netns", "exec", ns, "cat", &path]))?;
        let mask = u128::from_str_radix(&mask.trim().replace(',', ""), 16)?;
        ensure!(mask == 1 << queue, "{dev} in {ns}: tx-{queue} → CPUs {mask:#x}");
    }
    Ok(())
}

#[test]
fn external_veths_have_offloads_off_a_queue_per_cpu_and_xdp_on_the_bridge_side() {
    serially("external_veths_have_offloads_off_a_queue_per_cpu_and_xdp_on_the_bridge_side", || {
        let cluster = Cluster::new()?;
        let ends = [
            (cluster.node(NodeId::ONE).ns(), cluster.switch_port(NodeId::ONE)),
            (cluster.node(NodeId::TWO).ns(), cluster.switch_port(NodeId::TWO)),
            (cluster.client_ns(), cluster.client_switch_port()),
        ];
        let (sw, queues) = (cluster.switch_ns(), cluster.external_queues());
        ensure!(queues >= 1, "no queue");
        for (ns, port) in &ends {
            ensure!(feature(ns, "eth0", "tx-checksumming")?.starts_with("tx-checksumming: off"), "{ns} eth0");
            ensure!(feature(sw, port, "tx-checksumming")?.starts_with("tx-checksumming: off"), "{port}");
            ensure!(
                feature(sw, port, "generic-receive-offload")?.starts_with("generic-receive-offload: off"),
                "{port}"
            );
            // XDP_ATTACHED_DRV (1): the driver runs the program, so veth runs NAPI on the port.
            let xdp = &link_details(sw, port)?["xdp"];
            ensure!(xdp["mode"].as_u64() == Some(1), "{port}: XDP {xdp}");
            ensure!(link_details(ns, "eth0")?["xdp"].is_null(), "{ns} eth0 has an XDP program");
            ensure_queue_per_cpu(ns, "eth0", queues)?;
            ensure_queue_per_cpu(sw, port, queues)?;
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

        // UDP: counted while reading, left queued while paused, counted once resumed.
        let sender = in_netns(src.ns(), || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))??;
        let send = |n: usize| -> Result<()> {
            for _ in 0..n {
                sender.send_to(b"count me", target[0])?;
            }
            Ok(())
        };
        let settled = |expected: u64| {
            rproxy_tests::streak_start(Instant::now(), Duration::from_secs(2), 1, || server.udp_received() == expected)
                .is_some()
        };
        send(20)?;
        ensure!(settled(20), "counted {} of 20 datagrams", server.udp_received());
        server.pause_udp(true);
        send(10)?;
        thread::sleep(Duration::from_millis(200));
        ensure!(server.udp_received() <= 21, "counted {} while paused", server.udp_received());
        server.pause_udp(false);
        ensure!(settled(30), "counted {} of 30 datagrams after resuming", server.udp_received());

        // Nothing listens on 8082: every connection fails, and is counted as failed.
        let refused = [SocketAddrV4::new(dst.ip(), 8082)];
        let tcp = load::tcp_connection_rate(src.ns(), &refused, 1, Duration::from_millis(100), DEFAULT_TIMEOUT)?;
        ensure!(tcp.ok == 0 && tcp.failed > 0 && tcp.first_error.is_some(), "to a closed port: {tcp:?}");
        Ok(())
    });
}

/// Receives datagrams on `socket` until none comes for its read timeout (at most `limit`):
/// count per source, and whether every payload was `payload`.
fn drain(socket: &UdpSocket, payload: &[u8], limit: usize) -> (BTreeMap<SocketAddr, u64>, bool) {
    let (mut from, mut intact) = (BTreeMap::new(), true);
    let mut buf = [0u8; 2048];
    for _ in 0..limit {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else { break };
        *from.entry(peer).or_default() += 1;
        intact &= buf[..n] == *payload;
    }
    (from, intact)
}

#[test]
fn the_generator_injects_client_frames_that_arrive_intact() {
    serially("the_generator_injects_client_frames_that_arrive_intact", || {
        let mut cluster = two_pods()?;
        let (dst_ns, dst_ip) = (cluster.pod("pod-2").ns().to_owned(), cluster.pod("pod-2").ip());
        // Neighbour entries on the way (node 1 → node 2), so that no frame waits for ARP.
        cluster.pod("pod-1").tcp_request(dst_ip, TARGET_PORT, b"warm-up")?;
        let socket = in_netns(&dst_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, SINK_PORT)))??;
        setsockopt(&socket, sockopt::RcvBufForce, &(16 << 20))?;
        socket.set_read_timeout(Some(Duration::from_millis(300)))?;
        let (client_mac, node_mac) =
            (mac_address(cluster.client_ns(), "eth0")?, mac_address(cluster.node(NodeId::ONE).ns(), "eth0")?);
        // From the client to pod-2, through node 1 (the client itself has no route to pods):
        // node 1 forwards each frame in place (TTL, Ethernet header) on the generator's pages.
        let sources = [SocketAddrV4::new(CLIENT_IP, 20_000), SocketAddrV4::new(CLIENT_IP, 20_001)];
        let frames = sources
            .iter()
            .map(|&src| {
                let flow =
                    UdpFlow { src_mac: client_mac, dst_mac: node_mac, src, dst: SocketAddrV4::new(dst_ip, SINK_PORT) };
                pktgen::udp_frame(&flow, 16)
            })
            .collect::<Result<Vec<_>>>()?;
        let (switch, port) = (cluster.switch_ns().to_owned(), cluster.client_switch_port());
        let before = load::udp_counters(&dst_ns)?;
        let program = cluster.pass_program().program()?;
        let generator = LiveFrames::new(program, &switch, &port, frames, 64)?;

        // Exact counts: 300 + 200 frames in calls of at most 64, every one delivered, intact.
        generator.send(0, 300)?;
        generator.send(1, 200)?;
        let (from, intact) = drain(&socket, &[0x5a; 16], 1000);
        let expected = BTreeMap::from([(SocketAddr::V4(sources[0]), 300), (SocketAddr::V4(sources[1]), 200)]);
        ensure!(from == expected, "pod-2 received {from:?}, expected {expected:?}");
        ensure!(intact, "a payload differs");
        let counted = load::udp_counters(&dst_ns)?.since(before);
        ensure!(
            counted == UdpCounters { delivered: 500, socket_drops: 0, refused: 0 },
            "pod-2's UDP statistics: {counted:?}"
        );

        // Bounded in time, one thread per CPU, whole batches.
        let injected = generator.run(Duration::from_millis(200))?;
        ensure!(injected.elapsed >= Duration::from_millis(200), "stopped early: {injected:?}");
        let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))?;
        let cpus = (0..nix::sched::CpuSet::count()).filter(|&c| cpus.is_set(c).unwrap_or(false)).count();
        ensure!(injected.threads == cpus, "{} threads for {cpus} CPUs", injected.threads);
        ensure!(injected.frames > 0 && injected.frames == injected.calls * 64, "{injected:?}");
        // Measured CPU time: some, and no more than the CPUs had (plus the threads' start-up).
        let most = injected.elapsed * u32::try_from(cpus)? + Duration::from_millis(50);
        ensure!(injected.cpu > Duration::ZERO && injected.cpu <= most, "CPU time {:?}: {injected:?}", injected.cpu);
        let (from, intact) = drain(&socket, &[0x5a; 16], usize::MAX);
        let counted = load::udp_counters(&dst_ns)?.since(before);
        let known = |peer: &SocketAddr| matches!(peer, SocketAddr::V4(a) if sources.contains(a));
        ensure!(intact && from.keys().all(known), "unexpected datagrams: {from:?}");
        ensure!(
            counted.delivered > 500 && counted.delivered <= 500 + injected.frames && counted.refused == 0,
            "pod-2 counted {counted:?} of {} injected",
            injected.frames
        );
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
        cluster.add_pod(NodeId::ONE, "client-pod", NodeId::ONE.pod_ip(100))?;
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
        let remote = backends.iter().find(|b| b.node == NodeId::TWO).context("no backend on node 2")?;
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
