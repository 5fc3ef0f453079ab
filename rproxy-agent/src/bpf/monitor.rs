//! `rproxy-agent monitor`: the datapath's drops and translations as they happen. It turns the
//! programs' switch on (`RPX_MONITOR`, `rproxy_common::monitor`), prints each event of the ring
//! buffer (`RPX_EVENTS`) with the frontend and backend it names (read from the live rev-NAT and
//! backend maps), and turns the switch off again when it stops (Ctrl-C, SIGTERM, `--count` or
//! `--duration`). While no monitor runs, the programs emit nothing.
use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd as _},
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData, RingBuf};
use rproxy_common::{Backend, In6, MonitorEvent, RevNat, Stat, WireAddr, map_names, monitor};
use serde::Serialize;

use super::{dump::pinned, gc::monotonic_ns};
use crate::{Error, Result};

/// What to show and for how long.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub drops_only: bool,
    pub json: bool,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// One event as `monitor` prints it (`-o json`: one object per line).
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct EventView {
    /// Wall-clock time of the event, RFC 3339.
    pub time: String,
    /// `drop` or `translation`.
    pub verdict: &'static str,
    /// The datapath counter that counted the packet (`no_backend`, `new_flow`, …).
    pub reason: &'static str,
    /// Where it was seen: `from-pod`, `to-pod`, `external-in`, `external-out`, or `connect`
    /// (the socket hooks: a connection sent to a backend, or refused; `src` unknown, zero).
    pub hook: &'static str,
    pub proto: &'static str,
    /// The packet as the hook let it go (after a translation) or as it came (a drop).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The frontend (`address:port`) of the flow, from its rev-NAT id; `None` if not known.
    pub service: Option<SocketAddr>,
    pub rev_nat_id: u16,
    /// The backend (`address:port`) of the flow; `None` if not known.
    pub backend: Option<SocketAddr>,
    pub backend_id: u32,
    /// The IP packet's length.
    pub length: u16,
}

/// How events name frontends and backends: the live maps' entries for an id.
pub trait Resolve {
    fn frontend(&self, family: u8, rev_nat_id: u16) -> Option<SocketAddr>;
    fn backend(&self, family: u8, backend_id: u32) -> Option<SocketAddr>;
}

/// `event`, seen at monotonic time `now_mono_ns` and wall time `now`, in human terms.
#[must_use]
pub fn view(event: &MonitorEvent, resolve: &impl Resolve, now_mono_ns: u64, now: jiff::Timestamp) -> EventView {
    let ago = Duration::from_nanos(now_mono_ns.saturating_sub(event.time_ns));
    let time = now.checked_sub(jiff::SignedDuration::try_from(ago).unwrap_or_default()).unwrap_or(now);
    let addr =
        |slot: In6| -> IpAddr { if event.family == 4 { IpAddr::V4(slot[0].ip()) } else { IpAddr::V6(slot.ip()) } };
    let reason = Stat::ALL.iter().find(|s| **s as u8 == event.reason).map_or("?", |s| s.name());
    EventView {
        time: time.to_string(),
        verdict: if event.kind == monitor::KIND_DROP { "drop" } else { "translation" },
        reason,
        hook: match event.hook {
            monitor::HOOK_FROM_POD => "from-pod",
            monitor::HOOK_TO_POD => "to-pod",
            monitor::HOOK_EXTERNAL_IN => "external-in",
            monitor::HOOK_EXTERNAL_OUT => "external-out",
            monitor::HOOK_CONNECT => "connect",
            _ => "?",
        },
        proto: match event.proto {
            rproxy_common::proto::TCP => "TCP",
            rproxy_common::proto::UDP => "UDP",
            _ => "?",
        },
        src: SocketAddr::new(addr(event.saddr), u16::from_be(event.sport)),
        dst: SocketAddr::new(addr(event.daddr), u16::from_be(event.dport)),
        service: (event.rev_nat_id != 0).then(|| resolve.frontend(event.family, event.rev_nat_id)).flatten(),
        rev_nat_id: event.rev_nat_id,
        backend: (event.backend_id != 0).then(|| resolve.backend(event.family, event.backend_id)).flatten(),
        backend_id: event.backend_id,
        length: event.ip_len,
    }
}

