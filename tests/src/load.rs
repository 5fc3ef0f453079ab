//! Load generation for the `NodePort` benchmark: backend servers that count ([`LoadServer`]), a
//! TCP connection-rate client ([`tcp_connection_rate`]), and the kernel counters that count UDP
//! datagrams arriving in a backend ([`udp_counters`]); the UDP load itself comes from
//! [`crate::pktgen`]. Every loop is bounded in time; every socket operation has a timeout.
//!
//! Protocol — TCP: the client connects and sends one line; the server answers `<pod name>\n`
//! and closes (so the server, not the client, holds `TIME_WAIT` and the client's ports stay
//! free). UDP: datagrams are counted, never answered; reading can be paused
//! ([`LoadServer::pause_udp`]) so that no receiver competes with the datapath for the CPUs.
use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use nix::{
    poll::{PollFd, PollFlags, poll},
    sys::socket::{setsockopt, sockopt},
};

use crate::{
    netns::in_netns,
    server::{self, STOP_POLL},
};

/// How often a paused UDP counter looks at its flags.
const PAUSE_POLL: Duration = Duration::from_millis(10);
/// Timeout of each read and write on an accepted connection.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(1);
/// The TCP request line.
pub const REQUEST: &[u8] = b"rproxy-bench\n";
/// Receive buffer asked for the UDP counters (the kernel caps it at `net.core.rmem_max`).
const UDP_RCVBUF: usize = 4 << 20;

