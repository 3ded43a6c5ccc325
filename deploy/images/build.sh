#!/usr/bin/env bash
# Build Sluice's container images with podman (`make images`):
#   1. install podman, buildah, mmdebstrap and runc from Debian if they are missing;
#   2. make the Debian base image (mmdebstrap --variant=minbase, `podman import`) if missing;
#   3. build the images, tagged with the package version, from a staged copy of the sources;
#   4. print their sizes.
#
# Usage: deploy/images/build.sh [IMAGE ...]      (default: all of them)
#   IMAGE is sluice, sluice-build, sluice-triton, sluice-recall-gpu or sluice-redis.
#   deploy/images/build.sh --fingerprint          print the sources' fingerprint and exit
# Environment:
#   SLUICE_WHEELHOUSE=DIR     where torch-2.13.0+cpu-cp311-*.whl lies (default: pip's
#                             find-links, then /opt/wheels)
#   SLUICE_REBUILD_BASE=1     make the Debian base again even if it exists
#   TRITON_BASE=IMAGE         build sluice-triton on this base instead of the local
#                             stand-in, e.g. nvcr.io/nvidia/tritonserver:25.01-py3
#   SLUICE_BUILD_ARGS="..."   extra arguments for every `podman build` (e.g. --no-cache)
#
# Every image carries the label io.sluice.source: a fingerprint of the sources it was built
# from (tests/container compares it to refuse stale images).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=deploy/images/env.sh
. "$here/env.sh"
root="$SLUICE_REPO_ROOT"
work="$root/var/images"
context="$work/context"
host_ca=/etc/ssl/certs/ca-certificates.crt

log() { printf '==> %s\n' "$*" >&2; }

# -- the sources --------------------------------------------------------------------------
# What the package build reads (MANIFEST.in, setup.py) and the image recipes, as git sees
# them: tracked and new files, never ignored ones (generated protobuf code, trained versions
# under model_repository/<n>/, build/ directories).
stage_context() {
    rm -rf "$context"
    mkdir -p "$context"
    (cd "$root" && git ls-files -z --cached --others --exclude-standard -- \
        pyproject.toml setup.py MANIFEST.in README.md LICENSE protos services \
        model_repository deploy/images |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null --files-from=- --create --file=-) | tar --extract --directory="$context"
}

fingerprint() {
    (cd "$context" && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum) |
        sha256sum | cut -c1-16
}

if [ "${1:-}" = "--fingerprint" ]; then
    stage_context
    fingerprint
    exit 0
fi

# -- 1. the tools -------------------------------------------------------------------------
need=()
for tool in podman buildah mmdebstrap runc; do
    command -v "$tool" >/dev/null || need+=("$tool")
done
if [ "${#need[@]}" -gt 0 ]; then
    log "installing ${need[*]} from Debian"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# -- 2. the Debian base -------------------------------------------------------------------
