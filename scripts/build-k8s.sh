#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl and etcd) from the Go module in tests/k8s, using only the
# Go module proxy, into a content-addressed cache directory:
#
#   ${RPROXY_K8S_CACHE:-/var/cache/rproxy/k8s}/<key>/bin/
#
# <key> is a short hash of tests/k8s/go.mod, go.sum, cmd/etcd/main.go, this script
# and the Go toolchain version. When all five binaries are already there nothing is
# built. The bin directory is printed as the last line of stdout (logs go to stderr):
#
#   bin=$(scripts/build-k8s.sh)
#
# Builds go into a temp dir beside the cache entry that is renamed into place only
# when complete, so an interrupted build never looks complete. Other cache keys are
# removed. Concurrent runs are serialised with flock.
set -euo pipefail

log() { printf '[build-k8s] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script="$(readlink -f "${BASH_SOURCE[0]}")"
root="$(cd "$(dirname "$script")/.." && pwd)"
mod="$root/tests/k8s"
cache="${RPROXY_K8S_CACHE:-/var/cache/rproxy/k8s}"
bins=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd)
pkgs=(
    k8s.io/kubernetes/cmd/kube-apiserver
    k8s.io/kubernetes/cmd/kube-controller-manager
    k8s.io/kubernetes/cmd/kube-scheduler
    k8s.io/kubernetes/cmd/kubectl
    ./cmd/etcd
)

command -v go >/dev/null 2>&1 || die "go not found in PATH"
[ -f "$mod/go.mod" ] && [ -f "$mod/go.sum" ] || die "missing $mod/go.mod or go.sum"

goversion="$(go env GOVERSION)"
key="$(
    {
        cat "$mod/go.mod" "$mod/go.sum" "$mod/cmd/etcd/main.go" "$script"
        printf '%s %s/%s\n' "$goversion" "$(go env GOOS)" "$(go env GOARCH)"
    } | sha256sum | cut -c1-12
)"
dest="$cache/$key"
bin="$dest/bin"

complete() {
    local b
    for b in "${bins[@]}"; do [ -x "$1/$b" ] || return 1; done
}

if complete "$bin"; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Another run may have finished the build while this one waited for the lock.
if complete "$bin"; then
    echo "$bin"
    exit 0
fi

# Keep only the current key: drop other entries and leftovers of interrupted builds.
# An entry for this key without all binaries (not made by this script) goes too.
# Only names this script makes are touched, in case the cache is a shared directory.
for old in "$cache"/* "$cache"/.tmp-*; do
    [ -e "$old" ] || continue
    [[ "$(basename "$old")" =~ ^(\.tmp-)?[0-9a-f]{12}(\..*)?$ ]] || continue
    log "removing $old"
    rm -rf -- "$old"
done

cd "$mod"
export CGO_ENABLED=0

# Version stamping as kubernetes' hack/lib/version.sh does it, from the release
# that go.mod pins. The module proxy gives no commit id; buildDate is the release's
# commit time (from the module proxy) so that a rebuild is identical.
kver="$(go list -mod=readonly -m -f '{{.Version}}' k8s.io/kubernetes)"
kdate="$(go list -mod=readonly -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)"
[[ "$kver" =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || die "unexpected k8s.io/kubernetes version '$kver'"
major="${BASH_REMATCH[1]}"
minor="${BASH_REMATCH[2]}"
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $p.gitVersion=$kver -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    ldflags+=" -X $p.gitCommit= -X $p.gitTreeState=archive -X $p.buildDate=$kdate"
done

tmp="$(mktemp -d "$cache/.tmp-$key.XXXXXX")"
trap 'rm -rf -- "$tmp"' EXIT
log "building Kubernetes $kver and etcd ($goversion, key $key) into $dest; this takes a while"
start=$SECONDS
go build -mod=readonly -trimpath -buildvcs=false \
    -tags selinux,notest,grpcnotrace \
    -ldflags "all=$ldflags" \
    -o "$tmp/bin/" "${pkgs[@]}"
complete "$tmp/bin" || die "go build did not produce all of: ${bins[*]}"
chmod 0755 "$tmp"
mv -T -- "$tmp" "$dest"
trap - EXIT
log "built in $((SECONDS - start))s"
echo "$bin"
