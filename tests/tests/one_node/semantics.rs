//! Service semantics that need real packets, end to end in the netns lab with the agent reading a
//! manifests directory: named target ports, several ports, TCP and UDP on one port number, the
//! fallback to terminating endpoints and connection draining, a pod reaching its own Service
//! (hairpin), `ClientIP` session affinity, topology (node) hints, a
//! Service without endpoints
//! refusing connections, a backend's ICMP error reaching the client, a change of Service type, an agent restart under a stream of
//! connections, and a UDP flow moved off a removed backend.
//!
//! Every test builds its own lab (the demo's pods: `backend-a..c` and a client, serving the ports
//! the test needs), writes its own Service and `EndpointSlice`, starts the agent, and holds
//! [`serial`](rproxy_tests::serial) so that labs never overlap. Without root every test prints
//! why and passes, unless `RPROXY_REQUIRE_KERNEL=1`, where it fails.
use std::{
    collections::BTreeMap,
    fmt::Display,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use rproxy_tests::{
    Lab, Pod, agent_bin,
    client::{self, Reply},
    demo::{self, BACKENDS, CLIENT, CLUSTER_IP, NAMESPACE, NODE_NAME},
    manifest::{
        Endpoint, EndpointPort, EndpointSlice, ExternalNameService, Protocol, Service, ServicePort, TargetPort,
        write_atomic,
    },
    netns::in_netns,
    serial_or_skip, streak_start,
};

/// How fast the agent must apply a manifest change.
const PROPAGATION: Duration = Duration::from_secs(1);
/// Timeout of one request in the loops that wait for a change.
const SHORT: Duration = Duration::from_millis(250);
/// Timeout of one request that must succeed.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Requests allowed for every backend to show up (a backend is missed by 60 uniform picks among
/// three with probability (2/3)^60 ≈ 3e-11).
const MAX_REQUESTS: usize = 60;
/// The Service's name.
const SERVICE: &str = "sem";

// ---------------------------------------------------------------------------------------------
// Lab and manifests

/// The state of an endpoint in the `EndpointSlice`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    /// `ready: false, serving: true, terminating: true`: a pod shutting down that still serves.
    Terminating,
    /// `ready: false, serving: false, terminating: false`: a running pod that failed its
    /// readiness probe.
    NotReady,
}

/// A running lab with the agent on a manifests directory holding `service.yaml` and `slice.yaml`.
struct Setup {
    lab: Lab,
    dir: PathBuf,
    slice_ports: Vec<EndpointPort>,
}

impl Setup {
    fn client(&self) -> &Pod {
        self.lab.pod(CLIENT.0)
    }

    fn write_service(&self, service: &dyn Display) -> Result<()> {
        write_atomic(&self.dir.join("service.yaml"), &service.to_string())
    }

    /// Writes the slice with the named backends in the given states.
    fn write_slice(&self, endpoints: &[(&str, State)]) -> Result<()> {
        self.write_endpoints(endpoints.iter().map(|&(name, state)| endpoint(name, state)).collect())
    }

    fn write_endpoints(&self, endpoints: Vec<Endpoint>) -> Result<()> {
        let slice = EndpointSlice {
            namespace: NAMESPACE.into(),
            name: format!("{SERVICE}-1"),
            service_name: SERVICE.into(),
            endpoints,
            ports: self.slice_ports.clone(),
        };
        write_atomic(&self.dir.join("slice.yaml"), &slice.to_string())
    }

    /// One request from the client pod.
    fn request(&self, proto: Protocol, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
        match proto {
            Protocol::Tcp => self.client().tcp_request_timeout(CLUSTER_IP, port, payload, timeout),
            Protocol::Udp => self.client().udp_request_timeout(CLUSTER_IP, port, payload, timeout),
        }
    }

    /// The backend answering one TCP request to the `ClusterIP` on `port`.
    fn tcp_backend(&self, port: u16, timeout: Duration) -> Result<String> {
        Ok(self.request(Protocol::Tcp, port, b"who", timeout)?.0)
    }
}

fn endpoint(name: &str, state: State) -> Endpoint {
    let address = BACKENDS.iter().find(|b| b.0 == name).unwrap_or_else(|| panic!("no backend {name}")).1;
    Endpoint {
        address: address.into(),
        ready: state == State::Ready,
        serving: state != State::NotReady,
        terminating: state == State::Terminating,
        node_name: NODE_NAME.into(),
        for_nodes: Vec::new(),
    }
}

fn all(state: State) -> Vec<(&'static str, State)> {
    BACKENDS.iter().map(|b| (b.0, state)).collect()
}

fn service_port(name: &str, protocol: Protocol, port: u16, target_port: impl Into<TargetPort>) -> ServicePort {
    ServicePort { name: name.into(), protocol, port, target_port: target_port.into() }
}

fn slice_port(name: &str, protocol: Protocol, port: u16) -> EndpointPort {
    EndpointPort { name: name.into(), protocol, port }
}

fn service(ports: Vec<ServicePort>) -> Service {
    Service { namespace: NAMESPACE.into(), name: SERVICE.into(), cluster_ip: CLUSTER_IP, ports }
}

/// What a test starts from.
struct Spec<'a> {
    /// Ports every backend serves (TCP and UDP each).
    serve: &'a [u16],
    service: Service,
    slice_ports: Vec<EndpointPort>,
    endpoints: Vec<(&'static str, State)>,
    /// A TCP port of the Service that answers once the agent has programmed it.
    ready_port: u16,
}

