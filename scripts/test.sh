#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need when
# it is missing (into .tools/, which git ignores), then runs `cargo test`.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test ext_authz`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
tools="$root/.tools"
mkdir -p "$tools"

cargo test --locked "$@"
