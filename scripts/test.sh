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
  python3:python3
  curl:curl
  ip:iproute2
  bird:bird2
  birdc:bird2
)
missing=()
for pair in "${tools[@]}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
# The docker tests' images carry Debian's static busybox (another busybox may be installed).
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  missing+=(busybox-static)
if ((${#missing[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PyPI tools: the OTLP/HTTP receiver the tracing tests export to; the Kubernetes schema
# validator (it ships its schemas) and yamllint for deploy/; the ORAS client.
pypi=()
python3 -c "import oteltap" >/dev/null 2>&1 || pypi+=(oteltap)
command -v kubernetes-validate >/dev/null 2>&1 || pypi+=(kubernetes-validate==1.37.0)
command -v yamllint >/dev/null 2>&1 || pypi+=(yamllint==1.38.0)
python3 -c "import importlib.metadata as m; assert m.version('oras') == '0.2.43'" \
  >/dev/null 2>&1 || pypi+=(oras==0.2.43)
if ((${#pypi[@]})); then
  echo "installing: ${pypi[*]} (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check "${pypi[@]}"
fi

# Go tools, pinned, built into a directory this script owns: kustomize; the OCI
# distribution-spec conformance suite (the ginkgo build of the v1.1 era, `go test -c`, and the
# current one); crane and regctl.
gobin="$HOME/.cache/regatta-test/go/bin"
mkdir -p "$gobin"
export PATH="$gobin:$PATH"
if ! kustomize version 2>/dev/null | grep -qx v5.8.2; then
  echo "installing: kustomize v5.8.2 (go install)"
  GOBIN="$gobin" go install sigs.k8s.io/kustomize/kustomize/v5@v5.8.2
fi
go_tool() { # NAME MODULE@VERSION install|test-binary
  local name=$1 pin=$2 how=$3
  [ -x "$gobin/$name" ] && [ "$(cat "$gobin/$name.version" 2>/dev/null)" = "$pin" ] && return
  command -v go >/dev/null 2>&1 || { echo "Go 1.24+ is needed to build $pin" >&2; exit 1; }
  echo "building: $name ($pin)"
  local tmp
  tmp=$(mktemp -d)
  case $how in
    install) GOBIN="$tmp" go install "$pin" && mv "$tmp"/* "$gobin/$name" ;;
    test-binary)
      local dir
      dir=$(go mod download -json "$pin" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
      (cd "$dir" && go test -c -o "$gobin/$name" .) ;;
  esac
  rm -rf "$tmp"
  echo "$pin" >"$gobin/$name.version"
}
conformance=github.com/opencontainers/distribution-spec/conformance
go_tool oci-conformance-ginkgo.test "$conformance@v0.0.0-20231101194043-f2182352d4cc" test-binary
go_tool oci-conformance "$conformance@v0.0.0-20260831232431-97274622c111" install
go_tool crane github.com/google/go-containerregistry/cmd/crane@v0.22.1 install
go_tool regctl github.com/regclient/regclient/cmd/regctl@v0.11.7 install

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast "$@" || status=$?
else
  cargo test --no-fail-fast "$@" || status=$?
fi
# The per-request cost bench, as a smoke (debug build, allocations only): it must still run.
COST_REQUESTS=200 COST_INSTRUCTIONS=0 cargo test --quiet --bench cost || status=$?
# The conformance suite's summary per case; its reports stay under target/conformance/.
if compgen -G "target/conformance/*/summary.txt" >/dev/null; then
  echo "OCI conformance (reports in target/conformance/):"
  cat target/conformance/*/summary.txt
fi
exit "$status"
