"""Gateway metrics beyond the request counters every server has (llama_grpc_runtime.metrics)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from prometheus_client import Counter, Gauge, Histogram

from llama_grpc_runtime.metrics import LATENCY_BUCKETS


@dataclass(frozen=True)
class GatewayMetrics:
    upstream_up: Gauge
    time_to_first_chunk: Histogram
    generated_tokens: Counter
    finished: Counter
    admission_refused: Counter
    replica_up: Gauge
    replica_in_flight: Gauge
    routed: Counter


@cache
def gateway_metrics() -> GatewayMetrics:
    """Created once per process (Prometheus' registry refuses duplicates)."""
    p = "llama_gateway"
    return GatewayMetrics(
        upstream_up=Gauge(f"{p}_upstream_up", "1 while the upstream service answers its health check SERVING",
                          ["upstream"]),
        time_to_first_chunk=Histogram(f"{p}_time_to_first_token_seconds",
                                      "From request to the model's first generated tokens (tokenize + queue + prefill)",
                                      buckets=LATENCY_BUCKETS),
        generated_tokens=Counter(f"{p}_generated_tokens_total", "Tokens received from the model service"),
        finished=Counter(f"{p}_completions_total", "Completions by finish reason", ["finish_reason"]),
        admission_refused=Counter(f"{p}_admission_refused_total",
                                  "Requests refused RESOURCE_EXHAUSTED by the gateway before tokenising: every "
                                  "serving model replica was full"),
        replica_up=Gauge(f"{p}_model_replica_up", "1 while the model replica answers its health check SERVING",
                         ["replica"]),
        replica_in_flight=Gauge(f"{p}_model_replica_in_flight",
                                "Sequences of this gateway's calls running or queued on the model replica",
                                ["replica"]),
        routed=Counter(f"{p}_routed_total", "Generate calls sent to each model replica, by why it was chosen "
                       "(prefix, least_loaded, round_robin, retry)", ["replica", "reason"]),
    )
