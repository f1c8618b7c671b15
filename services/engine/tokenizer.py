"""Text ↔ token ids and chat-template rendering, on a fast `tokenizers.Tokenizer`.

transformers is not needed at runtime: tokenizer.json holds the whole pipeline, and the chat
template is rendered here the way transformers renders it (sandboxed jinja2, trim_blocks,
lstrip_blocks, raise_exception / strftime_now helpers, special tokens as variables), so the
prompt string is byte-identical to `AutoTokenizer.apply_chat_template`.

A folder's tokenizer is tokenizer.json, or the same compressed as tokenizer.json.xz or .json.gz
(the bundled dummy tokenizers are stored so: a full vocabulary is megabytes of JSON).
"""

from __future__ import annotations

import gzip
import json
import lzma
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.json.xz", "tokenizer.json.gz")
_DECOMPRESS = {".xz": lzma.decompress, ".gz": gzip.decompress}


def find_tokenizer_file(folder: str | Path) -> Path | None:
    """The folder's first of TOKENIZER_FILES, or None."""
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            return path
    return None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; templates expect plain JSON (as in HF).
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _pick_template(value: Any) -> str | None:
    """chat_template is a string or a list of {name, template}; take the "default" one."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


class Tokenizer:
    """Wraps a fast tokenizer with the model's special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        """special_tokens: {"bos_token": "<s>", "eos_token": ..., ...} (strings, as in HF)."""
        self._tok = backend
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.chat_template = chat_template
        eos_ids: list[int] = []
        eos = self.special_tokens.get("eos_token")
        eos_id = None if eos is None else backend.token_to_id(eos)
        for token_id in ([eos_id] if eos_id is not None else []) + list(extra_eos_token_ids):
            if token_id not in eos_ids:
                eos_ids.append(int(token_id))
        self.eos_token_ids: tuple[int, ...] = tuple(eos_ids)
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = None if bos is None else backend.token_to_id(bos)

    @classmethod
    def from_file(
        cls,
        tokenizer_json_path: str | Path,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> Tokenizer:
        """From a tokenizer.json (.xz, .gz) alone; special tokens and template from the caller."""
        path = Path(tokenizer_json_path)
        decompress = _DECOMPRESS.get(path.suffix)
        if decompress is not None:
            backend = tokenizers.Tokenizer.from_str(decompress(path.read_bytes()).decode("utf-8"))
        else:
            backend = tokenizers.Tokenizer.from_file(str(path))
        return cls(
            backend,
            special_tokens=special_tokens,
            chat_template=chat_template,
            extra_eos_token_ids=extra_eos_token_ids,
        )

    @classmethod
    def from_pretrained_dir(
        cls, hf_dir: str | Path, *, extra_eos_token_ids: Sequence[int] = ()
    ) -> Tokenizer:
        """From an HF folder: tokenizer.json + tokenizer_config.json (+ chat_template.jinja).

        extra_eos_token_ids: ids that also end generation (config / generation_config eos).
        """
        root = Path(hf_dir)
        config: dict[str, Any] = {}
        config_path = root / "tokenizer_config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
        special: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(config.get(key))
            if content is not None:
                special[key] = content
        # transformers ≥ 4.47 saves the template next to the config, and prefers that file.
        template_path = root / "chat_template.jinja"
        if template_path.is_file():
            template: str | None = template_path.read_text(encoding="utf-8")
        else:
            template = _pick_template(config.get("chat_template"))
        tokenizer_file = find_tokenizer_file(root)
        if tokenizer_file is None:
            raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} in {root}")
        return cls.from_file(
            tokenizer_file,
            special_tokens=special,
            chat_template=template,
            extra_eos_token_ids=extra_eos_token_ids,
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped fast tokenizer (for batch encoding or streaming decoders)."""
        return self._tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Default False: chat templates already contain special tokens."""
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        text: str = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        token: str | None = self._tok.id_to_token(token_id)
        return token

    def token_to_id(self, token: str) -> int | None:
        token_id: int | None = self._tok.token_to_id(token)
        return token_id

    @cached_property
    def _compiled_template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt string for a conversation, as transformers would render it."""
        return self._compiled_template.render(
            messages=messages,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
        )
