"""Attention backends behind one contract (base.py) and a lazy, name-keyed registry
(registry.py): torch_ref.py (the CPU path and reference), triton.py, flashinfer.py."""
