"""Every config field is a flag, written once: the parsers of services/cli.py, generated from the
config dataclasses, reach every field; serve hands its workers the engine config whole."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import typing
from dataclasses import dataclass, field
from typing import Any

import pytest

import baton.services.cli as cli
from baton.kvstore.transports.registry import transport_names
from baton.services.config_cli import (
    CHOICES,
    add_config_flags,
    flat_fields,
    from_flat,
    from_json,
    from_namespace,
    namespace_values,
    to_json,
)
from baton.services.engine.config import (
    ATTENTION_BACKENDS,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
)
from baton.services.engine.llm import LLM
from baton.services.gateway.main import API_KEY_ENV, API_KEYS_ENV, api_keys_from_env
from baton.services.launcher import ServeConfig, gateway_cmd, gateway_env, worker_cmd
from baton.services.worker.server import WorkerConfig

ENGINE_CONFIGS = (EngineConfig, CacheConfig, SchedulerConfig)


def _leaf_fields(cls: type) -> list[tuple[type, dataclasses.Field[Any]]]:
    """(owner, field) for every non-config field under cls, walked here independently."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[type, dataclasses.Field[Any]]] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _leaf_fields(hints[f.name])
        else:
            out.append((cls, f))
    return out


ENGINE_FIELDS = _leaf_fields(EngineConfig)


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _docstring(owner: type, name: str) -> str:
    """The literal under `name: ...` in owner's source (a regex, not the generator's ast walk)."""
    source = inspect.getsource(owner)
    match = re.search(rf"^\s+{name}: [^\n]*\n\s+\"\"\"(.*?)\"\"\"", source, re.M | re.S)
    assert match, f"{owner.__name__}.{name} has no docstring"
    return " ".join(match.group(1).split())


def _non_default(owner: type, f: dataclasses.Field[Any]) -> Any:
    """A valid value for f that is not its default (dataclass or CLI)."""
    hint = typing.get_type_hints(owner)[f.name]
    default = f.default
    if choices := f.metadata.get(CHOICES):
        return next(c for c in (choices() if callable(choices) else choices) if c != default)
    if f.name == "device":
        return "cuda:1"  # neither "cpu" (the dataclass's) nor "auto" (the CLI's)
    if bool in typing.get_args(hint) or hint is bool:
        return not default
    if int in typing.get_args(hint) or hint is int:
        return 7 if default is None else default + 3
    if float in typing.get_args(hint) or hint is float:
        return 0.375 if default is None else default / 3
    if str in typing.get_args(hint) or hint is str:
        return f"x-{f.name}"
    raise AssertionError(f"no test value for {owner.__name__}.{f.name}: {hint}")


def _argv(values: dict[str, Any]) -> list[str]:
    argv = []
    for _, f in ENGINE_FIELDS:
        value = values[f.name]
        if isinstance(value, bool):
            argv.append(_flag(f) if value else "--no-" + _flag(f)[2:])
        else:
            argv += [_flag(f), str(value)]
    return argv


def _flat(config: object) -> dict[str, Any]:
    """A config's leaf values by name (nested configs flattened)."""
    out: dict[str, Any] = {}
    for name, value in dataclasses.asdict(config).items():  # type: ignore[call-overload]
        out.update(value if isinstance(value, dict) else {name: value})
    return out


def _help(action: argparse.Action) -> str:
    assert action.help is not None
    return " ".join(action.help.replace("%%", "%").split())


NON_DEFAULT = {f.name: _non_default(owner, f) for owner, f in ENGINE_FIELDS}


# ---- every field is a flag


@pytest.mark.parametrize("command", ["generate", "chat", "serve", "worker"])
def test_every_engine_field_is_a_flag_whose_help_is_its_docstring(command: str) -> None:
    options = _subparser(command)._option_string_actions
    for owner, f in ENGINE_FIELDS:
        action = options[_flag(f)]
        assert action.dest == f.name
        assert _help(action) == _docstring(owner, f.name)


@pytest.mark.parametrize(("command", "config"), [("worker", WorkerConfig), ("serve", ServeConfig)])
def test_every_worker_and_serve_field_is_a_flag(command: str, config: type) -> None:
    options = _subparser(command)._option_string_actions
    for owner, f in _leaf_fields(config):
        assert options[_flag(f)].dest == f.name
        assert _help(options[_flag(f)]) == _docstring(owner, f.name)


