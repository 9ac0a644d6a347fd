"""Gateway metrics beyond the request counters every server has (llama_grpc_runtime.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llama_grpc_runtime.metrics import LATENCY_BUCKETS

UPSTREAM_UP = Gauge("llama_gateway_upstream_up", "1 while the upstream service answers its health check SERVING",
                    ["upstream"])
TIME_TO_FIRST_CHUNK = Histogram("llama_gateway_time_to_first_token_seconds",
                                "From request to the model's first generated tokens (tokenize + queue + prefill)",
                                buckets=LATENCY_BUCKETS)
GENERATED_TOKENS = Counter("llama_gateway_generated_tokens_total", "Tokens received from the model service")
FINISHED = Counter("llama_gateway_completions_total", "Completions by finish reason", ["finish_reason"])
