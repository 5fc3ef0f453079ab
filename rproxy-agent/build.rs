//! Builds rproxy-ebpf for `bpfel-unknown-none` and leaves the object in `OUT_DIR/rproxy.bpf.o`,
//! where `src/bpf/datapath.rs` embeds it: the agent binary is self-contained.
//!
//! Needs `bpf-linker` and the `rust-src` component (`scripts/setup.sh` installs both). The stable
//! toolchain builds `core` for the BPF target with `RUSTC_BOOTSTRAP=1`, as aya-build does.
//! Set `RPROXY_EBPF_OBJ=/path/to/object` to embed a prebuilt object instead, and
//! `RPROXY_EBPF_FEATURES=log` for a development build whose programs log with aya-log.
use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dst = out_dir.join("rproxy.bpf.o");
    println!("cargo:rerun-if-env-changed=RPROXY_EBPF_OBJ");
    println!("cargo:rerun-if-env-changed=RPROXY_EBPF_FEATURES");
    if let Some(obj) = env::var_os("RPROXY_EBPF_OBJ") {
        println!("cargo:rerun-if-changed={}", Path::new(&obj).display());
        std::fs::copy(&obj, &dst).unwrap_or_else(|e| panic!("copying RPROXY_EBPF_OBJ: {e}"));
        return;
    }

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("workspace root");
    let ebpf = root.join("rproxy-ebpf");
    for p in ["rproxy-ebpf/src", "rproxy-ebpf/Cargo.toml", "rproxy-ebpf/Cargo.lock", "rproxy-common/src"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    // A target dir of its own (never the outer build's: its lock is held while we run).
    let target_dir = root.join("target").join("bpf");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&ebpf)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTC_BOOTSTRAP", "1");
    // The outer build's compiler settings are for the host, not for the BPF target.
    for key in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(key);
    }
    // Development builds of the datapath: `RPROXY_EBPF_FEATURES=log` adds aya-log records (see
    // rproxy-ebpf's Cargo.toml), which the agent then logs at debug level.
    if let Some(features) = env::var_os("RPROXY_EBPF_FEATURES").filter(|f| !f.is_empty()) {
        cmd.arg("--features").arg(features);
    }
    // BTF for the maps' keys and values (bpftool prints their fields) and for the programs (the
    // verifier's messages name source lines): bpf-linker emits it from the debug info.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Cdebuginfo=2\x1f-Clink-arg=--btf");
    let status = cmd.status().unwrap_or_else(|e| panic!("running cargo for rproxy-ebpf: {e}"));
    assert!(status.success(), "building rproxy-ebpf failed ({status}); is the toolchain set up? run scripts/setup.sh");
    let obj = target_dir.join("bpfel-unknown-none").join("release").join("rproxy");
    std::fs::copy(&obj, &dst).unwrap_or_else(|e| panic!("copying {}: {e}", obj.display()));
}
