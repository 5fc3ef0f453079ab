//! A UDP packet generator that outruns the datapaths it measures: `BPF_PROG_TEST_RUN` in
//! live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`, Linux ≥ 5.18).
//!
//! The kernel runs an `XDP_PASS` program ([`PassProgram`]) on a frame the caller built, with an
//! `xdp_md` whose `ingress_ifindex` names a device of the calling thread's namespace, and hands
//! the frame to the stack as if that device had received it: `netif_receive_skb` on the device,
//! no socket, no `sendmsg`, no qdisc, no veth hop on the sender's side. In the two-node lab the
//! device is the client's bridge port (`<prefix>sc` in the switch namespace), so each frame enters
//! the bridge exactly as one the client sent, and the bridge forwards it to node 1.
//!
//! **One batch per call.** The kernel copies the frame into a page of a page pool created for
//! the call, once per page, when the pool first hands the page out. A frame passed up the stack
//! is an skb on that page, marked for page-pool recycling, and everything after the switch
//! rewrites it in place: node 1's IP forwarding decrements the TTL and writes the next hop's
//! Ethernet header, NAT rewrites addresses and checksums. Freed, the page goes back to the same
//! pool, and a later frame of the same call would be built on it unchanged — a frame to a pod's
//! MAC with a decremented TTL, which the bridge floods and the nodes drop. So each call injects
//! one batch (`repeat` = batch size ≤ [`MAX_BATCH`]): the pool dies with the call, and a page
//! freed later is never handed out again. The price is one page-pool setup per batch, which
//! [`LiveFrames::run`]'s caller can measure against a sink (frames the bridge drops at once).
//!
//! **The program must be attached to some device's XDP hook** (the lab's are in driver mode). A
//! live-frames run puts its program in the kernel's XDP dispatcher for the call and takes it out
//! again, unless an attachment already holds it there; each change of the dispatcher waits for an
//! RCU grace period (`bpf_dispatcher_change_prog` → `synchronize_rcu`), measured here at about
//! 25 ms per call, which then dominates the run.
//!
//! Every loop is bounded in time or in count; the generator counts the frames the kernel took
//! (offered load), not what arrives: receivers count that with kernel counters.
use std::{
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use aya::{TestRun as _, TestRunAttrs, TestRunOptions, programs::Xdp};
use etherparse::PacketBuilder;
use nix::{
    net::if_::if_nametoindex,
    sched::{CpuSet, sched_getaffinity, sched_setaffinity},
    time::{ClockId, clock_gettime},
    unistd::Pid,
};

use crate::netns::in_netns;
#[cfg(doc)]
use crate::xdp::PassProgram;

/// The largest batch the kernel takes in live-frames mode (`TEST_XDP_MAX_BATCH`).
pub const MAX_BATCH: u32 = 256;
/// TTL of the generated packets.
const TTL: u8 = 64;
/// Size of `struct xdp_md`: `data`, `data_end`, `data_meta`, `ingress_ifindex`,
/// `rx_queue_index`, `egress_ifindex`, each a `u32`.
const XDP_MD_LEN: usize = 24;

/// The addresses of a generated UDP datagram: one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpFlow {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// A complete Ethernet II / IPv4 / UDP frame of `flow` with `payload_len` payload bytes (0x5a),
/// TTL 64, and correct IPv4 and UDP checksums.
pub fn udp_frame(flow: &UdpFlow, payload_len: usize) -> Result<Vec<u8>> {
    let builder = PacketBuilder::ethernet2(flow.src_mac, flow.dst_mac)
        .ipv4(flow.src.ip().octets(), flow.dst.ip().octets(), TTL)
        .udp(flow.src.port(), flow.dst.port());
    let payload = vec![0x5a_u8; payload_len];
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut frame, &payload).context("building a UDP frame")?;
    Ok(frame)
}

/// `struct xdp_md` for a `len`-byte frame received on device `ifindex`, queue 0, without
/// metadata: what `BPF_PROG_TEST_RUN` takes as `ctx_in` (`data` 0, `data_end` = `len`).
pub fn xdp_md(ifindex: u32, len: usize) -> Result<[u8; XDP_MD_LEN]> {
    let len = u32::try_from(len).context("frame too long")?;
    let fields = [0, len, 0, ifindex, 0, 0];
    let mut md = [0u8; XDP_MD_LEN];
    for (chunk, field) in md.chunks_exact_mut(4).zip(fields) {
        chunk.copy_from_slice(&field.to_ne_bytes());
    }
    Ok(md)
}

