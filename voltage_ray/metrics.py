"""voltage_ray's Prometheus metrics, through ``ray.util.metrics``.

Ray exports them with every node's other metrics on its metrics export port (``ray start
--metrics-export-port``; ``voltage-ray serve --metrics-port``, default 8080), prefixed ``ray_``:
``voltage_requests`` is scraped as ``ray_voltage_requests_total``. Ray flushes them to its agent
every few seconds (``RAY_metrics_report_interval_ms``).

Ingress replicas record requests (endpoint, model, status, plan), latency, time to first token,
tokens, images, limiter rejections, failed authentications, calls refused because a model's
queue was full, and failovers; model replicas record queue wait and realized batch sizes per
model. ``configs/grafana/voltage_ray.json`` charts them.
"""

from __future__ import annotations

from ray.util import metrics

LATENCY_BOUNDARIES = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
]  # fmt: skip
BATCH_BOUNDARIES = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]

REQUEST_TAGS = ("endpoint", "model", "status", "plan")


class IngressMetrics:
    """The metrics one ingress replica records (created in the replica: Ray metrics are
    per process)."""

    def __init__(self) -> None:
        self.requests = metrics.Counter(
            "voltage_requests",
            description="HTTP requests answered, by route, model id, status code and plan.",
            tag_keys=REQUEST_TAGS,
        )
        self.latency = metrics.Histogram(
            "voltage_request_latency_seconds",
            description="Time from a request's arrival to its last byte (streams: to [DONE]).",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=REQUEST_TAGS,
        )
        self.ttft = metrics.Histogram(
            "voltage_time_to_first_token_seconds",
            description="Streamed chat: time from arrival to the first token's chunk.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model",),
        )
        self.prompt_tokens = metrics.Counter(
            "voltage_prompt_tokens",
            description="Prompt (input) tokens of answered requests.",
            tag_keys=("endpoint", "model", "plan"),
        )
        self.completion_tokens = metrics.Counter(
            "voltage_completion_tokens",
            description="Completion tokens generated for answered chat requests.",
            tag_keys=("model", "plan"),
        )
        self.images = metrics.Counter(
            "voltage_images",
            description="Images generated for answered requests.",
            tag_keys=("model", "plan"),
        )
        self.rejections = metrics.Counter(
            "voltage_limiter_rejections",
            description="Requests the limiter refused: reason rate, quota, concurrency or "
            "forbidden (a model outside the plan).",
            tag_keys=("reason", "plan"),
        )
        self.auth_failures = metrics.Counter(
            "voltage_auth_failures",
            description="Requests whose key was refused by the ingress: reason missing, "
            "malformed, unknown, revoked or mismatch (a known id with the wrong secret); status "
            "401, or 429 once the client address failed too often.",
            tag_keys=("reason", "status"),
        )
        self.overloaded = metrics.Counter(
            "voltage_overload_rejections",
            description="Requests answered 503 at once because their model was full: reason "
            "refused (its key held its fair share of the model's queue), shed (it waited, and gave "
            "way to a key under its share) or capacity (Serve's router queue was full).",
            tag_keys=("model", "reason"),
        )
        self.failovers = metrics.Counter(
            "voltage_failovers",
            description="Model calls tried again because their replica died or was unreachable.",
            tag_keys=("model", "error"),
        )


class ReplicaMetrics:
    """Queue wait (by plan) and realized batch size of one model replica."""

    def __init__(self, model_id: str, kind: str) -> None:
        self.tags = {"model": model_id, "kind": kind}
        self._wait = metrics.Histogram(
            "voltage_queue_wait_seconds",
            description="Time a request waited in its model replica before the model started "
            "on it (chat: until its prefill; embeddings and images: until its batch ran), by the "
            "plan of its API key.",
            boundaries=LATENCY_BOUNDARIES,
            tag_keys=("model", "kind", "plan"),
        )
        self._batch = metrics.Histogram(
            "voltage_batch_size",
            description="Realized batch size per model call (chat: rows per decode step; "
            "embeddings: inputs per encode; images: images per pipeline call).",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=("model", "kind"),
        )

    def waited(self, seconds: float, plan: str = "") -> None:
        self._wait.observe(max(0.0, seconds), tags={**self.tags, "plan": plan})

    def batch(self, size: int) -> None:
        self._batch.observe(size, tags=self.tags)
