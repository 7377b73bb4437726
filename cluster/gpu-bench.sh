#!/usr/bin/env bash
# `pseudoflow bench throughput --device cuda` on a GPU machine that has torch, torchvision, numpy,
# pillow and pyarrow but none of this project's other packages and no network (a lent
# accelerator, a locked-down node). The bench's stage cores import no Ray and no MLflow; what they
# need besides (pydantic, click) comes from wheels carried beside the checkout.
#
#   here, with the package registry:  cluster/gpu-bench.sh download .wheels
#   there, from the repository root:  cluster/gpu-bench.sh run .wheels OUT_DIR [bench options...]
#
# `run` installs the wheels into OUT_DIR/site (nothing system-wide), prints the device and the
# torch build, and writes OUT_DIR/throughput.json and OUT_DIR/throughput.txt.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
mode=$1 wheels=$2
shift 2
packages=(pydantic click)

case $mode in
download)
    mkdir -p "$wheels"
    # pydantic-core is built per Python version: one wheel for each a GPU image may carry
    for version in 3.10 3.11 3.12 3.13 3.14; do
        python3 -m pip download --quiet --dest "$wheels" --only-binary=:all: \
            --platform manylinux2014_x86_64 --python-version "$version" "${packages[@]}"
    done
    ls "$wheels"
    ;;
run)
    [ $# -ge 1 ] || usage
    out=$1
    shift
    mkdir -p "$out"
    python3 -m pip install --quiet --no-index --find-links "$wheels" --target "$out/site" \
        "${packages[@]}"
    export PYTHONPATH="$PWD:$out/site" RAY_USAGE_STATS_ENABLED=0
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
    python3 -m pipeline bench throughput --device cuda --json "$out/throughput.json" "$@" \
        | tee "$out/throughput.txt"
    ;;
*)
    usage
    ;;
esac