/// A Service port: name, protocol, port, target port.
type PortSpec = (&'static str, Protocol, u16, u16);

/// A Service with ports `a` (TCP 80, which tells when the agent is ready) and `b`, every endpoint
/// ready and serving `serve`.
fn two_port_spec(serve: &'static [u16], a: PortSpec, b: PortSpec) -> Spec<'static> {
    let ports = [a, b];
    Spec {
        serve,
        service: service(
            ports.iter().map(|&(name, proto, port, target)| service_port(name, proto, port, target)).collect(),
        ),
        slice_ports: ports.iter().map(|&(name, proto, _, target)| slice_port(name, proto, target)).collect(),
        endpoints: all(State::Ready),
        ready_port: 80,
    }
}

/// Builds the lab, writes the manifests, starts the agent, waits until the `ClusterIP` answers on
/// `spec.ready_port`, and runs `body`; skipped when not root. An error panics while the lab is
/// alive, so that its drop prints the agent's log.
fn run(test: &str, spec: &Spec<'_>, body: impl FnOnce(&mut Setup) -> Result<()>) {
    let Some(_serial) = serial_or_skip(test) else {
        return;
    };
    let started = Instant::now();
    let mut setup = prepare(spec).unwrap_or_else(|e| panic!("{test}: setting up: {e:?}"));
    let result = start_agent(&mut setup, spec).and_then(|()| body(&mut setup));
    if let Err(e) = result {
        panic!("{test}: {e:?}");
    }
    eprintln!("{test}: passed in {:?}", started.elapsed());
}

fn prepare(spec: &Spec<'_>) -> Result<Setup> {
    let mut lab = Lab::new(NODE_NAME)?;
    for (name, ip) in BACKENDS {
        let pod = lab.add_pod(name, ip)?;
        for &port in spec.serve {
            pod.serve(port)?;
        }
    }
    lab.add_pod(CLIENT.0, CLIENT.1)?;
    let dir = lab.work_dir().join("manifests");
    std::fs::create_dir(&dir)?;
    Ok(Setup { lab, dir, slice_ports: spec.slice_ports.clone() })
}

fn start_agent(setup: &mut Setup, spec: &Spec<'_>) -> Result<()> {
    setup.write_service(&spec.service)?;
    setup.write_slice(&spec.endpoints)?;
    setup.lab.start_agent(&agent_bin()?, &setup.dir)?;
    // No request before the agent's first sync is complete with the socket hooks attached (a
    // pod reaching itself through the devices a moment before would see the hairpin address).
    demo::wait_ready_on(&mut setup.lab, spec.ready_port)
}

// ---------------------------------------------------------------------------------------------
// Assertions

/// A payload that shows reordering or corruption.
fn payload(len: usize) -> Vec<u8> {
    (0..=250u8).cycle().take(len).collect()
}

/// Connections (TCP) or datagrams (UDP) each backend's server on each of `ports` has seen.
fn peer_counts(lab: &Lab, proto: Protocol, ports: &[u16]) -> Vec<(String, u16, usize)> {
    let mut counts = Vec::new();
    for (name, _) in BACKENDS {
        for &port in ports {
            let peers = lab.pod(name).peers_on(port);
            let seen = match proto {
                Protocol::Tcp => peers.tcp.len(),
                Protocol::Udp => peers.udp.len(),
            };
            counts.push((name.to_owned(), port, seen));
        }
    }
    counts
}

/// Sends one request to the `ClusterIP` on `port` and finds where it landed: the backend that
/// answered and which of the served ports (`served`) its server saw the request on. Fails unless
/// exactly one server saw exactly one new peer, from the client's own address (no SNAT), and the
/// echo is intact.
fn request_landing(setup: &Setup, proto: Protocol, port: u16, served: &[u16]) -> Result<(String, u16)> {
    let sent = payload(1000);
    let before = peer_counts(&setup.lab, proto, served);
    let (name, echo) = setup.request(proto, port, &sent, TIMEOUT)?;
    ensure!(echo == sent, "{proto} to port {port}: {name} echoed {} bytes, not the {} sent", echo.len(), sent.len());
    let after = peer_counts(&setup.lab, proto, served);
    let changed: Vec<_> =
        before.iter().zip(&after).filter(|(b, a)| a.2 != b.2).map(|(b, a)| (a.0.clone(), a.1, a.2 - b.2)).collect();
    let [(seen_by, target, 1)] = changed.as_slice() else {
        bail!("{proto} to port {port}: answered by {name}, but the servers' new peers are {changed:?}");
    };
    ensure!(*seen_by == name, "{proto} to port {port}: answered as {name} by the server of {seen_by}");
    let peers = setup.lab.pod(seen_by).peers_on(*target);
    let peer = match proto {
        Protocol::Tcp => peers.tcp.last(),
        Protocol::Udp => peers.udp.last(),
    };
    ensure!(peer.map(std::net::SocketAddr::ip) == Some(CLIENT.1.into()), "{name} saw peer {peer:?}, not the client");
    Ok((name, *target))
}

/// Sends requests to the `ClusterIP` on `port` (at most [`MAX_REQUESTS`]) until every backend has
/// answered; each must have landed on `target` (see [`request_landing`]).
fn assert_reaches_every_backend(setup: &Setup, proto: Protocol, port: u16, target: u16, served: &[u16]) -> Result<()> {
    let mut unseen: Vec<&str> = BACKENDS.iter().map(|b| b.0).collect();
    for attempt in 1..=MAX_REQUESTS {
        let (name, landed) = request_landing(setup, proto, port, served)
            .with_context(|| format!("{proto} request {attempt} to {CLUSTER_IP}:{port}"))?;
        ensure!(landed == target, "{proto} to port {port} reached {name}:{landed}, not port {target}");
        unseen.retain(|b| *b != name);
        if unseen.is_empty() {
            return Ok(());
        }
    }
    bail!("{proto} to port {port}: {unseen:?} never answered in {MAX_REQUESTS} requests")
}

/// Requests in a row that must match before a change counts as applied. With 3 backends, a
/// shorter streak of "not backend X" happens by chance before the change (10 in a row: 1.7 %).
const STREAK: usize = 40;

/// Waits until `matches(backend)` holds for [`STREAK`] TCP requests in a row to `port`, which
/// must start within [`PROPAGATION`] of `since`; then checks 20 more requests.
fn assert_new_connections_move(
    setup: &Setup,
    port: u16,
    since: Instant,
    what: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<()> {
    let ok = || setup.tcp_backend(port, SHORT).is_ok_and(|b| matches(&b));
    let took = streak_start(since, PROPAGATION * 5, STREAK, ok)
        .with_context(|| format!("new connections are not {what} {:?} after the change", PROPAGATION * 5))?;
    ensure!(took <= PROPAGATION, "new connections were {what} only {took:?} after the change");
    for i in 1..=20 {
        let backend = setup.tcp_backend(port, TIMEOUT).with_context(|| format!("request {i} after the change"))?;
        ensure!(matches(&backend), "request {i} after the change went to {backend}, not {what}");
    }
    eprintln!("new connections {what} {took:?} after the change");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn named_target_port_resolves_through_the_slice_port_names() {
    // The slice lists an unrelated port first: the Service's ports must pick theirs by name.
    let spec = Spec {
        serve: &[8080],
        service: service(vec![
            service_port("http", Protocol::Tcp, 80, TargetPort::Name("http".into())),
            service_port("dns", Protocol::Udp, 80, TargetPort::Name("dns".into())),
        ]),
        slice_ports: vec![
            slice_port("metrics", Protocol::Tcp, 9090),
            slice_port("http", Protocol::Tcp, 8080),
            slice_port("dns", Protocol::Udp, 8080),
        ],
        endpoints: all(State::Ready),
        ready_port: 80,
    };
    run("named_target_port_resolves_through_the_slice_port_names", &spec, |setup| {
        assert_reaches_every_backend(setup, Protocol::Tcp, 80, 8080, &[8080])?;
        assert_reaches_every_backend(setup, Protocol::Udp, 80, 8080, &[8080])
    });
}

#[test]
fn two_ports_of_one_service_reach_their_own_backend_ports() {
    let spec = two_port_spec(&[8080, 8081], ("web", Protocol::Tcp, 80, 8080), ("alt", Protocol::Tcp, 81, 8081));
    run("two_ports_of_one_service_reach_their_own_backend_ports", &spec, |setup| {
        assert_reaches_every_backend(setup, Protocol::Tcp, 80, 8080, &[8080, 8081])?;
        assert_reaches_every_backend(setup, Protocol::Tcp, 81, 8081, &[8080, 8081])
    });
}

#[test]
fn tcp_and_udp_on_the_same_port_are_translated_separately() {
    // 53/TCP and 53/UDP lead to different backend ports, and every backend serves TCP and UDP on
    // both: a request landing on the other protocol's target port would be seen.
    let spec = Spec {
        serve: &[8080, 8081],
        service: service(vec![
            service_port("dns-tcp", Protocol::Tcp, 53, 8080),
            service_port("dns", Protocol::Udp, 53, 8081),
        ]),
        slice_ports: vec![slice_port("dns-tcp", Protocol::Tcp, 8080), slice_port("dns", Protocol::Udp, 8081)],
        endpoints: all(State::Ready),
        ready_port: 53,
    };
    run("tcp_and_udp_on_the_same_port_are_translated_separately", &spec, |setup| {
        assert_reaches_every_backend(setup, Protocol::Tcp, 53, 8080, &[8080, 8081])?;
        assert_reaches_every_backend(setup, Protocol::Udp, 53, 8081, &[8080, 8081])
    });
}

fn http_spec(endpoints: Vec<(&'static str, State)>) -> Spec<'static> {
    Spec {
        serve: &[8080],
        service: service(vec![
            service_port("http", Protocol::Tcp, 80, 8080),
            service_port("dns", Protocol::Udp, 80, 8080),
        ]),
        slice_ports: vec![slice_port("http", Protocol::Tcp, 8080), slice_port("dns", Protocol::Udp, 8080)],
        endpoints,
        ready_port: 80,
    }
}

/// How a new TCP connection and a connected UDP socket from the calling thread's namespace
/// fare against `CLUSTER_IP:port`: refused (`ECONNREFUSED`, which only an answer gives: a
/// dropped packet times out after `TIMEOUT` instead), or anything else (connected, timed out,
/// another error).
fn refused(port: u16) -> (bool, bool) {
    let is_refused = |e: &std::io::Error| e.kind() == std::io::ErrorKind::ConnectionRefused;
    let tcp = std::net::TcpStream::connect_timeout(&(CLUSTER_IP, port).into(), TIMEOUT).is_err_and(|e| is_refused(&e));
    let udp = (|| -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.connect((CLUSTER_IP, port))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.send(b"anyone?")?;
        socket.recv(&mut [0u8; 64]).map(drop)
    })()
    .is_err_and(|e| is_refused(&e));
    (tcp, udp)
}

/// A Service whose endpoints are all gone rejects new connections at once, as kube-proxy's
/// `REJECT` rule does (ICMP port unreachable from the `ClusterIP`): a pod's TCP connect is refused
/// instead of timing out, and a connected UDP socket learns it on its next receive. With an
/// endpoint back, connections work again.
#[test]
fn service_without_endpoints_refuses_connections() {
    run("service_without_endpoints_refuses_connections", &http_spec(all(State::Ready)), |setup| {
        let ns = setup.client().ns().to_owned();
        ensure!(in_netns(&ns, || refused(80))? == (false, false), "refused with every endpoint ready");
        setup.write_slice(&[])?;
        let since = Instant::now();
        loop {
            let (tcp, udp) = in_netns(&ns, || refused(80))?;
            if tcp && udp {
                break;
            }
            // One try may wait out its timeouts while the change is under way.
            ensure!(
                since.elapsed() < PROPAGATION + TIMEOUT * 2,
                "not refused {:?} after the endpoints went: TCP {tcp}, UDP {udp}",
                since.elapsed()
            );
        }
        ensure!(in_netns(&ns, || refused(80))?.0, "a second connect was not refused");

        setup.write_slice(&[("backend-b", State::Ready)])?;
        let since = Instant::now();
        while setup.tcp_backend(80, SHORT).is_err() {
            ensure!(
                since.elapsed() < PROPAGATION + SHORT * 2,
                "no connection {:?} after an endpoint came back",
                since.elapsed()
            );
        }
        Ok(())
    });
}

/// A backend's ICMP error about a translated flow reaches the client translated back
/// (conntrack's "related" packets): a connected UDP socket to a port that the backends do not
/// serve gets `ECONNREFUSED` from the backend's port unreachable, as with kube-proxy, instead of
/// waiting in vain.
#[test]
fn backend_port_unreachable_reaches_the_client() {
    let spec = two_port_spec(&[8080], ("http", Protocol::Tcp, 80, 8080), ("closed", Protocol::Udp, 81, 9090));
    run("backend_port_unreachable_reaches_the_client", &spec, |setup| {
        let ns = setup.client().ns().to_owned();
        let (_, udp) = in_netns(&ns, || refused(81))?;
        ensure!(udp, "the backend's port unreachable did not reach the client's connected UDP socket");
        Ok(())
    });
}

/// `sessionAffinity: ClientIP`: once the agent has the Service with affinity, every new
/// connection of the client pod lands on one backend (20 in a row; without affinity three
/// backends share them at random).
#[test]
fn client_ip_affinity_keeps_the_client_on_one_backend() {
    let spec = http_spec(all(State::Ready));
    run("client_ip_affinity_keeps_the_client_on_one_backend", &spec, |setup| {
        setup.write_service(&format!("{}  sessionAffinity: ClientIP\n", spec.service))?;
        let mut last: Option<String> = None;
        let held = streak_start(Instant::now(), PROPAGATION * 3, 20, || {
            let backend = setup.tcp_backend(80, SHORT).ok();
            let same = backend.is_some() && backend == last;
            last = backend;
            same
        });
        ensure!(held.is_some(), "no 20 connections in a row reached one backend; last {last:?}");
        // `rproxy-agent dump` shows the client remembered.
        let dump =
            std::process::Command::new(agent_bin()?).arg("dump").arg("--bpffs").arg(setup.lab.pin_dir()).output()?;
        let dump = String::from_utf8_lossy(&dump.stdout);
        let client = format!(": {} -> backend", CLIENT.1);
        ensure!(dump.lines().any(|l| l.contains(&client)), "dump does not show the client's affinity:\n{dump}");
        Ok(())
    });
}

/// Topology hints (what the `EndpointSlice` controller writes for `trafficDistribution:
/// PreferSameNode`): with every endpoint hinted and one hinted to this node, new connections go
/// to that one only; without hints, to all again.
#[test]
fn node_hints_keep_new_connections_on_this_nodes_endpoints() {
    let spec = http_spec(all(State::Ready));
    run("node_hints_keep_new_connections_on_this_nodes_endpoints", &spec, |setup| {
        let hinted: Vec<Endpoint> = BACKENDS
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let node = if i == 1 { NODE_NAME } else { "other-node" };
                Endpoint { for_nodes: vec![node.into()], ..endpoint(b.0, State::Ready) }
            })
            .collect();
        setup.write_endpoints(hinted)?;
        let only = BACKENDS[1].0;
        let held =
            streak_start(Instant::now(), PROPAGATION * 3, 20, || setup.tcp_backend(80, SHORT).is_ok_and(|b| b == only));
        ensure!(held.is_some(), "no 20 connections in a row reached {only}, the one endpoint hinted to this node");
        for _ in 0..20 {
            let backend = setup.tcp_backend(80, TIMEOUT)?;
            ensure!(backend == only, "a new connection reached {backend}, hinted to another node");
        }
        // Without hints: every endpoint again, within the propagation time (bounded in count too).
        setup.write_slice(&all(State::Ready))?;
        let started = Instant::now();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..500 {
            if seen.len() == BACKENDS.len() || started.elapsed() > PROPAGATION * 3 {
                break;
            }
            seen.insert(setup.tcp_backend(80, TIMEOUT)?);
        }
        ensure!(seen.len() == BACKENDS.len(), "without hints only {seen:?} answered");
        Ok(())
    });
}

/// Hairpin: a pod reaches its own Service, also when the Service picks the pod itself (over
/// TCP and UDP), and sees such connections come from the hairpin address, as kube-proxy's
/// masquerade makes them come from the node.
#[test]
fn a_pod_reaches_its_own_service() {
    run("a_pod_reaches_its_own_service", &http_spec(all(State::Ready)), |setup| {
        let me = "backend-a";
        let pod = setup.lab.pod(me);
        let mut landed: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..MAX_REQUESTS {
            let (name, _) = pod
                .tcp_request_timeout(CLUSTER_IP, 80, b"self", TIMEOUT)
                .with_context(|| format!("TCP request {i} from {me}"))?;
            *landed.entry(name).or_default() += 1;
            let (name, _) = pod
                .udp_request_timeout(CLUSTER_IP, 80, b"self", TIMEOUT)
                .with_context(|| format!("UDP request {i} from {me}"))?;
            *landed.entry(name).or_default() += 1;
        }
        ensure!(landed.contains_key(me), "{me} never reached itself: {landed:?}");
        // UDP is translated packet by packet: the pod's own packets come back to it from the
        // hairpin address, so that its replies pass the node again and are translated back.
        let hairpin = std::net::IpAddr::V4(Ipv4Addr::new(169, 254, 42, 1));
        let peers = pod.peers_on(8080);
        ensure!(
            peers.udp.iter().any(|p| p.ip() == hairpin),
            "{me} saw its UDP from {:?}, not the hairpin address",
            peers.udp
        );
        // TCP is sent to the backend at connect() (`--pod-sockets`): no NAT, so the pod sees
        // its connections to itself come from its own address, and its replies need nothing.
        let own = std::net::IpAddr::V4(pod.ip());
        ensure!(
            peers.tcp.iter().any(|p| p.ip() == own) && !peers.tcp.iter().any(|p| p.ip() == hairpin),
            "{me} saw its TCP from {:?}, not only from its own address {own}",
            peers.tcp
        );
        Ok(())
    });
}

#[test]
fn terminating_endpoints_serve_until_one_is_ready() {
    run("terminating_endpoints_serve_until_one_is_ready", &http_spec(all(State::Terminating)), |setup| {
        // No ready endpoint: the serving, terminating ones take the traffic.
        assert_reaches_every_backend(setup, Protocol::Tcp, 80, 8080, &[8080])
            .context("with every endpoint terminating (and serving)")?;
        setup.write_slice(&[
            ("backend-a", State::Terminating),
            ("backend-b", State::Ready),
            ("backend-c", State::Terminating),
        ])?;
        assert_new_connections_move(setup, 80, Instant::now(), "only on backend-b (the ready one)", |b| {
            b == "backend-b"
        })
    });
}

#[test]
fn open_connection_to_a_terminating_endpoint_keeps_working() {
    run("open_connection_to_a_terminating_endpoint_keeps_working", &http_spec(all(State::Ready)), |setup| {
        let mut session = setup.client().tcp_session(CLUSTER_IP, 80, TIMEOUT)?;
        session.echo(b"before")?;
        let draining = session.server().to_owned();
        let endpoints: Vec<_> =
            BACKENDS.iter().map(|b| (b.0, if b.0 == draining { State::Terminating } else { State::Ready })).collect();
        setup.write_slice(&endpoints)?;
        let what = format!("off {draining} (now terminating)");
        assert_new_connections_move(setup, 80, Instant::now(), &what, |b| b != draining)?;
        session
            .echo(b"after the endpoint went terminating")
            .with_context(|| format!("the connection open to {draining} must keep working while it drains"))?;
        Ok(())
    });
}

/// kube-proxy keeps an established TCP connection on its backend whatever happens to the
/// endpoint (NAT applies to new connections only): a pod that turns unready, then leaves the
/// slice, while it still runs keeps its open connections, also across an agent restart and
/// conntrack GC passes, while new connections go to the other endpoints.
#[test]
fn open_connection_to_an_endpoint_that_turns_unready_or_leaves_keeps_working() {
    run(
        "open_connection_to_an_endpoint_that_turns_unready_or_leaves_keeps_working",
        &http_spec(all(State::Ready)),
        |setup| {
            let mut session = setup.client().tcp_session(CLUSTER_IP, 80, TIMEOUT)?;
            session.echo(b"before")?;
            let pinned = session.server().to_owned();
            let others = || BACKENDS.iter().filter(|b| b.0 != pinned).map(|b| (b.0, State::Ready));
            let mut endpoints: Vec<_> = others().collect();
            endpoints.push((pinned.as_str(), State::NotReady));
            setup.write_slice(&endpoints)?;
            assert_new_connections_move(setup, 80, Instant::now(), &format!("off {pinned} (now unready)"), |b| {
                b != pinned
            })?;
            session
                .echo(b"after the endpoint turned unready")
                .with_context(|| format!("the connection to {pinned}, unready"))?;

            setup.write_slice(&others().collect::<Vec<_>>())?;
            thread::sleep(PROPAGATION);
            session
                .echo(b"after the endpoint left")
                .with_context(|| format!("the connection to {pinned}, gone from the slice"))?;

            // A restart adopts the maps; the GC (every second here) runs a few passes.
            setup.lab.stop_agent()?;
            setup.lab.start_agent_with(&agent_bin()?, &setup.dir, &["--ct-gc-interval", "1"])?;
            thread::sleep(PROPAGATION * 3);
            setup.lab.ensure_agent_running()?;
            session
                .echo(b"after a restart and GC passes")
                .with_context(|| format!("the connection to {pinned}, after the restart"))?;
            assert_new_connections_move(setup, 80, Instant::now(), &format!("still off {pinned}"), |b| b != pinned)?;
            session.echo(b"still").context("the connection, at the end")?;
            Ok(())
        },
    );
}

/// A pod that connects to its Service, closes, then connects straight to the backend that
/// served it from the same source port (its kernel gives a port out again once the destination
/// differs) reaches it. The closed flow's entries would otherwise translate the backend's SYN-ACK
/// to the service address for their whole closing lifetime, and the pod would time out;
/// netfilter remaps such a clash, rproxy lets the new connection take the tuple of the flow that
/// is over.
#[test]
fn a_pod_reaches_a_backend_directly_from_the_port_of_a_closed_service_connection() {
    run(
        "a_pod_reaches_a_backend_directly_from_the_port_of_a_closed_service_connection",
        &http_spec(all(State::Ready)),
        |setup| {
            const PORT: u16 = 42_424;
            let mut session = setup.client().tcp_session_from(PORT, CLUSTER_IP, 80, TIMEOUT)?;
            session.echo(b"through the service")?;
            let served = session.server().to_owned();
            drop(session);
            // The server closes on the client's FIN: the flow is over both ways.
            thread::sleep(Duration::from_millis(100));
            let backend = BACKENDS.iter().find(|b| b.0 == served).expect("a demo backend").1;
            let mut direct = setup
                .client()
                .tcp_session_from(PORT, backend, 8080, TIMEOUT)
                .with_context(|| format!("straight to {served} ({backend}:8080) from port {PORT}"))?;
            ensure!(direct.server() == served, "answered by {}", direct.server());
            direct.echo(b"straight to the backend")?;
            Ok(())
        },
    );
}

/// A pod's connections never share a tuple: it holds a connection straight to a backend (to
/// the pod's address: no frontend, not in conntrack) from one source port and, from the same
/// port (`SO_REUSEADDR`; a kernel hands a port out again once the destination differs),
/// connects to its Service's two ports, which land on that backend. The Service has `ClientIP`
/// affinity, which the socket hooks leave to the pod's device, so those are flows translated
/// there: they take source ports of the SNAT range, and the server sees three connections from
/// three ports; all three carry data both ways, the first one to the end. (With the pod's own
/// port the Service's SYN would land on the open connection's tuple: the backend answers it
/// with a challenge ACK, the pod resets, and the open connection is gone.)
#[test]
fn a_pods_connections_to_a_backend_and_through_its_service_never_share_a_tuple() {
    let spec = Spec {
        serve: &[8080],
        service: service(vec![
            service_port("http", Protocol::Tcp, 80, 8080),
            service_port("alt", Protocol::Tcp, 81, 8080),
        ]),
        slice_ports: vec![slice_port("http", Protocol::Tcp, 8080), slice_port("alt", Protocol::Tcp, 8080)],
        endpoints: vec![(BACKENDS[0].0, State::Ready)],
        ready_port: 80,
    };
    run("a_pods_connections_to_a_backend_and_through_its_service_never_share_a_tuple", &spec, |setup| {
        const PORT: u16 = 42_425;
        setup.write_service(&format!("{}  sessionAffinity: ClientIP\n", spec.service))?;
        // Affinity is programmed once a connection leaves the client remembered.
        let remembered = format!(": {} -> backend", CLIENT.1);
        let affine = streak_start(Instant::now(), PROPAGATION * 3, 1, || {
            let _ = setup.tcp_backend(80, SHORT);
            std::process::Command::new(agent_bin().expect("agent"))
                .arg("dump")
                .arg("--bpffs")
                .arg(setup.lab.pin_dir())
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.contains(&remembered)))
        });
        ensure!(affine.is_some(), "the Service's affinity was not programmed");
        let backend = BACKENDS[0].1;
        let mut held = setup
            .client()
            .tcp_session_from(PORT, backend, 8080, TIMEOUT)
            .with_context(|| format!("straight to {backend}:8080 from port {PORT}"))?;
        held.echo(b"straight to the backend")?;
        ensure!(held.seen_as().map(|a| a.port()) == Some(PORT), "the direct connection seen as {:?}", held.seen_as());
        let mut through = Vec::new();
        for port in [80, 81] {
            let mut session = setup
                .client()
                .tcp_session_from(PORT, CLUSTER_IP, port, TIMEOUT)
                .with_context(|| format!("the Service's port {port} from source port {PORT}"))?;
            session.echo(b"through the service")?;
            through.push(session);
        }
        let ports: Vec<_> = through.iter().map(|s| s.seen_as().map(|a| a.port())).collect();
        ensure!(
            ports.iter().all(|p| p.is_some_and(|p| (1024..=29_999).contains(&p))) && ports[0] != ports[1],
            "the server saw the Service's connections from ports {ports:?} (not two of the SNAT range)"
        );
        held.echo(b"once more").context("the direct connection, at the end")?;
        for (i, session) in through.iter_mut().enumerate() {
            session.echo(b"once more").with_context(|| format!("the Service's connection {i}, at the end"))?;
        }
        Ok(())
    });
}

#[test]
fn service_type_change_to_external_name_and_back() {
    let spec = http_spec(all(State::Ready));
    let cluster_ip = spec.service.clone();
    run("service_type_change_to_external_name_and_back", &spec, |setup| {
        setup.write_service(&ExternalNameService::from_service(&cluster_ip, "example.com"))?;
        let since = Instant::now();
        let fails = || setup.tcp_backend(80, SHORT).is_err();
        let took = streak_start(since, PROPAGATION * 5, 5, fails)
            .context("the ClusterIP still translates 5 s after the change to ExternalName")?;
        ensure!(took <= PROPAGATION, "translation stopped {took:?} after the change to ExternalName");
        eprintln!("translation stopped {took:?} after the change to ExternalName");
        // Ignored as a valid ExternalName Service, not rejected as a broken one.
        let log = setup.lab.agent_log();
        ensure!(!log.contains("WARN"), "the agent warned about the ExternalName Service:\n{log}");

        setup.write_service(&cluster_ip)?;
        let since = Instant::now();
        let works = || setup.tcp_backend(80, SHORT).is_ok();
        let took = streak_start(since, PROPAGATION * 5, 5, works)
            .context("the ClusterIP does not translate 5 s after the change back to ClusterIP")?;
        ensure!(took <= PROPAGATION, "translation came back {took:?} after the change back to ClusterIP");
        eprintln!("translation came back {took:?} after the change back to ClusterIP");
        assert_reaches_every_backend(setup, Protocol::Udp, 80, 8080, &[8080])
    });
}

/// One connection of the stream in [`agent_restarts_under_a_stream_of_connections`].
struct Attempt {
    start: Duration,
    end: Duration,
    result: Result<String>,
}

/// Short TCP connections to the `ClusterIP` from `client` (each with a 1 s timeout, so a lost SYN
/// counts as a failure) until `stop`, [`MAX_STREAM`] connections or [`STREAM_LIMIT`].
fn connection_stream(client_ns: &str, t0: Instant, stop: &AtomicBool) -> Result<Vec<Attempt>> {
    rproxy_tests::in_netns(client_ns, || {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::Relaxed) && attempts.len() < MAX_STREAM && t0.elapsed() < STREAM_LIMIT {
            let start = t0.elapsed();
            let result = client::tcp_request(CLUSTER_IP, 80, b"x", Duration::from_secs(1)).and_then(|(name, echo)| {
                ensure!(echo == b"x", "{name} echoed {echo:?}");
                Ok(name)
            });
            attempts.push(Attempt { start, end: t0.elapsed(), result });
            // Paced, so that the cap is not reached before the restarts are over.
            thread::sleep(Duration::from_millis(2));
        }
        attempts
    })
}