/// What [`LiveFrames::run`] injected.
#[derive(Clone, Copy, Debug, Default)]
pub struct Injected {
    /// Frames the kernel took and passed to the stack.
    pub frames: u64,
    /// `BPF_PROG_TEST_RUN` calls (one batch each).
    pub calls: u64,
    /// From the start of the first thread to the end of the last.
    pub elapsed: Duration,
    /// Generator threads (one per CPU).
    pub threads: usize,
    /// CPU time the run took: the generator threads' own (the softirqs their frames raise run in
    /// their context when they re-enable bottom halves: the whole path through switch, nodes and
    /// pods) plus the `ksoftirqd` threads' (softirq work deferred) over the run. Time the
    /// hypervisor stole and time other processes ran are not in it.
    pub cpu: Duration,
}

/// Injects frames into namespace `ns` as if device `ifname` had received them (see the module
/// doc).
#[derive(Debug)]
pub struct LiveFrames<'p> {
    program: &'p Xdp,
    ns: String,
    ifname: String,
    frames: Vec<Vec<u8>>,
    batch: u32,
}

impl<'p> LiveFrames<'p> {
    /// A generator of `frames` (each a complete Ethernet frame: one flow) with `batch` frames per
    /// call (1..=[`MAX_BATCH`]); `program` must return `XDP_PASS`.
    pub fn new(program: &'p Xdp, ns: &str, ifname: &str, frames: Vec<Vec<u8>>, batch: u32) -> Result<Self> {
        ensure!(!frames.is_empty(), "no frames");
        ensure!((1..=MAX_BATCH).contains(&batch), "batch {batch} is not in 1..={MAX_BATCH}");
        ensure!(frames.iter().all(|f| (14..=1514).contains(&f.len())), "a frame is not 14..=1514 bytes");
        Ok(Self { program, ns: ns.to_owned(), ifname: ifname.to_owned(), frames, batch })
    }

    /// Injects `count` copies of frame `index`, from one thread, in calls of at most a batch.
    /// Returns when the kernel has taken them all.
    pub fn send(&self, index: usize, count: u64) -> Result<()> {
        let frame = self.frames.get(index).context("no such frame")?;
        in_netns(&self.ns, || {
            let ctx = xdp_md(self.ifindex()?, frame.len())?;
            let mut left = count;
            while left > 0 {
                let n = u32::try_from(left.min(u64::from(self.batch))).unwrap_or(self.batch);
                self.inject(frame, &ctx, n)?;
                left -= u64::from(n);
            }
            Ok(())
        })?
    }

    /// One thread per CPU this process may run on, each pinned to its CPU, injects a batch of
    /// each frame in turn (threads start at different frames) until `duration` has passed.
    pub fn run(&self, duration: Duration) -> Result<Injected> {
        let cpus = allowed_cpus()?;
        let threads = cpus.len();
        let softirq_before = softirq_daemons_cpu()?;
        let results: Vec<Result<Pumped>> = thread::scope(|s| {
            let handles: Vec<_> = cpus
                .iter()
                .enumerate()
                .map(|(t, &cpu)| {
                    let first = t * self.frames.len() / threads;
                    s.spawn(move || in_netns(&self.ns, || self.pump(cpu, first, duration))?)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let softirq = softirq_daemons_cpu()?.saturating_sub(softirq_before);
        let mut total = Injected { threads, cpu: softirq, ..Injected::default() };
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        for result in results {
            let pumped = result?;
            total.frames += pumped.frames;
            total.calls += pumped.calls;
            total.cpu += pumped.cpu;
            first = Some(first.map_or(pumped.start, |f| f.min(pumped.start)));
            last = Some(last.map_or(pumped.end, |l| l.max(pumped.end)));
        }
        total.elapsed = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
        Ok(total)
    }

    /// One generator thread (already in the namespace): pinned to `cpu`, a batch of each frame
    /// in turn from frame `first` on, for `duration`.
    fn pump(&self, cpu: usize, first: usize, duration: Duration) -> Result<Pumped> {
        let mut set = CpuSet::new();
        set.set(cpu)?;
        sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("pinning a generator to CPU {cpu}"))?;
        let ifindex = self.ifindex()?;
        let ctxs = self.frames.iter().map(|f| xdp_md(ifindex, f.len())).collect::<Result<Vec<_>>>()?;
        let (mut frames, mut calls) = (0u64, 0u64);
        let mut k = first;
        let cpu_start = thread_cpu_time()?;
        let start = Instant::now();
        while start.elapsed() < duration {
            let i = k % self.frames.len();
            self.inject(&self.frames[i], &ctxs[i], self.batch)?;
            frames += u64::from(self.batch);
            calls += 1;
            k += 1;
        }
        let end = Instant::now();
        let cpu = thread_cpu_time()?.saturating_sub(cpu_start);
        Ok(Pumped { frames, calls, start, end, cpu })
    }

    /// The device's index in the calling thread's namespace.
    fn ifindex(&self) -> Result<u32> {
        if_nametoindex(self.ifname.as_str()).with_context(|| format!("no device {} in netns {}", self.ifname, self.ns))
    }

    /// One call: `n` (≤ batch) copies of `frame`, one batch.
    fn inject(&self, frame: &[u8], ctx: &[u8], n: u32) -> Result<()> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(ctx),
            repeat: n,
            attrs: TestRunAttrs::new().xdp_live_frames(n),
            ..TestRunOptions::new()
        };
        self.program.test_run(opts).context("BPF_PROG_TEST_RUN (XDP live frames)")?;
        Ok(())
    }
}

/// What one generator thread did.
struct Pumped {
    frames: u64,
    calls: u64,
    start: Instant,
    end: Instant,
    /// The thread's CPU time over the run.
    cpu: Duration,
}

/// The calling thread's CPU time (with the softirqs run in its context; without steal time).
fn thread_cpu_time() -> Result<Duration> {
    Ok(clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).context("clock_gettime")?.into())
}

