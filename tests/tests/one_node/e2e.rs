//! End-to-end tests on the demo lab (see `rproxy_tests::demo`): a node, `backend-a..c` serving
//! TCP and UDP on 8080, and a client. `lab_plumbing` needs only root; the others also need the
//! agent binary (`cargo xtask test` builds it; see `rproxy_tests::agent_bin`). Without root every
//! test prints why and passes, unless `RPROXY_REQUIRE_KERNEL=1` (set by `cargo xtask test` and CI),
//! where it fails.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use rproxy_tests::{
    Lab, agent_bin,
    client::Reply,
    demo::{self, BACKENDS, CLIENT, CLUSTER_IP, PORT, TARGET_PORT},
    manifest::write_atomic,
    netns::{NetNs, sysctl},
    serial_or_skip, streak_start,
};

/// How fast the agent must apply manifest changes.
const PROPAGATION: Duration = Duration::from_secs(1);
/// Timeout of one request in the loops that wait for a change.
const SHORT: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

/// Sends one request from the client pod.
fn request(lab: &Lab, proto: Proto, to: (Ipv4Addr, u16), payload: &[u8], timeout: Duration) -> Result<Reply> {
    let client = lab.pod(CLIENT.0);
    match proto {
        Proto::Tcp => client.tcp_request_timeout(to.0, to.1, payload, timeout),
        Proto::Udp => client.udp_request_timeout(to.0, to.1, payload, timeout),
    }
}

/// A payload that shows reordering or corruption: bytes 0..=250 repeated.
fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Runs `body` on a fresh demo lab, holding the serial lock ([`serial_or_skip`]); skipped when not root. An error panics
/// while the lab is still alive, so that its drop prints the agent's log.
fn with_lab(test: &str, body: impl FnOnce(&mut Lab) -> Result<()>) {
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    let mut lab = demo::build_lab().expect("building the demo lab");
    if let Err(e) = body(&mut lab) {
        panic!("{test}: {e:?}");
    }
}

/// The demo manifests, one file per object, in the lab's work dir.
struct Manifests {
    dir: PathBuf,
}

impl Manifests {
    fn service(&self) -> PathBuf {
        self.dir.join("demo-service.yaml")
    }

    fn slice(&self) -> PathBuf {
        self.dir.join("demo-slice.yaml")
    }

    fn write_slice(&self, backends: &[&str]) -> Result<()> {
        write_atomic(&self.slice(), &demo::endpoint_slice(backends).to_string())
    }
}

/// [`with_lab`] with the agent running on the demo manifests (all backends) and answering.
fn with_agent(test: &str, body: impl FnOnce(&mut Lab, &Manifests) -> Result<()>) {
    with_lab(test, |lab| {
        let bin = agent_bin()?;
        let manifests = Manifests { dir: lab.work_dir().join("manifests") };
        std::fs::create_dir(&manifests.dir)?;
        write_atomic(&manifests.service(), &demo::service().to_string())?;
        manifests.write_slice(&demo::backend_names())?;
        lab.start_agent(&bin, &manifests.dir)?;
        demo::wait_ready(lab).with_context(|| format!("agent {} not ready", bin.display()))?;
        body(lab, &manifests)
    });
}

/// Sends requests to the `ClusterIP` (at most 60) until every backend has answered; every answer
/// must echo `payload` intact, and every backend must have seen the client's own address.
fn assert_reaches_every_backend(lab: &Lab, proto: Proto, payload: &[u8]) -> Result<()> {
    let mut unseen = demo::backend_names();
    for attempt in 1..=60 {
        let (name, echo) = request(lab, proto, (CLUSTER_IP, PORT), payload, Duration::from_secs(2))
            .with_context(|| format!("{proto:?} request {attempt} to the ClusterIP"))?;
        ensure!(echo == payload, "{proto:?}: {name} echoed {} bytes, not the {} sent", echo.len(), payload.len());
        unseen.retain(|b| *b != name);
        if unseen.is_empty() {
            break;
        }
    }
    ensure!(unseen.is_empty(), "{proto:?}: {unseen:?} never answered in 60 requests");
    for (name, _) in BACKENDS {
        let peers = lab.pod(name).peers();
        let peers = match proto {
            Proto::Tcp => peers.tcp,
            Proto::Udp => peers.udp,
        };
        ensure!(
            !peers.is_empty() && peers.iter().all(|p| p.ip() == CLIENT.1),
            "{proto:?}: {name} saw peers {peers:?}, expected only the client's {} (no SNAT)",
            CLIENT.1
        );
    }
    Ok(())
}

/// Asserts that TCP requests to the `ClusterIP` fail (5 in a row) within [`PROPAGATION`] of `since`.
fn assert_translation_stops(lab: &Lab, since: Instant, what: &str) -> Result<()> {
    let fails = || request(lab, Proto::Tcp, (CLUSTER_IP, PORT), b"x", SHORT).is_err();
    let took = streak_start(since, PROPAGATION * 5, 5, fails)
        .with_context(|| format!("requests to the ClusterIP still work {:?} after {what}", PROPAGATION * 5))?;
    ensure!(took <= PROPAGATION, "requests to the ClusterIP stopped working {took:?} after {what}");
    Ok(())
}

#[test]
fn lab_plumbing() {
    with_lab("lab_plumbing", |lab| {
        let (tcp, udp) = (payload(64 * 1024), payload(512));
        for (name, ip) in BACKENDS {
            for (proto, payload) in [(Proto::Tcp, &tcp), (Proto::Udp, &udp)] {
                let (answered, echo) = request(lab, proto, (ip, TARGET_PORT), payload, Duration::from_secs(2))?;
                ensure!(answered == name, "{proto:?} to {ip}: answered by {answered}, not {name}");
                ensure!(echo == *payload, "{proto:?} to {name}: echo differs from the payload");
            }
            let peers = lab.pod(name).peers();
            ensure!(
                peers.tcp.iter().chain(&peers.udp).all(|p| p.ip() == CLIENT.1)
                    && peers.tcp.len() == 1
                    && peers.udp.len() == 1,
                "{name} saw peers {peers:?}"
            );
        }
        Ok(())
    });
}

#[test]
fn stale_namespace_of_the_same_name_is_replaced() {
    let Some(_serial) = serial_or_skip("stale_namespace_of_the_same_name_is_replaced") else {
        return;
    };
    let lab = Lab::new(demo::NODE_NAME).expect("lab");
    let name = format!("{}-stale", lab.prefix());
    std::mem::forget(NetNs::create(&name).expect("first namespace")); // as a killed run leaves it
    drop(NetNs::create(&name).expect("namespace over a stale one"));
    assert!(!Path::new("/run/netns").join(&name).exists(), "{name} left behind");
}

/// A `--snat-port-range` that the node's own connections could take (inside
/// `net.ipv4.ip_local_port_range`, not reserved) is refused at start, before anything is loaded,
/// naming both sysctls; once the administrator reserves it the same agent starts and serves.
#[test]
fn snat_port_range_among_ephemeral_ports_is_refused_unless_reserved() {
    with_lab("snat_port_range_among_ephemeral_ports_is_refused_unless_reserved", |lab| {
        let bin = agent_bin()?;
        let manifests = lab.work_dir().join("manifests");
        std::fs::create_dir(&manifests)?;
        write_atomic(&manifests.join("demo-service.yaml"), &demo::service().to_string())?;
        write_atomic(&manifests.join("demo-slice.yaml"), &demo::endpoint_slice(&demo::backend_names()).to_string())?;
        let ns = lab.node_ns().to_owned();
        sysctl(&ns, "net/ipv4/ip_local_port_range", "1024 65535")?;
        // The check applies with external devices only (the north-south path is what SNATs); a
        // missing one is only logged.
        let args = ["--devices", "rpxnodev0"];
        lab.start_agent_with(&bin, &manifests, &args)?;
        let status = agent_exit(lab).context("the agent did not refuse the range")?;
        let log = lab.agent_log();
        ensure!(!status.success(), "the agent exited successfully: {log}");
        ensure!(
            log.contains("--snat-port-range 1024-29999")
                && log.contains("net.ipv4.ip_local_port_range 1024 65535")
                && log.contains("ip_local_reserved_ports"),
            "the refusal does not name the range and the sysctls: {log}"
        );
        ensure!(!lab.pin_dir().join("RPX_SVC4").exists(), "maps were pinned before the refusal");

        sysctl(&ns, "net/ipv4/ip_local_reserved_ports", "1024-29999")?;
        lab.start_agent_with(&bin, &manifests, &args)?;
        demo::wait_ready(lab).context("with the range reserved")?;
        assert_reaches_every_backend(lab, Proto::Tcp, b"reserved")
    });
}