def test_readme_flag_names_keep_working() -> None:
    options = _subparser("serve")._option_string_actions
    readme = "--model --dtype --block-size --max-num-seqs --max-num-batched-tokens --max-model-len"
    readme += " --device --enforce-eager --attention-backend --gpu-memory-utilization"
    readme += " --async-scheduling --no-async-scheduling --pdl --no-pdl --kv-cache-memory-mb"
    readme += " --port --num-prefill --num-decode --colocated --transport"
    readme += " --remote-prefill-min-tokens --api-key --redis-url --log-dir"
    assert not [flag for flag in readme.split() if flag not in options]


def test_choices_are_declared_on_the_fields() -> None:
    options = _subparser("worker")._option_string_actions
    assert options["--policy"].choices == ["fcfs", "priority"]
    assert options["--attention-backend"].choices == list(ATTENTION_BACKENDS)  # the registry's
    assert options["--dtype"].choices == ["auto", "float32", "bfloat16", "float16"]
    assert options["--transport"].choices == transport_names()  # WorkerConfig's own tuple
    assert _subparser("serve")._option_string_actions["--transport"].choices == transport_names()


def test_cli_device_default_is_auto_while_the_dataclass_stays_on_cpu() -> None:
    assert EngineConfig().device == "cpu"
    for command in ("generate", "chat", "serve", "worker"):
        assert _subparser(command)._option_string_actions["--device"].default == "auto"


# ---- flags -> config -> JSON -> config


def test_non_default_flags_round_trip_through_the_engine_config_json() -> None:
    a = cli.build_parser().parse_args(["worker", *_argv(NON_DEFAULT)])
    config = cli.engine_config(a)
    assert _flat(config) == NON_DEFAULT
    text = to_json(config)
    assert from_json(EngineConfig, text) == config
    again = cli.engine_config(cli.build_parser().parse_args(["worker", "--engine-config", text]))
    assert again == config


def test_every_engine_field_is_an_llm_keyword_and_unknown_ones_are_named() -> None:
    assert _flat(EngineConfig.from_kwargs(**NON_DEFAULT)) == NON_DEFAULT
    with pytest.raises(TypeError, match="max_num_seq'"):
        EngineConfig.from_kwargs(block_size=32, max_num_seq=8)
    with pytest.raises(TypeError, match="blok_size"):
        LLM(model="dummy:never-loaded", blok_size=16)  # refused before any model is loaded


def test_kv_cache_memory_mb_is_kv_cache_memory_bytes_in_mib() -> None:
    a = cli.build_parser().parse_args(["generate", "--kv-cache-memory-mb", "96"])
    assert cli.engine_config(a).cache.kv_cache_memory_bytes == 96 * 1024**2
    both = ["generate", "--kv-cache-memory-mb", "96", "--kv-cache-memory-bytes", "1024"]
    with pytest.raises(SystemExit, match="not both"):
        cli.engine_config(cli.build_parser().parse_args(both))


def test_async_scheduling_and_pdl_default_to_the_device() -> None:
    a = cli.build_parser().parse_args(["generate", "--device", "cpu"])
    config = cli.engine_config(a)
    assert config.async_scheduling is False and config.pdl is None  # CPU: nothing to overlap
    a = cli.build_parser().parse_args(["generate", "--device", "cuda", "--no-pdl"])
    config = cli.engine_config(a)
    assert config.async_scheduling is True and config.pdl is False


def test_worker_takes_engine_config_or_engine_flags_not_both() -> None:
    text = to_json(EngineConfig(dtype="float32"))
    for extra in (["--block-size", "32"], ["--kv-cache-memory-mb", "8"], ["--no-pdl"]):
        a = cli.build_parser().parse_args(["worker", "--engine-config", text, *extra])
        with pytest.raises(SystemExit, match=extra[0].replace("--no-", "--")):
            cli.engine_config(a)


# ---- serve -> its children


def _serve(argv: list[str]) -> ServeConfig:
    return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))


def _worker_args(cmd: list[str]) -> argparse.Namespace:
    assert cmd[1:4] == ["-m", "baton.services.cli", "worker"]
    return cli.build_parser().parse_args(cmd[3:])


