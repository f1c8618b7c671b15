#!/usr/bin/env bash
# One call on a lent GPU machine (no network): install the carried wheels (.whl/, gitignored:
# gguf, flashinfer-python 0.5.3, apache-tvm-ffi, nvidia-cudnn-frontend), run the GPU and kernel
# tests, then the GPU benchmark (python -m baton.services.engine.bench.gpu, given the bench args).
# Usage: [TEST_PATHS=...] bash scripts/device_check.sh [tests|bench|all] [bench args]
set -uo pipefail
what="${1:-all}"
shift || true
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/baton
export PYTHONPATH=/tmp/site:/tmp/pk PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
status=0
if [[ "$what" == tests || "$what" == all ]]; then
    python3 -m pytest -q -p no:cacheprovider -rfs --tb=short ${TEST_PATHS:-tests/gpu tests/kernels} 2>&1 | tail -40
    status=${PIPESTATUS[0]}
fi
if [[ "$what" == bench || "$what" == all ]]; then
    python3 -m baton.services.engine.bench.gpu "$@"
fi
exit "$status"