# bookworm's python3 is 3.11, the version the project pins. minbase, plus what every image
# needs: python3 with venv (the images' venvs link /usr/bin/python3), CA certificates and
# OpenMP (FAISS, onnxruntime). No documentation, manuals or locales; no apt lists.
make_base() {
    log "making the Debian base $SLUICE_BASE_IMAGE (mmdebstrap, from the host's apt sources)"
    local tarball="$work/base.tar"
    mkdir -p "$work"
    # The hook's "$1" is mmdebstrap's: the new root directory (so single quotes).
    # shellcheck disable=SC2016
    mmdebstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates,libgomp1 \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
        bookworm "$tarball"
    podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "mmdebstrap --variant=minbase bookworm $(date -u +%Y-%m-%d)" \
        "$tarball" "$SLUICE_BASE_IMAGE" >/dev/null
    rm -f "$tarball"
}
if [ "${SLUICE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$SLUICE_BASE_IMAGE"; then
    make_base
fi

# -- the torch wheelhouse -----------------------------------------------------------------
# The sluice-build image takes torch from a local wheel (a CPU build), never from PyPI.
find_torch_wheel() {
    local dirs=()
    [ -n "${SLUICE_WHEELHOUSE:-}" ] && dirs+=("$SLUICE_WHEELHOUSE")
    [ -n "${PIP_FIND_LINKS:-}" ] && read -r -a more <<<"$PIP_FIND_LINKS" && dirs+=("${more[@]}")
    while IFS= read -r line; do
        # pip config list: global.find-links='/opt/wheels' (possibly several, space-separated)
        local value="${line#*=}"
        value="${value//\'/}"
        read -r -a more <<<"$value" && dirs+=("${more[@]}")
    done < <(python3 -m pip config list 2>/dev/null | grep -E 'find-links=' || true)
    dirs+=(/opt/wheels)
    local d
    for d in "${dirs[@]}"; do
        d="${d#file://}"
        compgen -G "$d/torch-${SLUICE_TORCH_WHEEL_VERSION}-cp311-cp311-*.whl" >/dev/null &&
            { compgen -G "$d/torch-${SLUICE_TORCH_WHEEL_VERSION}-cp311-cp311-*.whl" | head -1; return 0; }
    done
    return 1
}
wheelhouse() {
    local wheel
    wheel="$(find_torch_wheel)" || {
        echo "no torch-${SLUICE_TORCH_WHEEL_VERSION}-cp311-*.whl found: download it from" \
            "https://download.pytorch.org/whl/cpu and set SLUICE_WHEELHOUSE to its directory" >&2
        exit 1
    }
    # Only that wheel goes into the build, through its own directory.
    mkdir -p "$work/wheelhouse"
    local target
    target="$work/wheelhouse/$(basename "$wheel")"
    if [ ! -f "$target" ] || [ "$(stat -c %s "$wheel")" != "$(stat -c %s "$target")" ]; then
        find "$work/wheelhouse" -name 'torch-*.whl' -delete
        ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
    fi
    echo "$work/wheelhouse"
}

# -- 3. the images ------------------------------------------------------------------------
stage_context
source_fp="$(fingerprint)"
log "sources staged in $context (fingerprint $source_fp)"

labels=(
    --label "org.opencontainers.image.version=$SLUICE_VERSION"
    --label "org.opencontainers.image.source=https://github.com/sluice/sluice"
    --label "org.opencontainers.image.licenses=Apache-2.0"
    --label "io.sluice.source=$source_fp"
)
# shellcheck disable=SC2206
extra=(${SLUICE_BUILD_ARGS:-})

build() { # [pull=POLICY] build IMAGE CONTAINERFILE [podman build arguments]
    local image="$1" file="$2" title
    shift 2
    title="${image%%:*}"
    title="${title##*/}"
    log "building $image"
    podman build --layers --pull="${pull:-never}" --format oci \
        --file "$here/$file" --tag "$image" \
        --build-arg "BASE=$SLUICE_BASE_IMAGE" \
        --volume "$host_ca:/run/host-ca.crt:ro" \
        "${labels[@]}" --label "org.opencontainers.image.title=$title" \
        "${extra[@]}" "$@" "$context"
}

images=("$@")
[ "${#images[@]}" -gt 0 ] || images=(sluice sluice-build sluice-triton sluice-redis sluice-recall-gpu)
built=()
for name in "${images[@]}"; do
    case "$name" in
    sluice)
        build "localhost/sluice:$SLUICE_VERSION" sluice.Containerfile ;;
    sluice-build)
        build "localhost/sluice-build:$SLUICE_VERSION" build.Containerfile \
            --volume "$(wheelhouse):/wheelhouse:ro" ;;
    sluice-recall-gpu)
        build "localhost/sluice-recall-gpu:$SLUICE_VERSION" recall-gpu.Containerfile ;;
    sluice-redis)
        build "localhost/sluice-redis:$SLUICE_VERSION" redis.Containerfile ;;
    sluice-triton)
        triton_base="${TRITON_BASE:-$SLUICE_TRITON_LOCAL_BASE}"
        if [ "$triton_base" = "$SLUICE_TRITON_LOCAL_BASE" ]; then
            build "$SLUICE_TRITON_LOCAL_BASE" triton-local-base.Containerfile
            built+=("$SLUICE_TRITON_LOCAL_BASE")
        fi
        # NVIDIA's image comes from nvcr.io (podman login nvcr.io first); ours never does.
        triton_pull=never
        [ "$triton_base" = "$SLUICE_TRITON_LOCAL_BASE" ] || triton_pull=missing
        pull="$triton_pull" build "localhost/sluice-triton:$SLUICE_VERSION" \
            triton.Containerfile --build-arg "TRITON_BASE=$triton_base" ;;
    *)
        echo "unknown image $name (sluice, sluice-build, sluice-triton, sluice-recall-gpu," \
            "sluice-redis)" >&2
        exit 2 ;;
    esac
    built+=("localhost/$name:$SLUICE_VERSION")
done

# -- 4. sizes -----------------------------------------------------------------------------
log "images (podman image ls)"
for image in "$SLUICE_BASE_IMAGE" "${built[@]}"; do
    podman image ls --noheading --format '{{.Repository}}:{{.Tag}}|{{.Size}}|{{.ID}}' "$image"
done | awk -F'|' '!seen[$1]++ { printf "  %-48s %10s  %s\n", $1, $2, $3 }'