/// The agent's exit status, once it has exited (within 10 s).
fn agent_exit(lab: &mut Lab) -> Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = lab.agent_exited()? {
            return Ok(status);
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "the agent still runs after 10 s");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tcp_to_cluster_ip_reaches_every_backend() {
    with_agent("tcp_to_cluster_ip_reaches_every_backend", |lab, _| {
        assert_reaches_every_backend(lab, Proto::Tcp, &payload(64 * 1024))
    });
}

#[test]
fn udp_to_cluster_ip_reaches_every_backend() {
    with_agent("udp_to_cluster_ip_reaches_every_backend", |lab, _| {
        assert_reaches_every_backend(lab, Proto::Udp, &payload(512))
    });
}

#[test]
fn endpoint_slice_edit_moves_traffic_within_a_second() {
    with_agent("endpoint_slice_edit_moves_traffic_within_a_second", |lab, manifests| {
        manifests.write_slice(&["backend-c"])?;
        let since = Instant::now();
        let on_c = || matches!(request(lab, Proto::Tcp, (CLUSTER_IP, PORT), b"x", SHORT), Ok((name, _)) if name == "backend-c");
        let took = streak_start(since, PROPAGATION * 5, 10, on_c)
            .with_context(|| format!("traffic not only on backend-c {:?} after the edit", PROPAGATION * 5))?;
        ensure!(took <= PROPAGATION, "traffic moved to backend-c only {took:?} after the edit");
        eprintln!("traffic moved {took:?} after the edit");
        Ok(())
    });
}

#[test]
fn deleting_the_service_stops_translation() {
    with_agent("deleting_the_service_stops_translation", |lab, manifests| {
        std::fs::remove_file(manifests.service())?;
        assert_translation_stops(lab, Instant::now(), "deleting the Service file")
    });
}

#[test]
fn datapath_survives_sigterm_until_cleanup() {
    with_agent("datapath_survives_sigterm_until_cleanup", |lab, _| {
        let status = lab.stop_agent()?;
        eprintln!("agent exited after SIGTERM: {status}");
        assert_reaches_every_backend(lab, Proto::Tcp, b"after sigterm")
            .context("the datapath must keep working after the agent's SIGTERM")?;
        lab.cleanup_agent()?;
        assert_translation_stops(lab, Instant::now(), "rproxy-agent cleanup")?;
        ensure!(!lab.pin_dir().exists(), "{} still exists after cleanup", lab.pin_dir().display());
        Ok(())
    });
}

/// Starts the agent again on `manifests` and waits for its own word that it runs: the pinned
/// datapath answers with no agent at all, so requests cannot tell.
fn start_and_wait_running(lab: &mut Lab, manifests: &Path) -> Result<()> {
    start_with_and_wait_running(lab, manifests, &[])
}

