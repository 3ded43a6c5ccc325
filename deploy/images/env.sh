# shellcheck shell=bash
# Source this before running podman or buildah by hand on Sluice's images:
#     . deploy/images/env.sh && podman image ls
# It points podman and buildah at the settings in this directory (runc + cgroupfs, ulimits
# below the host's, no registry search, overlay storage) instead of /etc, and names the
# images. build.sh and tests/container use it.

SLUICE_IMAGES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)"
SLUICE_REPO_ROOT="$(cd "$SLUICE_IMAGES_DIR/../.." && pwd)"
export CONTAINERS_CONF="$SLUICE_IMAGES_DIR/containers.conf"
export CONTAINERS_REGISTRIES_CONF="$SLUICE_IMAGES_DIR/registries.conf"
export CONTAINERS_STORAGE_CONF="$SLUICE_IMAGES_DIR/storage.conf"

# The package version (pyproject.toml) tags every image.
SLUICE_VERSION="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$SLUICE_REPO_ROOT/pyproject.toml")"
export SLUICE_VERSION

# The Debian base every local image starts from (made with mmdebstrap, `podman import`ed).
export SLUICE_BASE_IMAGE="${SLUICE_BASE_IMAGE:-localhost/sluice-base:bookworm}"
# The local stand-in for NGC's tritonserver image: tritonserver from the nvidia-pytriton
# wheel with the python backend, onnxruntime and numpy. Production passes
# TRITON_BASE=nvcr.io/nvidia/tritonserver:<ver>-py3 instead (build.sh, docs/deploy.md).
export SLUICE_TRITON_LOCAL_BASE="localhost/sluice-triton-base:pytriton-0.7.0"
# The torch build the sluice-build image installs, from a local wheelhouse (never PyPI).
export SLUICE_TORCH_WHEEL_VERSION="2.13.0+cpu"
