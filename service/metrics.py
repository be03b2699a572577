"""Prometheus metrics, one ``CollectorRegistry`` per app so several apps in one process never clash."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServiceMetrics:
    """Every metric the service exports (names prefixed ``vqtok_``)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vqtok_requests_total", "HTTP requests by route, method and status", ["route", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "vqtok_request_duration_seconds", "HTTP request latency by route", ["route"], buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "vqtok_queue_wait_seconds", "time items waited for a batch, by operation", ["operation"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "vqtok_inference_seconds", "forward pass time of one batch, by operation", ["operation"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "vqtok_batch_size", "items per forward pass, by operation", ["operation"], buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("vqtok_images_total", "images encoded or decoded", ["operation"], registry=r)
        self.tokens = Counter("vqtok_tokens_total", "tokens produced or consumed", ["operation"], registry=r)
        self.queue_depth = Gauge("vqtok_queue_depth", "items waiting for the model", registry=r)
        self.ready = Gauge("vqtok_ready", "1 once the model is loaded and warmed up", registry=r)

    def observe_batch(self, operation: str, size: int, seconds: float) -> None:
        self.batch_size.labels(operation).observe(size)
        self.inference_seconds.labels(operation).observe(seconds)

    def observe_work(self, operation: str, images: int, tokens: int, queue_seconds: float) -> None:
        """One answered /encode or /decode: its images (or grids), its tokens, and its longest queue wait."""
        self.images.labels(operation).inc(images)
        self.tokens.labels(operation).inc(tokens)
        self.queue_seconds.labels(operation).observe(queue_seconds)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
