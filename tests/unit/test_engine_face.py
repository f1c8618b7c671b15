"""EngineCore is the engine's only face: nothing outside services/engine/ reaches its parts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# `<anything>.core.runner`, `.core.scheduler`, `.core.kv`, `.core.executor`, `.core._private`:
# the engine's scheduler, KV manager, executor and runner are its own business.
REACH_THROUGH = re.compile(r"\bcore\.(runner|scheduler|kv|kv_events|executor|_\w+)\b")
SCANNED = ("services", "router", "kvstore", "loadgen", "kernels", "tests", "scripts")


def test_nothing_outside_the_engine_reaches_through_engine_core() -> None:
    hits = []
    for folder in SCANNED:
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("services", "engine") and rel.parts[2] != "bench":
                continue  # the engine itself (its benchmarks use the face like anyone else)
            for lineno, line in enumerate(path.read_text().splitlines(), 1):
                if REACH_THROUGH.search(line) and path != Path(__file__):
                    hits.append(f"{rel}:{lineno}: {line.strip()}")
    assert not hits, "reach-through into EngineCore's parts:\n" + "\n".join(hits)


def test_the_scheduler_keeps_no_disaggregation_state() -> None:
    """The prefill/decode handoff is a KV connector's (services/worker/connectors/)."""
    source = (ROOT / "services/engine/scheduler.py").read_text().lower()
    for word in ("remote", "prefill worker", "decode worker", "transport", "handoff"):
        assert word not in source, word
