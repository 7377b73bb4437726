#!/usr/bin/env bash
# Build the pseudoflow images (CPU and CUDA) with one tag scheme derived from the package version
# in pyproject.toml:
#
#     ghcr.io/pseudoflow/pseudoflow:<version>-cpu
#     ghcr.io/pseudoflow/pseudoflow:<version>-cuda
#
# The cluster files (cluster/) name the CUDA tag; tests/cluster checks that they name exactly
# what this script prints, so bump the version in pyproject.toml and the cluster files together.
#
# Usage:
#     docker/build.sh                  build both images
#     docker/build.sh cuda             build one flavour (cpu or cuda)
#     docker/build.sh --push [FLAVOUR] build, then push
#     docker/build.sh --print-tags     print the tags, one per line (cpu, then cuda); needs no docker
#
# Extra `docker build` options go in DOCKER_BUILD_ARGS, e.g.
#     DOCKER_BUILD_ARGS="--build-arg MAX_JOBS=16" docker/build.sh cuda
set -euo pipefail

# The registry and repository every tag starts with. Pushing elsewhere means changing it here and
# the image references in cluster/ (the tests keep the two in line).
readonly IMAGE_REPOSITORY="ghcr.io/pseudoflow/pseudoflow"
readonly FLAVOURS=(cpu cuda)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
    sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# `version = "..."` of the [project] table: the one place the version is written.
package_version() {
    local version
    version="$(awk -F'"' '
        /^\[project\][[:space:]]*$/ { in_project = 1; next }
        /^\[/                       { in_project = 0 }
        in_project && /^version[[:space:]]*=/ { print $2; exit }
    ' "${repo_root}/pyproject.toml")"
    if [[ -z "${version}" ]]; then
        echo "error: no [project] version in ${repo_root}/pyproject.toml" >&2
        exit 1
    fi
    printf '%s\n' "${version}"
}

tag_for() {  # tag_for FLAVOUR VERSION
    printf '%s:%s-%s\n' "${IMAGE_REPOSITORY}" "$2" "$1"
}

build_one() {  # build_one FLAVOUR VERSION
    local flavour="$1" version="$2" tag revision
    tag="$(tag_for "${flavour}" "${version}")"
    revision="$(git -C "${repo_root}" rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "building ${tag}" >&2
    # BuildKit (the default builder since Docker 23) reads docker/Dockerfile.<flavour>.dockerignore.
    # shellcheck disable=SC2086  # DOCKER_BUILD_ARGS is split into options on purpose
    DOCKER_BUILDKIT=1 docker build \
        --file "${repo_root}/docker/Dockerfile.${flavour}" \
        --tag "${tag}" \
        --label "org.opencontainers.image.title=pseudoflow" \
        --label "org.opencontainers.image.version=${version}" \
        --label "org.opencontainers.image.revision=${revision}" \
        ${DOCKER_BUILD_ARGS:-} \
        "${repo_root}"
}

main() {
    local print_tags=0 push=0 flavour
    local -a selected=()
    while (($#)); do
        case "$1" in
            --print-tags) print_tags=1 ;;
            --push) push=1 ;;
            -h | --help) usage; exit 0 ;;
            cpu | cuda) selected+=("$1") ;;
            *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
        esac
        shift
    done
    ((${#selected[@]})) || selected=("${FLAVOURS[@]}")

    local version
    version="$(package_version)"

    if ((print_tags)); then
        for flavour in "${selected[@]}"; do
            tag_for "${flavour}" "${version}"
        done
        exit 0
    fi

    if ! command -v docker >/dev/null 2>&1; then
        echo "error: docker is not installed (--print-tags works without it)" >&2
        exit 1
    fi
    for flavour in "${selected[@]}"; do
        build_one "${flavour}" "${version}"
    done
    if ((push)); then
        for flavour in "${selected[@]}"; do
            docker push "$(tag_for "${flavour}" "${version}")"
        done
    fi
}

main "$@"
