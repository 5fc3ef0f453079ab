//! The development build of the datapath (`RPROXY_EBPF_FEATURES=log`): its programs load, and
//! their aya-log records of new flows and drops reach the agent's log.
use std::{
    net::IpAddr,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use rproxy_agent::{
    bpf::datapath::Datapath,
    model::{Backend, BackendAddr, BackendState, Desired, Frontend, ObjectRef, Protocol, ServiceEntry},
    node::snat::PortRange,
    writer::Writer,
};
use rproxy_common::{SVC_F_CLUSTER_IP, prog_names};

use crate::common::{Fam, SERIAL, SYN, harness, tcp, test_run};

/// The log records seen, as text.
static SEEN: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        SEEN.lock().unwrap_or_else(PoisonError::into_inner).push(record.args().to_string());
    }
    fn flush(&self) {}
}

/// The eBPF crate built with `--features log` (as the agent's build script builds it), into a
/// target directory of its own.
fn log_object() -> Vec<u8> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = root.join("target/bpf-log");
    let status = std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(root.join("rproxy-ebpf"))
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--features", "log", "--target-dir"])
        .arg(&target)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf")
        .env_remove("RUSTFLAGS")
        .status()
        .expect("running cargo");
    assert!(status.success(), "building the eBPF crate with --features log: {status}");
    std::fs::read(target.join("bpfel-unknown-none/release/rproxy")).expect("the object")
}

#[test]
fn the_development_build_loads_and_logs_new_flows_and_drops() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    // Root and the kernel, as the other packet tests.
    if harness().is_none() {
        return;
    }
    let _ = log::set_logger(&Capture);
    log::set_max_level(log::LevelFilter::Debug);
    let mut dp = Datapath::load_object(&log_object(), None).expect("every program of the log build loads");
    // As the agent does before attaching anything.
    dp.set_snat_ports(PortRange::DEFAULT).expect("SNAT port range");
    let mut maps = dp.take_maps().expect("maps");
    let fam = Fam::V4;
    let (vip, empty, backend, client) = (fam.svc(10), fam.svc(11), fam.pod(11), fam.pod(100));
    let entry = |slots: Vec<Backend>| ServiceEntry {
        service: ObjectRef { namespace: "default".into(), name: "demo".into() },
        port_name: String::new(),
        flags: SVC_F_CLUSTER_IP,
        affinity_timeout: 0,
        slots,
        local_slots: Vec::new(),
        draining: Vec::new(),
        source_ranges: Vec::new(),
    };
    let one = Backend {
        addr: BackendAddr { addr: backend, port: 8080, proto: Protocol::Tcp },
        state: BackendState::Active,
        local: true,
    };
    let desired = Desired {
        services: [
            (Frontend { addr: vip, port: 80, proto: Protocol::Tcp }, entry(vec![one])),
            (Frontend { addr: empty, port: 80, proto: Protocol::Tcp }, entry(vec![])),
        ]
        .into_iter()
        .collect(),
        ..Desired::default()
    };
    let report = Writer::new().sync(&desired, &mut maps);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let run = |dp: &mut Datapath, dst: IpAddr| {
        let frame = tcp((client, 40_000), (dst, 80), SYN, b"");
        test_run(dp.program(prog_names::FROM_POD).expect("program"), prog_names::FROM_POD, &frame, None);
    };
    run(&mut dp, vip);
    run(&mut dp, empty);
    let started = Instant::now();
    loop {
        let seen = SEEN.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let (flow, drop) = (seen.iter().any(|l| l.contains("new flow")), seen.iter().any(|l| l.contains("drop")));
        if flow && drop {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "records seen: {seen:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