/// A TCP responder and a UDP counter on one port in a pod; stopped (threads joined) on drop.
#[derive(Debug)]
pub struct LoadServer {
    tcp: Arc<AtomicU64>,
    udp: Arc<AtomicU64>,
    udp_paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LoadServer {
    /// Binds `0.0.0.0:port` (TCP and UDP) in namespace `ns` and serves as `name`.
    pub fn start(ns: &str, name: &str, port: u16) -> Result<Self> {
        let (tcp, udp) = server::bind_tcp_udp(ns, port)?;
        // Best effort: a smaller buffer only shows up as more socket-buffer drops.
        let _ = setsockopt(&udp, sockopt::RcvBuf, &UDP_RCVBUF);
        let (tcp_count, udp_count) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (udp_paused, stop): (Arc<AtomicBool>, Arc<AtomicBool>) = (Arc::default(), Arc::default());
        let tcp_loop = {
            let (reply, count, stop) = (format!("{name}\n"), Arc::clone(&tcp_count), Arc::clone(&stop));
            move || respond_tcp(&tcp, reply.as_bytes(), &count, &stop)
        };
        let udp_loop = {
            let (count, paused, stop) = (Arc::clone(&udp_count), Arc::clone(&udp_paused), Arc::clone(&stop));
            move || count_udp(&udp, &count, &paused, &stop)
        };
        Ok(Self {
            tcp: tcp_count,
            udp: udp_count,
            udp_paused,
            stop,
            threads: vec![thread::spawn(tcp_loop), thread::spawn(udp_loop)],
        })
    }

    /// TCP requests answered so far.
    #[must_use]
    pub fn tcp_answered(&self) -> u64 {
        self.tcp.load(Ordering::Relaxed)
    }

    /// UDP datagrams received so far.
    #[must_use]
    pub fn udp_received(&self) -> u64 {
        self.udp.load(Ordering::Relaxed)
    }

    /// Stops (`true`) or resumes reading UDP datagrams. While paused, datagrams queue in the
    /// socket and, once its buffer is full, are dropped (and counted) by the kernel.
    pub fn pause_udp(&self, paused: bool) {
        self.udp_paused.store(paused, Ordering::Relaxed);
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn respond_tcp(listener: &TcpListener, reply: &[u8], count: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, u16::try_from(STOP_POLL.as_millis()).unwrap_or(u16::MAX)).is_err() {
            continue;
        }
        // Drain the accept queue; each connection is served inline (one short line each way).
        while let Ok((stream, _)) = listener.accept() {
            if answer(stream, reply).is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn answer(mut stream: TcpStream, reply: &[u8]) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(SERVER_IO_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IO_TIMEOUT))?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        match stream.read(&mut buf[got..])? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
        if got == buf.len() {
            return Err(io::ErrorKind::InvalidData.into());
        }
    }
    stream.write_all(reply)
}

fn count_udp(socket: &UdpSocket, count: &AtomicU64, paused: &AtomicBool, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if paused.load(Ordering::Relaxed) {
            thread::sleep(PAUSE_POLL);
        } else if socket.recv(&mut buf).is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Outcome of [`tcp_connection_rate`].
#[derive(Clone, Debug, Default)]
pub struct TcpRate {
    /// Connections that got a server name back.
    pub ok: u64,
    /// Connections that failed (connect, read, write, or an answer without a name).
    pub failed: u64,
    /// From the start of the workers to the end of the last one.
    pub elapsed: Duration,
    /// Successful connections per server name.
    pub by_server: BTreeMap<String, u64>,
    /// The first failure, for the report.
    pub first_error: Option<String>,
}

impl TcpRate {
    /// Successful connections per second.
    #[must_use]
    pub fn per_second(&self) -> f64 {
        rate(self.ok, self.elapsed)
    }
}

/// `count / elapsed` (0 for no time).
#[must_use]
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    // Counts stay far below 2^52, so the conversion is exact.
    #[expect(clippy::cast_precision_loss, reason = "counts are far below 2^52")]
    let count = count as f64;
    if secs > 0.0 { count / secs } else { 0.0 }
}

/// From namespace `ns`, `workers` threads each connect, send [`REQUEST`], read the answer to
/// EOF and close, over and over, until `duration` has passed. Worker `w`'s `k`-th connection goes
/// to `targets[(w + k) % len]`. Every connect, read and write times out after `timeout`.
pub fn tcp_connection_rate(
    ns: &str,
    targets: &[SocketAddrV4],
    workers: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<TcpRate> {
    ensure!(!targets.is_empty() && workers > 0, "no targets or no workers");
    let results: Vec<Result<(TcpRate, Instant, Instant)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                s.spawn(move || {
                    in_netns(ns, || {
                        let start = Instant::now();
                        let mut r = TcpRate::default();
                        let mut k = w;
                        while start.elapsed() < duration {
                            let target = targets[k % targets.len()];
                            k += 1;
                            match tcp_exchange(target, timeout) {
                                Ok(name) => {
                                    r.ok += 1;
                                    *r.by_server.entry(name).or_default() += 1;
                                }
                                Err(e) => {
                                    r.failed += 1;
                                    r.first_error.get_or_insert_with(|| format!("{target}: {e:#}"));
                                }
                            }
                        }
                        (r, start, Instant::now())
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut total = TcpRate::default();
    let (mut first, mut last) = (None::<Instant>, None::<Instant>);
    for result in results {
        let (r, start, end) = result?;
        total.ok += r.ok;
        total.failed += r.failed;
        for (name, n) in r.by_server {
            *total.by_server.entry(name).or_default() += n;
        }
        total.first_error = total.first_error.or(r.first_error);
        first = Some(first.map_or(start, |f| f.min(start)));
        last = Some(last.map_or(end, |l| l.max(end)));
    }
    total.elapsed = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
    Ok(total)
}

/// One connection: connect, send [`REQUEST`], read to EOF; returns the announced name.
pub fn tcp_exchange(target: SocketAddrV4, timeout: Duration) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&SocketAddr::V4(target), timeout).context("connect")?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(REQUEST).context("write")?;
    let mut answer = Vec::with_capacity(64);
    stream.read_to_end(&mut answer).context("read")?;
    let line = answer.strip_suffix(b"\n").context("no newline-terminated answer")?;
    ensure!(!line.is_empty() && !line.contains(&b'\n'), "answer {answer:?} is not one name");
    String::from_utf8(line.to_vec()).context("name is not UTF-8")
}

/// A backend namespace's UDP statistics (`/proc/net/snmp`), as far as the `NodePort` benchmark
/// counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpCounters {
    /// Datagrams that reached a socket: read (`InDatagrams`, counted when the application reads
    /// them) or dropped at its full receive buffer (`RcvbufErrors`, `MemErrors`).
    pub delivered: u64,
    /// The part of `delivered` dropped at a full receive buffer.
    pub socket_drops: u64,
    /// Datagrams that reached the namespace's UDP layer but no socket: no socket on the port
    /// (`NoPorts`) or a bad checksum (`InCsumErrors`).
    pub refused: u64,
}

impl UdpCounters {
    /// From `/proc/net/snmp` text.
    #[must_use]
    pub fn parse(snmp: &str) -> Option<Self> {
        let field = |name| snmp_field(snmp, "Udp", name);
        let (rcvbuf, mem) = (field("RcvbufErrors")?, field("MemErrors")?);
        Some(Self {
            delivered: field("InDatagrams")? + rcvbuf + mem,
            socket_drops: rcvbuf + mem,
            refused: field("NoPorts")? + field("InCsumErrors")?,
        })
    }

    /// The counts since `before`.
    #[must_use]
    pub fn since(self, before: Self) -> Self {
        Self {
            delivered: self.delivered.saturating_sub(before.delivered),
            socket_drops: self.socket_drops.saturating_sub(before.socket_drops),
            refused: self.refused.saturating_sub(before.refused),
        }
    }
}

/// Namespace `ns`'s [`UdpCounters`].
pub fn udp_counters(ns: &str) -> Result<UdpCounters> {
    let text = proc_net(ns, "snmp")?;
    UdpCounters::parse(&text).with_context(|| format!("no Udp counters in /proc/net/snmp of {ns}"))
}

/// The machine's CPU time so far, from the `cpu` line of `/proc/stat` (clock ticks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuTicks {
    /// user, nice, system, idle, iowait, irq, softirq and steal (guest time is in user).
    pub total: u64,
    /// Time the hypervisor ran something else while this machine had work (steal).
    pub steal: u64,
}

impl CpuTicks {
    /// From `/proc/stat` text.
    #[must_use]
    pub fn parse(stat: &str) -> Option<Self> {
        let line = stat.lines().find(|l| l.split_whitespace().next() == Some("cpu"))?;
        let fields: Vec<u64> =
            line.split_whitespace().skip(1).take(8).map(str::parse).collect::<Result<_, _>>().ok()?;
        (fields.len() == 8).then(|| Self { total: fields.iter().sum(), steal: fields[7] })
    }

    /// Now.
    pub fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&text).context("no cpu line in /proc/stat")
    }

