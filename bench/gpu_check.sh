#!/usr/bin/env bash
# The GPU measurements of issue 13, in one device call of under 8 minutes on a lent H100/H200.
#
#   bash bench/gpu_check.sh --prepare     # here, once: wheels the GPU image lacks -> .whl/,
#                                         # the 32 logos of ../shared/data/logos64 and the 48-logo set
#                                         # of bench/logo_sets.py -> .gpu-data/
#   device run: carry [".whl", ".gpu-data"], timeout_s 540, command "bash bench/gpu_check.sh"
#
# On the device it prints (and writes under $OUT): the card, the test suite on the GPU, the
# training step at float32, tf32 and bf16 for full-batch 256x256 and 512x512 photos (width 256,
# 3 hidden layers): steps/s, GFLOP/s as a share of a matmul peak of the same precision measured
# in the same run, the PSNR after the same number of steps (the cost of each precision), and
# the default `neurimg fit` of the logos. Each part has its own time limit, so one that hangs
# cannot eat the others' time. Record the figures with the card's name in bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    grep -qx '/.gpu-data/' .git/info/exclude 2>/dev/null || echo '/.gpu-data/' >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl .gpu-data
    # The GPU image has jax (CUDA), optax, rich, safetensors, imageio, pillow, scipy, pytest;
    # pypng is missing, and flax/typer are pinned here to the versions we test with.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        "pypng>=0.20220715" "flax==$(python3 -c 'import flax; print(flax.__version__)')" \
        "typer==$(python3 -c 'import importlib.metadata as m; print(m.version("typer"))')" || exit 1
    chmod -R u+w .gpu-data 2>/dev/null; rm -rf .gpu-data/logos64 .gpu-data/logos48 && cp -r --no-preserve=mode ../shared/data/logos64 .gpu-data/logos64
    python3 bench/logo_sets.py tune .gpu-data/logos48 || exit 1  # the 48-logo set of the fit target
    ls -la .whl .gpu-data
    exit 0
fi

OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD"
PY=python3

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
} 2>&1 | tee "$OUT/card.txt"

echo "== tests on the GPU (limit 200 s)"
timeout 200 $PY -m pytest -q -p no:cacheprovider -n 4 tests 2>&1 | tail -40 | tee "$OUT/tests.txt"

echo "== training step: float32 / tf32 / bf16, 256x256 and 512x512 full batch (limit 200 s)"
timeout 200 $PY bench/train_speed.py --configs gpu --precision float32,tf32,bf16 --psnr-steps 300 --calls 5 \
    --peak-size 8192 2>&1 | tee "$OUT/speed.txt"

LOGOS=.gpu-data/logos48
[ -d "$LOGOS" ] || LOGOS=.gpu-data/logos64
[ -d "$LOGOS" ] || LOGOS=examples/logos
echo "== default fit of $LOGOS (limit 90 s)"
timeout 90 $PY bench/fit_defaults.py "$LOGOS" 2>&1 | tee "$OUT/fit_defaults.txt"
