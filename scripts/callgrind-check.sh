#!/usr/bin/env bash
# Instructions per allowed Check in tollgate's ext_authz handler, counted by
# callgrind (the same count for the same binary and input, whatever else the
# machine runs): benches/check_cost.rs under valgrind, collecting only inside
# the test kit's `bench::answer_all` (the handler deciding, and the answer
# encoded as the server encodes it), divided by the Checks run.
#
#   scripts/callgrind-check.sh               # 2,000 Checks
#   CHECKS=5000 scripts/callgrind-check.sh
#   scripts/callgrind-check.sh --reference   # answers built and encoded by prost, as before the wire encoder
#
# Needs valgrind (Debian's package). Prints one line; the callgrind output
# file is kept in target/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
checks="${CHECKS:-2000}"
source scripts/callgrind-lib.sh
bin="$(callgrind_bench_bin callgrind-check check_cost)"
out="target/callgrind/check_cost.$(git rev-parse --short HEAD 2>/dev/null || echo local).out"
# Collect inside the handler only: the warm-up pass (100 Checks) is collected
# too, so it is counted in the Checks divided by.
valgrind --tool=callgrind --callgrind-out-file="$out" --collect-atstart=no \
  --toggle-collect='*bench*answer_all*' \
  "$bin" --bench --checks "$checks" "$@" >/dev/null 2>target/callgrind/valgrind.log
total="$(grep -m1 '^totals:' "$out" | awk '{print $2}')"
[ -n "$total" ] && [ "$total" -gt 0 ] || { echo "callgrind-check: nothing collected (see $out)" >&2; exit 1; }
python3 -c "import sys; t, n = int(sys.argv[1]), int(sys.argv[2]) + 100; print(f'callgrind-check: {t / n:,.0f} instructions per allowed Check ({t:,} in {n} Checks, warm-up included; {sys.argv[3]})')" "$total" "$checks" "$out"
