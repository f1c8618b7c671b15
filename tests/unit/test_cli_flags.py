"""`baton serve` hands its engine flags to its workers, with the device memory share split."""

from __future__ import annotations

import argparse

import pytest

import baton.services.cli as cli


def _serve_args(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> argparse.Namespace:
    """The namespace `baton serve <argv>` would run with (no cluster is started)."""
    captured: list[argparse.Namespace] = []
    monkeypatch.setattr(cli, "cmd_serve", lambda a: captured.append(a) or 0)
    cli.main(["serve", *argv])
    return captured[0]


def _flag_values(flags: tuple[str, ...]) -> dict[str, str]:
    return {f: v for f, v in zip(flags, (*flags[1:], ""), strict=True) if f.startswith("--")}


def test_workers_get_the_engine_flags_and_an_equal_memory_share(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    argv = ["--num-prefill", "1", "--num-decode", "3", "--enforce-eager", "--device", "cuda:1"]
    flags = cli._engine_flags(_serve_args(monkeypatch, argv))
    values = _flag_values(flags)
    assert values["--device"] == "cuda:1"
    assert float(values["--gpu-memory-utilization"]) == pytest.approx(0.9 / 4)
    assert values["--attention-backend"] == "triton"
    assert "--enforce-eager" in flags
    assert not any("async-scheduling" in f or "pdl" in f for f in flags)  # device defaults


def test_async_scheduling_and_pdl_flags_reach_config_and_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = _serve_args(monkeypatch, ["--no-async-scheduling", "--pdl", "--device", "cpu"])
    config = cli._engine_config(a)
    assert config.async_scheduling is False and config.pdl is True
    flags = cli._engine_flags(a)
    assert "--no-async-scheduling" in flags and "--pdl" in flags
    default = cli._engine_config(_serve_args(monkeypatch, ["--device", "cpu"]))
    assert default.async_scheduling is False and default.pdl is None  # CPU: nothing to overlap


def test_engine_config_from_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--colocated", "--attention-backend", "flashinfer", "--device", "cpu"]
    a = _serve_args(monkeypatch, argv)
    config = cli._engine_config(a)
    assert config.device == "cpu" and config.attention_backend == "flashinfer"
    assert config.graph_max_batch == 0  # no CUDA graphs on CPU
    assert float(_flag_values(cli._engine_flags(a))["--gpu-memory-utilization"]) == 0.9
