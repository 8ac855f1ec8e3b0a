#!/usr/bin/env bash
# End-to-end load through a real Envoy: benches/envoy.rs, after installing
# what it runs but cargo does not build (wrk, Envoy, redis-server, nginx; see
# scripts/tools.sh) into .tools/ when missing. Arguments go to the bench:
#
#   scripts/bench-envoy.sh                          # 2 rounds x 10 s, variants a b c-mem c-redis
#   scripts/bench-envoy.sh --rounds 2 --duration 3  # a short check
#   scripts/bench-envoy.sh --help                   # the knobs (each also an env var, BENCH_*)
#
# With the tools installed, `cargo bench --bench envoy -- ARGS` is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tools.sh

ensure_bench_tools
tools_versions envoy redis wrk nginx

exec cargo bench --locked --bench envoy -- "$@"
