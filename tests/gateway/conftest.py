"""The three real processes on 127.0.0.1 (embedded SmolLM2 model), started once per test session.

Tests that stop and restart an upstream leave the stack healthy again before they return, so every
test may assume a serving stack.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

# Small enough to exercise the limits cheaply: 4 slots, 2 waiting, 512-token context.
MODEL_ARGS = ("--max-batch-size", "4", "--max-queue", "2", "--max-seq-len", "512")
PARIS = [common_pb2.Message(role="user", content="What is the capital of France?")]
GREEDY = common_pb2.SamplingParams(temperature=0)


def start_model(*extra: str, port: int | None = None, metrics_port: int | None = None) -> ServiceProcess:
    return ServiceProcess("model_service", *MODEL_ARGS, "--log-level", "debug", *extra,
                          port=port, metrics_port=metrics_port)


def start_tokenizer(*extra: str, port: int | None = None, metrics_port: int | None = None) -> ServiceProcess:
    return ServiceProcess("tokenizer_service", "--log-level", "debug", *extra, port=port, metrics_port=metrics_port)


def start_gateway(tokenizer_address: str, model_address: str, *extra: str) -> ServiceProcess:
    return ServiceProcess("gateway", "--tokenizer-address", tokenizer_address, "--model-address", model_address,
                          "--health-interval", "0.2", "--log-level", "debug", *extra)


def health(address: str) -> int:
    """The server's overall health status (-1 when it does not answer)."""
    with grpc.insecure_channel(address) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return -1


def metric(text: str, name: str, **labels: str) -> float:
    """One sample from Prometheus text (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            return float(match.group(3))
    return 0.0


class Stack:
    def __init__(self) -> None:
        self.tokenizer = start_tokenizer()
        self.model = start_model()
        self.tokenizer.wait_healthy()
        self.model.wait_healthy(timeout=300)
        self.gateway = start_gateway(self.tokenizer.address, self.model.address).wait_healthy()
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.tokenizer_channel = grpc.insecure_channel(self.tokenizer.address)
        self.tokenizer_stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.tokenizer_channel)

    def restart(self, name: str) -> None:
        """Stop ``tokenizer`` or ``model`` and start it again on the same ports."""
        old: ServiceProcess = getattr(self, name)
        old.stop()
        start = start_tokenizer if name == "tokenizer" else start_model
        setattr(self, name, start(port=old.port, metrics_port=old.metrics_port).wait_healthy(timeout=300))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        """The tokenizer service's own Decode: the truth for the gateway's streamed text."""
        return self.tokenizer_stub.Decode(tokenizer_pb2.DecodeRequest(
            token_ids=token_ids, skip_special_tokens=skip_special_tokens), timeout=30).text

    def stream(self, request: gateway_pb2.GenerateRequest, **kwargs) -> list[gateway_pb2.GenerateStreamResponse]:
        stream_request = gateway_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
        return list(self.stub.GenerateStream(stream_request, timeout=kwargs.pop("timeout", 120), **kwargs))

    def model_metric(self, name: str, **labels: str) -> float:
        return metric(self.model.metrics_text(), name, **labels)

    def wait_model_idle(self, timeout: float = 10.0) -> None:
        """The model's running sequences and used cache slots back to 0."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.model.metrics_text()
            if metric(text, "llama_model_running_sequences") == 0 and metric(text, "llama_model_kv_slots_used") == 0:
                return
            time.sleep(0.05)
        raise AssertionError(f"model still busy after {timeout}s:\n" + "\n".join(
            line for line in self.model.metrics_text().splitlines() if "running" in line or "slots" in line))

    def model_finished(self, request_id: str, timeout: float = 10.0) -> list[dict]:
        """The model service's own 'generation finished' log lines for ``request_id`` (waits for one)."""
        deadline = time.monotonic() + timeout
        while not (finished := [e for e in self.model.log_events() if e.get("request_id") == request_id
                                and e.get("event") == "generation finished"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return finished

    def close(self) -> None:
        self.channel.close()
        self.tokenizer_channel.close()
        for process in (self.gateway, self.model, self.tokenizer):
            process.stop()


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    stack = Stack()
    yield stack
    stack.close()


def uncached(response: gateway_pb2.GenerateResponse) -> gateway_pb2.GenerateResponse:
    """The response without usage.cached_prompt_tokens, which depends on what ran before (the model
    service's prefix cache), for comparing outputs of repeated requests."""
    copy = type(response)()
    copy.CopyFrom(response)
    copy.usage.cached_prompt_tokens = 0
    return copy


def joined(responses: list[gateway_pb2.GenerateStreamResponse]) -> gateway_pb2.GenerateResponse:
    """Streamed responses joined the way unary Generate returns them (same field numbers)."""
    result = gateway_pb2.GenerateResponse()
    for response in responses:
        text = result.text + response.text
        result.MergeFrom(gateway_pb2.GenerateResponse.FromString(response.SerializeToString()))
        result.text = text
    return result
