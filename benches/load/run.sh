#!/usr/bin/env bash
# Load benchmark: regatta vs nginx `return 307` vs the Caddy facade, interleaved rounds.
# Installs what it drives when missing, then runs the release-build bench.
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
for pair in wrk:wrk nginx:nginx caddy:caddy docker-registry:docker-registry skopeo:skopeo redis-server:redis-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
exec cargo bench --bench load
