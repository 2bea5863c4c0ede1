#!/usr/bin/env bash
# Token endpoint throughput of one node: wrk against GET /token on loopback, with a user's
# Basic credentials (bcrypt, verified once then remembered for a minute), with a robot's
# secret, and anonymous, each asking a pull scope on a private org. Every answer must be a
# 200 (a refused request fails the run). Stops what it started by PID.
#
#   bash benches/token/run.sh            # 10 s per case, 32 connections, release build
#   SECONDS_PER_CASE=30 CONNECTIONS=64 bash benches/token/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds=${SECONDS_PER_CASE:-10}
connections=${CONNECTIONS:-32}
workers=${WORKERS:-2}
for tool in wrk openssl htpasswd curl; do
  command -v "$tool" >/dev/null || { echo "needs $tool (apt-get install wrk openssl apache2-utils curl)" >&2; exit 1; }
done
cargo build --release --bin regatta >/dev/null
bin=target/release/regatta

work=$(mktemp -d)
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/key.pem" 2>/dev/null
htpasswd -B -b -c "$work/users" alice alice-s3cret 2>/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
admin=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/regatta.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
workers = $workers
[log]
filter = "warn"
[admin]
listen = "127.0.0.1:$admin"
token = "token-bench-admin-0123456789"
[auth]
service = "bench"
signing_key = "$work/key.pem"
users_file = "$work/users"
[[backends]]
id = "hub"
url = "http://127.0.0.1:9"
delivery = "proxy"
[[orgs]]
name = "acme"
backends = ["hub"]
access = "private"
[[orgs.grants]]
principal = "alice"
[[orgs]]
name = "pub"
backends = ["hub"]
TOML
"$bin" serve --config "$work/regatta.toml" >"$work/regatta.log" 2>&1 &
pid=$!
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
robot=$("$bin" admin --url "http://127.0.0.1:$admin" --token token-bench-admin-0123456789 \
  robot create ci --repository 'acme/*' | sed -n 's/^secret: *//p')

url="http://127.0.0.1:$port/token?service=bench&scope=repository%3Aacme%2Fapp%3Apull"
public_url="http://127.0.0.1:$port/token?service=bench&scope=repository%3Apub%2Fapp%3Apull"
user_auth="Authorization: Basic $(printf 'alice:alice-s3cret' | base64 -w0)"
robot_auth="Authorization: Basic $(printf 'robot$ci:%s' "$robot" | base64 -w0)"
# Each case must be granted what it asks before it is measured.
curl -fs -H "$user_auth" "$url" | grep -q '"scope":"repository:acme/app:pull"'
curl -fs -H "$robot_auth" "$url" | grep -q '"scope":"repository:acme/app:pull"'
curl -fs "$public_url" | grep -q '"scope":"repository:pub/app:pull"'

measure() { # NAME URL [HEADER]
  local name=$1 target=$2 out
  shift 2
  out=$(wrk -t1 -c "$connections" -d "${seconds}s" --latency ${1:+-H "$1"} "$target")
  if grep -q "Non-2xx" <<<"$out"; then echo "$name: errors under load" >&2; echo "$out" >&2; exit 1; fi
  printf '%-22s %10s req/s   p50 %8s   p99 %8s\n' "$name" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" \
    "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
    "$(awk '$1 == "99%" {print $2}' <<<"$out")"
}
echo "token endpoint, one node ($workers workers), wrk -t1 -c $connections, ${seconds}s per case, $(nproc) cores"
measure "user (Basic, bcrypt)" "$url" "$user_auth"
measure "robot (Basic)" "$url" "$robot_auth"
measure "anonymous, public" "$public_url"
