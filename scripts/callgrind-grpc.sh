#!/usr/bin/env bash
# Instructions per Check over in-process gRPC, counted by callgrind (whatever
# else the machine runs; within ~1 % from run to run of one binary, as its two
# workers interleave differently: compare builds by several runs each):
# benches/grpc.rs with `--only echo|tollgate`, the whole process (client,
# server, runtime), a run of N Checks minus a run of 0 (start-up and warm-up
# alike in both), divided by N. The echo is the bare tonic server (the floor).
#
#   scripts/callgrind-grpc.sh            # 2,000 Checks per server
#   CHECKS=5000 scripts/callgrind-grpc.sh
#
# Needs valgrind (Debian's package). Prints one line per server; the callgrind
# output files are kept in target/callgrind/ for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
checks="${CHECKS:-2000}"
source scripts/callgrind-lib.sh
bin="$(callgrind_bench_bin callgrind-grpc grpc)"
rev="$(git rev-parse --short HEAD 2>/dev/null || echo local)"
count() { # server checks -> total instructions
  local out="target/callgrind/grpc.$1.$2.$rev.out"
  # glibc copies a block of a few KB (a boxed handler future) with `rep movsb`,
  # which callgrind counts as one instruction per byte; with the threshold
  # raised it copies with vector loads and stores, counted as what they are.
  GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4194304 \
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" --only "$1" --checks "$2" \
    >/dev/null 2>"target/callgrind/valgrind.grpc.log"
  grep -m1 '^totals:' "$out" | awk '{print $2}'
}
declare -A per
for server in echo tollgate; do
  base="$(count "$server" 0)"
  total="$(count "$server" "$checks")"
  per[$server]="$(python3 -c "import sys; print(round((int(sys.argv[1]) - int(sys.argv[2])) / int(sys.argv[3])))" "$total" "$base" "$checks")"
  echo "callgrind-grpc: $server: ${per[$server]} instructions per Check ($checks Checks at concurrency 32, whole process)"
done
python3 -c "import sys; print(f'callgrind-grpc: tollgate / echo = {int(sys.argv[1]) / int(sys.argv[2]):.2f}')" "${per[tollgate]}" "${per[echo]}"
