"""Prometheus metrics shared by every baton process (docs/design.md §8).

Names are `baton:<vLLM suffix>` with vLLM's histogram buckets (vllm/v1/metrics), so dashboards
and rules written for vLLM read baton with a prefix swap; disaggregation adds the TTFT split
(routing, prefill, transfer, first decode) and KV transfer size and time.

`Metrics` builds every family on a CollectorRegistry it is given (never the global default
registry, and nothing at import time), so tests can build as many as they like; one process
that hosts several roles or models takes further label views with `Metrics.bind()`.

Labels: request-level series (what the gateway observes per request) carry `model_name`;
worker-side series carry `model_name` and `role` (prefill/decode/mixed). Each side's series are
created on first use; the side named by the constructor's role is created up front, so a
scrape shows zeros instead of absent series before the first request.

Naming notes, checked by tests/router/test_metrics.py:
- prometheus_client stores a counter under its name without `_total` and exposes the sample
  as `<name>_total`; the names below are the exposed ones.
- total KV bytes moved is `baton:kv_transfer_bytes_sum`, the sum of the size histogram. A
  separate counter `baton:kv_transfer_bytes_total` cannot coexist with the histogram
  `baton:kv_transfer_bytes`: both are the metric family `baton:kv_transfer_bytes` (a counter's
  family name drops `_total`), which prometheus_client refuses and OpenMetrics forbids.
"""

from __future__ import annotations

from functools import cached_property
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# vLLM's buckets (vllm/v1/metrics/loggers.py, request_latency_buckets etc.).
TTFT_BUCKETS: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
# 4 KiB (one small block of one layer) to 1 GiB (a long prompt's whole KV), powers of 4.
KV_TRANSFER_BYTES_BUCKETS: Final = tuple(float(4096 * 4**i) for i in range(10))

CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
"""The Content-Type of what render() returns (Prometheus text format 0.0.4)."""

REQUEST_LABELS: Final = ("model_name",)
WORKER_LABELS: Final = ("model_name", "role")
ROLES: Final = ("gateway", "prefill", "decode", "mixed")


def render(registry: CollectorRegistry) -> bytes:
    """The body of a /metrics response; serve it with CONTENT_TYPE."""
    return generate_latest(registry)


