"""`baton` command line: generate, chat, serve, worker, gateway, bench.

Every engine, worker and serve flag is generated from its config dataclass (config_cli.py):
`--field-name`, typed and defaulted by the field, its help the field's docstring.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from baton.loadgen.cli import add_bench_arguments, run_bench
from baton.router.policy import DEFAULT_POLICY, POLICIES
from baton.services.config_cli import (
    add_config_flags,
    flat_fields,
    from_flat,
    from_json,
    from_namespace,
    namespace_values,
)
from baton.services.engine.config import EngineConfig
from baton.services.engine.llm_engine import LLMEngine
from baton.services.engine.sampling_params import SamplingParams
from baton.services.engine.tokenizer import Tokenizer
from baton.services.gateway.deadlines import StreamDeadlines
from baton.services.gateway.limits import GatewayLimits
from baton.services.launcher import ServeConfig
from baton.services.worker.server import WorkerConfig

ENGINE_CLI_DEFAULTS: dict[str, object] = {"device": "auto"}
"""The engine flags whose default differs from EngineConfig's on purpose: a command typed by
hand uses the GPU when there is one, while EngineConfig() in code stays on the CPU."""

MIB = 1024**2


def _engine_args(p: argparse.ArgumentParser) -> None:
    """A flag for every field of EngineConfig, CacheConfig and SchedulerConfig."""
    add_config_flags(p, EngineConfig, ENGINE_CLI_DEFAULTS)
    _kv_cache_mb_arg(p)


def _kv_cache_mb_arg(p: argparse.ArgumentParser) -> None:
    text = "--kv-cache-memory-bytes in MiB (give one of the two)"
    p.add_argument("--kv-cache-memory-mb", type=int, default=None, help=text)


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    # --seed is EngineConfig.seed
    p.add_argument("--sampling-seed", type=int, default=None, help="seed of each request")


def config_values(cls: type, a: argparse.Namespace) -> dict[str, Any]:
    """The flat field values of cls in a, with --kv-cache-memory-mb as kv_cache_memory_bytes."""
    values = namespace_values(cls, a)
    kv_mb = getattr(a, "kv_cache_memory_mb", None)
    if kv_mb is not None and "kv_cache_memory_bytes" in values:
        if values["kv_cache_memory_bytes"] is not None:
            raise SystemExit("give --kv-cache-memory-mb or --kv-cache-memory-bytes, not both")
        values["kv_cache_memory_bytes"] = kv_mb * MIB
    return values


def engine_config(a: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of a command's flags, or of its --engine-config JSON (worker)."""
    text = getattr(a, "engine_config", None)
    if text is None:
        return from_flat(EngineConfig, config_values(EngineConfig, a))
    flat = flat_fields(EngineConfig)
    given = sorted(
        flat[name].flag
        for name, value in namespace_values(EngineConfig, a).items()
        if value != ENGINE_CLI_DEFAULTS.get(name, flat[name].default)
    )
    if getattr(a, "kv_cache_memory_mb", None) is not None:
        given.append("--kv-cache-memory-mb")
    if given:
        raise SystemExit(f"--engine-config is the whole engine config; drop {', '.join(given)}")
    return from_json(EngineConfig, text)


def serve_config(a: argparse.Namespace) -> ServeConfig:
    """The ServeConfig of `baton serve`'s flags (API keys: --api-key and $BATON_API_KEYS)."""
    from baton.services.gateway.main import api_keys_from_env

    values = config_values(ServeConfig, a)
    values["api_keys"] = (*values.get("api_keys", ()), *api_keys_from_env())
    return from_flat(ServeConfig, values)


def _engine(a: argparse.Namespace) -> LLMEngine:
    return LLMEngine.from_config(engine_config(a))


def _params(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens,
        temperature=a.temperature,
        top_p=a.top_p,
        top_k=a.top_k,
        seed=a.sampling_seed,
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

    from baton.services.worker.server import run_worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run_worker(from_namespace(WorkerConfig, a), engine_config(a)))
    return 0


def cmd_gateway(a: argparse.Namespace) -> int:
    import logging

    from baton.services.gateway.main import run_gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    deadlines = from_namespace(StreamDeadlines, a)
    limits = from_namespace(GatewayLimits, a)
    keys = tuple(a.api_key)
    policy = a.router_policy
    run_gateway(a.host, a.port, a.redis_url, a.model, keys, policy, deadlines, limits=limits)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from baton.services.launcher import serve

    return serve(serve_config(a))


def cmd_bench(a: argparse.Namespace) -> int:
    def tokenizer(name: str) -> Tokenizer | None:
        from baton.services.engine.loader import load_model_info

        return load_model_info(name).tokenizer

    return run_bench(a, tokenizer_loader=tokenizer)


def build_parser() -> argparse.ArgumentParser:
    """The `baton` parser; every config flag comes from its dataclass (config_cli.py)."""
    parser = argparse.ArgumentParser(prog="baton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        fmt = argparse.ArgumentDefaultsHelpFormatter
        return sub.add_parser(name, help=help, description=help, formatter_class=fmt)

    gen = command("generate", "complete prompts (arguments or stdin lines)")
    gen.add_argument("prompt", nargs="*")
    _engine_args(gen)
    _sampling_args(gen, max_tokens=64)
    gen.set_defaults(func=cmd_generate)
    chat = command("chat", "chat with the model (interactive, or --message once)")
    chat.add_argument("--message", default=None, help="send one message, print the reply, exit")
    chat.add_argument("--system", default=None, help="system prompt")
    _engine_args(chat)
    _sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)
    serve = command("serve", "the whole cluster on this machine (OpenAI API)")
    add_config_flags(serve, ServeConfig, ENGINE_CLI_DEFAULTS)
    _kv_cache_mb_arg(serve)
    serve.set_defaults(func=cmd_serve)
    worker = command("worker", "one engine behind gRPC (started by serve)")
    add_config_flags(worker, WorkerConfig)
    worker.add_argument(
        "--engine-config",
        default=None,
        metavar="JSON",
        help="the whole EngineConfig as JSON (how serve hands it on), instead of engine flags",
    )
    _engine_args(worker)
    worker.set_defaults(func=cmd_worker)
    gateway = command("gateway", "the OpenAI HTTP front (started by serve)")
    gateway.add_argument("--model", default="smollm2")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=int, default=8000)
    gateway.add_argument("--redis-url", default="", help="empty: $BATON_REDIS_URL")
    gateway.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted Bearer key (repeatable); also $BATON_API_KEYS, comma-separated, and "
        "$BATON_API_KEY",
    )
    gateway.add_argument("--router-policy", default=DEFAULT_POLICY, choices=POLICIES)
    add_config_flags(gateway, StreamDeadlines)
    add_config_flags(gateway, GatewayLimits)
    gateway.set_defaults(func=cmd_gateway)
    bench = sub.add_parser("bench", help="benchmark a server: `bench serve`, `bench compare`")
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