const MAX_STREAM: usize = 3000;
const STREAM_LIMIT: Duration = Duration::from_secs(20);

/// Runs `restarts` (which returns its windows: when the old agent was told to stop, when the
/// new one was started, when it was running) while a stream of connections goes to the
/// `ClusterIP`, and checks that no connection failed and that some completed in every window.
/// With `swaps_maps` (a migration to new maps, whose programs are swapped device by device), a
/// connection opened while the new agent starts may fail: those are counted and reported, and
/// any other failure fails.
fn under_a_stream_of_connections(
    setup: &mut Setup,
    swaps_maps: bool,
    restarts: impl FnOnce(&mut Setup, Instant) -> Result<Vec<(Duration, Duration, Duration)>>,
) -> Result<()> {
    let t0 = Instant::now();
    let stop = AtomicBool::new(false);
    let client_ns = setup.client().ns().to_owned();
    let (attempts, windows) = thread::scope(|s| {
        let stream = s.spawn(|| connection_stream(&client_ns, t0, &stop));
        let windows = restarts(setup, t0);
        stop.store(true, Ordering::Relaxed);
        let attempts = stream.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (attempts, windows)
    });
    let (attempts, windows) = (attempts?, windows?);

    let swapping =
        |t: Duration| swaps_maps && windows.iter().any(|(_, starting, running)| t >= *starting && t <= *running);
    let (in_swap, failed): (Vec<_>, Vec<_>) = attempts
        .iter()
        .filter_map(|a| a.result.as_ref().err().map(|e| (a.start, e)))
        .partition(|(start, _)| swapping(*start));
    if !in_swap.is_empty() {
        eprintln!("{} connections opened during the program swap failed: {in_swap:?}", in_swap.len());
    }
    let slowest = attempts.iter().map(|a| a.end.saturating_sub(a.start)).max().unwrap_or_default();
    eprintln!(
        "{} connections in {:?}, {} failed, slowest {slowest:?}; restarts (SIGTERM, start, running): {windows:?}",
        attempts.len(),
        attempts.last().map(|a| a.end).unwrap_or_default(),
        failed.len() + in_swap.len(),
    );
    ensure!(
        failed.is_empty(),
        "{} of {} connections failed, the first: {:?}",
        failed.len(),
        attempts.len(),
        &failed[..failed.len().min(3)]
    );
    ensure!(attempts.len() < MAX_STREAM, "the stream hit its cap of {MAX_STREAM} before the restarts were over");
    for (stopping, starting, running) in windows {
        let within = |from: Duration, to: Duration| attempts.iter().filter(|a| a.start >= from && a.end <= to).count();
        let (no_agent, restarting) = (within(stopping, starting), within(starting, running));
        ensure!(
            no_agent > 0 && restarting > 0,
            "connections completed while stopping ({no_agent}) and while starting ({restarting}) the agent: \
             both must be > 0 (window {stopping:?}..{starting:?}..{running:?})"
        );
    }
    Ok(())
}