/// [`start_and_wait_running`] with `args` added to the agent's.
fn start_with_and_wait_running(lab: &mut Lab, manifests: &Path, args: &[&str]) -> Result<()> {
    lab.start_agent_with(&agent_bin()?, manifests, args)?;
    let started = Instant::now();
    while !lab.agent_log().contains("agent running") {
        lab.ensure_agent_running()?;
        ensure!(started.elapsed() < Duration::from_secs(10), "restarted agent not running after 10s");
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Writes `msg` on `conn` and reads the echo back.
fn echo_over(conn: &mut std::net::TcpStream, msg: &[u8]) -> Result<()> {
    use std::io::{Read as _, Write as _};
    conn.write_all(msg)?;
    let mut got = vec![0u8; msg.len()];
    conn.read_exact(&mut got)?;
    ensure!(got == msg, "echo {got:?} != {msg:?}");
    Ok(())
}

#[test]
fn agent_restart_keeps_established_connections() {
    with_agent("agent_restart_keeps_established_connections", |lab, manifests| {
        use std::io::{BufRead as _, BufReader};
        let client_ns = lab.pod(CLIENT.0).ns().to_owned();
        let mut conn = rproxy_tests::netns::in_netns(&client_ns, || {
            std::net::TcpStream::connect_timeout(&(CLUSTER_IP, PORT).into(), Duration::from_secs(2))
        })??;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut greeting = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut greeting)?;
        let name = greeting.split(' ').next().unwrap_or_default();
        ensure!(demo::backend_names().contains(&name), "greeting {greeting:?}");
        echo_over(&mut conn, b"before the restart")?;

        lab.stop_agent()?;
        echo_over(&mut conn, b"while no agent runs")?;
        start_and_wait_running(lab, &manifests.dir)?;
        echo_over(&mut conn, b"after the restart")
            .context("the connection opened before the restart must survive it")?;
        // The restarted agent adopted the pinned state: nothing to rewrite.
        let log = lab.agent_log();
        ensure!(log.contains("frontends=2 backends=6"), "restart did not adopt the pinned maps:\n{log}");
        ensure!(log.contains("map_ops=0"), "restart rewrote maps:\n{log}");
        Ok(())
    });
}

#[test]
fn pod_created_after_start_is_attached() {
    with_agent("pod_created_after_start_is_attached", |lab, _| {
        // A second client, plugged in while the agent runs: its device must get the programs
        // (netlink notification) without a restart.
        let late = Ipv4Addr::new(10, 244, 1, 101);
        let created = Instant::now();
        lab.add_pod("late-client", late)?;
        let pod = lab.pod("late-client");
        let reached = streak_start(created, PROPAGATION * 5, 1, || {
            pod.tcp_request_timeout(CLUSTER_IP, PORT, b"late", SHORT).is_ok()
        })
        .context("a pod created after the agent started never reached the ClusterIP")?;
        ensure!(reached <= PROPAGATION, "the late pod's device took {reached:?} to be attached");
        let (name, echo) = pod.tcp_request(CLUSTER_IP, PORT, b"late")?;
        ensure!(echo == b"late", "{name} echoed {echo:?}");
        Ok(())
    });
}

/// Whether the agent's IPv4 conntrack holds a flow from `src` (`rproxy-agent dump --conntrack`).
fn in_conntrack(lab: &Lab, src: std::net::SocketAddr) -> Result<bool> {
    let out = std::process::Command::new(agent_bin()?)
        .args(["dump", "--conntrack", "-o", "json", "--bpffs"])
        .arg(lab.pin_dir())
        .output()?;
    ensure!(out.status.success(), "dump: {}", String::from_utf8_lossy(&out.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let flows = dump["ipv4"]["conntrack"].as_array().context("ipv4.conntrack")?;
    Ok(flows.iter().any(|f| f["src"] == src.to_string().as_str()))
}

/// A pod's TCP connection to a Service goes to a backend at `connect()` (`--pod-sockets`, the
/// lab's pods' namespaces): the socket still reports the Service as its peer, its packets leave
/// no conntrack entry, and a pod made while the agent runs is listed the same way. With
/// `--pod-sockets none` the same connection is translated on the pod's device, through conntrack.
#[test]
fn pods_tcp_goes_to_a_backend_at_connect_and_still_sees_the_service() {
    with_agent("pods_tcp_goes_to_a_backend_at_connect_and_still_sees_the_service", |lab, manifests| {
        let service = std::net::SocketAddr::from((CLUSTER_IP, PORT));
        let open = |lab: &Lab, pod: &str| lab.pod(pod).tcp_session(CLUSTER_IP, PORT, Duration::from_secs(2));
        let mut session = open(lab, CLIENT.0)?;
        session.echo(b"at connect")?;
        ensure!(session.peer_addr()? == service, "getpeername: {}, not {service}", session.peer_addr()?);
        let local = session.local_addr()?;
        ensure!(session.seen_as() == Some(local), "the backend saw {:?}, not {local}", session.seen_as());
        ensure!(!in_conntrack(lab, local)?, "{local}'s connection went through conntrack");
        drop(session);

        let late = Ipv4Addr::new(10, 244, 1, 101);
        let created = Instant::now();
        lab.add_pod("late-client", late)?;
        let listed = streak_start(created, PROPAGATION * 5, 1, || {
            open(lab, "late-client").is_ok_and(|s| s.local_addr().is_ok_and(|l| in_conntrack(lab, l).is_ok_and(|c| !c)))
        })
        .context("a pod created after the agent started never had its TCP sent to a backend at connect()")?;
        ensure!(listed <= PROPAGATION, "the late pod's namespace took {listed:?} to be listed");

        // The restarted agent's setting holds once it has synced (until then the pinned
        // programs go on with the last one).
        lab.stop_agent()?;
        let restarted = Instant::now();
        lab.start_agent_with(&agent_bin()?, &manifests.dir, &["--pod-sockets", "none"])?;
        demo::wait_ready(lab)?;
        let mut through_conntrack = None;
        streak_start(restarted, PROPAGATION * 5, 1, || {
            through_conntrack = open(lab, CLIENT.0)
                .ok()
                .filter(|s| s.local_addr().is_ok_and(|l| in_conntrack(lab, l).unwrap_or(false)));
            through_conntrack.is_some()
        })
        .context("with --pod-sockets none, the client's TCP connections do not go through conntrack")?;
        let mut session = through_conntrack.context("a session")?;
        session.echo(b"on the device")?;
        ensure!(session.peer_addr()? == service, "getpeername: {}, not {service}", session.peer_addr()?);
        Ok(())
    });
}

#[test]
fn agents_side_by_side_do_not_touch_each_other() {
    with_agent("agents_side_by_side_do_not_touch_each_other", |first, _| {
        // A second node with its own agent and pin dir, same addresses in its own namespaces.
        let mut second = demo::build_lab()?;
        let dir = second.work_dir().join("manifests");
        std::fs::create_dir(&dir)?;
        write_atomic(&dir.join("demo.yaml"), &demo::manifest())?;
        second.start_agent(&agent_bin()?, &dir)?;
        demo::wait_ready(&mut second)?;
        ensure!(first.pin_dir() != second.pin_dir());
        assert_reaches_every_backend(first, Proto::Udp, b"first")?;
        assert_reaches_every_backend(&second, Proto::Udp, b"second")?;
        // Removing the second agent's datapath leaves the first one's alone.
        second.stop_agent()?;
        second.cleanup_agent()?;
        assert_translation_stops(&second, Instant::now(), "the second agent's cleanup")?;
        assert_reaches_every_backend(first, Proto::Tcp, b"first, still")
    });
}

/// Started with `ip netns exec` (which remounts /sys, hiding the host's bpffs), the agent refuses
/// with the message that says so and names `nsenter`, instead of failing to create its pin
/// directories there.
#[test]
fn agent_under_ip_netns_exec_says_to_use_nsenter() {
    with_lab("agent_under_ip_netns_exec_says_to_use_nsenter", |lab| {
        let bin = agent_bin()?;
        let manifests = lab.work_dir().join("manifests");
        std::fs::create_dir(&manifests)?;
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", lab.node_ns()])
            .arg(&bin)
            .args(["run", "--node-name", demo::NODE_NAME, "--pod-devices", "none*", "--cgroup", "none"])
            .arg("--manifests")
            .arg(&manifests)
            .arg("--bpffs")
            .arg(lab.pin_dir())
            .env("NO_COLOR", "1")
            .output()?;
        let log = String::from_utf8_lossy(&out.stderr);
        ensure!(!out.status.success(), "the agent started under ip netns exec:\n{log}");
        ensure!(
            log.contains("is not on a bpffs mount") && log.contains("nsenter"),
            "the refusal does not say why nor what to do:\n{log}"
        );
        Ok(())
    });
}

/// A Service deleted while no agent runs (the window of a `DaemonSet` rolling update) is removed by the
/// next agent's first sync, and stays removed at every later restart; the Service that still
/// exists keeps working throughout.
#[test]
fn service_deleted_while_the_agent_is_down_is_removed_at_start() {
    with_agent("service_deleted_while_the_agent_is_down_is_removed_at_start", |lab, manifests| {
        let second_ip = Ipv4Addr::new(10, 96, 0, 20);
        let second =
            rproxy_tests::manifest::Service { name: "second".into(), cluster_ip: second_ip, ..demo::service() };
        let second_slice = rproxy_tests::manifest::EndpointSlice {
            name: "second-1".into(),
            service_name: "second".into(),
            ..demo::endpoint_slice(&["backend-a"])
        };
        let second_file = manifests.dir.join("second.yaml");
        write_atomic(&second_file, &rproxy_tests::manifest::multi_document(&[&second, &second_slice]))?;
        let client = lab.pod(CLIENT.0);
        let reached = streak_start(Instant::now(), PROPAGATION * 5, 1, || {
            client.tcp_request_timeout(second_ip, PORT, b"x", SHORT).is_ok()
        });
        ensure!(reached.is_some(), "the second Service never answered");

        lab.stop_agent()?;
        std::fs::remove_file(&second_file)?;
        for restart in 1..=2 {
            lab.start_agent(&agent_bin()?, &manifests.dir)?;
            let started = Instant::now();
            while !lab.agent_log().contains(" synced") {
                lab.ensure_agent_running()?;
                ensure!(started.elapsed() < Duration::from_secs(10), "restart {restart}: no sync within 10 s");
                thread::sleep(Duration::from_millis(20));
            }
            let log = lab.agent_log();
            let synced = log.lines().find(|l| l.contains(" synced")).unwrap_or_default();
            ensure!(
                synced.contains("frontends=2 ") && (restart > 1 || log.contains("service removed")),
                "restart {restart}: the deleted Service's frontend was not removed at the first sync:\n{log}"
            );
            let client = lab.pod(CLIENT.0);
            for _ in 0..3 {
                ensure!(
                    client.tcp_request_timeout(second_ip, PORT, b"x", SHORT).is_err(),
                    "restart {restart}: the deleted Service's ClusterIP still reaches a backend"
                );
            }
            assert_reaches_every_backend(lab, Proto::Tcp, b"still here")?;
            lab.stop_agent()?;
        }
        Ok(())
    });
}

/// The dual-stack test's lab: two backends and a client, each with an address of both families.
mod dual {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use anyhow::{Context as _, Result, ensure};
    use rproxy_tests::{
        Lab, agent_bin, client, demo,
        manifest::{DualStackService, Endpoint, EndpointSlice, write_atomic},
    };

    use super::{PORT, Proto, TARGET_PORT};

    const fn v6(last: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, last)
    }

    pub const BACKENDS: [(&str, Ipv4Addr, Ipv6Addr); 2] =
        [("dual-a", Ipv4Addr::new(10, 244, 1, 21), v6(0x21)), ("dual-b", Ipv4Addr::new(10, 244, 1, 22), v6(0x22))];
    pub const CLIENT: (&str, Ipv4Addr, Ipv6Addr) = ("dual-client", Ipv4Addr::new(10, 244, 1, 120), v6(0x120));
    pub const VIPS: [IpAddr; 2] =
        [IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20))];

    /// The pods, and the manifests (the Service and a slice per family) in the returned directory.
    pub fn lab() -> Result<(Lab, std::path::PathBuf)> {
        let mut lab = Lab::new(demo::NODE_NAME)?;
        for (name, ip, ip6) in BACKENDS {
            lab.add_pod_dual(name, ip, ip6)?.serve(TARGET_PORT)?;
        }
        lab.add_pod_dual(CLIENT.0, CLIENT.1, CLIENT.2)?;
        let service = DualStackService {
            namespace: "default".into(),
            name: "dual".into(),
            cluster_ips: VIPS.to_vec(),
            ports: demo::service_ports(),
        };
        let slice = |family: &str, addresses: Vec<IpAddr>| EndpointSlice {
            namespace: "default".into(),
            name: format!("dual-{family}"),
            service_name: "dual".into(),
            endpoints: addresses.into_iter().map(|a| Endpoint::ready(a, demo::NODE_NAME)).collect(),
            ports: demo::endpoint_ports(),
        };
        let dir = lab.work_dir().join("manifests");
        std::fs::create_dir(&dir)?;
        write_atomic(&dir.join("dual-service.yaml"), &service.to_string())?;
        let v4 = slice("v4", BACKENDS.iter().map(|b| b.1.into()).collect());
        write_atomic(&dir.join("dual-v4.yaml"), &v4.to_string())?;
        let v6 = slice("v6", BACKENDS.iter().map(|b| b.2.into()).collect());
        write_atomic(&dir.join("dual-v6.yaml"), &v6.to_string())?;
        lab.start_agent(&agent_bin()?, &dir)?;
        Ok((lab, dir))
    }

    /// Requests from the client to `vip` (at most 60) until both backends have answered, each
    /// echoing the payload.
    pub fn reaches_both_backends(lab: &Lab, vip: IpAddr, proto: Proto) -> Result<()> {
        let mut unseen: Vec<&str> = BACKENDS.iter().map(|b| b.0).collect();
        for attempt in 1..=60 {
            let pod = lab.pod(CLIENT.0);
            let (name, echo) = match proto {
                Proto::Tcp => pod.tcp_request(vip, PORT, b"dual"),
                Proto::Udp => pod.udp_request(vip, PORT, b"dual"),
            }
            .with_context(|| format!("{proto:?} request {attempt} to {vip}"))?;
            ensure!(echo == b"dual", "{proto:?} to {vip}: {name} echoed {echo:?}");
            unseen.retain(|b| *b != name);
            if unseen.is_empty() {
                return Ok(());
            }
        }
        anyhow::bail!("{proto:?} to {vip}: {unseen:?} never answered in 60 requests")
    }

    /// Requests from namespace `ns` (the client pod's) to `vip`, TCP and UDP in turn, 2 ms
    /// apart, until `stop` is set (at most 60 s and 20,000 requests): how many were made, and
    /// the failures.
    pub fn continuous(ns: &str, vip: IpAddr, stop: &AtomicBool) -> Result<(usize, Vec<String>)> {
        rproxy_tests::netns::in_netns(ns, || {
            let (started, mut made, mut failures) = (Instant::now(), 0, Vec::new());
            while !stop.load(Ordering::Relaxed) && made < 20_000 && started.elapsed() < Duration::from_mins(1) {
                let timeout = Duration::from_secs(1);
                let (proto, reply) = if made % 2 == 0 {
                    ("TCP", client::tcp_request(vip, PORT, b"continuous", timeout))
                } else {
                    ("UDP", client::udp_request(vip, PORT, b"continuous", timeout))
                };
                made += 1;
                match reply {
                    Ok((_, echo)) if echo == b"continuous" => {}
                    Ok((name, echo)) => failures.push(format!("{proto} {made}: {name} echoed {echo:?}")),
                    Err(e) => failures.push(format!("{proto} {made}: {e:#}")),
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (made, failures)
        })
    }

    /// Every backend saw the client's addresses of both families, and nothing else (no SNAT).
    pub fn backends_saw_the_client(lab: &Lab) -> Result<()> {
        for (name, ..) in BACKENDS {
            let peers = lab.pod(name).peers();
            let all: Vec<_> = peers.tcp.iter().chain(&peers.udp).map(std::net::SocketAddr::ip).collect();
            ensure!(
                all.contains(&CLIENT.1.into()) && all.contains(&CLIENT.2.into()),
                "{name} saw {all:?}, expected the client's addresses of both families"
            );
            ensure!(all.iter().all(|ip| *ip == CLIENT.1 || *ip == CLIENT.2), "{name} saw {all:?}: not only the client");
        }
        Ok(())
    }
}

/// Dual-stack: a Service with an IPv4 and an IPv6 cluster IP and an `EndpointSlice` of each
/// family serves pods over both families at once, TCP and UDP. Each family's cluster IP reaches
/// every backend through that family's addresses, with the client's own address of that family
/// (no SNAT), and replies come back from the cluster IP (UDP checks the source address). An agent
/// restart under continuous IPv6 requests (new TCP connections and UDP) fails none of them, an
/// open IPv6 connection survives it, and the new agent adopts both families' maps and rewrites
/// nothing.
#[test]
fn a_dual_stack_service_answers_over_both_families() {
    let test = "a_dual_stack_service_answers_over_both_families";
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    let run = || -> Result<()> {
        let (mut lab, dir) = dual::lab()?;
        let started = Instant::now();
        while lab.pod(dual::CLIENT.0).tcp_request_timeout(dual::VIPS[1], PORT, b"", SHORT).is_err() {
            lab.ensure_agent_running()?;
            ensure!(started.elapsed() < Duration::from_secs(10), "the IPv6 cluster IP never answered");
        }
        for vip in dual::VIPS {
            for proto in [Proto::Tcp, Proto::Udp] {
                dual::reaches_both_backends(&lab, vip, proto)?;
            }
        }
        let mut conn = lab.pod(dual::CLIENT.0).tcp_session(dual::VIPS[1], PORT, Duration::from_secs(2))?;
        conn.echo(b"before the restart")?;
        // The restart happens under continuous IPv6 requests, new connections and UDP: none
        // fails.
        let stop = AtomicBool::new(false);
        let client_ns = lab.pod(dual::CLIENT.0).ns().to_owned();
        let (made, failures) = thread::scope(|s| -> Result<_> {
            let load = s.spawn(|| dual::continuous(&client_ns, dual::VIPS[1], &stop));
            let mut restart = || -> Result<()> {
                thread::sleep(Duration::from_millis(300));
                lab.stop_agent()?;
                conn.echo(b"while no agent runs")?;
                thread::sleep(Duration::from_millis(300));
                start_and_wait_running(&mut lab, &dir)?;
                thread::sleep(Duration::from_millis(500));
                Ok(())
            };
            let restarted = restart();
            stop.store(true, Ordering::Relaxed);
            let load = load.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            restarted?;
            load
        })?;
        eprintln!("{made} IPv6 requests across the restart, {} failed", failures.len());
        ensure!((10..20_000).contains(&made), "{made} IPv6 requests: the load did not span the restart");
        ensure!(failures.is_empty(), "IPv6 requests failed across the restart: {failures:#?}");
        conn.echo(b"after the restart").context("the IPv6 connection opened before the restart must survive it")?;
        // Both families adopted (2 ports × 2 families; TCP and UDP backends of 2 pods × 2
        // families), nothing rewritten.
        let log = lab.agent_log();
        ensure!(log.contains("adopted bpffs") && log.contains("frontends=4 backends=8"), "not adopted:\n{log}");
        ensure!(log.contains("map_ops=0"), "the restart rewrote maps:\n{log}");
        dual::backends_saw_the_client(&lab)
    };
    if let Err(e) = run() {
        panic!("{test}: {e:?}");
    }
}

/// The conntrack GC walks its tables on a thread of its own: with 500,000 live entries in
/// `RPX_CT4` and a pass every second, `/healthz` and `/metrics` (served by the agent's loop's
/// runtime) keep answering at once, the passes see every entry (`rproxy_conntrack_entries`), and
/// the table past 90 % full is warned about once.
/// Probes every 20 ms for 4 s and until two passes have finished after the writes; the report
/// gives the latencies. (Run on the loop, as before, a
/// pass over 500,000 entries held both ports for about a second.)
#[test]
fn health_and_metrics_answer_while_the_gc_walks_half_a_million_entries() {
    use rproxy_common::{CT_DIR_SERVICE, CtKey4, CtValue4, map_names};
    const ENTRIES: u32 = 500_000;
    with_lab("health_and_metrics_answer_while_the_gc_walks_half_a_million_entries", |lab| {
        let bin = agent_bin()?;
        let manifests = Manifests { dir: lab.work_dir().join("manifests") };
        std::fs::create_dir(&manifests.dir)?;
        write_atomic(&manifests.service(), &demo::service().to_string())?;
        manifests.write_slice(&demo::backend_names())?;
        lab.start_agent_with(&bin, &manifests.dir, &["--ct-gc-interval", "1"])?;
        demo::wait_ready(lab)?;
        // A backend id the agent programmed, so that the entries are live flows to keep.
        let backends: aya::maps::Array<_, rproxy_common::Backend4> = aya::maps::Array::try_from(
            aya::maps::Map::Array(aya::maps::MapData::from_pin(lab.pin_dir().join(map_names::BACKENDS4))?),
        )?;
        let backend_id = (1..backends.len())
            .find(|i| backends.get(i, 0).is_ok_and(|b| b != rproxy_common::Backend4::default()))
            .context("no backend programmed")?;
        let mut ct: aya::maps::HashMap<_, CtKey4, CtValue4> = aya::maps::HashMap::try_from(
            aya::maps::Map::LruHashMap(aya::maps::MapData::from_pin(lab.pin_dir().join(map_names::CT4))?),
        )?;
        let far = rproxy_agent::bpf::gc::monotonic_ns() + 3_600_000_000_000;
        for i in 0..ENTRIES {
            let key = CtKey4 {
                saddr: u32::from(Ipv4Addr::new(10, 250, 0, 0)).wrapping_add(i >> 10).to_be(),
                daddr: u32::from(CLUSTER_IP).to_be(),
                sport: u16::try_from(1024 + (i & 1023)).expect("16 bits").to_be(),
                dport: PORT.to_be(),
                proto: rproxy_common::proto::TCP,
                dir: CT_DIR_SERVICE,
                _pad: [0; 2],
            };
            let value = CtValue4 { expires_ns: far, backend_id, state: 1, ..CtValue4::default() };
            ct.insert(key, value, 0)?;
        }
        let node_ns = lab.node_ns().to_owned();
        let probe = |port: u16, path: &str| -> Result<Duration> {
            let started = Instant::now();
            let (status, _) = rproxy_tests::netns::in_netns(&node_ns, || http_get(port, path))??;
            ensure!(status == 200, "{path}: {status}");
            Ok(started.elapsed())
        };
        // GC passes finished so far: the entries metric is the last finished pass's count, and
        // one that started while the entries were being written saw part of them. The probes go
        // on for 4 s and until two more passes have finished (the second started after the
        // writes), at most 30 s.
        let passes = || -> Result<f64> {
            let (_, metrics) = rproxy_tests::netns::in_netns(&node_ns, || http_get(10249, "/metrics"))??;
            Ok(rproxy_tests::client::metric_sample(&metrics, "rproxy_conntrack_gc_duration_seconds_count")
                .unwrap_or(0.0))
        };
        let written = passes()?;
        let started = Instant::now();
        let mut latencies = Vec::new();
        while started.elapsed() < Duration::from_secs(4)
            || (started.elapsed() < Duration::from_secs(30) && passes()? < written + 2.0)
        {
            latencies.push(probe(10256, "/healthz")?);
            latencies.push(probe(10249, "/metrics")?);
            thread::sleep(Duration::from_millis(20));
        }
        let (_, metrics) = rproxy_tests::netns::in_netns(&node_ns, || http_get(10249, "/metrics"))??;
        let sample = |name: &str| rproxy_tests::client::metric_sample(&metrics, name);
        let entries = sample("rproxy_conntrack_entries{family=\"ipv4\"}").unwrap_or(0.0);
        latencies.sort();
        let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100];
        eprintln!(
            "{} probes during GC passes over {entries} entries: p50 {:?}, p95 {:?}, max {:?}",
            latencies.len(),
            pct(50),
            pct(95),
            pct(100)
        );
        ensure!(entries >= f64::from(ENTRIES), "the passes saw {entries} entries, not the {ENTRIES} written");
        // 500,000 of 524,288 entries: past 90 %, said once.
        let log = lab.agent_log();
        ensure!(
            log.matches("conntrack table nearly full").count() == 1 && log.contains("--ct-max"),
            "no single nearly-full warning naming --ct-max:\n{log}"
        );
        // The manifests source's objects count as changes too, as kube-proxy counts its
        // informers' events.
        for counter in
            ["kubeproxy_sync_proxy_rules_service_changes_total", "kubeproxy_sync_proxy_rules_endpoint_changes_total"]
        {
            let n = sample(counter);
            ensure!(n >= Some(1.0), "{counter} {n:?}");
        }
        ensure!(pct(95) < Duration::from_millis(100), "p95 {:?}: the ports waited for the GC", pct(95));
        ensure!(pct(100) < Duration::from_millis(500), "max {:?}: the ports waited for the GC", pct(100));
        Ok(())
    });
}

/// `GET path` on 127.0.0.1:`port` in the calling thread's namespace: (status code, body).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    rproxy_tests::client::http_get(Ipv4Addr::LOCALHOST, port, path, Duration::from_secs(2))
}

