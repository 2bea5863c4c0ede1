#!/usr/bin/env bash
# Builds regatta's container image from deploy/Containerfile, tags it, and optionally pushes it.
#
#   deploy/image/build.sh                              # from source: regatta:VERSION
#   deploy/image/build.sh --push cr.example.org/ops    # ... and push cr.example.org/ops/regatta:VERSION
#   deploy/image/build.sh --prebuilt target/x86_64-unknown-linux-gnu/release/regatta
#   deploy/image/build.sh --builder buildah --tag regatta:dev
#
# Options:
#   --tag NAME:TAG       local name (default regatta:VERSION, VERSION from Cargo.toml)
#   --push REGISTRY      also tag REGISTRY/regatta:VERSION and push it (plain HTTP is allowed for
#                        127.0.0.0/8 by docker; use --tls-verify=false registries with buildah)
#   --prebuilt BINARY    package this binary instead of compiling in the build stage; a
#                        dynamically linked one is packaged with the libraries `ldd` lists
#   --builder B          docker (default; BuildKit) or buildah
#   --source URL         org.opencontainers.image.source (default: git remote origin)
# Environment: DOCKER (the docker CLI to run, default `docker`), and for buildah the usual
# CONTAINERS_STORAGE_CONF / CONTAINERS_CONF. Prints the pushed reference and digest on success.
set -euo pipefail

repo="$(cd "$(dirname "$0")/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -n1)"
tag="regatta:$version"
push=""
prebuilt=""
builder="docker"
source="$(git -C "$repo" config --get remote.origin.url 2>/dev/null || echo unknown)"
revision="$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)"

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --tag) tag="$2"; shift 2 ;;
    --push) push="${2%/}"; shift 2 ;;
    --prebuilt) prebuilt="$2"; shift 2 ;;
    --builder) builder="$2"; shift 2 ;;
    --source) source="$2"; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "build.sh: unknown argument: $1" >&2; usage 2 >&2 ;;
  esac
done

args=(--build-arg "VERSION=$version" --build-arg "SOURCE=$source" --build-arg "REVISION=$revision")
context="$repo"
if [[ -n "$prebuilt" ]]; then
  # A context of its own: the binary (and its libraries, at the paths ldd names) under
  # prebuilt/, plus the files the runtime stage copies from the repository.
  context="$(mktemp -d)"
  trap 'rm -rf "$context"' EXIT
  mkdir -p "$context/prebuilt/usr/local/bin" "$context/deploy/image"
  cp "$prebuilt" "$context/prebuilt/usr/local/bin/regatta"
  cp "$repo/deploy/image/regatta.toml" "$context/deploy/image/"
  for lib in $(ldd "$prebuilt" 2>/dev/null | grep -o '/[^ ]*' || true); do
    mkdir -p "$context/prebuilt$(dirname "$lib")"
    cp -L "$lib" "$context/prebuilt$lib"
  done
  args+=(--build-arg BINARY=prebuilt)
fi

case "$builder" in
  docker)
    # BuildKit skips the stage the target does not use (the legacy builder would try to
    # pull the Rust image even for --prebuilt).
    DOCKER_BUILDKIT=1 ${DOCKER:-docker} build --network host -f "$repo/deploy/Containerfile" \
      "${args[@]}" -t "$tag" "$context"
    ;;
  buildah)
    buildah bud --isolation chroot --network host -f "$repo/deploy/Containerfile" \
      "${args[@]}" -t "$tag" "$context"
    ;;
  *) echo "build.sh: --builder is docker or buildah" >&2; exit 2 ;;
esac
echo "built $tag"

if [[ -n "$push" ]]; then
  remote="$push/regatta:$version"
  case "$builder" in
    docker)
      ${DOCKER:-docker} tag "$tag" "$remote"
      ${DOCKER:-docker} push "$remote"
      ;;
    buildah)
      buildah push "$tag" "docker://$remote"
      ;;
  esac
  echo "pushed $remote"
fi
