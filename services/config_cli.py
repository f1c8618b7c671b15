"""Flags generated from frozen config dataclasses, and back: every setting is written once.

A config field's name, type, default and docstring (the string literal under it) become the
flag `--field-name`, its type, default and help. Nested configs are flattened (EngineConfig's
`cache.block_size` is `--block-size`), so a field name is unique across the whole tree, and
flat keyword arguments (`LLM(block_size=32)`) reach every field the same way.

Per-field metadata, declared next to the field with `dataclasses.field(metadata=...)`:
  CHOICES: the allowed values, a sequence or a function returning one (a registry's names).
  FLAG: the flag when it is not `--field-name` (`api_keys` is the repeatable `--api-key`).

Types: int, float, str, bool (`--x/--no-x`), `X | None`, `tuple[X, ...]` (a repeatable flag)
and nested config dataclasses. JSON (`to_json`/`from_json`) hands a whole config to a child
process as one argument. Torch-free; it imports none of the configs it reads.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import itertools
import json
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = "choices"
FLAG = "flag"


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One leaf field of a config tree, under its flat name (the field's own name)."""

    name: str
    owner: type
    """The dataclass that declares it."""
    type: Any
    """The annotation without `| None`: int, float, str, bool or tuple[X, ...]."""
    default: Any
    doc: str
    """The field's docstring (empty when it has none)."""
    choices: Sequence[Any] | Callable[[], Sequence[Any]] | None
    flag: str


# ---- reading the classes


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of cls, read from its source (fields without one: absent)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef)).body
    docs: dict[str, str] = {}
    for stmt, after in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _split_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(hint)) != 2:
            raise TypeError(f"unsupported config annotation {hint!r}")
        return args[0], True
    return hint, False


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} has no default")


def flat_fields(cls: type) -> Mapping[str, FlatField]:
    """Every leaf field of the config tree under cls, keyed by name; ValueError on a clash."""
    return _flat_fields(cls)


@functools.cache
def _flat_fields(cls: type) -> Mapping[str, FlatField]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out: dict[str, FlatField] = {}
    for f in dataclasses.fields(cls):
        hint, optional = _split_optional(hints[f.name])
        if dataclasses.is_dataclass(hint) and isinstance(hint, type) and not optional:
            leaves = flat_fields(hint)
        else:
            if not (hint in (int, float, str, bool) or _is_tuple(hint)):
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported annotation {hint!r}")
            flag = f.metadata.get(FLAG, "--" + f.name.replace("_", "-"))
            choices = f.metadata.get(CHOICES)
            doc = docs.get(f.name, "")
            leaves = {f.name: FlatField(f.name, cls, hint, _default(f), doc, choices, flag)}
        for name, leaf in leaves.items():
            if name in out:
                raise ValueError(
                    f"config field name {name!r} appears twice under {cls.__name__} "
                    f"({out[name].owner.__name__} and {leaf.owner.__name__}): flat names must "
                    "be unique"
                )
            out[name] = leaf
    return out


# ---- flags


def add_config_flags(
    parser: argparse.ArgumentParser, cls: type, defaults: Mapping[str, Any] | None = None
) -> None:
    """One flag per leaf field of cls, grouped by the dataclass that declares it.

    defaults: flag defaults that differ from the dataclass's on purpose, by flat name.
    """
    defaults = dict(defaults or {})
    flat = flat_fields(cls)
    if unknown := sorted(set(defaults) - set(flat)):
        raise TypeError(f"defaults for unknown {cls.__name__} fields: {unknown}")
    groups: dict[type, argparse._ArgumentGroup] = {}
    for leaf in flat.values():
        if not leaf.doc:
            raise ValueError(f"{leaf.owner.__name__}.{leaf.name} has no docstring (its --help)")
        if leaf.owner not in groups:
            summary = (leaf.owner.__doc__ or "").strip().splitlines()[0]
            groups[leaf.owner] = parser.add_argument_group(leaf.owner.__name__, summary)
        kwargs: dict[str, Any] = {"dest": leaf.name}
        if leaf.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_tuple(leaf.type):
            # append onto None, not the default tuple (argparse appends in place); None = not given
            kwargs.update(action="append", type=typing.get_args(leaf.type)[0])
        else:
            kwargs["type"] = leaf.type
        if not _is_tuple(leaf.type):
            kwargs["default"] = defaults.get(leaf.name, leaf.default)
        if leaf.choices is not None:
            kwargs["choices"] = list(leaf.choices() if callable(leaf.choices) else leaf.choices)
        elif leaf.type is not bool:
            kwargs["metavar"] = leaf.flag.removeprefix("--").replace("-", "_").upper()
        action = groups[leaf.owner].add_argument(leaf.flag, **kwargs)
        # set after: Python 3.11's BooleanOptionalAction appends its own "(default: ...)"
        action.help = leaf.doc.replace("%", "%%")


def to_argv(config: object) -> list[str]:
    """The flags that give every leaf field of `config` its value (what add_config_flags reads
    back): how one process hands a small config to another on its command line."""
    argv: list[str] = []
    for leaf in flat_fields(type(config)).values():
        value = _leaf_value(config, leaf.name)
        if leaf.type is bool:
            argv.append(leaf.flag if value else "--no-" + leaf.flag.removeprefix("--"))
        elif _is_tuple(leaf.type):
            for item in value:
                argv += [leaf.flag, str(item)]
        elif value is not None:
            argv += [leaf.flag, str(value)]
    return argv


def _leaf_value(config: object, name: str) -> Any:
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if f.name == name:
            return value
        if dataclasses.is_dataclass(value) and name in flat_fields(type(value)):
            return _leaf_value(value, name)
    raise KeyError(name)


def namespace_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The flat field values of cls that namespace holds (a repeatable flag not given: absent)."""
    values: dict[str, Any] = {}
    for name, leaf in flat_fields(cls).items():
        if not hasattr(namespace, name):
            continue
        value = getattr(namespace, name)
        if _is_tuple(leaf.type):
            if value is None:
                continue
            value = tuple(value)
        values[name] = value
    return values


def from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    """The config the flags of add_config_flags(parser, cls) were parsed into."""
    return from_flat(cls, namespace_values(cls, namespace))


# ---- building configs


def from_flat(cls: type[T], values: Mapping[str, Any]) -> T:
    """cls from flat keyword values (`block_size=32` lands in the nested CacheConfig); missing
    fields keep their defaults; TypeError naming any unknown key."""
    flat = flat_fields(cls)
    if unknown := sorted(set(values) - set(flat)):
        raise TypeError(f"unknown {cls.__name__} arguments: {unknown}")
    return _build(cls, values)


def _build(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            kwargs[f.name] = _build(hint, values)
        elif f.name in values:
            value = values[f.name]
            tuple_typed = _is_tuple(_split_optional(hint)[0])
            kwargs[f.name] = tuple(value) if tuple_typed and value is not None else value
    return cls(**kwargs)


def to_json(config: object) -> str:
    """config as JSON, nested configs as nested objects (from_json reads it back exactly)."""
    return json.dumps(dataclasses.asdict(config))  # type: ignore[call-overload]


def from_json(cls: type[T], text: str) -> T:
    """The config to_json wrote (missing fields keep their defaults; ValueError on unknown)."""
    return from_dict(cls, json.loads(text))


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """cls from a nested mapping shaped like dataclasses.asdict's."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown := sorted(set(data) - names):
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint, _ = _split_optional(hints[name])
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            value = from_dict(hint, value)
        elif _is_tuple(hint) and value is not None:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
