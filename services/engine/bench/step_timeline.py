"""What a decode step spends outside its CUDA graph: the GPU timeline between two replays.

    python -m baton.services.engine.bench.step_timeline [--model llama-3.1-8b] [--batch 1]

Runs the engine as bench.gpu does (random-weight model from its real config, bf16, 1k context,
CUDA graphs, async scheduling), records 20 steady decode steps with torch.profiler (CUPTI: the
graph's kernels, copies and the sampler's kernels), and cuts the timeline at each graph's first
kernel. Per step: the span from one graph's first kernel to the next, the graph's own span
(first to last of its kernels, taken from a replay profiled alone), and every operation and
idle gap in between, with its median start offset and duration. Prints a table and writes
bench_step_timeline.json to $OUT (or bench_out/). Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from typing import Any

import torch

from baton.services.engine.bench.common import (
    DECODE_CONTEXT,
    DecodeDriver,
    build_engine,
    out_dir,
    random_prompts,
)
from baton.services.engine.sampling_params import SamplingParams

STEPS = 20


def _device_events(prof: Any) -> list[tuple[str, float, float]]:
    """(name, start us, end us) of every GPU activity, by start."""
    out = []
    for e in prof.events():
        if e.device_type.name == "CUDA":
            start = e.time_range.start
            out.append((e.name, float(start), float(start + e.device_time)))
    return sorted(out, key=lambda t: t[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine.bench.step_timeline: no CUDA device, nothing to measure")
        return 0
    from torch.profiler import ProfilerActivity, profile

    engine = build_engine(args.model, args.batch, 8192 + 64)
    graphs = engine.core.decode_graphs
    assert graphs is not None
    bucket = graphs.bucket_for(args.batch)
    assert bucket is not None
    params = SamplingParams(temperature=0, max_tokens=STEPS + 64, ignore_eos=True)
    prompts = random_prompts(args.batch, DECODE_CONTEXT, engine.arch.vocab_size, 0)
    DecodeDriver(engine, prompts, params).step_until_decoding()
    for _ in range(8):
        engine.step()
    torch.cuda.synchronize()

    with profile(activities=[ProfilerActivity.CUDA]) as alone:
        graphs.replay(bucket)
        torch.cuda.synchronize()
    in_graph = _device_events(alone)
    first_name, last_name = in_graph[0][0], in_graph[-1][0]
    graph_us = in_graph[-1][2] - in_graph[0][1]

    replays = graphs.num_replays
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            engine.step()
        torch.cuda.synchronize()
    assert graphs.num_replays - replays == STEPS, "a profiled step was not a graph replay"
    events = _device_events(prof)
    starts = [i for i, e in enumerate(events) if e[0] == first_name]
    n_graph = len(in_graph)
    steps: list[dict[str, Any]] = []
    for a, b in itertools.pairwise(starts):
        window = events[a:b]
        if len(window) < n_graph or window[n_graph - 1][0] != last_name:
            continue  # the window does not start with a whole graph (profiler edge)
        graph_end = window[n_graph - 1][2]
        outside = []
        cursor = graph_end
        for name, start, end in [*window[n_graph:], (first_name, events[b][1], events[b][2])]:
            if start > cursor:
                outside.append(("(idle)", cursor - graph_end, start - cursor))
            if name != first_name or start != events[b][1]:
                outside.append((name, start - graph_end, end - start))
            cursor = max(cursor, end)
        steps.append(
            {
                "step_us": events[b][1] - window[0][1],
                "graph_us": graph_end - window[0][1],
                "outside": outside,
            }
        )
    assert steps, "no whole step in the profile"
    # Steps share their sequence of outside operations; report the medians per position.
    shape = [name for name, _, _ in steps[0]["outside"]]
    same = [s for s in steps if [n for n, _, _ in s["outside"]] == shape]
    rows = [
        {
            "op": name,
            "offset_us": statistics.median(s["outside"][i][1] for s in same),
            "us": statistics.median(s["outside"][i][2] for s in same),
        }
        for i, name in enumerate(shape)
    ]
    step_us = statistics.median(s["step_us"] for s in steps)
    replay_us = statistics.median(s["graph_us"] for s in steps)
    print(
        f"\n{torch.cuda.get_device_name()}: {args.model} decode b={args.batch}, {len(steps)} steps"
    )
    print(f"step (graph start to graph start) {step_us:9.1f} us")
    print(f"graph, first to last kernel       {replay_us:9.1f} us (replayed alone: {graph_us:.1f})")
    print(f"between graphs ({len(same)} steps alike):")
    print(f"  {'operation':<60}{'at us':>8}{'us':>8}")
    for r in rows:
        print(f"  {r['op'][:59]:<60}{r['offset_us']:>8.1f}{r['us']:>8.1f}")
    result = {
        "device": torch.cuda.get_device_name(),
        "model": args.model,
        "batch": args.batch,
        "step_us": step_us,
        "graph_us": replay_us,
        "graph_alone_us": graph_us,
        "between_graphs": rows,
    }
    path = out_dir() / "bench_step_timeline.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
