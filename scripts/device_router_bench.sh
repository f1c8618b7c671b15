#!/usr/bin/env bash
# On a lent GPU (no network): install the carried wheels (.whl/), then the router policies
# benchmark (python -m baton.router.bench.policies) on dummy:llama-3.1-8b, 1 prefill + 2 decode
# workers on the one GPU. Results (JSON, per-policy bench results) go to $OUT.
# Usage: bash scripts/device_router_bench.sh [extra args for baton.router.bench.policies]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/baton
export PYTHONPATH=/tmp/site:/tmp/pk PYTHONUNBUFFERED=1 OUT="${OUT:-bench_out}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
python3 -m baton.router.bench.policies --model dummy:llama-3.1-8b --device cuda --dtype bfloat16 \
    --kv-cache-memory-mb 900 --groups 8 --questions 12 --prefix-len 1500 --question-len 64 \
    --output-len 32 --concurrency 8 --slo-ttft-ms 300 --slo-tpot-ms 50 "$@"
status=$?
for f in "$OUT"/bench-policies-*/*-logs/*.log; do
    if grep -q -i "traceback\|error" "$f"; then echo "== $f"; grep -i -m5 -A3 "traceback\|error" "$f"; fi
done
exit $status