/// `rproxy-agent dump -o json` gives the pinned state as one JSON object: the demo Service's
/// frontend with its three backends, the backends and rev-NAT entries, the conntrack entries of
/// the flows just made (listed with `--conntrack`), and the counters; the text form still holds
/// the same.
#[test]
fn dump_as_json_holds_the_pinned_state() {
    with_agent("dump_as_json_holds_the_pinned_state", |lab, _| {
        // UDP: its flows are in conntrack (pods' TCP is sent to a backend at connect()).
        assert_reaches_every_backend(lab, Proto::Udp, b"json")?;
        let out = std::process::Command::new(agent_bin()?)
            .args(["dump", "--conntrack", "-o", "json", "--bpffs"])
            .arg(lab.pin_dir())
            .output()?;
        ensure!(out.status.success(), "dump -o json: {}", String::from_utf8_lossy(&out.stderr));
        let dump: serde_json::Value = serde_json::from_slice(&out.stdout).context("dump -o json is JSON")?;
        let v4 = &dump["ipv4"];
        let frontend = format!("{CLUSTER_IP}:{PORT}");
        let service = v4["services"]
            .as_array()
            .context("ipv4.services")?
            .iter()
            .find(|s| s["frontend"] == frontend.as_str() && s["protocol"] == "TCP")
            .with_context(|| format!("no {frontend}/TCP in {v4}"))?;
        ensure!(service["backends"].as_array().map(Vec::len) == Some(BACKENDS.len()), "{service}");
        ensure!(service["scope"] == "external", "{service}");
        let backends = v4["backends"].as_array().context("ipv4.backends")?;
        for (name, ip) in BACKENDS {
            let addr = format!("{ip}:{TARGET_PORT}");
            ensure!(backends.iter().any(|b| b["address"] == addr.as_str()), "backend {name} {addr} missing: {v4}");
        }
        let entries = v4["conntrack_entries"].as_u64().context("conntrack_entries")?;
        let listed = v4["conntrack"].as_array().context("conntrack listed with --conntrack")?;
        ensure!(entries >= 2 && listed.len() as u64 == entries, "{entries} entries, {} listed", listed.len());
        ensure!(listed.iter().any(|c| c["dst"] == frontend.as_str() && c["dir"] == "svc"), "no flow to {frontend}");
        ensure!(dump["counters"]["new_flow"].as_u64() >= Some(3), "counters: {}", dump["counters"]);
        ensure!(dump["config"]["snat_ports"].is_string() && dump["ipv6"]["services"].is_array(), "{dump}");
        let text = std::process::Command::new(agent_bin()?).args(["dump", "--bpffs"]).arg(lab.pin_dir()).output()?;
        let text = String::from_utf8_lossy(&text.stdout);
        ensure!(text.contains(&format!("  {frontend}/TCP  scope=external")), "text dump:\n{text}");
        Ok(())
    });
}

