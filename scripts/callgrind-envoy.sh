#!/usr/bin/env bash
# Envoy's instructions per request, by variant of the Envoy bench: what
# applying each answer costs Envoy, counted by callgrind (the same count
# whatever else this shared machine does, where CPU seconds swing by tens of
# percent). Each variant runs the bench twice with Envoy under callgrind, for
# a short and a long time; instructions per request are the difference of
# the two totals over the difference of the requests Envoy served, so
# Envoy's start, its idle timers and health checks cancel out.
#
#   scripts/callgrind-envoy.sh                         # b c-mem c-lean
#   scripts/callgrind-envoy.sh "b b-small b-nometa"    # any Envoy bench variant but a
#
# Slow: Envoy under valgrind serves a few hundred requests a second (wrk
# -c4 here, so that no Check outlives Envoy's ext_authz timeout) and takes
# tens of seconds to start; about 2 minutes per variant.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tools.sh
ensure_bench_tools

variants=${1:-"b c-mem c-lean"}
short=${SHORT:-2}
long=${LONG:-12}
work=$(mktemp -d)
real_envoy=$ENVOY_BIN
cleanup() {
  # Envoys still running under valgrind (the bench kills only the wrapper).
  [ -f "$work/pids" ] && while read -r p; do kill -KILL "$p" 2>/dev/null || true; done <"$work/pids"
  rm -rf "$work"
}
trap cleanup EXIT

# The bench kills its Envoy with SIGKILL, and callgrind writes nothing then:
# the wrapper leaves valgrind running when the bench kills it, and this
# script stops it with SIGTERM (Envoy exits cleanly, callgrind writes).
cat >"$work/envoy" <<EOF
#!/bin/sh
valgrind --tool=callgrind --callgrind-out-file="$work/cg.\$\$.out" "$real_envoy" "\$@" &
echo \$! >>"$work/pids"
wait
EOF
chmod +x "$work/envoy"
cargo build --locked --release --bench envoy --quiet

# Stops the Envoys of the last run (SIGTERM: callgrind writes its file) and waits for them.
stop_envoys() {
  while read -r p; do kill -TERM "$p" 2>/dev/null || true; done <"$work/pids"
  while read -r p; do while kill -0 "$p" 2>/dev/null; do sleep 0.5; done; done <"$work/pids"
}

# run VARIANT SECONDS: prints "instructions requests" for one bench run.
run() {
  : >"$work/pids"
  rm -f "$work"/cg.*.out
  ENVOY_BIN="$work/envoy" cargo bench --locked --quiet --bench envoy -- \
    --variants "$1" --rounds 1 --duration "$2" --warmup 2 --connections 4 --deadline 600 >"$work/bench.out" 2>&1 ||
    { grep -v "^ " "$work/bench.out" | tail -8 >&2; stop_envoys; return 1; }
  # Every request Envoy completed, warm-up and wiring checks included: its
  # ext_authz.ok and .denied counters (so not variant a, which has no ext_authz).
  local requests
  requests=$(grep -oE "^- $1: .*" "$work/bench.out" | grep -oE 'ext_authz\.(ok|denied) [0-9]+' |
    awk '{s += $2} END {print s + 0}')
  stop_envoys
  # The serving Envoy's file: the largest count (the bench also asks `envoy --version`).
  local instructions
  instructions=$(cat "$work"/cg.*.out | awk '/^summary:/ {if ($2 > m) m = $2} END {print m + 0}')
  echo "$instructions $requests"
}

# Under valgrind a Check now and then outlives Envoy's 0.25 s ext_authz
# timeout (the bench then fails on the 503): up to three tries.
measure() {
  run "$@" || run "$@" || run "$@"
}

printf '| variant | requests (%ss / %ss) | Envoy instructions per request |\n|---|---|---|\n' "$short" "$long"
for v in $variants; do
  first=$(measure "$v" "$short")
  second=$(measure "$v" "$long")
  read -r i1 n1 <<<"$first"
  read -r i2 n2 <<<"$second"
  awk -v v="$v" -v i1="$i1" -v n1="$n1" -v i2="$i2" -v n2="$n2" \
    'BEGIN { if (n2 <= n1) { print "| " v " | " n1 " / " n2 " | (too few requests) |"; exit }
             printf "| %s | %d / %d | %.0f |\n", v, n1, n2, (i2 - i1) / (n2 - n1) }'
done