/// Stops the agent and starts `bin` with `args` until its log says `running` (SIGTERM, start and
/// running times since `t0`).
fn restart_agent(
    setup: &mut Setup,
    t0: Instant,
    bin: &Path,
    args: &[&str],
    running: &str,
) -> Result<(Duration, Duration, Duration)> {
    let stopping = t0.elapsed();
    let status = setup.lab.stop_agent()?;
    ensure!(status.success(), "the agent exited with {status} on SIGTERM");
    thread::sleep(Duration::from_millis(100));
    let starting = t0.elapsed();
    setup.lab.start_agent_with(bin, &setup.dir, args)?;
    while !setup.lab.agent_log().contains(running) {
        setup.lab.ensure_agent_running()?;
        ensure!(t0.elapsed() < STREAM_LIMIT, "the restarted agent did not log {running:?}");
        thread::sleep(Duration::from_millis(10));
    }
    Ok((stopping, starting, t0.elapsed()))
}

#[test]
fn agent_restarts_under_a_stream_of_connections() {
    run("agent_restarts_under_a_stream_of_connections", &http_spec(all(State::Ready)), |setup| {
        let bin = agent_bin()?;
        under_a_stream_of_connections(setup, false, |setup, t0| {
            let mut windows = Vec::new();
            thread::sleep(Duration::from_millis(300));
            for _ in 0..2 {
                windows.push(restart_agent(setup, t0, &bin, &[], "agent running")?);
                thread::sleep(Duration::from_millis(300));
            }
            Ok(windows)
        })
    });
}

