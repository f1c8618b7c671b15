"""Where a batch-1 decode step's time goes: the decode graph replayed with one stage left out.

    python -m baton.services.engine.bench.ablation [--model llama-3.1-8b] [--batches 1 4 16]

Captures the engine's decode CUDA graphs (random-weight model from its real config, bf16, 1k
context, max_model_len as bench.gpu) once per variant and times their replay. A variant swaps
one stage for a no-op (the norms, the attention prologue, the attention itself), or turns off
one optimisation (norms folded into the GEMMs, the prologue folded into the decode kernel, the
graph-buffer fast paths), so each row's difference to "full" is what that stage or optimisation
costs or buys. Outputs of the ablated graphs are meaningless; only their time is read. Prints a
table and writes bench_ablation.json to $OUT (or bench_out/). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
from collections.abc import Callable, Iterator
from typing import Any

import torch

from baton.services.engine.bench.common import (
    build_engine,
    copy_bandwidth,
    out_dir,
    weight_bytes_per_step,
)
from baton.services.engine.cuda_graphs import DecodeBatch, DecodeGraphs

CONTEXT = 1024
MAX_LEN = 8256  # bench.gpu's engine: it sets the graphs' split-KV count


@contextlib.contextmanager
def _patched(obj: object, name: str, value: object) -> Iterator[None]:
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _variants(model: Any) -> dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]:
    from baton.kernels import triton_attention
    from baton.services.engine.layers import attention, norm, rotary

    def no_norms() -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        stack.enter_context(_patched(model, "fuse_decode_norms", False))
        stack.enter_context(_patched(norm.RMSNorm, "forward", lambda self, x: x))
        stack.enter_context(_patched(norm.RMSNorm, "add_and_norm", lambda self, x, r: (x, r)))
        return stack

    attentions = [m for m in model.modules() if hasattr(m, "fold_prologue")]

    def prologue_kernel() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for m in attentions:
            stack.enter_context(_patched(m, "fold_prologue", False))
        return stack

    def no_prologue() -> contextlib.AbstractContextManager[Any]:
        stack = prologue_kernel()
        stack.enter_context(
            _patched(rotary.RopeStep, "rotate_and_write_kv", lambda self, q, k, *a, **kw: (q, k))
        )
        return stack

    def no_attention() -> contextlib.AbstractContextManager[Any]:
        stack = contextlib.ExitStack()
        skip = lambda self, q, *a, **kw: q.reshape(q.shape[0], -1)
        stack.enter_context(_patched(attention.Attention, "forward", skip))
        stack.enter_context(_patched(attention.Attention, "forward_folded", skip))
        return stack

    plan = triton_attention.plan_decode

    def not_static(*args: Any, **kwargs: Any) -> Any:
        return plan(*args, **{**kwargs, "static_inputs": False})

    return {
        "full": contextlib.nullcontext,
        "norms as kernels (not folded)": lambda: _patched(model, "fuse_decode_norms", False),
        "graph-buffer fast paths off": lambda: _patched(
            triton_attention, "plan_decode", not_static
        ),
        "prologue as a kernel (not folded)": prologue_kernel,
        "no norms": no_norms,
        "no attention prologue": no_prologue,
        "no attention (split + merge)": no_attention,
    }


def _time_buckets(graphs: DecodeGraphs, batches: list[int]) -> dict[int, float]:
    """Median ms per replay of each batch's bucket, 8 back-to-back replays per sample."""
    out = {}
    for b in batches:
        blocks = CONTEXT // graphs.block_size
        step = DecodeBatch(
            input_ids=[100] * b,
            positions=[CONTEXT - 1] * b,
            slots=[-1] * b,  # write no KV
            seq_lens=[CONTEXT] * b,
            block_tables=[list(range(i * blocks, (i + 1) * blocks)) for i in range(b)],
        )
        graphs.run(step)  # fills the graphs' static buffers; replays below reuse them
        bucket = graphs.bucket_for(b)
        assert bucket is not None
        for _ in range(3):
            graphs.replay(bucket)
        samples = []
        for _ in range(15):
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            for _ in range(8):
                graphs.replay(bucket)
            end.record()
            end.synchronize()
            samples.append(float(start.elapsed_time(end)) / 8)
        out[b] = statistics.median(samples)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine.bench.ablation: no CUDA device, nothing to measure")
        return 0
    engine = build_engine(args.model, max(args.batches), MAX_LEN)
    core = engine.core
    model, kv_cache = core.model, core.kv_cache()
    core.release_decode_graphs()  # each variant captures its own
    gc.collect()
    torch.cuda.empty_cache()
    ideal_ms = weight_bytes_per_step(engine) / copy_bandwidth() * 1e3
    rows: list[dict[str, Any]] = []
    for name, variant in _variants(model).items():
        with variant():
            graphs = DecodeGraphs(
                model,
                kv_cache,
                block_size=core.block_size,
                max_batch=max(args.batches),
                max_model_len=core.max_model_len,
            )
            graphs.capture()
            ms = _time_buckets(graphs, args.batches)
        del graphs
        gc.collect()
        torch.cuda.empty_cache()
        rows.append({"variant": name, "ms": ms})
        print(f"{name}: {ms}", flush=True)
    full: dict[int, float] = rows[0]["ms"]
    print(f"\n{torch.cuda.get_device_name()}: {args.model}, context {CONTEXT}; weights alone "
          f"{ideal_ms:.3f} ms at the measured copy bandwidth")  # fmt: skip
    head = "".join(f"{'b=' + str(b) + ' ms':>10}{'delta':>8}" for b in args.batches)
    print(f"{'variant':<36}{head}")
    for r in rows:
        cells = "".join(f"{r['ms'][b]:>10.3f}{r['ms'][b] - full[b]:>+8.3f}" for b in args.batches)
        print(f"{r['variant']:<36}{cells}")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "model": args.model}
    result["context"] = CONTEXT
    result |= {"weights_ms": ideal_ms, "rows": rows}
    path = out_dir() / "bench_ablation.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
