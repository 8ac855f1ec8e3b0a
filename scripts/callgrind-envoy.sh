#!/usr/bin/env bash
# Envoy's instructions per request, by variant of the Envoy bench: what
# applying each answer costs Envoy, counted by callgrind (the same count
# whatever else this shared machine does, where CPU seconds swing by tens of
# percent). Each variant runs the bench twice with Envoy under callgrind, for
# a short and a long time; instructions per request are the difference of
# the two totals over the difference of the requests Envoy served, so
# Envoy's start cancels out (its timers and health checks over the extra
# 10 s do not, but Envoy under valgrind is busy serving all that time).
#
#   scripts/callgrind-envoy.sh                         # b c-mem c-lean
#   scripts/callgrind-envoy.sh "b b-small b-nometa"    # any b-* or c-* variant (they count Checks)
#
# Slow: Envoy under valgrind serves a few hundred requests a second (wrk
# -c4 here, so that no Check outlives Envoy's ext_authz timeout) and takes
# tens of seconds to start (the test kit waits 30 s for it); about 2.5
# minutes per variant.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/tools.sh
ensure_bench_tools
command -v valgrind >/dev/null || { echo "callgrind-envoy: valgrind not found (apt-get install valgrind)" >&2; exit 1; }

variants=${1:-"b c-mem c-lean"}
short=${SHORT:-2}
long=${LONG:-12}
work=$(mktemp -d)
real_envoy=$ENVOY_BIN
# The pids the wrappers wrote that are still valgrind (a pid may have been reused).
ours() {
  [ -f "$work/pids" ] || return 0
  while read -r p; do
    grep -qs valgrind "/proc/$p/cmdline" && [ "$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" != Z ] && echo "$p"
  done <"$work/pids"
  return 0
}
cleanup() {
  # Envoys still running under valgrind (the bench kills only the wrapper).
  for p in $(ours); do kill -KILL "$p" 2>/dev/null || true; done
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
  for p in $(ours); do kill -TERM "$p" 2>/dev/null || true; done
  local waited=0
  while [ -n "$(ours)" ] && [ "$waited" -lt 120 ]; do sleep 0.5; waited=$((waited + 1)); done
  for p in $(ours); do kill -KILL "$p" 2>/dev/null || true; done
}

# run VARIANT SECONDS: prints "instructions requests" for one bench run.
run() {
  : >"$work/pids"
  rm -f "$work"/cg.*.out
  # Envoy under valgrind takes far longer than the test kit's 30 s to start on a busy machine.
  TOLLGATE_ENVOY_START_SECS=300 ENVOY_BIN="$work/envoy" cargo bench --locked --quiet --bench envoy -- \
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
  instructions=$(cat "$work"/cg.*.out 2>/dev/null | awk '/^summary:/ {if ($2 > m) m = $2} END {print m + 0}')
  # A run without its counters or its callgrind file is a failed try, not a 0.
  if [ "$requests" -le 0 ] || [ "$instructions" -le 0 ]; then
    echo "callgrind-envoy: $1: no request count or no callgrind file" >&2
    return 1
  fi
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