/// Each map pinned in `dir` and whether the kernel has its key and value types (BTF), as
/// `bpftool map show` reports them.
fn maps_with_btf(dir: &Path) -> Result<BTreeMap<String, bool>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        if !name.starts_with("RPX_") {
            continue;
        }
        let out = std::process::Command::new("bpftool").args(["-j", "map", "show", "pinned"]).arg(&path).output()?;
        ensure!(out.status.success(), "bpftool map show {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        found.insert(name, info.get("btf_id").and_then(serde_json::Value::as_u64).is_some_and(|id| id > 0));
    }
    Ok(found)
}

/// Fails unless the first sync in an agent's `log` wrote nothing: it adopted every id the maps
/// held (a rewrite would give flows' backend ids to other pods).
fn ensure_first_sync_adopted(log: &str) -> Result<()> {
    let first = log.lines().find(|l| l.contains("map_ops=")).context("no sync in the log")?;
    ensure!(first.contains(" map_ops=0 "), "the restarted agent rewrote maps (ids not adopted): {first}\n{log}");
    Ok(())
}

/// A connection from the client to the `ClusterIP`'s echo server, open across restarts.
struct EchoConnection(std::net::TcpStream);

impl EchoConnection {
    fn open(setup: &Setup) -> Result<Self> {
        use std::io::{BufRead as _, BufReader};
        let conn =
            in_netns(setup.client().ns(), || std::net::TcpStream::connect_timeout(&(CLUSTER_IP, 80).into(), TIMEOUT))??;
        conn.set_read_timeout(Some(TIMEOUT))?;
        let mut greeting = String::new();
        BufReader::new(conn.try_clone()?).read_line(&mut greeting)?;
        Ok(Self(conn))
    }

