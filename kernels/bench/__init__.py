"""Kernel benchmarks on one GPU: scripts that print a table and write JSON ($OUT or bench_out/).

    python -m baton.kernels.bench.attention   decode attention: Triton vs SDPA vs FlashInfer
    python -m baton.kernels.bench.ops         elementwise Triton ops vs torch eager
    python -m baton.kernels.bench.gemv        the skinny decode GEMM vs cuBLAS

`ops` and `gemv` take --ptx-check: compile for sm_90 and read the PTX, no GPU needed.
Without CUDA each says so and exits 0. Like the rest of kernels/, nothing here imports
baton.services.
"""