class MetricFamilies:
    """Every baton metric family, registered once on one registry (labels unbound)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._build_request_families(registry)
        self._build_worker_families(registry)

    def _build_request_families(self, r: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, REQUEST_LABELS, registry=r, buckets=buckets)

        self.time_to_first_token = hist(
            "baton:time_to_first_token_seconds", "Time to first token, seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = hist(
            "baton:inter_token_latency_seconds", "Time between output tokens, seconds.", ITL_BUCKETS
        )
        self.e2e_request_latency = hist(
            "baton:e2e_request_latency_seconds",
            "Arrival to last token, seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.ttft_routing = hist(
            "baton:ttft_routing_seconds", "TTFT part: placement by the router.", TTFT_BUCKETS
        )
        self.ttft_prefill = hist(
            "baton:ttft_prefill_seconds",
            "TTFT part: prompt compute on the prefill side.",
            TTFT_BUCKETS,
        )
        self.ttft_transfer = hist(
            "baton:ttft_transfer_seconds",
            "TTFT part: KV handoff from prefill to decode not hidden behind compute.",
            TTFT_BUCKETS,
        )
        self.ttft_first_decode = hist(
            "baton:ttft_first_decode_seconds",
            "TTFT part: from KV ready on the decode worker to the first token.",
            TTFT_BUCKETS,
        )
        self.request_success = Counter(
            "baton:request_success_total",
            "Finished requests by finish reason.",
            (*REQUEST_LABELS, "finished_reason"),
            registry=r,
        )
        self.request_rejected = Counter(
            "baton:request_rejected_total",
            "Requests the gateway refused before serving them, by reason.",
            (*REQUEST_LABELS, "reason"),
            registry=r,
        )
        self.router_decisions = Counter(
            "baton:router_decisions_total",
            "Placements by policy and prefill (local: on the decode worker; remote).",
            (*REQUEST_LABELS, "policy", "prefill"),
            registry=r,
        )
        self.router_matched_blocks = Counter(
            "baton:router_matched_blocks_total",
            "Prompt blocks the chosen decode worker already held, per the router's index.",
            REQUEST_LABELS,
            registry=r,
        )
        self.router_prompt_blocks = Counter(
            "baton:router_prompt_blocks_total",
            "Full prompt blocks of placed requests (matched / prompt = the predicted hit rate).",
            REQUEST_LABELS,
            registry=r,
        )
        # Signed: predicted minus observed time to first token, -40 s .. +40 s.
        error_buckets = tuple(
            sorted(
                {-b for b in TTFT_BUCKETS if b <= 40} | {0.0} | {b for b in TTFT_BUCKETS if b <= 40}
            )
        )
        self.router_ttft_error = Histogram(
            "baton:router_ttft_prediction_error_seconds",
            "The router's predicted time to first token minus the one observed (from placement).",
            REQUEST_LABELS,
            registry=r,
            buckets=error_buckets,
        )

    def _build_worker_families(self, r: CollectorRegistry) -> None:
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, WORKER_LABELS, registry=r, buckets=buckets)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, WORKER_LABELS, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, WORKER_LABELS, registry=r)

        self.request_queue_time = hist(
            "baton:request_queue_time_seconds",
            "Time waiting in the scheduler queue, seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_prefill_time = hist(
            "baton:request_prefill_time_seconds",
            "Time in the prefill phase, seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.kv_transfer_bytes = hist(
            "baton:kv_transfer_bytes",
            "Bytes of KV moved per handoff (the _sum is the total moved).",
            KV_TRANSFER_BYTES_BUCKETS,
        )
        self.kv_transfer_time = hist(
            "baton:kv_transfer_seconds", "Duration of one KV handoff, seconds.", TTFT_BUCKETS
        )
        self.num_requests_running = gauge("baton:num_requests_running", "Requests running.")
        self.num_requests_waiting = gauge("baton:num_requests_waiting", "Requests waiting.")
        self.kv_cache_usage = gauge(
            "baton:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0 to 1)."
        )
        self.prompt_tokens = counter("baton:prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = counter(
            "baton:generation_tokens_total", "Generation tokens produced."
        )
        self.prefix_cache_queries = counter(
            "baton:prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_cache_hits = counter(
            "baton:prefix_cache_hits_total", "Prompt tokens found in the prefix cache."
        )
        self.num_preemptions = counter(
            "baton:num_preemptions_total", "Requests preempted (KV freed, recomputed later)."
        )


class Metrics:
    """This process's view of the metrics: families on a registry, its labels bound.

    The properties return label-bound children: `m.time_to_first_token.observe(0.2)`.
    A process that hosts several roles or models (`baton serve` in one process) builds one
    Metrics per registry and takes more views with bind(); a second Metrics on the same
    registry is refused (duplicated series).
    """

    def __init__(self, registry: CollectorRegistry, model_name: str, role: str = "gateway"):
        self._init_view(MetricFamilies(registry), model_name, role)

    def _init_view(self, families: MetricFamilies, model_name: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.families = families
        self.registry = families.registry
        self.model_name = model_name
        self.role = role
        # Touching a bound child creates its series (at zero) in the exposition.
        if role == "gateway":
            self.request_series()
        else:
            self.worker_series()

    def bind(self, model_name: str | None = None, role: str | None = None) -> Metrics:
        """Another view on the same families with other labels (same registry)."""
        view = Metrics.__new__(Metrics)
        view._init_view(self.families, model_name or self.model_name, role or self.role)
        return view

    # ---- request-level, labels (model_name) ---------------------------------------------------

    @cached_property
    def time_to_first_token(self) -> Histogram:
        return self.families.time_to_first_token.labels(self.model_name)

    @cached_property
    def inter_token_latency(self) -> Histogram:
        return self.families.inter_token_latency.labels(self.model_name)

    @cached_property
    def e2e_request_latency(self) -> Histogram:
        return self.families.e2e_request_latency.labels(self.model_name)

    @cached_property
    def ttft_routing(self) -> Histogram:
        return self.families.ttft_routing.labels(self.model_name)

    @cached_property
    def ttft_prefill(self) -> Histogram:
        return self.families.ttft_prefill.labels(self.model_name)

    @cached_property
    def ttft_transfer(self) -> Histogram:
        return self.families.ttft_transfer.labels(self.model_name)

    @cached_property
    def ttft_first_decode(self) -> Histogram:
        return self.families.ttft_first_decode.labels(self.model_name)

    def request_success(self, finished_reason: str) -> Counter:
        """The counter for one finish reason ("stop", "length", "abort", ...)."""
        return self.families.request_success.labels(self.model_name, finished_reason)

    def request_rejected(self, reason: str) -> Counter:
        """The counter for one reason a request was refused ("max_concurrent_requests")."""
        return self.families.request_rejected.labels(self.model_name, reason)

    def observe_route(
        self, policy: str, remote: bool, matched_blocks: int, prompt_blocks: int
    ) -> None:
        """One placement: its policy, local or remote prefill, and the index's hit."""
        f = self.families
        f.router_decisions.labels(self.model_name, policy, "remote" if remote else "local").inc()
        f.router_matched_blocks.labels(self.model_name).inc(matched_blocks)
        f.router_prompt_blocks.labels(self.model_name).inc(prompt_blocks)

    @cached_property
    def router_ttft_error(self) -> Histogram:
        return self.families.router_ttft_error.labels(self.model_name)

    # ---- worker-side, labels (model_name, role) ------------------------------------------------

    @cached_property
    def request_queue_time(self) -> Histogram:
        return self.families.request_queue_time.labels(self.model_name, self.role)

    @cached_property
    def request_prefill_time(self) -> Histogram:
        return self.families.request_prefill_time.labels(self.model_name, self.role)

    @cached_property
    def kv_transfer_bytes(self) -> Histogram:
        return self.families.kv_transfer_bytes.labels(self.model_name, self.role)

    @cached_property
    def kv_transfer_time(self) -> Histogram:
        return self.families.kv_transfer_time.labels(self.model_name, self.role)

    @cached_property
    def num_requests_running(self) -> Gauge:
        return self.families.num_requests_running.labels(self.model_name, self.role)

    @cached_property
    def num_requests_waiting(self) -> Gauge:
        return self.families.num_requests_waiting.labels(self.model_name, self.role)

    @cached_property
    def kv_cache_usage(self) -> Gauge:
        return self.families.kv_cache_usage.labels(self.model_name, self.role)

    @cached_property
    def prompt_tokens(self) -> Counter:
        return self.families.prompt_tokens.labels(self.model_name, self.role)

    @cached_property
    def generation_tokens(self) -> Counter:
        return self.families.generation_tokens.labels(self.model_name, self.role)

    @cached_property
    def prefix_cache_queries(self) -> Counter:
        return self.families.prefix_cache_queries.labels(self.model_name, self.role)

    @cached_property
    def prefix_cache_hits(self) -> Counter:
        return self.families.prefix_cache_hits.labels(self.model_name, self.role)

    @cached_property
    def num_preemptions(self) -> Counter:
        return self.families.num_preemptions.labels(self.model_name, self.role)

    def request_series(self) -> tuple[Histogram, ...]:
        return (
            self.time_to_first_token,
            self.inter_token_latency,
            self.e2e_request_latency,
            self.ttft_routing,
            self.ttft_prefill,
            self.ttft_transfer,
            self.ttft_first_decode,
        )

    def worker_series(self) -> tuple[Histogram | Gauge | Counter, ...]:
        return (
            self.request_queue_time,
            self.request_prefill_time,
            self.kv_transfer_bytes,
            self.kv_transfer_time,
            self.num_requests_running,
            self.num_requests_waiting,
            self.kv_cache_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.prefix_cache_queries,
            self.prefix_cache_hits,
            self.num_preemptions,
        )

    def observe_kv_transfer(self, num_bytes: int, seconds: float) -> None:
        """One finished KV handoff (either side may report it, with its own role)."""
        self.kv_transfer_bytes.observe(num_bytes)
        self.kv_transfer_time.observe(seconds)
