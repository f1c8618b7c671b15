#!/usr/bin/env bash
# On a lent GPU (after scripts/device_check.sh has installed the carried wheels into /tmp/site):
# `baton serve` a random-weight real architecture on CUDA, as a user would, and ask it one chat
# request and one streamed completion over HTTP; then stop it (SIGTERM, as Kubernetes does) and check it stops cleanly.
# Usage: bash scripts/device_serve_check.sh [model] [serve flags...]
# e.g.   bash scripts/device_serve_check.sh dummy:llama-3.1-8b --max-model-len 4096
set -uo pipefail
model="${1:-dummy:llama-3.1-8b}"
shift || true
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/baton
export PYTHONPATH=/tmp/site:/tmp/pk PYTHONUNBUFFERED=1
port=8321
log=$(mktemp -d)/serve.log
${PYTHON:-python3} -m baton.services.cli serve --model "$model" --device "${DEVICE:-cuda}" --port "$port" \
    --log-dir "$(dirname "$log")/children" "$@" >"$log" 2>&1 &
serve_pid=$!
for _ in $(seq 1 300); do
    grep -q "baton is serving" "$log" && break
    kill -0 "$serve_pid" 2>/dev/null || break
    sleep 1
done
cat "$log"
status=1
${PYTHON:-python3} - "$port" "$model" <<'EOF' && status=0
import json, sys, time, urllib.request

port, model = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}/v1"
models = json.load(urllib.request.urlopen(f"{base}/models", timeout=10))
model_id = models["data"][0]["id"]
print("model:", model_id)

def post(path, body):
    req = urllib.request.Request(
        base + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=120)

t0 = time.perf_counter()
chat = json.load(post("/chat/completions", {
    "model": model_id,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 32, "temperature": 0,
}))
dt = time.perf_counter() - t0
choice = chat["choices"][0]
print(f"chat ({dt:.2f} s): finish={choice['finish_reason']} usage={chat['usage']}")
print("  text:", repr(choice["message"]["content"][:200]))
assert chat["usage"]["completion_tokens"] > 0

t0 = time.perf_counter()
first = None
chunks = 0
with post("/completions", {
    "model": model_id, "prompt": "The three laws of robotics are " * 40,
    "max_tokens": 64, "temperature": 0, "ignore_eos": True, "stream": True,
}) as resp:
    for line in resp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            chunks += 1
            first = first or time.perf_counter() - t0
total = time.perf_counter() - t0
print(f"stream: {chunks} chunks, first after {first:.3f} s, all after {total:.3f} s")
assert chunks >= 1
EOF
for f in "$(dirname "$log")"/children/*.log; do
    echo "== $f (tail)"; tail -5 "$f"
done
kill -TERM "$serve_pid"
wait "$serve_pid"
echo "serve exited with $? (0 = clean stop on SIGTERM); chat check status $status"
exit "$status"
