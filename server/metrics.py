"""Prometheus metrics of one app (own registry) and the ASGI middleware that records every HTTP request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Metrics:
    """The service's metrics; one registry per app so several apps (tests) never collide."""

    registry: CollectorRegistry = field(default_factory=lambda: CollectorRegistry(auto_describe=True))

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "simvq_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "simvq_http_request_duration_seconds",
            "HTTP request latency by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("simvq_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.audio_seconds = Counter(
            "simvq_audio_seconds",
            "Seconds of audio encoded or decoded, by operation.",
            ["operation"],
            registry=r,
        )
        self.rejections = Counter(
            "simvq_rejections",
            "Requests refused or failed, by reason (the problem type slug).",
            ["reason"],
            registry=r,
        )
        self.streams = Gauge("simvq_streams_open", "WebSocket streams open.", ["direction"], registry=r)
        self.stream_steps = Counter(
            "simvq_stream_steps", "Batched steps of the stream scheduler, by direction.", ["direction"], registry=r
        )
        self.stream_step_frames = Counter(
            "simvq_stream_step_frames", "Frames those steps carried, one per stream.", ["direction"], registry=r
        )
        self.stream_step_seconds = Counter(
            "simvq_stream_step_cpu_seconds", "CPU time those steps took.", ["direction"], registry=r
        )
        self.work_in_flight = Gauge(
            "simvq_work_slots_busy", "Admitted encode/decode requests holding a slot.", registry=r
        )
        self.ready = Gauge("simvq_ready", "1 when the models are loaded and warmed up.", registry=r)


class MetricsMiddleware:
    """Counts requests by route template (not raw path), times them, tracks the in-flight gauge and
    tells the app's runtime (if started) that a request is active, so shutdown can drain it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()
        self.metrics.in_flight.inc()
        runtime = getattr(scope["app"].state, "runtime", None) if "app" in scope else None
        if runtime is not None:
            runtime.enter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            if runtime is not None:
                runtime.leave()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(route=template, method=scope.get("method", "?"), status=str(status)).inc()
            self.metrics.latency.labels(route=template).observe(time.perf_counter() - start)
