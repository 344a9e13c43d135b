"""The server's counters, exposed in Prometheus' text format (``/metrics``) and as JSON
(``/metrics.json``, the older summary the load test reads).

Labels take only names the server knows: a loaded adapter, the base, or ``"unknown"`` (for
a request whose model is not loaded, or that never named one), and one of the fixed
endpoints, so no client can grow the number of series.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .multi import ResidencyStats

UNKNOWN = "unknown"
RESIDENCY = {
    "loads": "Adapters loaded from disk on their first use",
    "evictions": "Least recently used adapters unloaded to keep the resident byte budget",
    "over_budget": "Calls whose own adapters alone exceeded the resident byte budget (served anyway)",
}
# seconds per request: CPU generation ranges from milliseconds to the 60 s default timeout
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    """Per-model request, error and token counters and a latency histogram, in one registry
    per app (so several apps in one process, as in the tests, count apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        per_request = ["model", "endpoint"]
        self.requests = Counter("moslora_requests", "Requests received", per_request, registry=self.registry)
        self.errors = Counter("moslora_request_errors", "Requests answered with an error, by HTTP status",
                              [*per_request, "status"], registry=self.registry)
        self.prompt_tokens = Counter("moslora_prompt_tokens", "Prompt tokens of answered requests", ["model"],
                                     registry=self.registry)
        self.completion_tokens = Counter("moslora_completion_tokens", "Generated tokens of answered requests",
                                         ["model"], registry=self.registry)
        self.latency = Histogram("moslora_request_duration_seconds", "Time from arrival to the last token",
                                 per_request, buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("moslora_queue_depth", "Requests waiting for the worker", registry=self.registry)
        self.adapters = Gauge("moslora_adapters_loaded", "Adapters resident", registry=self.registry)
        self.available = Gauge("moslora_adapters_available", "Adapters servable: resident or on disk under the root",
                               registry=self.registry)
        self.resident = Gauge("moslora_resident_bytes", "Resident bytes (base, adapters_total, cache, total, budget)",
                              ["part"], registry=self.registry)
        # the model counts these (ResidencyStats); each exposition adds what is new since the last
        self.residency = {event: Counter(f"moslora_adapter_{event}", text, registry=self.registry)
                          for event, text in RESIDENCY.items()}
        self._residency_seen = dict.fromkeys(RESIDENCY, 0)

    def answered(self, model: str, endpoint: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.latency.labels(model, endpoint).observe(seconds)
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.completion_tokens.labels(model).inc(completion_tokens)

    def failed(self, model: str, endpoint: str, status: int) -> None:
        self.errors.labels(model, endpoint, str(status)).inc()

    def exposition(self, queue_depth: int, memory: dict[str, Any], residency: "ResidencyStats",
                   available: int) -> bytes:
        """The text format, with the gauges read now (``memory``: ``MultiAdapterModel.memory_report()``)."""
        self.queue_depth.set(queue_depth)
        self.adapters.set(len(memory["adapters"]))
        self.available.set(available)
        for part in ("base", "adapters_total", "total", "budget"):
            if memory[part] is not None:  # no budget: no series
                self.resident.labels(part).set(memory[part])
        for event, counter in self.residency.items():
            total = getattr(residency, event)
            counter.inc(total - self._residency_seen[event])
            self._residency_seen[event] = total
        return generate_latest(self.registry)

    def summary(self) -> dict[str, int]:
        """Totals over all labels, under the keys the JSON ``/metrics`` had."""
        by_status = {s: self._total(self.errors, status=s) for s in ("500", "503", "504")}
        return {"requests": self._total(self.requests), "prompt_tokens": self._total(self.prompt_tokens),
                "completion_tokens": self._total(self.completion_tokens), "errors": self._total(self.errors),
                "internal_errors": by_status["500"], "rejected_queue_full": by_status["503"],
                "timeouts": by_status["504"]}

    @staticmethod
    def _total(counter: Counter, **labels: str) -> int:
        return int(sum(s.value for m in counter.collect() for s in m.samples
                   if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())))
