#!/usr/bin/env bash
# Build helm from the Go module in tests/helm (helm.sh/helm/v4, the version its go.mod
# pins), using only the Go module proxy, into a content-addressed cache directory:
#
#   ${RPROXY_HELM_CACHE:-/var/cache/rproxy/helm}/<key>/bin/helm
#
# (beside build-k8s.sh's cache, which outlives a fresh clone; <workspace>/target/helm when that
# is not writable).
#
# <key> is a short hash of tests/helm/go.mod, go.sum, tools.go, this script and the Go
# toolchain version. When the binary is already there nothing is built. The bin directory
# is printed as the last line of stdout (logs go to stderr):
#
#   helm="$(scripts/build-helm.sh | tail -n1)/helm"
#
# The chart's tests (tests/tests/offline/helm.rs) run this when RPROXY_HELM_BIN is unset;
# `cargo xtask test` runs it and sets RPROXY_HELM_BIN. The build goes into a temp dir beside
# the cache entry that is renamed into place only when complete, so an interrupted build
# never looks complete. Other cache keys are removed. Concurrent runs are serialised with
# flock.
set -euo pipefail

log() { printf '[build-helm] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

script="$(readlink -f "${BASH_SOURCE[0]}")"
root="$(cd "$(dirname "$script")/.." && pwd)"
mod="$root/tests/helm"
cache="${RPROXY_HELM_CACHE:-/var/cache/rproxy/helm}"
# Without root (the chart's tests need none), under the workspace's target/ instead.
if ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then
    cache="$root/target/helm"
fi

command -v go >/dev/null 2>&1 || die "go not found in PATH"
for f in go.mod go.sum tools.go; do
    [ -f "$mod/$f" ] || die "missing $mod/$f"
done

goversion="$(go env GOVERSION)"
key="$(
    {
        cat "$mod/go.mod" "$mod/go.sum" "$mod/tools.go" "$script"
        printf '%s %s/%s\n' "$goversion" "$(go env GOOS)" "$(go env GOARCH)"
    } | sha256sum | cut -c1-12
)"
dest="$cache/$key"
bin="$dest/bin"

if [ -x "$bin/helm" ]; then
    echo "$bin"
    exit 0
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
# Another run may have finished the build while this one waited for the lock.
if [ -x "$bin/helm" ]; then
    echo "$bin"
    exit 0
fi

# Keep only the current key: drop other entries and leftovers of interrupted builds.
# Only names this script makes are touched, in case the cache is a shared directory.
for old in "$cache"/* "$cache"/.tmp-*; do
    [ -e "$old" ] || continue
    [[ "$(basename "$old")" =~ ^(\.tmp-)?[0-9a-f]{12}(\..*)?$ ]] || continue
    log "removing $old"
    rm -rf -- "$old"
done

cd "$mod"
export CGO_ENABLED=0

# Version stamping as helm's Makefile does it for a release tag: the version go.mod pins,
# no commit id (the module proxy gives none).
hver="$(go list -mod=readonly -m -f '{{.Version}}' helm.sh/helm/v4)"
[[ "$hver" =~ ^v4\.[0-9]+\.[0-9]+$ ]] || die "unexpected helm.sh/helm/v4 version '$hver'"
p=helm.sh/helm/v4/internal/version
ldflags="-s -w -X $p.version=$hver -X $p.metadata= -X $p.gitCommit= -X $p.gitTreeState=archive"

tmp="$(mktemp -d "$cache/.tmp-$key.XXXXXX")"
trap 'rm -rf -- "$tmp"' EXIT
log "building helm $hver ($goversion, key $key) into $dest; the first build takes minutes"
start=$SECONDS
go build -mod=readonly -trimpath -buildvcs=false -ldflags "$ldflags" -o "$tmp/bin/helm" helm.sh/helm/v4/cmd/helm
[ -x "$tmp/bin/helm" ] || die "go build did not produce helm"
"$tmp/bin/helm" version --short >/dev/null || die "the built helm does not run"
chmod 0755 "$tmp"
mv -T -- "$tmp" "$dest"
trap - EXIT
log "built in $((SECONDS - start))s"
echo "$bin"
