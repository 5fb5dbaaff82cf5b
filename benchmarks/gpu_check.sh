#!/usr/bin/env bash
# GPU check: the builtin trainer against kohya-ss sd-scripts on one GPU (benchmarks/gpu_check.py).
#
# On a machine with network, once: the wheels and the sd-scripts code it needs (~28 MB) into DIR:
#     benchmarks/gpu_check.sh --download DIR SD_SCRIPTS_CHECKOUT
# On the GPU machine (no network; python3 with CUDA torch, transformers, accelerate, safetensors,
# tensorboard, pillow, numpy, opencv already there; transformers >= 5 for charbuild's side, see
# pyproject), from the repository root, <= 8 minutes on an H100:
#     benchmarks/gpu_check.sh DIR [OUT_DIR]
# It installs the wheels into two folders under /tmp (charbuild's: diffusers 0.42, doit, tomli-w;
# sd-scripts' pins: transformers 4.54.1, diffusers 0.32.1, accelerate 1.6.0, ...), makes random
# full-size SD1.5 and SDXL models on the GPU, trains both sides of every case, and writes
# OUT_DIR/gpu_check.md (the table to append to benchmarks/GPU.md) and gpu_check.json.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
PY="${PYTHON:-python3}"

if [ "${1:-}" = "--download" ]; then
    dir="$2"; checkout="$3"
    mkdir -p "$dir/wheels/charbuild" "$dir/wheels/sd-scripts" "$dir/sd-scripts"
    get() {  # folder, then requirements: Python 3.12 x86-64 wheels, no dependencies pulled in
        local into="$1"; shift
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$into" "$@"
    }
    get "$dir/wheels/charbuild" diffusers==0.42.1 doit==0.36.0 tomli-w==1.2.0 cloudpickle==3.1.3
    # sd-scripts' requirements.txt pins (what its training imports; no bitsandbytes: both sides use AdamW)
    get "$dir/wheels/sd-scripts" diffusers==0.32.1 transformers==4.54.1 tokenizers==0.21.4 huggingface-hub==0.34.3 \
        accelerate==1.6.0 ftfy==6.3.1 wcwidth==0.2.13 einops==0.7.0 toml==0.10.2 voluptuous==0.15.2 imagesize==1.4.1
    git -C "$checkout" archive HEAD library networks train_network.py sdxl_train_network.py | tar -x -C "$dir/sd-scripts"
    git -C "$checkout" rev-parse HEAD > "$dir/sd-scripts/COMMIT"
    du -sh "$dir"
    exit 0
fi

dir="${1:?usage: gpu_check.sh DIR [OUT_DIR] | gpu_check.sh --download DIR SD_SCRIPTS_CHECKOUT}"
out="${2:-${OUT:-.}}"
mkdir -p "$out"
site=/tmp/gpu-check-site; sdsite=/tmp/gpu-check-sd-site
rm -rf "$site" "$sdsite"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$dir"/wheels/charbuild/*.whl
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$sdsite" "$dir"/wheels/sd-scripts/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "sd-scripts $(cat "$dir/sd-scripts/COMMIT" 2>/dev/null || echo '?')"
export PYTHONPATH="$site:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# 8 minutes in all: the model making and each side's training are bounded inside too
timeout 470 "$PY" "$HERE/gpu_check.py" --work /tmp/gpu-check --sd-scripts "$dir/sd-scripts" --sd-path "$sdsite" \
    --out "$out/gpu_check.md" ${GPU_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_check.log"  # GPU_CHECK_ARGS: e.g. "--cases sdxl-bf16"