/// CPU time of every `ksoftirqd/<cpu>` thread so far (the first field of its
/// `/proc/<pid>/schedstat`).
fn softirq_daemons_cpu() -> Result<Duration> {
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").context("reading /proc")? {
        let path = entry?.path();
        let is_pid = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        // A thread may exit between the listing and the reads: skip what cannot be read.
        if !is_pid || !std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.starts_with("ksoftirqd/")) {
            continue;
        }
        if let Some(ns) = std::fs::read_to_string(path.join("schedstat")).ok().as_deref().and_then(schedstat_runtime) {
            total += ns;
        }
    }
    Ok(Duration::from_nanos(total))
}

/// The run time in nanoseconds in `/proc/<pid>/schedstat` text (its first field).
fn schedstat_runtime(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    let cpus: Vec<usize> = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
    ensure!(!cpus.is_empty(), "no CPU to run on");
    Ok(cpus)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use etherparse::{NetSlice, SlicedPacket, TransportSlice};

    use super::*;

    fn flow() -> UdpFlow {
        UdpFlow {
            src_mac: [2, 0, 0, 0, 0, 0x64],
            dst_mac: [2, 0, 0, 0, 0, 1],
            src: SocketAddrV4::new(Ipv4Addr::new(172, 31, 0, 100), 10_007),
            dst: SocketAddrV4::new(Ipv4Addr::new(172, 31, 0, 1), 30_080),
        }
    }

    #[test]
    fn udp_frame_is_a_complete_datagram_with_valid_checksums() {
        let frame = udp_frame(&flow(), 18).unwrap();
        assert_eq!(frame.len(), 14 + 20 + 8 + 18);
        assert_eq!(frame[..6], [2, 0, 0, 0, 0, 1], "destination MAC");
        assert_eq!(frame[6..12], [2, 0, 0, 0, 0, 0x64], "source MAC");
        let packet = SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(NetSlice::Ipv4(ip)) = packet.net else { panic!("not IPv4: {:?}", packet.net) };
        let header = ip.header().to_header();
        assert_eq!(header.source, [172, 31, 0, 100]);
        assert_eq!(header.destination, [172, 31, 0, 1]);
        assert_eq!(header.time_to_live, 64);
        assert_eq!(header.header_checksum, header.calc_header_checksum(), "IPv4 checksum");
        let Some(TransportSlice::Udp(udp)) = packet.transport else { panic!("not UDP") };
        assert_eq!((udp.source_port(), udp.destination_port()), (10_007, 30_080));
        assert_eq!(udp.payload(), &[0x5a; 18]);
        let expected = udp.to_header().calc_checksum_ipv4(&header, udp.payload()).unwrap();
        assert_ne!(udp.checksum(), 0, "UDP checksum present");
        assert_eq!(udp.checksum(), expected, "UDP checksum");
    }

    #[test]
    fn schedstat_runtime_is_the_first_field() {
        assert_eq!(schedstat_runtime("55796151304 161510274416 194829\n"), Some(55_796_151_304));
        assert_eq!(schedstat_runtime(""), None);
    }

    #[test]
    fn xdp_md_names_the_device_and_the_frame_length() {
        let md = xdp_md(7, 60).unwrap();
        let field = |i: usize| u32::from_ne_bytes(md[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!([field(0), field(1), field(2), field(3), field(4), field(5)], [0, 60, 0, 7, 0, 0]);
    }
}
