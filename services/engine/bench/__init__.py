"""Engine benchmarks: scripts that print a table and write JSON, not tests.

    python -m baton.services.engine.bench                 the throughput bench (as .throughput)
    python -m baton.services.engine.bench.throughput      baton vs transformers' batched generate
    python -m baton.services.engine.bench.gpu             the single-GPU table (roofline, MFU)
    python -m baton.services.engine.bench.ablation        a decode graph with one stage left out
    python -m baton.services.engine.bench.step_timeline   the GPU timeline between graph replays

They drive the engine only through its public face: `LLM`, `LLMEngine` (add_request, step,
abort_request, arch) and `EngineCore` (stats, has_unfinished, step, reset_prefix_cache, model,
decode_graphs, release_decode_graphs, kv_cache, num_blocks, block_size, max_model_len). The GPU
ones say "no CUDA device" and exit 0 on a machine without one.
"""