    /// Sends `msg` and checks that it comes back.
    fn echo(&mut self, msg: &[u8]) -> Result<()> {
        use std::io::{Read as _, Write as _};
        self.0.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        self.0.read_exact(&mut got)?;
        ensure!(got == msg, "echo {got:?} != {msg:?}");
        Ok(())
    }
}

/// An agent upgraded from a release whose maps had no BTF (its eBPF object is kept in
/// tests/fixtures) moves them to BTF maps: connections opened before keep working, none made
/// during the upgrade fails, the maps keep their ids (nothing to rewrite) and bpftool then knows
/// every map's types.
#[test]
fn upgrade_from_maps_without_btf_loses_no_connection() {
    run("upgrade_from_maps_without_btf_loses_no_connection", &http_spec(all(State::Ready)), |setup| {
        let bin = agent_bin()?;
        let previous = rproxy_tests::previous_ebpf_object();
        let previous = previous.to_str().context("fixture path")?;
        // The previous release's datapath in place of this one's.
        setup.lab.stop_agent()?;
        setup.lab.cleanup_agent()?;
        let t0 = Instant::now();
        restart_agent(setup, t0, &bin, &["--ebpf-object", previous], "agent running")?;
        let pins = setup.lab.pin_dir().to_path_buf();
        let before = maps_with_btf(&pins)?;
        ensure!(before.len() == 25 && before.values().all(|btf| !btf), "the old datapath's maps: {before:?}");

        let mut conn = EchoConnection::open(setup)?;
        conn.echo(b"before the upgrade")?;

        // Established connections survive the migration; one opened in the few milliseconds
        // between a device's two program swaps may be reset (docs/maps.md).
        under_a_stream_of_connections(setup, true, |setup, t0| {
            thread::sleep(Duration::from_millis(300));
            let window = restart_agent(setup, t0, &bin, &[], "map migration finished")?;
            thread::sleep(Duration::from_millis(300));
            Ok(vec![window])
        })?;
        conn.echo(b"after the upgrade").context("the connection opened before the upgrade must survive it")?;

        let after = maps_with_btf(&pins)?;
        // Every map but the monitor's ring buffer, which has no key or value types.
        let typed = after.iter().filter(|(name, _)| *name != "RPX_EVENTS");
        ensure!(
            after.len() == rproxy_common::map_names::ALL.len() && typed.clone().all(|(_, btf)| *btf),
            "maps after the upgrade: {after:?}"
        );
        ensure!(!pins.join("legacy").exists(), "the old maps' pins are still there after the migration");
        ensure_first_sync_adopted(&setup.lab.agent_log())?;
        Ok(())
    });
}

