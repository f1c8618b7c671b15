"""The correctness oracle: Hugging Face transformers on the same GGUF file, fp32, CPU."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def hf_smollm2() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    from baton.services.engine.loader import default_gguf_path

    path = Path(default_gguf_path())
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


GreedyFn = Callable[[list[int], int], list[int]]


@pytest.fixture(scope="session")
def hf_greedy(hf_smollm2: torch.nn.Module) -> GreedyFn:
    """greedy(prompt_ids, max_new_tokens) with the transformers model."""
    return lambda ids, n: greedy_decode(hf_smollm2, ids, n)


@torch.inference_mode()
def greedy_decode(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with HF's own KV cache; never stops early (like ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    tokens: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(out.logits[0, -1].argmax())
        tokens.append(next_id)
        out = model(input_ids=torch.tensor([[next_id]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
    return tokens
