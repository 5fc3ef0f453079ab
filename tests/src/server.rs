//! Pod servers: a TCP and a UDP server on one port, inside a pod's namespace.
//!
//! Protocol — TCP: on accept the server writes one line, `<pod name> <peer address> <peer
//! port>\n` (the client as the pod sees it), then echoes every byte until the client shuts down
//! its write side, then closes. UDP: each datagram gets the reply `<pod name> <peer address>
//! <peer port>\n<payload>`. Both record the peer address of every connection / datagram.
use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context as _, Result};
use nix::poll::{PollFd, PollFlags, poll};

use crate::netns::in_netns;

/// How often the server loops (here and in [`crate::load`]) look at the stop flag.
pub const STOP_POLL: Duration = Duration::from_millis(50);
/// Read/write timeout of an accepted TCP connection, so a stuck client cannot pin a thread.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Peer addresses seen by a server, in arrival order.
#[derive(Debug, Default, Clone)]
pub struct Peers {
    pub tcp: Vec<SocketAddr>,
    pub udp: Vec<SocketAddr>,
}

/// Binds `port` for TCP (non-blocking) and UDP (reads time out after [`STOP_POLL`]) inside
/// namespace `ns`, on both families (`[::]`, dual-stack: IPv4 peers appear as IPv4-mapped
/// addresses, which [`canonical`] turns back), or `0.0.0.0` where the namespace has no IPv6: the
/// sockets of the lab's servers, whose loops poll a stop flag.
pub fn bind_tcp_udp(ns: &str, port: u16) -> Result<(TcpListener, UdpSocket)> {
    let bind = |addr: SocketAddr| -> io::Result<_> { Ok((TcpListener::bind(addr)?, UdpSocket::bind(addr)?)) };
    let (tcp, udp) = in_netns(ns, || match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EAFNOSUPPORT as i32) => {
            bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        }
        other => other,
    })?
    .with_context(|| format!("cannot bind port {port} in netns {ns}"))?;
    tcp.set_nonblocking(true)?;
    udp.set_read_timeout(Some(STOP_POLL))?;
    Ok((tcp, udp))
}

/// A running TCP + UDP server pair; stopped (threads joined) on drop.
#[derive(Debug)]
pub struct Server {
    port: u16,
    peers: Arc<Mutex<Peers>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    /// Binds `0.0.0.0:port` for TCP and UDP inside `ns` and serves as pod `name`.
    pub fn start(ns: &str, name: &str, port: u16) -> Result<Self> {
        let (tcp, udp) = bind_tcp_udp(ns, port)?;

        let peers = Arc::new(Mutex::new(Peers::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_loop = {
            let (name, peers, stop) = (name.to_owned(), peers.clone(), stop.clone());
            move || serve_tcp(&tcp, &name, &peers, &stop)
        };
        let udp_loop = {
            let (name, peers, stop) = (name.to_owned(), peers.clone(), stop.clone());
            move || serve_udp(&udp, &name, &peers, &stop)
        };
        Ok(Self { port, peers, stop, threads: vec![thread::spawn(tcp_loop), thread::spawn(udp_loop)] })
    }

    /// The port served.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A snapshot of the peers seen so far.
    #[must_use]
    pub fn peers(&self) -> Peers {
        self.peers.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A peer as the client sees itself: an IPv4-mapped IPv6 address (an IPv4 client of a
/// dual-stack socket) as the IPv4 address.
#[must_use]
pub fn canonical(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

fn record(peers: &Mutex<Peers>, f: impl FnOnce(&mut Peers)) {
    f(&mut peers.lock().unwrap_or_else(PoisonError::into_inner));
}

fn serve_tcp(listener: &TcpListener, name: &str, peers: &Mutex<Peers>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        // `STOP_POLL` is 50 ms, which fits in u16.
        if poll(&mut fds, u16::try_from(STOP_POLL.as_millis()).unwrap_or(u16::MAX)).is_err() {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let peer = canonical(peer);
                record(peers, |p| p.tcp.push(peer));
                let name = name.to_owned();
                // Detached: the connection ends by itself (client EOF or `CONN_TIMEOUT`).
                thread::spawn(move || {
                    let _ = echo(stream, &name, peer);
                });
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => eprintln!("rproxy-tests: {name}: accept: {e}"),
        }
    }
}

/// The line a server answers with: its name and the peer as it sees it.
#[must_use]
pub fn greeting(name: &str, peer: SocketAddr) -> String {
    format!("{name} {} {}\n", peer.ip(), peer.port())
}

fn echo(mut stream: TcpStream, name: &str, peer: SocketAddr) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CONN_TIMEOUT))?;
    stream.set_write_timeout(Some(CONN_TIMEOUT))?;
    stream.write_all(greeting(name, peer).as_bytes())?;
    let mut buf = [0; 16 * 1024];
    loop {
        match stream.read(&mut buf)? {
            0 => return Ok(()),
            n => stream.write_all(&buf[..n])?,
        }
    }
}

fn serve_udp(socket: &UdpSocket, name: &str, peers: &Mutex<Peers>, stop: &AtomicBool) {
    let mut buf = vec![0; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                record(peers, |p| p.udp.push(canonical(peer)));
                let reply = [greeting(name, canonical(peer)).as_bytes(), &buf[..n]].concat();
                if let Err(e) = socket.send_to(&reply, peer) {
                    eprintln!("rproxy-tests: {name}: udp reply to {peer}: {e}");
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
            Err(e) => eprintln!("rproxy-tests: {name}: udp recv: {e}"),
        }
    }
}
