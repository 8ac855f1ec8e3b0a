#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need when
# it is missing (redis-server, Envoy, nginx, promtool and kubernetes-validate into .tools/, which git ignores; see
# scripts/tools.sh), then runs `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test redis`).
# TOLLGATE_FORCE_TOOLS=1 installs into .tools/ even when the system has the tools.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
source scripts/tools.sh

ensure_redis
ensure_envoy
ensure_nginx
ensure_promtool
ensure_kubernetes_validate
tools_versions envoy redis nginx promtool kubernetes-validate

cargo test --locked "$@"