/// `--ct-max` and `--ct-max-ipv6` size the conntrack tables (the pinned maps have those sizes
/// and `/metrics` reports them); a restart with other sizes moves the pinned tables to new ones
/// of those sizes, flows included, and adopts the rest of the state (the first sync writes
/// nothing); a backend array too small for the ids in use is refused, naming it, and leaves the
/// pinned state serving.
#[test]
fn conntrack_sizes_are_set_by_flags_and_changed_at_a_restart() {
    with_lab("conntrack_sizes_are_set_by_flags_and_changed_at_a_restart", |lab| {
        let bin = agent_bin()?;
        let manifests = Manifests { dir: lab.work_dir().join("manifests") };
        std::fs::create_dir(&manifests.dir)?;
        write_atomic(&manifests.service(), &demo::service().to_string())?;
        manifests.write_slice(&demo::backend_names())?;
        let sizes = ["--ct-max", "65536", "--ct-max-ipv6", "4096"];
        lab.start_agent_with(&bin, &manifests.dir, &sizes)?;
        demo::wait_ready(lab)?;
        let pins = lab.pin_dir().to_path_buf();
        let max_entries = |name: &str| -> Result<u32> {
            let map = aya::maps::MapData::from_pin(pins.join(name))?;
            Ok(map.info()?.max_entries())
        };
        ensure!(max_entries("RPX_CT4")? == 65_536 && max_entries("RPX_CT6")? == 4096, "sizes not applied");
        let node_ns = lab.node_ns().to_owned();
        let (_, metrics) = rproxy_tests::netns::in_netns(&node_ns, || http_get(10249, "/metrics"))??;
        for want in [
            "rproxy_map_capacity{map=\"conntrack\",family=\"ipv4\"} 65536",
            "rproxy_map_capacity{map=\"conntrack\",family=\"ipv6\"} 4096",
        ] {
            ensure!(metrics.contains(want), "no {want:?} in /metrics");
        }
        lab.stop_agent()?;

        start_with_and_wait_running(lab, &manifests.dir, &["--ct-max", "131072", "--ct-max-ipv6", "8192"])?;
        let resized = (max_entries("RPX_CT4")?, max_entries("RPX_CT6")?);
        ensure!(resized == (131_072, 8192), "tables not resized: {resized:?}\n{}", lab.agent_log());
        let log = lab.agent_log();
        ensure!(log.contains("resizing a pinned map") && log.contains("map migration finished"), "{log}");
        let first = log.lines().find(|l| l.contains("map_ops=")).context("no sync")?;
        ensure!(first.contains(" map_ops=0 "), "the state was rewritten, not adopted: {first}");
        assert_reaches_every_backend(lab, Proto::Tcp, b"resized")?;
        lab.stop_agent()?;

        // The demo's backends hold ids 1 to 3 (at least one): an array of 4096 holds them, so a
        // refusal needs an id above it, written as an earlier agent with a larger array could
        // have.
        let mut backends: aya::maps::Array<_, rproxy_common::Backend4> =
            aya::maps::Array::try_from(aya::maps::Map::Array(aya::maps::MapData::from_pin(pins.join("RPX_BE4"))?))?;
        let stray = rproxy_common::Backend4::new(Ipv4Addr::new(10, 244, 1, 99), 8080, 6, 1);
        backends.set(5000, stray, 0)?;
        drop(backends);
        lab.start_agent_with(&bin, &manifests.dir, &["--backend-map-max", "4096"])?;
        let status = agent_exit(lab).context("the agent did not refuse a backend array too small")?;
        let log = lab.agent_log();
        ensure!(!status.success(), "the agent started with a backend array too small: {log}");
        ensure!(
            log.contains("RPX_BE4") && log.contains("backend id 5000") && log.contains("--backend-map-max"),
            "the refusal does not name the table, the id and the flag: {log}"
        );
        assert_reaches_every_backend(lab, Proto::Tcp, b"pinned state still serving")
    });
}