def test_serve_hands_each_worker_one_engine_config_with_an_equal_gpu_share() -> None:
    argv = ["--num-prefill", "1", "--num-decode", "3", *_argv(NON_DEFAULT)]
    serve = _serve(argv)
    assert serve.engine == EngineConfig.from_kwargs(**NON_DEFAULT)
    for i, role in enumerate(serve.roles):
        cmd = worker_cmd(serve, role, i)
        assert cmd.count("--engine-config") == 1
        flags = {_flag(f) for _, f in ENGINE_FIELDS} | {"--kv-cache-memory-mb"}
        assert not [arg for arg in cmd if arg.split("=")[0] in flags]
        a = _worker_args(cmd)
        engine = cli.engine_config(a)
        share = NON_DEFAULT["gpu_memory_utilization"] / 4
        assert _flat(engine) == {**NON_DEFAULT, "gpu_memory_utilization": share}
        worker = from_namespace(WorkerConfig, a)
        assert (worker.role, worker.worker_id, worker.metrics_port) == (role, f"{role}-{i}", 0)


def test_colocated_worker_keeps_the_whole_gpu_share() -> None:
    serve = _serve(["--colocated", "--gpu-memory-utilization", "0.8"])
    engine = cli.engine_config(_worker_args(worker_cmd(serve, "mixed", 0)))
    assert serve.roles == ["mixed"] and engine.cache.gpu_memory_utilization == 0.8


def test_serve_config_shorthands_fold_into_the_engine() -> None:
    serve = ServeConfig(dtype="float32", kv_cache_memory_mb=96)
    assert serve.engine.dtype == "float32"
    assert serve.engine.cache.kv_cache_memory_bytes == 96 * 1024**2


def test_api_keys_reach_the_gateway_by_environment_never_argv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(API_KEYS_ENV, "from-env")
    serve = _serve(["--api-key", "sekrit-1", "--api-key", "sekrit-2"])
    assert serve.api_keys == ("sekrit-1", "sekrit-2", "from-env")
    children = [worker_cmd(serve, r, i) for i, r in enumerate(serve.roles)]
    children.append(gateway_cmd(serve))
    assert not [arg for cmd in children for arg in cmd if "sekrit" in arg or "from-env" in arg]
    assert api_keys_from_env(gateway_env(serve)) == serve.api_keys
    # serve's own env does not leak into the gateway's
    assert gateway_env(ServeConfig()) == {API_KEYS_ENV: "", API_KEY_ENV: ""}


# ---- the generator itself


@dataclass(frozen=True)
class _Inner:
    """Inner."""

    size: int = 1
    """Size (100% of it)."""


@dataclass(frozen=True)
class _Outer:
    """Outer."""

    size: int = 2
    """Also size."""
    inner: _Inner = field(default_factory=_Inner)


@dataclass(frozen=True)
class _Undocumented:
    """No field docstrings."""

    names: tuple[str, ...] = ()
    level: float | None = None


def test_a_flat_name_clash_and_a_missing_docstring_are_refused() -> None:
    with pytest.raises(ValueError, match="'size' appears twice"):
        flat_fields(_Outer)
    with pytest.raises(ValueError, match=r"_Undocumented\.names has no docstring"):
        add_config_flags(argparse.ArgumentParser(), _Undocumented)


def test_help_with_a_percent_sign_and_repeatable_tuple_flags() -> None:
    p = argparse.ArgumentParser()
    add_config_flags(p, _Inner)
    assert "100% of it" in p.format_help()
    assert flat_fields(_Undocumented)["names"].type == tuple[str, ...]
    not_given = argparse.Namespace(names=None, level=None)
    assert namespace_values(_Undocumented, not_given) == {"level": None}
    assert from_flat(_Undocumented, {"names": ["a", "b"]}).names == ("a", "b")
    config = _Undocumented(("a",), 0.5)
    assert from_json(_Undocumented, to_json(config)) == config


def test_serve_hands_the_gateway_its_deadlines_and_limits_and_workers_their_bind_address() -> None:
    from baton.services.gateway.deadlines import StreamDeadlines
    from baton.services.gateway.limits import GatewayLimits

    serve = _serve(
        [
            *("--max-concurrent-requests", "7", "--header-timeout-s", "2.5"),
            *("--inter-token-timeout-s", "4", "--host", "0.0.0.0", "--worker-host", "10.1.2.3"),
        ]
    )
    args = cli.build_parser().parse_args(gateway_cmd(serve)[3:])
    assert from_namespace(GatewayLimits, args) == GatewayLimits(
        max_concurrent_requests=7, header_timeout_s=2.5
    )
    assert from_namespace(StreamDeadlines, args) == StreamDeadlines(inter_token_timeout_s=4.0)
    assert args.host == "0.0.0.0"
    worker = cli.build_parser().parse_args(worker_cmd(serve, "decode", 1)[3:])
    assert from_namespace(WorkerConfig, worker).host == "10.1.2.3"
