"""The gateway's model info (torch-free) and the bundled dummy models' tokenizers.

Oracles: the bundled HF configs (vocab size, bos/eos ids), the families' published special-token
ids, chat prompts written out by hand in each family's format, and the engine's own loader (the
gateway and a worker given one spec must name the model and tokenize alike).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from baton.services.engine.loader import load_model, load_model_info, resolve_model
from baton.services.engine.loader.sources import CONFIG_DIR
from baton.services.engine.tokenizer import Tokenizer

BUNDLED = ["llama-3.1-8b", "qwen3-8b"]
FIRST_SPECIAL_ID = {"llama-3.1-8b": 128000, "qwen3-8b": 151643}
KNOWN_IDS = {
    "llama-3.1-8b": {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128255: "<|reserved_special_token_247|>",
    },
    "qwen3-8b": {
        151643: "<|endoftext|>",
        151644: "<|im_start|>",
        151645: "<|im_end|>",
        151657: "<tool_call>",
        151667: "<think>",
        151668: "</think>",
    },
}
CONVERSATION = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
]
EXPECTED_PROMPT = {
    "llama-3.1-8b": (
        "<|begin_of_text|>"
        "<|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3 + 3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "qwen3-8b": (
        "<|im_start|>system\nYou answer briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
}
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Grüße aus Köln — naïve café, 東京タワー, Ελληνικά, emoji 🚀🧪 and tabs\tand\r\nCRLF.",
    "   leading spaces, trailing spaces   ",
    "<|not a special token|> <|im_start (unterminated)",
]


def _config(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    return data


def _tokenizer(name: str) -> Tokenizer:
    tok = load_model_info(f"dummy:{name}").tokenizer
    assert tok is not None, name
    return tok


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Tokenizer]:
    return {name: _tokenizer(name) for name in BUNDLED}


def test_dummy_model_info_loads_without_torch() -> None:
    check = textwrap.dedent(
        f"""
        import json, sys
        from baton.services.engine.loader.model_info import load_model_info
        out = {{}}
        for name in {BUNDLED!r}:
            info = load_model_info("dummy:" + name)
            out[name] = [info.model_id, info.vocab_size, info.max_position_embeddings,
                         info.bos_token_id, list(info.eos_token_ids), info.tokenizer.vocab_size]
        assert "torch" not in sys.modules, "model info imported torch"
        print(json.dumps(out))
        """
    )
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    for name in BUNDLED:
        cfg = _config(name)
        assert got[name] == [
            f"dummy-{name}",
            cfg["vocab_size"],
            cfg["max_position_embeddings"],
            cfg["bos_token_id"],
            [cfg["eos_token_id"]],
            cfg["vocab_size"],
        ]


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tokenizer_covers_the_whole_vocabulary(
    tokenizers: dict[str, Tokenizer], name: str
) -> None:
    tok, vocab_size = tokenizers[name], _config(name)["vocab_size"]
    assert tok.vocab_size == vocab_size
    # Every id has a token, and ids and tokens are one to one.
    tokens = [tok.id_to_token(i) for i in range(vocab_size)]
    assert None not in tokens
    assert len(set(tokens)) == vocab_size
    assert all(tok.token_to_id(t) == i for i, t in enumerate(tokens) if t is not None)
    # Every id decodes, the last one included, to some text.
    texts = tok.backend.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    assert all(texts) and texts[-1] == tokens[-1]
    assert tok.decode([vocab_size - 1]) == ""  # a special token: skipped by default


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_special_tokens_sit_at_the_configs_ids(
    tokenizers: dict[str, Tokenizer], name: str
) -> None:
    tok, cfg = tokenizers[name], _config(name)
    for token_id, token in KNOWN_IDS[name].items():
        assert tok.id_to_token(token_id) == token
    assert tok.bos_token_id == cfg["bos_token_id"]
    assert cfg["eos_token_id"] in tok.eos_token_ids
    eos = tok.special_tokens["eos_token"]
    assert tok.token_to_id(eos) == tok.eos_token_ids[0]
    assert tok.decode([tok.eos_token_ids[0]]) == ""  # special: hidden from completions


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_tokenizer_round_trips_text(tokenizers: dict[str, Tokenizer], name: str) -> None:
    tok = tokenizers[name]
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # Plain text never turns into special tokens, and BPE merges shorten it.
        assert max(ids) < FIRST_SPECIAL_ID[name]
        assert len(ids) < len(text.encode())
    with_bos = tok.encode("hello", add_special_tokens=True)
    if name.startswith("llama"):
        assert with_bos == [128000, *tok.encode("hello")]
    else:
        assert with_bos == tok.encode("hello")


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_chat_template_renders_the_family_format(
    tokenizers: dict[str, Tokenizer], name: str
) -> None:
    tok = tokenizers[name]
    prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    assert prompt == EXPECTED_PROMPT[name]
    ids = tok.encode(prompt)
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    # Each marker is one special id, not spelled out in bytes.
    turn_end = 128009 if name.startswith("llama") else 151645
    assert ids.count(turn_end) == len(CONVERSATION)


def _tiny_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A bundled config shrunk to a model this CPU builds in a moment (same vocabulary)."""
    return _config(name) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "max_position_embeddings": 1024,
        **overrides,
    }


