#!/usr/bin/env bash
# Copies the .proto files that Envoy's ext_authz and access-log services need
# (and what they import) from the envoy-types crate's sources into
# proto/vendor/, so build.rs can put their descriptors in the reflection
# service. The Rust types still come from envoy-types; these are only read
# for descriptors. Run after bumping envoy-types; commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(cargo metadata --format-version 1 --locked 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="envoy-types"))')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/envoy-types-"$version"/proto | head -1)
rm -rf proto/vendor
python3 - "$src" <<'PY'
import os, re, shutil, sys
src = sys.argv[1]
roots = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
def find(name):
    for r in roots:
        p = os.path.join(src, r, name)
        if os.path.exists(p):
            return p
    return None
todo = ["envoy/service/auth/v3/external_auth.proto", "envoy/service/accesslog/v3/als.proto"]
seen = set()
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    path = find(name)
    if path is None:
        if not name.startswith("google/protobuf/"):  # protox ships the well-known types
            sys.exit(f"{name}: not in envoy-types")
        continue
    dest = os.path.join("proto/vendor", name)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.copyfile(path, dest)
    todo += re.findall(r'^import (?:public )?"([^"]+)";', open(path).read(), re.M)
PY
echo "envoy-types $version" > proto/vendor/SOURCE
find proto/vendor -name '*.proto' | wc -l
