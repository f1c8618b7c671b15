"""`baton` command line: generate and chat on a local engine (serve etc. arrive in [2/4])."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from baton.loadgen.cli import add_bench_arguments, run_bench
from baton.services.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from baton.services.engine.dtypes import CHOICES
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.tokenizer import Tokenizer


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 | path.gguf | HF folder | dummy:cfg")
    p.add_argument("--dtype", default="auto", choices=list(CHOICES))
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (CUDA if present)")
    p.add_argument(
        "--enforce-eager", action="store_true", help="CUDA: no CUDA graphs (every step eager)"
    )
    p.add_argument(
        "--attention-backend",
        default="triton",
        choices=["triton", "flashinfer"],
        help="CUDA attention kernels (flashinfer runs eagerly)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="CUDA: fraction of the device for weights + KV + graphs (KV pool auto-sizing)",
    )
    p.add_argument(
        "--async-scheduling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="launch step N+1 before collecting step N's tokens (default: on for CUDA)",
    )
    p.add_argument(
        "--pdl",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CUDA: programmatic dependent launch of the Triton kernels (default: on sm_90+)",
    )


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def _engine_config(a: argparse.Namespace) -> EngineConfig:
    """The engine flags of _engine_args (plus --kv-cache-memory-mb where a command has it)."""
    kv_mb = getattr(a, "kv_cache_memory_mb", None)
    cache = CacheConfig(
        block_size=a.block_size,
        kv_cache_memory_bytes=None if kv_mb is None else kv_mb * 1024**2,
        gpu_memory_utilization=a.gpu_memory_utilization,
    )
    return EngineConfig(
        model=a.model,
        dtype=a.dtype,
        device=a.device,
        enforce_eager=a.enforce_eager,
        attention_backend=a.attention_backend,
        async_scheduling=a.async_scheduling,
        pdl=a.pdl,
        max_model_len=a.max_model_len,
        cache=cache,
        scheduler=SchedulerConfig(
            max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens
        ),
    )


def _engine(a: argparse.Namespace) -> LLMEngine:
    return LLMEngine.from_config(_engine_config(a))


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.seed,
    )


def _stream(engine: LLMEngine, prompt: str, params: SamplingParams) -> str:
    """Run one request, printing text as it is detokenized."""
    request_id = engine.add_request(prompt, params)
    printed = 0
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != request_id:
                continue
            text = out.outputs[0].text
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)
    sys.stdout.write("\n")
    return text


def cmd_generate(a: argparse.Namespace) -> int:
    prompts = a.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    engine = _engine(a)
    params = _params(a)
    ids = [engine.add_request(p, params) for p in prompts]
    t0 = time.perf_counter()
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - t0
    for rid, prompt in zip(ids, prompts, strict=True):
        out = done[rid]
        print(
            json.dumps(
                {
                    "prompt": prompt,
                    "text": out.outputs[0].text,
                    "finish_reason": out.outputs[0].finish_reason,
                }
            )
        )
    num_tokens = sum(len(o.outputs[0].token_ids) for o in done.values())
    print(f"# {num_tokens} tokens in {elapsed:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    engine = _engine(a)
    tokenizer = engine.tokenizer
    if tokenizer is None:
        print("this model has no tokenizer", file=sys.stderr)
        return 2
    params = _params(a)
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    once = a.message is not None
    print(f"baton chat · {engine.model_id} · Ctrl-D to quit", file=sys.stderr)
    while True:
        if once:
            user = a.message
        else:
            try:
                user = input("you> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True)
        print("assistant> ", end="", flush=True)
        reply = _stream(engine, prompt, params)
        history.append({"role": "assistant", "content": reply})
        if once:
            return 0


def cmd_worker(a: argparse.Namespace) -> int:
    import asyncio
    import logging

    from baton.services.worker.server import WorkerConfig, run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine = _engine_config(a)
    worker = WorkerConfig(
        role=a.role,
        host=a.host,
        port=a.port,
        worker_id=a.worker_id,
        redis_url=a.redis_url,
        transport=a.transport,
        metrics_port=a.metrics_port,
        remote_prefill_min_tokens=a.remote_prefill_min_tokens,
        max_queued_requests=a.max_queued_requests,
    )
    asyncio.run(run_worker(worker, engine))
    return 0


def cmd_gateway(a: argparse.Namespace) -> int:
    import logging

    from baton.services.gateway.main import run_gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_gateway(a.host, a.port, a.redis_url, a.model, tuple(a.api_key), a.policy)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from baton.services.launcher import ServeConfig, serve

    return serve(
        ServeConfig(
            host=a.host,
            port=a.port,
            model=a.model,
            dtype=a.dtype,
            num_prefill=a.num_prefill,
            num_decode=a.num_decode,
            colocated=a.colocated,
            transport=a.transport,
            redis_url=a.redis_url,
            kv_cache_memory_mb=a.kv_cache_memory_mb,
            remote_prefill_min_tokens=a.remote_prefill_min_tokens,
            api_keys=tuple(a.api_key),
            log_dir=a.log_dir,
            worker_args=_engine_flags(a),
        )
    )


def _engine_flags(a: argparse.Namespace) -> tuple[str, ...]:
    """serve's engine flags, handed on to each `baton worker` it starts; the workers share
    the device, so each gets an equal part of --gpu-memory-utilization."""
    num_workers = 1 if a.colocated else a.num_prefill + a.num_decode
    flags = [
        "--block-size",
        str(a.block_size),
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--max-num-batched-tokens",
        str(a.max_num_batched_tokens),
        "--device",
        a.device,
        "--gpu-memory-utilization",
        str(a.gpu_memory_utilization / num_workers),
        "--attention-backend",
        a.attention_backend,
    ]
    if a.enforce_eager:
        flags.append("--enforce-eager")
    for name, value in (("async-scheduling", a.async_scheduling), ("pdl", a.pdl)):
        if value is not None:
            flags.append(f"--{name}" if value else f"--no-{name}")
    if a.max_model_len is not None:
        flags += ["--max-model-len", str(a.max_model_len)]
    return tuple(flags)


def cmd_bench(a: argparse.Namespace) -> int:
    def tokenizer(name: str) -> Tokenizer | None:
        from baton.services.engine.loader import load_model_info

        return load_model_info(name).tokenizer

    return run_bench(a, tokenizer_loader=tokenizer)


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--redis-url", default="", help="empty: start a Redis server (serve only)")
    p.add_argument("--transport", default="tcp", choices=["tcp", "nixl", "mooncake"])
    p.add_argument(
        "--kv-cache-memory-mb",
        type=int,
        default=None,
        help="KV pool size (default: 512 on CPU; on CUDA what --gpu-memory-utilization leaves)",
    )
    p.add_argument(
        "--remote-prefill-min-tokens",
        type=int,
        default=32,
        help="conditional disaggregation: shorter uncached prompts are prefilled on decode",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete prompts (arguments or stdin lines)")
    gen.add_argument("prompt", nargs="*")
    _engine_args(gen)
    _sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat with the model (interactive, or --message once)")
    chat.add_argument("--message", default=None, help="send one message, print the reply, exit")
    chat.add_argument("--system", default=None, help="system prompt")
    _engine_args(chat)
    _sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)
    serve = sub.add_parser("serve", help="the whole cluster on this machine (OpenAI API)")
    _engine_args(serve)
    _cluster_args(serve)
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--num-prefill", type=int, default=1)
    serve.add_argument("--num-decode", type=int, default=1)
    serve.add_argument("--colocated", action="store_true", help="one mixed worker")
    serve.add_argument("--api-key", action="append", default=[])
    serve.add_argument("--log-dir", default="")
    serve.set_defaults(func=cmd_serve)
    worker = sub.add_parser("worker", help="one engine behind gRPC (started by serve)")
    _engine_args(worker)
    _cluster_args(worker)
    worker.add_argument("--role", default="mixed", choices=["prefill", "decode", "mixed"])
    worker.add_argument("--port", type=int, default=0)
    worker.add_argument("--worker-id", default="")
    worker.add_argument("--metrics-port", type=int, default=None)
    worker.add_argument(
        "--max-queued-requests", type=int, default=256, help="beyond this, new requests get 429"
    )
    worker.set_defaults(func=cmd_worker)
    gateway = sub.add_parser("gateway", help="the OpenAI HTTP front (started by serve)")
    gateway.add_argument("--model", default="smollm2")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--redis-url", required=True)
    gateway.add_argument("--api-key", action="append", default=[])
    gateway.add_argument("--policy", default="least_load", choices=["least_load", "round_robin"])
    gateway.set_defaults(func=cmd_gateway)
    bench = sub.add_parser("bench", help="benchmark a server: `bench serve`, `bench compare`")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