    /// The share of the CPU time since `before` that was stolen, in percent (0 for none).
    #[must_use]
    pub fn steal_percent_since(self, before: Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        let steal = self.steal.saturating_sub(before.steal);
        // Tick counts stay far below 2^52.
        #[expect(clippy::cast_precision_loss, reason = "tick counts are far below 2^52")]
        let percent = if total == 0 { 0.0 } else { steal as f64 * 100.0 / total as f64 };
        percent
    }
}

/// `TCPSynRetrans` of namespace `ns`'s TCP statistics: SYNs sent again because the first got no
/// answer (a lost SYN, or one a backend's `TIME_WAIT` socket refused).
pub fn tcp_syn_retransmits(ns: &str) -> Result<u64> {
    net_counter(ns, "netstat", "TcpExt", "TCPSynRetrans")
}

/// Counter `field` of `proto` in `/proc/net/<file>` (`snmp` or `netstat`) of namespace `ns`.
fn net_counter(ns: &str, file: &str, proto: &str, field: &str) -> Result<u64> {
    let text = proc_net(ns, file)?;
    snmp_field(&text, proto, field).with_context(|| format!("no {proto} {field} in /proc/net/{file} of {ns}"))
}

/// `/proc/net/<file>` of namespace `ns`.
fn proc_net(ns: &str, file: &str) -> Result<String> {
    // /proc/thread-self/net is the calling thread's namespace (/proc/self/net the process's).
    let path = format!("/proc/thread-self/net/{file}");
    in_netns(ns, || std::fs::read_to_string(&path))?.with_context(|| format!("reading {path} in {ns}"))
}

/// Field `field` of protocol `proto` in `/proc/net/snmp` or `/proc/net/netstat` text (a line of
/// names, then a line of values, both starting with `<proto>:`).
#[must_use]
pub fn snmp_field(text: &str, proto: &str, field: &str) -> Option<u64> {
    let tag = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&tag));
    let (names, values) = (lines.next()?, lines.next()?);
    let index = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_field_reads_the_value_under_its_name() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nUdp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\n\
                    Udp: 167 0 5 170 4\nUdpLite: InDatagrams RcvbufErrors\nUdpLite: 9 9\n";
        assert_eq!(snmp_field(text, "Udp", "RcvbufErrors"), Some(4));
        assert_eq!(snmp_field(text, "Udp", "InDatagrams"), Some(167));
        assert_eq!(snmp_field(text, "UdpLite", "RcvbufErrors"), Some(9));
        assert_eq!(snmp_field(text, "Udp", "Nope"), None);
        assert_eq!(snmp_field(text, "Tcp", "InErrs"), None);
        let netstat = "TcpExt: SyncookiesSent TCPSynRetrans\nTcpExt: 0 37\nIpExt: InNoRoutes\nIpExt: 1\n";
        assert_eq!(snmp_field(netstat, "TcpExt", "TCPSynRetrans"), Some(37));
    }

    #[test]
    fn udp_counters_count_what_reached_a_socket() {
        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti \
                    MemErrors\nUdp: 100 3 12 0 10 0 2 0 1\n";
        let now = UdpCounters::parse(snmp).unwrap();
        assert_eq!(now, UdpCounters { delivered: 111, socket_drops: 11, refused: 5 });
        let before = UdpCounters { delivered: 11, socket_drops: 1, refused: 5 };
        assert_eq!(now.since(before), UdpCounters { delivered: 100, socket_drops: 10, refused: 0 });
        assert_eq!(UdpCounters::parse("Udp: InDatagrams\nUdp: 1\n"), None);
    }

    #[test]
    fn cpu_ticks_count_steal_against_the_total() {
        let before = CpuTicks::parse("cpu  100 0 50 800 10 0 20 20 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n").unwrap();
        assert_eq!(before, CpuTicks { total: 1000, steal: 20 });
        let after = CpuTicks { total: 1200, steal: 70 };
        assert!((after.steal_percent_since(before) - 25.0).abs() < 1e-9);
        assert!(before.steal_percent_since(before) == 0.0);
        assert_eq!(CpuTicks::parse("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn rate_is_count_per_second() {
        assert!((rate(300, Duration::from_millis(1500)) - 200.0).abs() < 1e-9);
        assert!(rate(5, Duration::ZERO) == 0.0);
    }
}
