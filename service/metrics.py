"""Prometheus metrics, one registry per app (no module-level globals, so tests and apps stay independent)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swissroll_requests_total", "HTTP requests", ["endpoint", "model", "sampler", "status"], registry=r
        )
        self.latency = Histogram(
            "swissroll_request_seconds",
            "HTTP request latency",
            ["endpoint", "model", "sampler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.points = Counter("swissroll_points_generated_total", "points sampled", ["sampler"], registry=r)
        self.queue_wait = Histogram(
            "swissroll_queue_wait_seconds", "time waiting for a compute slot", buckets=LATENCY_BUCKETS, registry=r
        )
        self.compute = Histogram(
            "swissroll_compute_seconds",
            "time sampling/rendering in a compute slot",
            ["endpoint", "sampler"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("swissroll_in_flight_requests", "HTTP requests being handled", registry=r)
        self.batch_points = Histogram(
            "swissroll_batch_points",
            "points per batched sampling job",
            registry=r,
            buckets=(1, 10, 100, 1_000, 10_000, 100_000),
        )
        self.batch_requests = Histogram(
            "swissroll_batch_requests",
            "requests merged per batched sampling job",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )
        # Label values name models by their file stems (the operator's directory), never by what a client sent.
        self.reloads = Counter(
            "swissroll_model_reloads_total",
            "model repository changes: loaded, reloaded, unchanged (same bytes), unloaded, failed",
            ["result"],
            registry=r,
        )
        self.rejected = Counter(
            "swissroll_rejected_total", "requests refused by admission control", ["reason"], registry=r
        )
        self.connections_refused = Counter(
            "swissroll_connections_refused_total",
            "connections closed by the HTTP server's limits (max_connections, header_timeout, header_too_large)",
            ["reason"],
            registry=r,
        )
