"""`baton serve --model dummy:<config>` end to end: a random-weight model with a tokenizer folder.

The gateway takes the model's id, tokenizer and chat template from the config's folder without
torch (loader/model_info.py), the worker loads the same spec, and the router must find the
worker under the gateway's id. Oracles: the official `openai` client, and the offline engine's
greedy output for the same rendered prompt (same config, same seed, so the same weights).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from openai import OpenAI

from baton import LLM, SamplingParams
from baton.services.engine.config import EngineConfig
from baton.services.engine.loader import load_model_info
from baton.services.engine.loader.sources import CONFIG_DIR
from baton.services.launcher import Cluster, ServeConfig
from baton.services.redis_server import free_port

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "Say something random."},
]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A two-layer Llama-3.1 (full 128256-token vocabulary) beside the bundled tokenizer."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    folder.mkdir()
    config = json.loads((CONFIG_DIR / "llama-3.1-8b.json").read_text()) | {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": True,
        "max_position_embeddings": 1024,
    }
    (folder / "config.json").write_text(json.dumps(config))
    for f in (CONFIG_DIR / "llama-3.1-8b.tokenizer").iterdir():
        (folder / f.name).symlink_to(f)
    return f"dummy:{folder / 'config.json'}"


@pytest.fixture(scope="module")
def cluster(spec: str) -> Iterator[Cluster]:
    cluster = Cluster(
        ServeConfig(
            port=free_port(),
            colocated=True,
            engine=EngineConfig(model=spec),
            dtype="float32",
            kv_cache_memory_mb=16,
        )
    )
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_dummy_model_with_a_tokenizer_folder_serves_chat(cluster: Cluster, spec: str) -> None:
    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["dummy-tiny-llama"]
    ask = {
        "model": "dummy-tiny-llama",
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "extra_body": {"ignore_eos": True},
    }
    chat = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    choice = chat.choices[0]
    assert choice.finish_reason == "length"

    tokenizer = load_model_info(spec).tokenizer
    assert tokenizer is not None
    prompt = tokenizer.apply_chat_template(MESSAGES)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert chat.usage.completion_tokens == MAX_TOKENS

    llm = LLM(model=spec, dtype="float32", kv_cache_memory_bytes=16 * 1024**2)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    offline = llm.generate([prompt], params)[0].outputs[0]
    assert len(offline.token_ids) == MAX_TOKENS and offline.text
    assert choice.message.content == offline.text

    stream = client.chat.completions.create(**ask, stream=True)  # type: ignore[call-overload]
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == offline.text