def _link_tokenizer(name: str, folder: Path) -> None:
    """The bundled tokenizer's files, linked into `folder` (HF layout: beside config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in (CONFIG_DIR / f"{name}.tokenizer").iterdir():
        (folder / f.name).symlink_to(f)


def test_gateway_and_engine_agree_on_a_dummy_model_with_a_tokenizer_beside_its_config(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "tiny-llama"
    _link_tokenizer("llama-3.1-8b", folder)
    (folder / "config.json").write_text(json.dumps(_tiny_config("llama-3.1-8b")))
    spec = f"dummy:{folder / 'config.json'}"
    info, loaded = load_model_info(spec), load_model(spec)
    assert info.model_id == loaded.model_id == resolve_model(spec).model_id == "dummy-tiny-llama"
    assert info.vocab_size == loaded.arch.vocab_size == 128256
    assert info.max_position_embeddings == loaded.arch.max_position_embeddings == 1024
    assert info.eos_token_ids == loaded.arch.eos_token_ids
    assert info.tokenizer is not None and loaded.tokenizer is not None
    assert info.tokenizer.eos_token_ids == loaded.tokenizer.eos_token_ids
    prompt = info.tokenizer.apply_chat_template(CONVERSATION)
    assert prompt == loaded.tokenizer.apply_chat_template(CONVERSATION)
    assert info.tokenizer.encode(prompt) == loaded.tokenizer.encode(prompt)


def test_a_named_config_takes_its_tokenizer_from_the_folder_named_after_it(
    tmp_path: Path,
) -> None:
    """`<dir>/<stem>.json` pairs with `<dir>/<stem>.tokenizer/`, as the bundled configs do."""
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "small-qwen.json"
    config.write_text(json.dumps(_tiny_config("qwen3-8b")))
    (tmp_path / "configs" / "small-qwen.tokenizer").symlink_to(CONFIG_DIR / "qwen3-8b.tokenizer")
    info, loaded = load_model_info(f"dummy:{config}"), load_model(f"dummy:{config}")
    assert info.model_id == loaded.model_id == "dummy-configs"
    assert info.tokenizer is not None and loaded.tokenizer is not None
    assert info.tokenizer.vocab_size == loaded.tokenizer.vocab_size == 151936
    assert info.tokenizer.apply_chat_template(CONVERSATION) == EXPECTED_PROMPT["qwen3-8b"]


def test_a_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path: Path) -> None:
    _link_tokenizer("llama-3.1-8b", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_tiny_config("llama-3.1-8b", vocab_size=512)))
    for load in (load_model_info, load_model):
        with pytest.raises(ValueError, match="128256 ids"):
            load(f"dummy:{tmp_path / 'config.json'}")


@pytest.mark.slow
def test_gateway_and_engine_agree_on_the_default_gguf_model() -> None:
    info, loaded = load_model_info(), load_model()
    assert info.model_id == loaded.model_id == "SmolLM2-135M-Instruct"
    assert info.vocab_size == loaded.arch.vocab_size
    assert info.max_position_embeddings == loaded.arch.max_position_embeddings
    assert info.tokenizer is not None and loaded.tokenizer is not None
    assert info.tokenizer.eos_token_ids == loaded.tokenizer.eos_token_ids
    prompt = info.tokenizer.apply_chat_template(CONVERSATION)
    assert info.tokenizer.encode(prompt) == loaded.tokenizer.encode(prompt)
