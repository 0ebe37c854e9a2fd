"""Prometheus metrics of `kosmos2 serve`: requests by task and status, their latency, rows in flight, the queue.

Each service has a registry of its own (not the process-wide default), so two apps in one process (tests) do not
collide and /metrics shows this service's numbers only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds, from a short ground on a GPU (~0.05 s) to a long detailed description behind a full queue.
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)


class Metrics:
    """The service's counters and gauges; the gauges read the scheduler when scraped."""

    def __init__(self, scheduler) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("kosmos2_requests", "Task requests answered, by task and HTTP status.",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("kosmos2_request_seconds", "Time from a task request's arrival to its answer.",
                                 ["task"], buckets=LATENCY_BUCKETS, registry=self.registry)
        Gauge("kosmos2_rows_in_flight", "Prompts taken by the model and not yet answered.",
              registry=self.registry).set_function(lambda: scheduler.rows_in_flight)
        Gauge("kosmos2_rows", "Most prompts decoding at once (halved when the device runs out of memory).",
              registry=self.registry).set_function(lambda: scheduler.rows)
        Gauge("kosmos2_stream_rows", "Rows of the decoding now running (the demand's power of two, up to "
              "kosmos2_rows).", registry=self.registry).set_function(lambda: scheduler.stream_rows)
        Gauge("kosmos2_queue_length", "Requests waiting for the model.",
              registry=self.registry).set_function(lambda: scheduler.queued)
        Gauge("kosmos2_queue_limit", "Most requests that may wait (503 past it).",
              registry=self.registry).set_function(lambda: scheduler.queue_limit)

    def observe(self, task: str, status: int, seconds: float) -> None:
        self.requests.labels(task=task, status=str(status)).inc()
        if status == 200:
            self.latency.labels(task=task).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
