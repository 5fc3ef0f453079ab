//! Clients of the pod servers' protocol (see [`crate::server`]), and of the agent's HTTP ports
//! ([`http_get`]). These run in the calling thread's namespace; [`crate::Pod`] wraps them to
//! run inside a pod.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

/// Default timeout for connecting, each read and each write.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// A server's answer: the pod name it announced, and the bytes it echoed.
pub type Reply = (String, Vec<u8>);

/// Up to this many bytes, a request is written whole before its echo is read: the echo fits in
/// the two ends' socket buffers (Linux's defaults hold 16 KiB to send and 128 KiB to receive).
const WRITE_BEFORE_READ: usize = 16 * 1024;

/// Connects to `addr:port`, sends `payload`, shuts down the write side and reads the whole
/// answer. A payload larger than [`WRITE_BEFORE_READ`] is written on its own thread, so that it
/// cannot deadlock against the echo.
pub fn tcp_request(addr: impl Into<IpAddr>, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
    let to = SocketAddr::new(addr.into(), port);
    let run = || -> Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&to, timeout).context("connect")?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let mut answer = Vec::new();
        if payload.len() <= WRITE_BEFORE_READ {
            stream.write_all(payload).context("write")?;
            stream.shutdown(Shutdown::Write).context("shutdown(write)")?;
            stream.read_to_end(&mut answer).context("read")?;
            return Ok(answer);
        }
        let mut writer = stream.try_clone()?;
        thread::scope(|s| {
            let sent = s.spawn(move || -> Result<()> {
                writer.write_all(payload).context("write")?;
                writer.shutdown(Shutdown::Write).context("shutdown(write)")
            });
            let read = stream.read_to_end(&mut answer).context("read");
            sent.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            read
        })?;
        Ok(answer)
    };
    let answer = run().with_context(|| format!("TCP request to {to}"))?;
    split_reply(&answer).with_context(|| format!("TCP reply from {to}"))
}

/// Sends `payload` as one datagram to `addr:port` and waits for the reply, which must come from
/// `addr:port` (a reply from anywhere else means the reverse translation is missing).
pub fn udp_request(addr: impl Into<IpAddr>, port: u16, payload: &[u8], timeout: Duration) -> Result<Reply> {
    let addr = addr.into();
    let socket = UdpSocket::bind(unspecified(addr, 0)).context("UDP bind")?;
    udp_exchange(&socket, addr, port, payload, timeout)
}

/// The unspecified address of `addr`'s family, with `port`.
#[must_use]
pub fn unspecified(addr: IpAddr, port: u16) -> SocketAddr {
    match addr {
        IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
    }
}

/// [`udp_request`] over an existing `socket` (so from a fixed source port, one conntrack flow).
/// Datagrams already queued on the socket (late replies to earlier requests) are discarded
/// first, so the reply read belongs to this request.
pub fn udp_exchange(
    socket: &UdpSocket,
    addr: impl Into<IpAddr>,
    port: u16,
    payload: &[u8],
    timeout: Duration,
) -> Result<Reply> {
    let to = SocketAddr::new(addr.into(), port);
    let mut buf = vec![0; 65536];
    let run = |buf: &mut Vec<u8>| -> Result<usize> {
        socket.set_nonblocking(true)?;
        while socket.recv_from(buf).is_ok() {}
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(timeout))?;
        socket.send_to(payload, to).context("send")?;
        let (n, from) = socket.recv_from(buf).context("no reply")?;
        if from != to {
            bail!("reply came from {from}, not from {to} (reverse NAT missing?)");
        }
        Ok(n)
    };
    let n = run(&mut buf).with_context(|| format!("UDP request to {to}"))?;
    split_reply(&buf[..n]).with_context(|| format!("UDP reply from {to}"))
}

/// An open TCP connection to a pod server: the server's greeting has been read, and
/// [`TcpSession::echo`] sends data and checks it comes back.
#[derive(Debug)]
pub struct TcpSession {
    stream: TcpStream,
    server: String,
    /// The client's address and port as the server saw them (from its greeting).
    seen_as: Option<SocketAddr>,
}

impl TcpSession {
    /// Connects to `addr:port` (in the calling thread's namespace) and reads the greeting.
    pub fn connect(addr: impl Into<IpAddr>, port: u16, timeout: Duration) -> Result<Self> {
        Self::connect_from(None, addr, port, timeout)
    }

