#!/usr/bin/env bash
# Take a fresh Debian machine with rustup to a machine that builds and tests rproxy.
# Idempotent: every step checks first and is skipped when already satisfied.
#
# Also builds the Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd) from tests/k8s with Go (scripts/build-k8s.sh, cached), for
# `cargo xtask cluster` and the tests against a real API server; `--no-control-plane` skips it.
set -euo pipefail

control_plane=1
for arg in "$@"; do
    case "$arg" in
        --no-control-plane) control_plane=0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

LLVM_MAJOR=22
BPF_LINKER_VERSION=0.13.0
need_root() { [ "$(id -u)" -eq 0 ] || { echo "setup.sh: run as root (apt-get, bpffs)" >&2; exit 1; }; }
log() { printf '[setup] %s\n' "$*"; }

need_root
export DEBIAN_FRONTEND=noninteractive

pkgs=(llvm-${LLVM_MAJOR}-dev libpolly-${LLVM_MAJOR}-dev iproute2 bpftool iptables nftables
      ethtool procps zlib1g-dev libzstd-dev libxml2-dev openssl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    log "apt packages present"
fi

# rust-src for build-std of the bpfel target; the stable toolchain builds it with RUSTC_BOOTSTRAP=1.
if ! rustup component list --installed 2>/dev/null | grep -q '^rust-src'; then
    log "adding rust-src"
    rustup component add rust-src
fi

# bpf-linker linked against the system LLVM.
if ! command -v bpf-linker >/dev/null 2>&1 || ! bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    log "building bpf-linker $BPF_LINKER_VERSION against LLVM $LLVM_MAJOR"
    PATH=/usr/lib/llvm-${LLVM_MAJOR}/bin:$PATH cargo install --locked bpf-linker \
        --version "$BPF_LINKER_VERSION" --no-default-features --features "llvm-${LLVM_MAJOR}"
else
    log "bpf-linker present"
fi

# bpffs for pinned maps and links.
if ! mount | grep -q ' /sys/fs/bpf type bpf'; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi
# cgroup v2 for the socket hooks (host-network processes → services). Hosts with only cgroup
# v1 hierarchies mounted get the v2 hierarchy beside them (every process is in its root).
if ! grep -q ' - cgroup2 ' /proc/self/mountinfo; then
    dir=/sys/fs/cgroup/unified
    [ -d /sys/fs/cgroup ] && ! mountpoint -q /sys/fs/cgroup && dir=/sys/fs/cgroup
    log "mounting cgroup2 on $dir"
    mkdir -p "$dir"
    mount -t cgroup2 none "$dir"
fi
# The control plane, from Go modules (about 6 minutes on 2 cores the first time; cached after).
if [ "$control_plane" = 1 ]; then
    GO_MIN=1.26
    if ! command -v go >/dev/null 2>&1; then
        echo "setup.sh: Go $GO_MIN or later is needed to build the Kubernetes control plane" \
             "(cargo xtask cluster, cargo xtask test); install it from https://go.dev/dl/" >&2
        exit 1
    fi
    have=$(go env GOVERSION | sed 's/^go//')
    if [ "$(printf '%s\n%s\n' "$GO_MIN" "$have" | sort -V | head -n1)" != "$GO_MIN" ]; then
        echo "setup.sh: Go $have is too old for Kubernetes 1.36; $GO_MIN or later is needed" >&2
        exit 1
    fi
    bin=$("$(dirname "$0")/build-k8s.sh")
    log "Kubernetes control plane in $bin"
fi
log "done"
