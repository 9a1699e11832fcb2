#!/usr/bin/env bash
# Builds the compose cluster's images with no registry: Debian base images made by mmdebstrap
# and `docker import`, and the Snapwake images on top of them.
#
#   deploy/compose/build-images.sh [services|modelserver|all]     (default: services)
#
# Images (the names docker-compose.yml and `make compose-up` use):
#   snapwake/python-base:bookworm  Debian minbase + python3, the node's tools (runc, the
#                                  containers-common seccomp profile, skopeo, umoci) and etcd;
#                                  stands in for python:3.11-slim-bookworm
#   snapwake/etcd:bookworm         the same image (one mmdebstrap, not two), standing in for
#                                  quay.io/coreos/etcd: Debian's etcd-server and etcdctl
#   snapwake/services:dev          Dockerfile.services on the python base
#   snapwake/modelserver:dev       Dockerfile.modelserver on the python base (modelserver|all)
#
# A base image carries a label with the hash of what made it (packages, mirror, this script's
# base recipe); an image whose label matches is reused, so only the first run pays mmdebstrap.
# Python packages come from a wheelhouse in the build context (deploy/compose/wheels/, ignored
# by git), filled by the host's pip: the CPU torch wheel from pip's local wheel directory,
# the rest from the indexes pip is configured with. The image build itself fetches nothing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/deploy/compose
WHEELS=$HERE/wheels
PY=${PY:-$ROOT/.venv/bin/python}
TORCH=torch==2.13.0
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
PYTHON_BASE=snapwake/python-base:bookworm
ETCD_IMAGE=snapwake/etcd:bookworm
BASE_PACKAGES="python3 python3-venv ca-certificates runc golang-github-containers-common skopeo umoci etcd-server etcd-client"
export DOCKER_BUILDKIT=0  # the classic builder: BuildKit needs the buildx plugin on newer clients

log() { echo "build-images: $*" >&2; }

# (mirror, suite) of the Debian archive apt uses here, as tests/oci_image.py finds them.
read -r MIRROR SUITE < <(cd "$ROOT" && "$PY" -c \
  'import sys; sys.path.insert(0, "tests"); from oci_image import debian_mirror; print(*debian_mirror())')

# base_image TAG "PACKAGES" DOCKER-IMPORT-CHANGES...: mmdebstrap | docker import, unless TAG's
# label says it was made from the same recipe.
base_image() {
  local tag=$1 packages=$2; shift 2
  local key
  key=$(printf '%s\n' "v1" "$MIRROR" "$SUITE" "$packages" "$@" | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f '{{index .Config.Labels "org.snapwake.recipe"}}' "$tag" 2>/dev/null)" = "$key" ]; then
    log "$tag is current (recipe $key)"
    return
  fi
  log "$tag: mmdebstrap $SUITE from $MIRROR with: $packages"
  local changes=()
  for c in "$@" "LABEL org.snapwake.recipe=$key"; do changes+=(--change "$c"); done
  mmdebstrap --quiet --variant=minbase --include="${packages// /,}" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    "$SUITE" - "$MIRROR" | docker import "${changes[@]}" - "$tag" >/dev/null
}

# pip download into the wheelhouse, without pip's notes on configured index dirs it skips.
pip_download() {
  "$PY" -m pip download -q --dest "$WHEELS" "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

# The wheelhouse: refilled only when requirements.txt changes.
fill_wheels() {
  local key
  key=$(sha256sum "$ROOT/requirements.txt" | cut -c1-16)
  [ "$(cat "$WHEELS/.key" 2>/dev/null)" = "$key" ] && { log "wheelhouse is current"; return; }
  mkdir -p "$WHEELS" && rm -f "$WHEELS"/*.whl
  # The CPU torch wheel from pip's local wheel directory (find-links), else the CPU index:
  # never the multi-GB CUDA build from PyPI.
  pip_download --no-deps --no-index "$TORCH" 2>/dev/null \
    || pip_download --no-deps --index-url "$TORCH_CPU_INDEX" "$TORCH"
  # Runtime requirements only: what comes before the "# dev and test" line.
  pip_download --find-links "$WHEELS" "$TORCH" -r <(sed '/^# dev and test/,$d' "$ROOT/requirements.txt")
  echo "$key" >"$WHEELS/.key"
}

# build DOCKERFILE TAG: the build context is the repository's tracked and unignored files that
# the image needs, plus the wheelhouse, streamed as a tar (no .dockerignore is relied upon).
build() {
  local dockerfile=$1 tag=$2
  log "$tag from $dockerfile"
  (cd "$ROOT" && { git ls-files -z --cached --others --exclude-standard -- \
       requirements.txt pyproject.toml snapwake services modelserver proto "$dockerfile" \
       deploy/compose/wheels/.gitignore deploy/compose/nodeagent-entrypoint.sh
     find deploy/compose/wheels -maxdepth 1 -name '*.whl' -print0; } \
   | tar --null --ignore-failed-read -T - -c \
   | docker build -q -f "$dockerfile" --build-arg "BASE_IMAGE=$PYTHON_BASE" -t "$tag" - >/dev/null) \
    2> >(grep -vE '^(DEPRECATED: The legacy builder| +BuildKit is currently disabled| +environment-variable|$)' >&2)
}

what=${1:-services}
base_image "$PYTHON_BASE" "$BASE_PACKAGES" 'ENV LANG=C.UTF-8' 'CMD ["python3"]'
docker tag "$PYTHON_BASE" "$ETCD_IMAGE"
fill_wheels
case $what in
  services) build deploy/compose/Dockerfile.services snapwake/services:dev ;;
  modelserver) build deploy/compose/Dockerfile.modelserver snapwake/modelserver:dev ;;
  all) build deploy/compose/Dockerfile.services snapwake/services:dev
       build deploy/compose/Dockerfile.modelserver snapwake/modelserver:dev ;;
  *) echo "usage: $0 [services|modelserver|all]" >&2; exit 2 ;;
esac