/// Adds a Service `empty` (10.96.0.20, the demo's ports) without endpoints, and waits until it
/// rejects (connection refused): its address.
fn add_empty_service(lab: &Lab, manifests: &Manifests) -> Result<Ipv4Addr> {
    let empty_ip = Ipv4Addr::new(10, 96, 0, 20);
    let empty = rproxy_tests::manifest::Service { name: "empty".into(), cluster_ip: empty_ip, ..demo::service() };
    write_atomic(&manifests.dir.join("empty.yaml"), &empty.to_string())?;
    streak_start(Instant::now(), PROPAGATION * 5, 1, || {
        request(lab, Proto::Tcp, (empty_ip, PORT), b"x", SHORT).is_err_and(|e| format!("{e:#}").contains("refused"))
    })
    .context("the Service without endpoints never refused")?;
    Ok(empty_ip)
}

/// The value `bpftool` reads at key 0 of the pinned array `name` (a `u32`).
fn pinned_u32(lab: &Lab, name: &str) -> Result<u64> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(lab.pin_dir().join(name))
        .args(["key", "0", "0", "0", "0"])
        .output()?;
    ensure!(out.status.success(), "bpftool map lookup {name}: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    // With BTF, bpftool gives the decoded value under "formatted".
    v["formatted"]["value"].as_u64().with_context(|| format!("{name}[0]: {v}"))
}

