#!/usr/bin/env bash
# archeio vs regatta, interleaved (not part of CI: benchmarks are run by hand).
# archeio is built from a checkout of kubernetes/registry.k8s.io (ARCHEIO_SRC; its module is
# not on the Go module proxy, so `go install k8s.io/registry.k8s.io/cmd/archeio@...` cannot
# fetch it), or taken from ARCHEIO_BIN. Installs wrk, nginx, curl, docker-registry, skopeo.
set -euo pipefail
cd "$(dirname "$0")/../.."
missing=()
for pair in wrk:wrk nginx:nginx curl:curl docker-registry:docker-registry skopeo:skopeo; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if [ -z "${ARCHEIO_BIN:-}" ]; then
  : "${ARCHEIO_SRC:?set ARCHEIO_SRC to a checkout of kubernetes/registry.k8s.io, or ARCHEIO_BIN}"
  ARCHEIO_BIN="$HOME/.cache/regatta-bench/archeio"
  mkdir -p "$(dirname "$ARCHEIO_BIN")"
  echo "building archeio from $ARCHEIO_SRC ($(git -C "$ARCHEIO_SRC" describe --tags 2>/dev/null || echo unknown))"
  (cd "$ARCHEIO_SRC" && go build -o "$ARCHEIO_BIN" ./cmd/archeio)
fi
export ARCHEIO_BIN
exec cargo bench --bench archeio
