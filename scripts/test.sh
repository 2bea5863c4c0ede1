#!/usr/bin/env bash
# The test command: installs the Debian packages the tests drive (real registries, clients,
# nginx), checks formatting and lints, then runs every test. Tests start and stop their own
# processes on random loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
tools=(
  docker-registry:docker-registry
  skopeo:skopeo
  podman:podman
  containerd:containerd
  ctr:containerd
  nginx:nginx
  htpasswd:apache2-utils
  openssl:openssl
  redis-server:redis-server
  prometheus:prometheus
  promtool:prometheus
)
missing=()
for pair in "${tools[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The OTLP/HTTP receiver the tracing tests export to (PyPI).
if ! python3 -c "import oteltap" >/dev/null 2>&1; then
  echo "installing: oteltap (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check oteltap
fi

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