impl std::fmt::Display for EventView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A connect() has no packet yet: its source is not known.
        let src = if self.hook == "connect" { "(socket)".to_owned() } else { self.src.to_string() };
        write!(
            f,
            "{} {:<11} {:<14} {:<12} {} {src} -> {}",
            self.time, self.verdict, self.reason, self.hook, self.proto, self.dst
        )?;
        if let Some(s) = self.service {
            write!(f, " service {s}")?;
        } else if self.rev_nat_id != 0 {
            write!(f, " service #{}", self.rev_nat_id)?;
        }
        if let Some(b) = self.backend {
            write!(f, " backend {b}")?;
        } else if self.backend_id != 0 {
            write!(f, " backend #{}", self.backend_id)?;
        }
        write!(f, " len {}", self.length)
    }
}

/// The live rev-NAT and backend maps.
struct LiveMaps {
    rev_nat4: Array<MapData, RevNat<u32>>,
    rev_nat6: Array<MapData, RevNat<In6>>,
    backends4: Array<MapData, Backend<u32>>,
    backends6: Array<MapData, Backend<In6>>,
}

fn sock<A: WireAddr>(addr: A, port: u16) -> Option<SocketAddr> {
    (port != 0).then(|| SocketAddr::new(addr.ip().into(), u16::from_be(port)))
}

impl Resolve for LiveMaps {
    fn frontend(&self, family: u8, id: u16) -> Option<SocketAddr> {
        let id = u32::from(id);
        if family == 4 {
            self.rev_nat4.get(&id, 0).ok().and_then(|r| sock(r.addr, r.port))
        } else {
            self.rev_nat6.get(&id, 0).ok().and_then(|r| sock(r.addr, r.port))
        }
    }

    fn backend(&self, family: u8, id: u32) -> Option<SocketAddr> {
        if family == 4 {
            self.backends4.get(&id, 0).ok().and_then(|b| sock(b.addr, b.port))
        } else {
            self.backends6.get(&id, 0).ok().and_then(|b| sock(b.addr, b.port))
        }
    }
}

/// Set by SIGINT and SIGTERM: the monitor stops and turns the switch off.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// The switch, turned off when dropped (also on an error or a panic).
struct Switch(Array<MapData, u32>);

impl Drop for Switch {
    fn drop(&mut self) {
        if let Err(e) = self.0.set(0, 0, 0) {
            eprintln!("turning the monitor off ({}): {e}", map_names::MONITOR);
        }
    }
}

/// Streams the events of the agent pinned in `dir` to `out` until stopped.
pub fn run(dir: &Path, opts: Options, out: &mut impl Write) -> Result<()> {
    let maps = LiveMaps {
        rev_nat4: pinned(dir, map_names::REV_NAT4)?,
        rev_nat6: pinned(dir, map_names::REV_NAT6)?,
        backends4: pinned(dir, map_names::BACKENDS4)?,
        backends6: pinned(dir, map_names::BACKENDS6)?,
    };
    let mut ring: RingBuf<MapData> = pinned(dir, map_names::EVENTS)?;
    let mut switch = Switch(pinned(dir, map_names::MONITOR)?);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    // Events left from an earlier monitor are not this one's.
    while ring.next().is_some() {}
    let bits = if opts.drops_only { monitor::ON_DROPS } else { monitor::ON_DROPS | monitor::ON_TRANSLATIONS };
    switch.0.set(0, bits, 0).map_err(|source| Error::Map { name: map_names::MONITOR, source })?;
    let started = Instant::now();
    let mut seen = 0u64;
    let io = |source| Error::Io { what: "writing events".into(), source };
    loop {
        while let Some(item) = ring.next() {
            let Some(event) = parse(&item) else { continue };
            let v = view(&event, &maps, monotonic_ns(), jiff::Timestamp::now());
            if opts.json {
                serde_json::to_writer(&mut *out, &v).map_err(|e| io(e.into()))?;
                writeln!(out).map_err(io)?;
            } else {
                writeln!(out, "{v}").map_err(io)?;
            }
            seen += 1;
            if opts.count.is_some_and(|n| seen >= n) {
                return out.flush().map_err(io);
            }
        }
        out.flush().map_err(io)?;
        if STOP.load(Ordering::Relaxed) || opts.duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        wait_readable(&ring, Duration::from_millis(100));
    }
}

/// An event from a ring buffer record.
fn parse(bytes: &[u8]) -> Option<MonitorEvent> {
    (bytes.len() >= size_of::<MonitorEvent>())
        // SAFETY: a plain `repr(C)` struct of integers, read unaligned from enough bytes.
        .then(|| unsafe { bytes.as_ptr().cast::<MonitorEvent>().read_unaligned() })
}

