#!/usr/bin/env bash
# Regenerates the RS256 test key, its JWKS and signed test tokens in
# tests/fixtures/jwt/ (test-only material: never use these keys anywhere else).
# Tokens carry no `exp`, so the committed fixtures never expire.
set -euo pipefail
dir="$(cd "$(dirname "$0")/.." && pwd)/tests/fixtures/jwt"
mkdir -p "$dir"
cd "$dir"
openssl genrsa -out private.pem 2048 2>/dev/null
python3 - <<'PY'
import base64, json, subprocess

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

mod = subprocess.check_output(["openssl", "rsa", "-in", "private.pem", "-noout", "-modulus"]).decode().strip().split("=", 1)[1]
n = bytes.fromhex(mod)
jwks = {"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "tollgate-test", "n": b64(n), "e": b64((65537).to_bytes(3, "big"))}]}
open("jwks.json", "w").write(json.dumps(jwks, indent=2) + "\n")

def token(claims, name):
    header = {"alg": "RS256", "typ": "JWT", "kid": "tollgate-test"}
    signing_input = b64(json.dumps(header, separators=(",", ":")).encode()) + "." + b64(json.dumps(claims, separators=(",", ":")).encode())
    sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", "private.pem"], input=signing_input.encode(), capture_output=True, check=True).stdout
    open(name, "w").write(signing_input + "." + b64(sig) + "\n")

base = {"iss": "https://issuer.tollgate.test", "aud": "tollgate-e2e", "sub": "user-1"}
token(dict(base, org_id="acct_pro"), "acct_pro.jwt")
token(dict(base, org_id="acct_free"), "acct_free.jwt")
token(dict(base, iss="https://evil.example"), "wrong_issuer.jwt")
PY
echo "wrote $(ls "$dir")"
