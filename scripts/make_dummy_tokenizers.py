"""Make the tokenizers of the bundled dummy configs, offline, from text on this machine.

    .venv/bin/python scripts/make_dummy_tokenizers.py            # (re)write the tokenizer folders
    .venv/bin/python scripts/make_dummy_tokenizers.py --check    # rebuild in memory, compare

For each family below it writes services/engine/models/configs/<name>.tokenizer/ with
tokenizer.json.xz and tokenizer_config.json (special tokens, a chat template), the folder the
loader pairs with <name>.json (see services/engine/loader/__init__.py).

The tokenizer: a byte-level BPE (GPT-2 pre-tokenization; the 256 bytes are the first tokens, so
any text encodes and every id decodes) trained with the `tokenizers` package on the CPython
standard library's own .py sources (the running interpreter's stdlib, site-packages excluded,
files sorted by path). Training stops when the corpus has no pair left to merge (about 123k
tokens from CPython 3.11's stdlib); reserved special tokens "<|reserved_<id>|>" fill the ids up
to the family's first special token, then come the family's special tokens at their real ids
(Llama-3: <|begin_of_text|> = 128000 ... <|eot_id|> = 128009; Qwen2/3: <|endoftext|> = 151643,
<|im_start|>, <|im_end|>, ...), then reserved tokens up to the config's vocab_size, so the
tokenizer covers the model's whole vocabulary and the config's bos/eos ids name the right tokens.
The chat templates are our own, in each family's format (Llama-3 header tokens; ChatML).

Deterministic: the trainer breaks ties by pair order, so the same corpus gives the same
tokenizer.json (--check compares that, not the compressed bytes). The corpus (interpreter
version, number of files, sha256 of the text) is recorded in tokenizer_config.json under
"baton_corpus"; the checked-in files were made with CPython 3.11.7. Another Python version gives
another corpus, hence different (equally valid) tokenizers: --check says so rather than report a
mismatch in the tokenizer itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import platform
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "services" / "engine" / "models" / "configs"

LLAMA3_TEMPLATE = """\
{{- bos_token }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {{- (message['content'] or '') | trim }}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

CHATML_TEMPLATE = """\
{%- for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


@dataclass(frozen=True)
class Family:
    """One bundled config's tokenizer: where its special tokens sit and how it chats."""

    config: str
    """The bundled config's stem (models/configs/<config>.json)."""
    first_special_id: int
    specials: tuple[tuple[str, bool], ...]
    """(content, is special) for ids first_special_id, first_special_id + 1, ..."""
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    chat_template: str
    add_bos: bool
    """encode(add_special_tokens=True) prepends bos_token (Llama-3 does; Qwen does not)."""


def _llama3_specials() -> tuple[tuple[str, bool], ...]:
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
    return tuple((t, True) for t in named + reserved)  # 256 tokens: 128000 ... 128255


def _qwen_specials() -> tuple[tuple[str, bool], ...]:
    special = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|object_ref_start|>",
        "<|object_ref_end|>",
        "<|box_start|>",
        "<|box_end|>",
        "<|quad_start|>",
        "<|quad_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|vision_pad|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    # Tool, fill-in-the-middle and thinking markers are plain added tokens: they stay in decoded
    # text, so a client can see them.
    plain = [
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    ]
    return tuple((t, True) for t in special) + tuple((t, False) for t in plain)


FAMILIES = (
    Family(
        config="llama-3.1-8b",
        first_special_id=128000,
        specials=_llama3_specials(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",  # ends a chat turn; the config's <|end_of_text|> stops too
        pad_token=None,
        chat_template=LLAMA3_TEMPLATE,
        add_bos=True,
    ),
    Family(
        config="qwen3-8b",
        first_special_id=151643,
        specials=_qwen_specials(),
        bos_token="<|endoftext|>",  # the config's bos id; the template does not use it
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        add_bos=False,
    ),
)


# ---- corpus -------------------------------------------------------------------------------------


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in stdlib.rglob("*.py") if "site-packages" not in p.relative_to(stdlib).parts]
    return sorted(files, key=lambda p: p.relative_to(stdlib).as_posix())


def read_corpus() -> tuple[list[str], dict[str, object]]:
    """The texts, and what identifies them (recorded with the tokenizer)."""
    texts = [p.read_bytes().decode("utf-8", errors="replace") for p in corpus_files()]
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    meta: dict[str, object] = {
        "source": f"CPython {platform.python_version()} standard library, *.py",
        "files": len(texts),
        "sha256": digest.hexdigest(),
    }
    return texts, meta


def _batches(texts: list[str], size: int = 256) -> Iterator[list[str]]:
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


# ---- building -----------------------------------------------------------------------------------


def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_batches(texts), trainer=trainer, length=len(texts))
    return tok