/// Waits until the ring buffer (any file descriptor of one) has data, a signal arrives, or
/// `timeout` passes.
pub(crate) fn wait_readable(ring: &impl AsFd, timeout: Duration) {
    let mut fds = [libc::pollfd { fd: ring.as_fd().as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd; EINTR (a signal) just returns early.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    struct Fixed;

    impl Resolve for Fixed {
        fn frontend(&self, family: u8, id: u16) -> Option<SocketAddr> {
            (family == 4 && id == 3).then(|| "10.96.0.10:80".parse().unwrap())
        }
        fn backend(&self, family: u8, id: u32) -> Option<SocketAddr> {
            (family == 6 && id == 7).then(|| "[fd00:244:1::11]:8080".parse().unwrap())
        }
    }

    #[test]
    fn a_drop_reads_as_the_packet_it_was_with_its_frontend() {
        let e = MonitorEvent {
            time_ns: 9_000_000_000,
            saddr: [u32::from(Ipv4Addr::new(10, 244, 1, 100)).to_be(), 0, 0, 0],
            daddr: [u32::from(Ipv4Addr::new(10, 96, 0, 10)).to_be(), 0, 0, 0],
            sport: 41_234u16.to_be(),
            dport: 80u16.to_be(),
            rev_nat_id: 3,
            ip_len: 60,
            kind: monitor::KIND_DROP,
            reason: Stat::NoBackend as u8,
            family: 4,
            proto: rproxy_common::proto::TCP,
            hook: monitor::HOOK_FROM_POD,
            ..MonitorEvent::default()
        };
        let now = jiff::Timestamp::from_second(1_800_000_000).unwrap();
        let v = view(&e, &Fixed, 10_000_000_000, now);
        assert_eq!(v.time, now.checked_sub(jiff::SignedDuration::from_secs(1)).unwrap().to_string());
        assert_eq!((v.verdict, v.reason, v.hook, v.proto), ("drop", "no_backend", "from-pod", "TCP"));
        assert_eq!(v.src, "10.244.1.100:41234".parse().unwrap());
        assert_eq!(v.dst, "10.96.0.10:80".parse().unwrap());
        assert_eq!(v.service, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!(v.backend, None);
        let line = v.to_string();
        assert!(
            line.contains("drop")
                && line.contains("no_backend")
                && line.contains("10.244.1.100:41234 -> 10.96.0.10:80"),
            "{line}"
        );
        assert!(line.contains("service 10.96.0.10:80") && line.ends_with("len 60"), "{line}");
    }

    #[test]
    fn a_connect_names_its_backend_and_no_source() {
        let e = MonitorEvent {
            daddr: In6::wire("fd00:244:1::11".parse().unwrap()),
            dport: 8080u16.to_be(),
            rev_nat_id: 3,
            backend_id: 7,
            kind: monitor::KIND_TRANSLATION,
            reason: Stat::NewFlow as u8,
            family: 6,
            proto: rproxy_common::proto::TCP,
            hook: monitor::HOOK_CONNECT,
            ..MonitorEvent::default()
        };
        let v = view(&e, &Fixed, 0, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!((v.verdict, v.reason, v.hook, v.proto), ("translation", "new_flow", "connect", "TCP"));
        assert_eq!(v.backend, Some("[fd00:244:1::11]:8080".parse().unwrap()));
        let line = v.to_string();
        assert!(line.contains("connect      TCP (socket) -> [fd00:244:1::11]:8080"), "{line}");
    }

    #[test]
    fn a_translation_names_its_backend_and_unknown_ids_by_number() {
        let backend: Ipv6Addr = "fd00:244:1::11".parse().unwrap();
        let e = MonitorEvent {
            saddr: In6::wire("fd00:244:1::100".parse().unwrap()),
            daddr: In6::wire(backend),
            sport: 5000u16.to_be(),
            dport: 8080u16.to_be(),
            rev_nat_id: 9,
            backend_id: 7,
            kind: monitor::KIND_TRANSLATION,
            reason: Stat::NewFlow as u8,
            family: 6,
            proto: rproxy_common::proto::UDP,
            hook: monitor::HOOK_FROM_POD,
            ..MonitorEvent::default()
        };
        let v = view(&e, &Fixed, 0, jiff::Timestamp::UNIX_EPOCH);
        assert_eq!((v.verdict, v.reason, v.proto), ("translation", "new_flow", "UDP"));
        assert_eq!(v.dst, SocketAddr::new(backend.into(), 8080));
        assert_eq!(v.backend, Some(SocketAddr::new(backend.into(), 8080)));
        assert_eq!(v.service, None);
        let line = v.to_string();
        assert!(line.contains("service #9") && line.contains("backend [fd00:244:1::11]:8080"), "{line}");
        let json = serde_json::to_value(&v).unwrap();
        for field in ["time", "verdict", "reason", "hook", "proto", "src", "dst", "service", "backend"] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
    }
}