/// Restarting with other table sizes (a cluster that outgrew the defaults, or a node that wants
/// a smaller conntrack table) moves the pinned tables to new ones of those sizes: the connection
/// opened before keeps working, none opened during the restart fails outside the program swap,
/// and the ids are adopted as they were (no map write at the first sync).
#[test]
fn tables_resized_at_a_restart_keep_every_connection() {
    run("tables_resized_at_a_restart_keep_every_connection", &http_spec(all(State::Ready)), |setup| {
        let bin = agent_bin()?;
        let mut conn = EchoConnection::open(setup)?;
        conn.echo(b"before the restart")?;
        let sizes = ["--ct-max", "262144", "--service-map-max", "524288", "--backend-map-max", "262144"];
        under_a_stream_of_connections(setup, true, |setup, t0| {
            thread::sleep(Duration::from_millis(300));
            let window = restart_agent(setup, t0, &bin, &sizes, "map migration finished")?;
            thread::sleep(Duration::from_millis(300));
            Ok(vec![window])
        })?;
        conn.echo(b"after the restart").context("the connection opened before the restart must survive it")?;

        let pins = setup.lab.pin_dir().to_path_buf();
        for (map, want) in [
            ("RPX_CT4", 262_144),
            ("RPX_SVC4", 524_288),
            ("RPX_SVC6", 524_288),
            ("RPX_AFFINITY_MATCH", 524_288),
            ("RPX_BE4", 262_144),
            ("RPX_BE6", 262_144),
        ] {
            let out = std::process::Command::new("bpftool")
                .args(["-j", "map", "show", "pinned"])
                .arg(pins.join(map))
                .output()?;
            let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            ensure!(info["max_entries"] == want, "{map} after the restart: {info}");
        }
        ensure!(!pins.join("legacy").exists(), "the old tables' pins are still there");
        ensure_first_sync_adopted(&setup.lab.agent_log())?;
        Ok(())
    });
}