/// `rproxy-agent monitor` streams what the datapath does while it runs: the demo Service's new
/// flows (TCP connects sent to a backend by the socket hooks, UDP flows translated on the pod's
/// device) and replies (with the frontend and the backend each names), and the refused connect
/// to a Service without endpoints; it turns the programs' switch off when it stops. `/metrics`
/// counts each frontend's packets, bytes and new flows (`rproxy_service_*`).
#[test]
fn monitor_streams_drops_and_translations_and_metrics_count_each_service() {
    with_agent("monitor_streams_drops_and_translations_and_metrics_count_each_service", |lab, manifests| {
        use std::io::Read as _;
        let empty_ip = add_empty_service(lab, manifests)?;
        ensure!(pinned_u32(lab, "RPX_MONITOR")? == 0, "the monitor's switch is on with no monitor running");

        let mut monitor = std::process::Command::new(agent_bin()?)
            .args(["monitor", "-o", "json", "--duration", "20", "--bpffs"])
            .arg(lab.pin_dir())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let guard = scopeguard_kill(monitor.id());
        let started = Instant::now();
        while pinned_u32(lab, "RPX_MONITOR")? == 0 {
            ensure!(started.elapsed() < Duration::from_secs(5), "the monitor did not turn its switch on");
            thread::sleep(Duration::from_millis(20));
        }
        // TCP is sent to a backend at connect() by the socket hooks (`--pod-sockets`), UDP is
        // translated packet by packet on the pod's device.
        for proto in [Proto::Tcp, Proto::Udp] {
            for i in 0..3 {
                let (name, echo) = request(lab, proto, (CLUSTER_IP, PORT), b"seen", Duration::from_secs(2))
                    .with_context(|| format!("{proto:?} request {i}"))?;
                ensure!(echo == b"seen", "{name} echoed {echo:?}");
            }
        }
        ensure!(request(lab, Proto::Tcp, (empty_ip, PORT), b"x", SHORT).is_err(), "the empty Service answered");
        thread::sleep(Duration::from_millis(300));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(monitor.id())?), nix::sys::signal::SIGINT)?;
        let status = monitor.wait()?;
        // Reaped: its pid may be someone else's now.
        std::mem::forget(guard);
        let (mut out, mut err) = (String::new(), String::new());
        monitor.stdout.take().context("stdout")?.read_to_string(&mut out)?;
        monitor.stderr.take().context("stderr")?.read_to_string(&mut err)?;
        ensure!(status.success(), "monitor exited with {status}: {err}");
        ensure!(pinned_u32(lab, "RPX_MONITOR")? == 0, "the monitor left its switch on");

        let events: Vec<serde_json::Value> =
            out.lines().map(serde_json::from_str).collect::<Result<_, _>>().context("monitor -o json lines")?;
        let frontend = format!("{CLUSTER_IP}:{PORT}");
        let backends: Vec<String> = BACKENDS.iter().map(|b| format!("{}:{TARGET_PORT}", b.1)).collect();
        let new_flows = |proto: &str, hook: &str| -> Vec<&serde_json::Value> {
            events
                .iter()
                .filter(|e| e["verdict"] == "translation" && e["reason"] == "new_flow" && e["proto"] == proto)
                .filter(|e| e["service"] == frontend.as_str() && e["hook"] == hook)
                .collect()
        };
        let (connects, datagrams) = (new_flows("TCP", "connect"), new_flows("UDP", "from-pod"));
        ensure!(connects.len() >= 3, "{} TCP connects to {frontend} in:\n{out}", connects.len());
        ensure!(datagrams.len() >= 3, "{} UDP new flows to {frontend} in:\n{out}", datagrams.len());
        ensure!(new_flows("TCP", "from-pod").is_empty(), "TCP translated on the pod's device:\n{out}");
        for e in connects.iter().chain(&datagrams) {
            let backend = e["backend"].as_str().context("backend")?;
            ensure!(backends.iter().any(|b| b == backend) && e["dst"] == backend, "new flow {e}");
        }
        for e in &datagrams {
            ensure!(e["src"].as_str().is_some_and(|s| s.starts_with(&format!("{}:", CLIENT.1))), "new flow {e}");
        }
        ensure!(
            events.iter().any(|e| e["reason"] == "rev_nat" && e["hook"] == "to-pod" && e["src"] == frontend.as_str()),
            "no reply translated back to {frontend} in:\n{out}"
        );
        let empty_fe = format!("{empty_ip}:{PORT}");
        ensure!(
            events.iter().any(|e| e["verdict"] == "drop"
                && e["reason"] == "no_backend"
                && e["dst"] == empty_fe.as_str()
                && e["hook"] == "connect"),
            "no refused connect() to {empty_fe} in:\n{out}"
        );

        let (_, metrics) = rproxy_tests::netns::in_netns(lab.node_ns(), || http_get(10249, "/metrics"))??;
        let sample = |name: &str, proto: &str| {
            metrics.lines().find_map(|l| {
                let rest = l.strip_prefix(name)?;
                (rest.contains(&format!("frontend=\"{frontend}/{proto}\"")) && rest.contains("service=\"demo\""))
                    .then(|| rest.rsplit(' ').next()?.parse::<f64>().ok())?
            })
        };
        let counters = |proto: &str| -> Result<[f64; 3]> {
            let get = |name: &str| sample(name, proto).with_context(|| format!("{name} of {frontend}/{proto}"));
            Ok([
                get("rproxy_service_new_flows_total")?,
                get("rproxy_service_packets_total")?,
                get("rproxy_service_bytes_total")?,
            ])
        };
        // TCP: with_agent's connections and these three, each a new flow at connect(); their
        // packets pass untranslated, so none is counted.
        let [flows, packets, _] = counters("TCP")?;
        ensure!(flows >= 3.0 && packets == 0.0, "TCP: {flows} flows, {packets} packets");
        // UDP: these three, a datagram and a reply each, at least 28 bytes each.
        let [flows, packets, bytes] = counters("UDP")?;
        ensure!(
            flows >= 3.0 && packets >= 2.0 * flows && bytes >= 28.0 * packets,
            "UDP: {flows} flows, {packets} packets, {bytes} bytes"
        );
        Ok(())
    });
}

/// Kills process `pid` when dropped, unless it has been waited for (a failing test must not leave
/// a monitor running).
fn scopeguard_kill(pid: u32) -> impl Drop {
    struct Kill(i32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::SIGKILL);
        }
    }
    Kill(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// Every pinned map of the agent but its ring buffer, as `bpftool` dumps them, each entry as
/// one JSON string, sorted: equal for equal contents whatever the walk order.
fn map_contents(lab: &Lab) -> Result<BTreeMap<String, Vec<String>>> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(lab.pin_dir())? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if !name.starts_with("RPX_") || name == "RPX_EVENTS" {
            continue;
        }
        let out = std::process::Command::new("bpftool").args(["-j", "map", "dump", "pinned"]).arg(&path).output()?;
        ensure!(out.status.success(), "bpftool map dump {name}: {}", String::from_utf8_lossy(&out.stderr));
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
        let mut entries: Vec<String> = entries.iter().map(ToString::to_string).collect();
        entries.sort();
        all.insert(name, entries);
    }
    Ok(all)
}

