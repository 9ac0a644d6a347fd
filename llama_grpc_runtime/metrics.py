"""Prometheus metrics common to every server: requests by method and status code, latency."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram, start_http_server

# Streams of generated text last seconds to minutes; unary calls take milliseconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class RequestMetrics:
    requests: Counter
    latency: Histogram
    in_flight: Gauge


@cache
def request_metrics(prefix: str) -> RequestMetrics:
    """One set per metric prefix (``llama_tokenizer``, ``llama_model``, ``llama_gateway``) per process."""
    return RequestMetrics(
        requests=Counter(f"{prefix}_requests_total", "gRPC requests handled, by method and status code",
                         ["method", "code"]),
        latency=Histogram(f"{prefix}_request_duration_seconds", "gRPC request latency (whole stream)",
                          ["method"], buckets=LATENCY_BUCKETS),
        in_flight=Gauge(f"{prefix}_requests_in_flight", "gRPC requests being served", ["method"]),
    )


def serve_metrics(host: str, port: int) -> None:
    """Expose the default registry as Prometheus text on http://host:port/metrics (port 0: off)."""
    if port:
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            raise SystemExit(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc}): is another server "
                             "using the port? Stop it or choose another --metrics-port.") from None
