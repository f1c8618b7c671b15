"""Attention and other kernels: plain-torch references (the CPU path) and, on CUDA, Triton and
FlashInfer implementations selected by dispatch. Imports nothing from baton.services."""