/// `rproxy-agent explain` in the node's namespace (where the agent's metrics address is), as
/// JSON.
fn explain(lab: &Lab, args: &[&str]) -> Result<serde_json::Value> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.node_ns()))
        .arg(agent_bin()?)
        .args(["explain", "-o", "json", "--bpffs"])
        .arg(lab.pin_dir())
        .args(args)
        .output()?;
    ensure!(out.status.success(), "explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("explain {args:?}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// `rproxy-agent explain` says what the datapath does with a packet, from the live maps: an open
/// connection and a UDP flow keep their backend; a new flow to the demo Service gets one of its
/// three backends (named, with its Service); a Service without endpoints rejects; an address
/// that is no frontend passes. It changes no map.
#[test]
fn explain_tells_what_the_datapath_does_and_changes_no_map() {
    with_agent("explain_tells_what_the_datapath_does_and_changes_no_map", |lab, manifests| {
        use std::io::{BufRead as _, BufReader};
        // No GC pass while the maps are compared (its first pass runs at the start). Pods' TCP
        // on their devices, with conntrack, as UDP is: the explanation of an open connection
        // reads its flow (the socket hooks' choice at connect() leaves none: the unit tests).
        lab.stop_agent()?;
        lab.start_agent_with(&agent_bin()?, &manifests.dir, &["--ct-gc-interval", "3600", "--pod-sockets", "none"])?;
        demo::wait_ready(lab)?;
        let empty_ip = add_empty_service(lab, manifests)?;
        let frontend = format!("{CLUSTER_IP}:{PORT}");
        let backend_of = |name: &str| -> Result<String> {
            let b = BACKENDS.iter().find(|b| b.0 == name).with_context(|| format!("no backend {name}"))?;
            Ok(format!("{}:{TARGET_PORT}", b.1))
        };
        // An open TCP connection, whose backend its greeting names. (The lab's servers close an
        // idle connection after 5 s, sooner than the map dumps below take: asked at once.)
        let conn = rproxy_tests::netns::in_netns(lab.pod(CLIENT.0).ns(), || {
            std::net::TcpStream::connect_timeout(&(CLUSTER_IP, PORT).into(), Duration::from_secs(2))
        })??;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut greeting = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut greeting)?;
        let tcp = explain(lab, &["--proto", "tcp", "--src", &conn.local_addr()?.to_string(), "--dst", &frontend])?;
        let serving = backend_of(greeting.split(' ').next().unwrap_or_default())?;
        ensure!(tcp["verdict"] == "translate" && tcp["backend"] == serving.as_str(), "{tcp}");
        ensure!(tcp["reason"].as_str().is_some_and(|r| r.contains("established")), "{tcp}");
        drop(conn);
        // A UDP flow: its conntrack entries stay while the maps are compared.
        let socket = lab.pod(CLIENT.0).udp_socket()?;
        let (udp_name, _) =
            rproxy_tests::client::udp_exchange(&socket, CLUSTER_IP, PORT, b"flow", Duration::from_secs(2))?;
        let udp_src = format!("{}:{}", CLIENT.1, socket.local_addr()?.port());
        // The TCP connection's close settles.
        thread::sleep(Duration::from_millis(500));
        let before = map_contents(lab)?;

        let udp = explain(lab, &["--proto", "udp", "--src", &udp_src, "--dst", &frontend])?;
        ensure!(udp["verdict"] == "translate" && udp["backend"] == backend_of(&udp_name)?.as_str(), "{udp}");
        // A port below the pods' ephemeral range (32768-60999), which no earlier connection of
        // this test can have had (40000 once was, and explain found its closing flow).
        let new_src = format!("{}:20000", CLIENT.1);
        let new = explain(lab, &["--proto", "tcp", "--src", &new_src, "--dst", &frontend])?;
        ensure!(new["verdict"] == "translate" && new["backend"].is_null(), "{new}");
        ensure!(new["service"]["frontend"] == frontend.as_str() && new["service"]["kind"] == "ClusterIP", "{new}");
        ensure!(
            new["service"]["name"].as_str().is_some_and(|n| n.starts_with(&format!(
                "{}/{}:",
                demo::NAMESPACE,
                demo::SERVICE_NAME
            ))),
            "the Service's name: {new}"
        );
        let candidates: Vec<&str> =
            new["candidates"].as_array().context("candidates")?.iter().filter_map(|c| c["addr"].as_str()).collect();
        let expected: Vec<String> = BACKENDS.iter().map(|b| format!("{}:{TARGET_PORT}", b.1)).collect();
        ensure!(candidates.len() == 3 && expected.iter().all(|e| candidates.contains(&e.as_str())), "{new}");
        let rejected = explain(lab, &["--proto", "tcp", "--src", &new_src, "--dst", &format!("{empty_ip}:{PORT}")])?;
        ensure!(rejected["verdict"] == "reject" && rejected["service"]["backends"] == 0, "{rejected}");
        let nothing = explain(lab, &["--proto", "udp", "--src", &new_src, "--dst", "10.96.0.99:53"])?;
        ensure!(nothing["verdict"] == "pass" && nothing["service"].is_null(), "{nothing}");
        // The text form says the same.
        let text = std::process::Command::new(agent_bin()?)
            .args(["explain", "--agent", "", "--proto", "tcp", "--src", &new_src, "--dst", &frontend, "--bpffs"])
            .arg(lab.pin_dir())
            .output()?;
        let text = String::from_utf8_lossy(&text.stdout);
        ensure!(text.contains("verdict: translate") && text.contains("candidates:"), "text explain:\n{text}");

        let after = map_contents(lab)?;
        let changed: Vec<_> = before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(*v))
            .map(|(k, v)| {
                let now = after.get(k).cloned().unwrap_or_default();
                let gone: Vec<_> = v.iter().filter(|e| !now.contains(e)).collect();
                let new: Vec<_> = now.iter().filter(|e| !v.contains(e)).collect();
                format!("{k}: before {gone:?}, after {new:?}")
            })
            .collect();
        ensure!(changed.is_empty(), "the maps changed while explain ran:\n{}", changed.join("\n"));
        Ok(())
    });
}

/// Hundreds of idle connections and of slow clients (a request head sent a few bytes at a time)
/// on the agent's `/healthz` and `/metrics` ports do not keep them from answering: every probe
/// meanwhile answers, and fast.
#[test]
fn health_and_metrics_ports_answer_through_idle_and_slow_connections() {
    with_agent("health_and_metrics_ports_answer_through_idle_and_slow_connections", |lab, _| {
        use std::io::Write as _;
        let node_ns = lab.node_ns().to_owned();
        // 300 idle and 100 slow connections on each port.
        let held = rproxy_tests::netns::in_netns(&node_ns, || -> Result<Vec<std::net::TcpStream>> {
            let mut held = Vec::new();
            for port in [10256u16, 10249] {
                for i in 0..400 {
                    let mut c = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
                    if i >= 300 {
                        c.write_all(b"GET /healthz HTTP/1.1\r\nHo")?;
                    }
                    held.push(c);
                }
            }
            Ok(held)
        })??;
        let probe = |port: u16, path: &str| -> Result<Duration> {
            let started = Instant::now();
            let (status, _) = rproxy_tests::netns::in_netns(&node_ns, || http_get(port, path))??;
            ensure!(status == 200, "{path}: {status}");
            Ok(started.elapsed())
        };
        let mut latencies = Vec::new();
        for _ in 0..20 {
            latencies.push(probe(10256, "/healthz")?);
            latencies.push(probe(10249, "/metrics")?);
        }
        latencies.sort();
        let (p50, max) = (latencies[latencies.len() / 2], latencies[latencies.len() - 1]);
        eprintln!("{} probes beside {} held connections: p50 {p50:?}, max {max:?}", latencies.len(), held.len());
        ensure!(max < Duration::from_millis(100), "a probe took {max:?} beside the held connections");
        drop(held);
        Ok(())
    });
}

/// The pin directory is root's alone (`0700`) and so are its pins (`0600`); one found open to
/// others is closed again at the next start, with a warning.
#[test]
fn the_pin_directory_is_root_only() {
    with_agent("the_pin_directory_is_root_only", |lab, manifests| {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &std::path::Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
        let dir = lab.pin_dir().to_path_buf();
        ensure!(mode(&dir)? == 0o700, "pin directory mode {:o}", mode(&dir)?);
        for name in ["RPX_SVC4", "RPX_CT4", "RPX_BE6"] {
            let m = mode(&dir.join(name))?;
            ensure!(m <= 0o700, "{name} mode {m:o}: open to others");
        }
        lab.stop_agent()?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        start_and_wait_running(lab, &manifests.dir)?;
        ensure!(mode(&dir)? == 0o700, "pin directory mode {:o} after the restart", mode(&dir)?);
        ensure!(lab.agent_log().contains("the pin directory was open to others"), "no warning:\n{}", lab.agent_log());
        Ok(())
    });
}
