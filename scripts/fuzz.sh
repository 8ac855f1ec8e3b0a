#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets/) for N executions, one
# after the other, and exits non-zero if any crashes, hangs or fails to build.
# Not part of CI (minutes per target); see fuzz/README.md.
#
#   scripts/fuzz.sh                 # every target, 1000000 runs each
#   scripts/fuzz.sh 100000          # every target, 100000 runs each
#   scripts/fuzz.sh 1000000 path    # some targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`).
# Each target starts from its committed seeds (fuzz/seeds/<target>/) plus
# what earlier runs kept in fuzz/corpus/<target>/ (ignored by git); crashes
# land in fuzz/artifacts/<target>/. Logs go to fuzz/logs/<target>.log.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

runs="${1:-1000000}"
shift $(( $# > 0 ? 1 : 0 ))
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(path config check problem webhook views)
fi

# Longest input per target: paths are bounded at 4096 bytes by tollgate itself.
max_len() {
  case "$1" in
    path) echo 4096 ;;
    *) echo 16384 ;;
  esac
}

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "scripts/fuzz.sh: needs the nightly toolchain and cargo-fuzz (cargo install cargo-fuzz)" >&2
  exit 2
fi

# One build for all targets: release with debug assertions and overflow checks (cargo fuzz's default).
if ! cargo +nightly fuzz build; then
  echo "scripts/fuzz.sh: build failed" >&2
  exit 2
fi

mkdir -p fuzz/logs
failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/logs/$t.log"
  echo "== $t: $runs runs (max_len $(max_len "$t"))"
  start=$(date +%s)
  # libFuzzer's default is one in-process job, i.e. one core.
  cargo +nightly fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
    -runs="$runs" -max_len="$(max_len "$t")" -timeout=30 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  done_line=$(grep -E '^Done [0-9]+ runs' "$log" | tail -n 1)
  speed=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}')
  if [ $rc -eq 0 ] && [ -n "$done_line" ]; then
    echo "   ok: $done_line; ${speed:-?} exec/s; wall ${secs}s"
  else
    echo "   FAILED (exit $rc, wall ${secs}s): see $log and fuzz/artifacts/$t/" >&2
    grep -E 'panicked at|==ERROR|SUMMARY|Test unit written' "$log" | head -n 5 >&2
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "scripts/fuzz.sh: failed: ${failed[*]}" >&2
  exit 1
fi
echo "scripts/fuzz.sh: all ${#targets[@]} targets ran $runs times without a crash"
