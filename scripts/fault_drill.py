"""Fault drill: a real `baton serve` under load, faults injected one after another, bad inputs.

    .venv/bin/python scripts/fault_drill.py [--out DIR] [--quick]

Starts `baton serve` (2 prefill + 2 decode workers, CPU, float32, an API key in $BATON_API_KEY,
--inter-token-timeout-s 5, --max-concurrent-requests 64) in its own session, keeps 8 threads of
streaming chat and completions from the official `openai` client running (max_tokens 16,
temperature 0; most prompts over 32 tokens, so they are prefilled remotely), then:

- inputs (docs/design.md §24, docs/gateway.md): the inputs that once gave 500s, a 5 MB body
  (with /health timed meanwhile), a 100 KB head, slowloris, 200 requests at once over the
  admission limit, invalid requests, keys; raw gRPC to the workers without the cluster token,
  Redis without its password, a forged registry entry pointing at an impostor we run;
- faults (§25), each timed from injection until the cluster is whole again (the restarted
  worker printed BATON_WORKER_READY again, re-registered and does work; requests succeed):
  kill -9 of a decode and a prefill worker, SIGSTOP of a decode worker, Redis killed five times
  in a row, both prefill workers killed at once; last, Ctrl-C (SIGINT to serve's group) with
  the load stopped: no process may be left and the port must be free.

A load request either completes (a finish_reason), fails cleanly (an HTTP status or an SSE error
event) or hangs (nothing for 60 s: the client's timeout). A failure counts toward the fault
whose window it overlaps. 429s the load gets during the admission burst are refusals by design
(the client waits Retry-After and goes on) and are not counted as lost.

Prints two markdown tables and writes them as JSON to OUT/fault_drill.json; the cluster's logs
stay in OUT/fault_drill_logs. Serve is always stopped, even when the drill itself fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from fault_drill_cluster import (
    NUM_THREADS,
    OK_AFTER_RECOVERY,
    RECOVERY_TIMEOUT_S,
    WORK_COUNTER,
    WORKER_IDS,
    Load,
    Outcome,
    Serve,
    _counter,
    _wait,
    _work,
)
from fault_drill_inputs import Inputs

from baton.services.redis_server import free_port


@dataclass
class Window:
    """One fault, injection to recovery; failures are matched to it afterwards."""

    fault: str
    in_flight: int
    t0: float
    t1: float = 0.0
    recovered_s: float | None = None
    notes: list[str] = field(default_factory=list)


class Drill:
    def __init__(self, serve: Serve, load: Load) -> None:
        self.serve, self.load = serve, load
        self.windows: list[Window] = []
        self.stopped: set[int] = set()
        """Pids we SIGSTOPped and not yet SIGCONTed (continued at teardown whatever happens)."""

    def _open(self, fault: str) -> Window:
        with self.load.lock:
            w = Window(fault, self.load.in_flight, time.monotonic())
        self.windows.append(w)
        print(f"[drill] {fault}", flush=True)
        return w

    def _close(self, w: Window, healed: bool) -> None:
        w.t1 = time.monotonic()
        if healed:
            w.recovered_s = round(w.t1 - w.t0, 1)
        else:
            w.notes.append(f"NOT recovered within {RECOVERY_TIMEOUT_S:.0f} s")
        if self.serve.proc.poll() is not None:
            w.notes.append(f"serve exited ({self.serve.proc.returncode})")
            raise RuntimeError(f"serve exited during {w.fault}")
        self.settle()

    def settle(self) -> None:
        """Every worker registered and requests completing again, then a breath."""
        _wait(lambda: set(WORKER_IDS) <= set(self.serve.registry()), RECOVERY_TIMEOUT_S)
        self.load.wait_ok_after(time.monotonic(), OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        time.sleep(2.0)

    def _worker_works(self, worker_id: str, since_unix_s: float) -> bool:
        """The restarted worker is registered (a new entry) and has done work since: a decode
        worker streamed tokens, a prefill worker looked prompts up (its engine ran them)."""
        info = self.serve.registry().get(worker_id)
        if info is None or info.started_unix_s < since_unix_s or not info.metrics_address:
            return False
        return _counter(info.metrics_address, WORK_COUNTER[info.role]) > 0

    def kill(self, worker_ids: tuple[str, ...]) -> None:
        readies = {w: self.serve.readies(w) for w in worker_ids}
        pids = [self.serve.worker_pid(w) for w in worker_ids]
        since = time.time()
        w = self._open(f"kill -9 {' + '.join(worker_ids)}")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        healed = _wait(
            lambda: all(self.serve.readies(x) > readies[x] for x in worker_ids), RECOVERY_TIMEOUT_S
        )
        if healed:
            w.notes.append(
                f"re-registered (BATON_WORKER_READY) after {time.monotonic() - w.t0:.1f} s"
            )
            t_ready = time.monotonic()
            healed = _wait(
                lambda: all(self._worker_works(x, since) for x in worker_ids), RECOVERY_TIMEOUT_S
            ) and self.load.wait_ok_after(t_ready, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
            if healed:
                w.notes.append("restarted worker(s) doing work again")
        self._close(w, healed)

    def freeze(self, worker_id: str, stop_s: float) -> None:
        pid = self.serve.worker_pid(worker_id)
        info = self.serve.registry()[worker_id]
        w = self._open(f"SIGSTOP {worker_id} for {stop_s:g} s, then SIGCONT")
        os.kill(pid, signal.SIGSTOP)
        self.stopped.add(pid)
        try:
            time.sleep(stop_s)
        finally:
            os.kill(pid, signal.SIGCONT)
            self.stopped.discard(pid)
        t_cont = time.monotonic()
        time.sleep(1.0)  # the streams the gateway gave up on are aborted meanwhile
        served = _counter(info.metrics_address, "baton:generation_tokens_total")
        healed = _wait(
            lambda: _counter(info.metrics_address, "baton:generation_tokens_total") > served + 16,
            RECOVERY_TIMEOUT_S,
        ) and self.load.wait_ok_after(t_cont, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        if healed:
            w.notes.append(
                f"{worker_id} serving again {time.monotonic() - t_cont:.1f} s after SIGCONT"
            )
        self._close(w, healed)

    def kill_redis(self, times: int, gap_s: float = 3.0) -> None:
        w = self._open(f"kill -9 Redis x{times}, {gap_s:g} s apart")
        back_s = []
        healed = True
        for _ in range(times):
            old = self.serve.redis_pid()
            t_kill = time.monotonic()
            if old is not None:
                os.kill(old, signal.SIGKILL)

            def answers(old: int | None = old) -> bool:
                pid = self.serve.redis_pid()
                with redis.Redis.from_url(self.serve.redis_url, socket_timeout=1) as r:
                    return pid is not None and pid != old and bool(r.ping())

            healed = healed and _wait(answers, 30.0, step_s=0.05)
            back_s.append(time.monotonic() - t_kill)
            time.sleep(max(gap_s - (time.monotonic() - t_kill), 0.0))
        w.notes.append(f"Redis back (with its password) after at most {max(back_s):.1f} s")
        t_last = time.monotonic()
        healed = (
            healed
            and _wait(lambda: set(WORKER_IDS) <= set(self.serve.registry()), RECOVERY_TIMEOUT_S)
            and self.load.wait_ok_after(t_last, OK_AFTER_RECOVERY, RECOVERY_TIMEOUT_S)
        )
        if healed:
            w.notes.append(f"all 4 workers re-registered {time.monotonic() - t_last:.1f} s after")
        self._close(w, healed)

    def window_of(self, o: Outcome, grace_s: float = 5.0) -> Window | None:
        """The fault a failure belongs to: the last injected before it ended, if the request
        began before that fault healed (+ grace_s)."""
        for w in reversed(self.windows):
            if w.t0 <= o.end:
                return w if o.start <= (w.t1 or time.monotonic()) + grace_s else None
        return None

    def rows(self, outcomes: list[Outcome], t_base: float) -> list[dict[str, Any]]:
        """One row per window: requests completed in it, failures that belong to it."""
        rows = []
        for w in self.windows:
            t1 = w.t1 or time.monotonic()
            ok = [o for o in outcomes if o.kind == "ok" and w.t0 <= o.end <= t1]
            bad = [o for o in outcomes if o.kind != "ok" and self.window_of(o) is w]
            kinds = Counter(o.kind for o in bad if o.kind != "hung")
            rows.append(
                {
                    "fault": w.fault,
                    "in_flight_at_injection": w.in_flight,
                    "completed_during": len(ok),
                    "failed_cleanly": sum(kinds.values()),
                    "hung": sum(o.kind == "hung" for o in bad),
                    "recovered_after_s": w.recovered_s,
                    "injected_at_s": round(w.t0 - t_base, 1),
                    "failure_kinds": dict(kinds),
                    "failure_details": sorted({o.detail for o in bad})[:5],
                    "notes": w.notes,
                }
            )
        return rows


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _log_excerpts(log_dir: Path, max_lines: int = 12) -> dict[str, list[str]]:
    """Lines that look like trouble, per log file (the last max_lines of them)."""
    marks = ("Traceback", "ERROR", "Error", "CRITICAL", "exited", "restart", "unhealthy")
    found = {}
    for path in sorted(log_dir.glob("*.*")):
        lines = [
            ln[:300]
            for ln in path.read_text(errors="replace").splitlines()
            if any(m in ln for m in marks)
        ]
        if lines:
            found[path.name] = lines[-max_lines:]
    return found


def report(data: dict[str, Any]) -> str:
    faults = [
        [
            r["fault"], r["in_flight_at_injection"], r["completed_during"], r["failed_cleanly"],
            r["hung"], r["recovered_after_s"] if r["recovered_after_s"] is not None else "NO",
            "; ".join([*(f"{k}: {v}" for k, v in r["failure_kinds"].items()), *r["notes"]]),
        ]
        for r in data["faults"]
    ]  # fmt: skip
    down = data.get("teardown")
    if down:
        faults.append(
            [
                "Ctrl-C (SIGINT to serve's group; load stopped first)", 0, "-", "-", "-",
                down["stop_s"],
                f"exit {down['exit_code']}; {len(down['processes_left'])} of "
                f"{down['processes_before']} processes left; port "
                f"{'free' if down['port_free'] else 'STILL TAKEN'}; Redis port "
                f"{'free' if down['redis_port_free'] else 'STILL TAKEN'}"
                + ("; SIGKILL was needed" if down["sigkill_needed"] else ""),
            ]
        )  # fmt: skip
    head = ["fault", "in flight at injection", "completed during", "failed cleanly", "hung"]
    out = [_table([*head, "recovered after s", "notes"], faults), ""]
    inputs = [
        [
            r["input"], r["tried"], r["expected"], r["as_expected"], r["n5xx"],
            "; ".join([", ".join(f"{k} x{v}" for k, v in r["seen"].items()), *r["notes"]]),
        ]
        for r in data["inputs"]
    ]  # fmt: skip
    out += [_table(["input", "tried", "expected outcome", "as expected", "5xx", "seen"], inputs)]
    t = data["totals"]
    out += [
        "",
        f"load held: {t['completed']} requests completed over {t['duration_s']:.0f} s, "
        f"{t['lost']} lost (failed) of which {t['hung']} hung"
        f" (+{t['refused_429_in_burst']} refused with 429 during the admission burst, by design;"
        f" {t['failed_outside_fault_windows']} failed outside any fault window)",
    ]
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="output folder")
    p.add_argument("--quick", action="store_true", help="a shorter drill, for a smoke test")
    a = p.parse_args()
    out = Path(a.out)
    log_dir = out / "fault_drill_logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    serve = Serve(log_dir, free_port(), api_key="sk-drill-" + secrets.token_urlsafe(16))
    data: dict[str, Any] = {"quick": a.quick, "faults": [], "inputs": [], "log_dir": str(log_dir)}
    load: Load | None = None
    drill: Drill | None = None
    inputs: Inputs | None = None
    t_start = time.monotonic()
    error = None
    try:
        serve.wait_serving()
        print(f"[drill] serving at {serve.url}; logs in {log_dir}", flush=True)
        model = httpx.get(
            f"{serve.url}/v1/models", headers={"Authorization": f"Bearer {serve.api_key}"}
        ).json()["data"][0]["id"]
        load = Load(serve.url, serve.api_key, model).start()
        t_start = time.monotonic()
        if not load.wait_ok_after(t_start, NUM_THREADS, RECOVERY_TIMEOUT_S):
            raise RuntimeError("the load never got going")
        drill = Drill(serve, load)
        inputs = Inputs(serve, load, a.quick)
        data["inputs"] = [r.to_dict() for r in inputs.run_all()]
        drill.settle()
        drill.kill(("decode-2",))
        drill.kill(("prefill-0",))
        drill.freeze("decode-3", 5.0 if a.quick else 20.0)
        drill.kill_redis(2 if a.quick else 5)
        drill.kill(("prefill-0", "prefill-1"))
    except Exception as e:  # reported; serve is stopped below
        error = f"{type(e).__name__}: {e}"
        print(f"[drill] FAILED: {error}", flush=True)
    finally:
        stuck = load.finish() if load is not None else 0
        duration_s = time.monotonic() - t_start
        if drill is not None:
            for pid in drill.stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        with contextlib.suppress(Exception):
            data["work_since_last_start"] = _work(serve)
        print("[drill] Ctrl-C", flush=True)
        data["teardown"] = serve.stop()
    outcomes = load.snapshot() if load is not None else []
    if drill is not None:
        data["faults"] = drill.rows(outcomes, t_start)
    burst = inputs.burst_window if inputs is not None else (0.0, 0.0)
    in_burst = [o for o in outcomes if o.kind == "HTTP 429" and burst[0] <= o.end <= burst[1]]
    failed = [o for o in outcomes if o.kind != "ok" and not any(o is b for b in in_burst)]
    outside = [o for o in failed if drill is None or drill.window_of(o) is None]
    data["totals"] = {
        "completed": sum(o.kind == "ok" for o in outcomes),
        "duration_s": round(duration_s, 1),
        "lost": len(failed) + stuck,
        "hung": sum(o.kind == "hung" for o in failed) + stuck,
        "threads_stuck_at_the_end": stuck,
        "refused_429_in_burst": len(in_burst),
        "failed_outside_fault_windows": len(outside),
        "outside_kinds": dict(Counter(o.kind for o in outside)),
        "completed_by_api": dict(Counter(o.api for o in outcomes if o.kind == "ok")),
    }
    data["failures"] = [
        {**asdict(o), "start": round(o.start - t_start, 1), "end": round(o.end - t_start, 1)}
        for o in failed
    ]
    data["error"] = error
    data["log_excerpts"] = _log_excerpts(log_dir)
    text = report(data)
    print(text)
    if error:
        print(f"\ndrill error: {error}")
    (out / "fault_drill.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"\nwrote {out / 'fault_drill.json'}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