#[test]
fn udp_flow_moves_off_a_removed_backend() {
    run("udp_flow_moves_off_a_removed_backend", &http_spec(all(State::Ready)), |setup| {
        let socket = setup.client().udp_socket()?;
        let exchange = |msg: &[u8], timeout| client::udp_exchange(&socket, CLUSTER_IP, 80, msg, timeout);
        let (removed, _) = exchange(b"first", TIMEOUT)?;
        for i in 1..=5 {
            let (name, _) = exchange(b"same flow", TIMEOUT)?;
            ensure!(name == removed, "datagram {i} of one flow went to {name}, not to {removed} like the first");
        }
        let rest: Vec<_> = BACKENDS.iter().filter(|b| b.0 != removed).map(|b| (b.0, State::Ready)).collect();
        setup.write_slice(&rest)?;
        let since = Instant::now();

        let moved_to = loop {
            ensure!(since.elapsed() < PROPAGATION * 5, "the flow still goes to {removed} 5 s after its removal");
            match exchange(b"after removal", SHORT) {
                Ok((name, echo)) if name != removed => {
                    ensure!(echo == b"after removal", "{name} echoed {echo:?}");
                    break name;
                }
                Ok(_) | Err(_) => thread::sleep(Duration::from_millis(10)),
            }
        };
        let took = since.elapsed();
        ensure!(took <= PROPAGATION, "the flow left {removed} only {took:?} after its removal");
        eprintln!("the UDP flow moved from {removed} to {moved_to} {took:?} after the removal");
        for i in 1..=20 {
            let (name, _) = exchange(b"moved", TIMEOUT).with_context(|| format!("datagram {i} after the move"))?;
            ensure!(name == moved_to, "datagram {i} after the move went to {name}, not {moved_to}");
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// The manifests these tests write (no root needed)

#[test]
fn named_target_port_and_external_name_render_as_the_api_reads_them() {
    use k8s_openapi::{api::core::v1::Service as ApiService, apimachinery::pkg::util::intstr::IntOrString};

    let svc = service(vec![service_port("http", Protocol::Tcp, 80, TargetPort::Name("http".into()))]);
    let parsed: ApiService = serde_yaml_ng::from_str(&svc.to_string()).expect("a valid Service");
    let spec = parsed.spec.expect("spec");
    let port = &spec.ports.expect("ports")[0];
    assert_eq!(port.target_port, Some(IntOrString::String("http".into())));

    let external: ApiService =
        serde_yaml_ng::from_str(&ExternalNameService::from_service(&svc, "example.com").to_string())
            .expect("a valid Service");
    assert_eq!(external.metadata.name.as_deref(), Some(SERVICE));
    let spec = external.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("ExternalName"));
    assert_eq!(spec.external_name.as_deref(), Some("example.com"));
    assert_eq!((spec.cluster_ip, spec.cluster_ips), (None, None));
    assert_eq!(spec.ports.expect("ports")[0].target_port, Some(IntOrString::String("http".into())));
}
