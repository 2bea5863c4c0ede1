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
  dockerd:docker.io
  docker-compose:docker-compose
  buildah:buildah
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

# PyPI tools: the OTLP/HTTP receiver the tracing tests export to; the Kubernetes schema
# validator (it ships its schemas) and yamllint for deploy/.
pypi=()
python3 -c "import oteltap" >/dev/null 2>&1 || pypi+=(oteltap)
command -v kubernetes-validate >/dev/null 2>&1 || pypi+=(kubernetes-validate==1.37.0)
command -v yamllint >/dev/null 2>&1 || pypi+=(yamllint==1.38.0)
if ((${#pypi[@]})); then
  echo "installing: ${pypi[*]} (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check "${pypi[@]}"
fi

# Go tools, pinned, built into a directory this script owns.
gobin="$HOME/.cache/regatta-test/go/bin"
export PATH="$gobin:$PATH"
if ! kustomize version 2>/dev/null | grep -qx v5.8.2; then
  echo "installing: kustomize v5.8.2 (go install)"
  GOBIN="$gobin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.8.2
fi

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@"
else
  cargo test --no-fail-fast "$@"
fi