def _add_in_order(tok: Tokenizer, tokens: list[tuple[str, bool]]) -> None:
    """Append tokens at the next ids, in order; each run of one kind is added in one call
    (every call rebuilds the added-token matcher: one call per token is quadratic)."""
    first_id = tok.get_vocab_size(with_added_tokens=True)
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j][1] == tokens[i][1]:
            j += 1
        run = [AddedToken(t, special=tokens[i][1], normalized=False) for t, _ in tokens[i:j]]
        if tokens[i][1]:
            tok.add_special_tokens(run)
        else:
            tok.add_tokens(run)
        i = j
    for offset, (content, _) in enumerate(tokens):
        got = tok.token_to_id(content)
        if got != first_id + offset:
            raise RuntimeError(f"{content!r} got id {got}, expected {first_id + offset}")


def build(family: Family, texts: list[str], vocab_size: int) -> Tokenizer:
    """The family's tokenizer over exactly `vocab_size` ids."""
    tok = train_bpe(texts, family.first_special_id)
    num_trained = tok.get_vocab_size(with_added_tokens=True)
    if num_trained > family.first_special_id:
        raise RuntimeError(f"trained {num_trained} tokens, more than {family.first_special_id}")
    first_after = family.first_special_id + len(family.specials)
    tokens = [(f"<|reserved_{i}|>", True) for i in range(num_trained, family.first_special_id)]
    tokens += family.specials
    tokens += [(f"<|reserved_{i}|>", True) for i in range(first_after, vocab_size)]
    _add_in_order(tok, tokens)
    if family.add_bos and family.bos_token is not None:
        bos = (family.bos_token, tok.token_to_id(family.bos_token))
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def tokenizer_config(family: Family, corpus: dict[str, object], max_len: int) -> dict[str, object]:
    config: dict[str, object] = {
        "bos_token": family.bos_token,
        "eos_token": family.eos_token,
        "pad_token": family.pad_token,
        "model_max_length": max_len,
        "chat_template": family.chat_template,
        "baton_corpus": corpus,
    }
    return config


def _json(data: object) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="Make the bundled dummy models' tokenizers.")
    parser.add_argument("--check", action="store_true", help="compare with the files; write none")
    args = parser.parse_args()
    texts, corpus = read_corpus()
    print(f"corpus: {corpus['source']}, {corpus['files']} files, sha256 {corpus['sha256']}")
    failed = False
    for family in FAMILIES:
        model_config = json.loads((CONFIG_DIR / f"{family.config}.json").read_text())
        tok = build(family, texts, int(model_config["vocab_size"]))
        tok_json = tok.to_str()
        config_json = _json(
            tokenizer_config(family, corpus, int(model_config["max_position_embeddings"]))
        )
        out = CONFIG_DIR / f"{family.config}.tokenizer"
        if args.check:
            old_config = json.loads((out / "tokenizer_config.json").read_text())
            if old_config.get("baton_corpus") != corpus:
                print(f"{family.config}: made from another corpus ({old_config['baton_corpus']})")
                failed = True
                continue
            old = lzma.decompress((out / "tokenizer.json.xz").read_bytes()).decode()
            same = old == tok_json and (out / "tokenizer_config.json").read_text() == config_json
            print(f"{family.config}: {'identical' if same else 'DIFFERENT'}")
            failed |= not same
            continue
        out.mkdir(exist_ok=True)
        # xz: 1.1 MB where gzip -9 takes 1.6 MB (the 5-8 MB of JSON are vocab and merges).
        packed = lzma.compress(tok_json.encode(), preset=9 | lzma.PRESET_EXTREME)
        (out / "tokenizer.json.xz").write_bytes(packed)
        (out / "tokenizer_config.json").write_text(config_json)
        print(f"{family.config}: {tok.get_vocab_size()} ids, {len(packed)} bytes (xz) -> {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