    /// [`TcpSession::connect`] from source port `local_port` (bound with `SO_REUSEADDR`, so a
    /// port whose earlier connection is in `TIME_WAIT` can connect elsewhere), or an ephemeral
    /// one.
    pub fn connect_from(
        local_port: Option<u16>,
        addr: impl Into<IpAddr>,
        port: u16,
        timeout: Duration,
    ) -> Result<Self> {
        let to = SocketAddr::new(addr.into(), port);
        let run = || -> Result<Self> {
            let stream = match local_port {
                None => TcpStream::connect_timeout(&to, timeout).context("connect")?,
                Some(local) => connect_bound(local, to, timeout)?,
            };
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            // Byte by byte: nothing after the greeting may be consumed here.
            let mut line = Vec::new();
            let mut byte = [0u8];
            while byte[0] != b'\n' {
                (&stream).read_exact(&mut byte).context("read the greeting")?;
                line.push(byte[0]);
            }
            let seen_as = greeting_peer(&line);
            let (server, _) = split_reply(&line)?;
            Ok(Self { stream, server, seen_as })
        };
        run().with_context(|| format!("TCP session to {to}"))
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// The connection's peer as the client's socket reports it (`getpeername`).
    pub fn peer_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.peer_addr()?)
    }

    /// The client's address and port as the server saw them.
    #[must_use]
    pub fn seen_as(&self) -> Option<SocketAddr> {
        self.seen_as
    }

    /// The pod name the server announced.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    /// Writes `msg` and reads the echo back; fails unless it is `msg`.
    pub fn echo(&mut self, msg: &[u8]) -> Result<()> {
        self.stream.write_all(msg).context("write on the open connection")?;
        let mut got = vec![0u8; msg.len()];
        self.stream.read_exact(&mut got).context("read the echo on the open connection")?;
        ensure!(got == msg, "echo {got:?} != {msg:?}");
        Ok(())
    }
}

/// A TCP connection to `to` from local port `local` (`SO_REUSEADDR`), giving up after `timeout`
/// (`SO_SNDTIMEO` bounds a blocking connect on Linux).
fn connect_bound(local: u16, to: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    use nix::sys::{
        socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, connect, setsockopt, socket, sockopt,
        },
        time::TimeVal,
    };
    let family = if to.is_ipv6() { AddressFamily::Inet6 } else { AddressFamily::Inet };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    setsockopt(&fd, sockopt::ReuseAddr, &true).context("SO_REUSEADDR")?;
    let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(micros / 1_000_000, micros % 1_000_000))
        .context("SO_SNDTIMEO")?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    match to {
        SocketAddr::V4(to) => {
            bind(raw, &SockaddrIn::new(0, 0, 0, 0, local)).with_context(|| format!("bind to port {local}"))?;
            connect(raw, &SockaddrIn::from(to)).context("connect")?;
        }
        SocketAddr::V6(to) => {
            let any = SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, local, 0, 0));
            bind(raw, &any).with_context(|| format!("bind to port {local}"))?;
            connect(raw, &SockaddrIn6::from(to)).context("connect")?;
        }
    }
    Ok(TcpStream::from(fd))
}

/// Splits `<name> <peer address> <peer port>\n<rest>` (see [`crate::server`]) into the name and
/// the rest.
fn split_reply(answer: &[u8]) -> Result<Reply> {
    let nl = answer
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| anyhow!("no server name line in {} bytes", answer.len()))?;
    let line = std::str::from_utf8(&answer[..nl]).context("server name is not UTF-8")?;
    let name = line.split(' ').next().unwrap_or_default();
    ensure!(!name.is_empty(), "empty server name");
    Ok((name.to_owned(), answer[nl + 1..].to_vec()))
}

/// The peer a server's greeting line names (see [`crate::server`]).
#[must_use]
pub fn greeting_peer(line: &[u8]) -> Option<SocketAddr> {
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.trim_end().split(' ').skip(1);
    let (addr, port) = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
    Some(SocketAddr::new(addr, port))
}

/// `GET path` on `addr:port` (HTTP/1.1, `Connection: close`), `timeout` for the connect and
/// each read: the status code and the body. For the agent's `/healthz`, `/metrics` and health
/// check node ports.
pub fn http_get(addr: impl Into<IpAddr>, port: u16, path: &str, timeout: Duration) -> Result<(u16, String)> {
    let to = SocketAddr::new(addr.into(), port);
    let mut s = TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connecting to {to}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text).with_context(|| format!("GET {path} from {to}"))?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no status line")?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The value of sample `name` (with its labels, as written) in a Prometheus metrics text.
#[must_use]
pub fn metric_sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.split(' ').next()?.parse().ok())
}
