#!/usr/bin/env bash
# The GPU check of issue 19, run ON the lent GPU machine (the device tool's `run`, with
# carry [".whl"] after benchmarks/gpu/wheels.sh here), e.g.
#   bash benchmarks/gpu/run.sh            (about 6-8 minutes; logs under $OUT)
# 1. the built-in models' CUDA path against the CPU (tests/learners, tests/foundation device test);
# 2. benchmarks/aggregation.py --device cuda (robust rules on (20, 1M) float32, against the copy bandwidth);
# 3. benchmarks/overhead.py --device cuda at 100 and 1000 clients (fleetlearn's round against the
#    plain vmapped loop, both on the GPU; --variants default no-store).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script on a machine without a GPU
AGG_ARGS="${AGG_ARGS:-}" OVERHEAD_ARGS="${OVERHEAD_ARGS:-}"  # extra arguments (a quick dry run: --no-fedavg; --clients 100)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if ! python3 -c "import pydantic, sqlalchemy, zstandard, orjson, tomli_w, cryptography" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" >> "$OUT/gpu.txt" 2>&1
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/learners/test_torch_learner.py -k "device" 2>&1 | tee "$OUT/tests.log" | tail -3
timeout 200 python3 benchmarks/aggregation.py --device "$DEVICE" $AGG_ARGS 2>&1 | tee "$OUT/aggregation.log" | tail -30
timeout 240 python3 benchmarks/overhead.py --device "$DEVICE" --rounds 6 --variants default no-store $OVERHEAD_ARGS 2>&1 | tee "$OUT/overhead.log" | tail -30
