# Sourced by scripts/callgrind-*.sh: what counting instructions in a bench needs.

# Prints the executable of bench NAME, built (release) for this tree; exits
# with a message from SCRIPT when valgrind is missing or the bench did not build.
callgrind_bench_bin() { # SCRIPT NAME
  local script="$1" name="$2" bin
  command -v valgrind >/dev/null || { echo "$script: valgrind not found (apt-get install valgrind)" >&2; exit 1; }
  bin="$(cargo bench --locked --bench "$name" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$name")"
  [ -x "$bin" ] || { echo "$script: the $name bench did not build" >&2; exit 1; }
  mkdir -p target/callgrind
  echo "$bin"
}
