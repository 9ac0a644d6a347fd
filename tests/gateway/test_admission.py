"""Admission before tokenising: the gateway refuses at once what no model replica has room for,
takes exactly what the model service would take, and learns of other gateways' calls from the load
the model service reports (which keeps the final word)."""

from __future__ import annotations

import time

import grpc
import pytest

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from .conftest import GREEDY, PARIS, metric, start_gateway, start_model, start_tokenizer

CAPACITY = 6  # MODEL_ARGS: --max-batch-size 4 + --max-queue 2
# SmolLM2 on this CPU finishes a few hundred tokens in a second: held streams need a longer context.
LONG = 2000
SHORT = gateway_pb2.GenerateRequest(messages=PARIS, sampling=GREEDY,
                                    stopping=common_pb2.StoppingCriteria(max_new_tokens=3))


def long_stream(n: int = 1) -> gateway_pb2.GenerateStreamRequest:
    # min_new_tokens keeps it running past an early end-of-turn, so it surely holds its place.
    return gateway_pb2.GenerateStreamRequest(
        messages=PARIS, sampling=common_pb2.SamplingParams(temperature=1.0, seed=7), n=n,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=LONG, min_new_tokens=LONG))


def hold(stack: Admitting, count: int, n: int = 1) -> list:
    """``count`` more streams of ``n`` completions each, running or queued at the model service."""
    before = stack.model_live()
    calls = [stack.stub.GenerateStream(long_stream(n), timeout=300) for _ in range(count)]
    wait_for(lambda: stack.model_live() == before + count * n, what=f"{count * n} more sequences at the model")
    return calls


class Admitting:
    """Tokenizer, a model replica (capacity 6, room for long streams) and a gateway in front of them."""

    def __init__(self) -> None:
        self.tokenizer = start_tokenizer()
        self.model = start_model("--max-seq-len", str(LONG + 48), "--kv-cache-tokens", str(CAPACITY * (LONG + 64)))
        self.tokenizer.wait_healthy()
        self.model.wait_healthy(timeout=300)
        self.gateway = start_gateway(self.tokenizer.address, self.model.address).wait_healthy(timeout=60)
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def wait_model_idle(self) -> None:
        wait_for(lambda: metric(self.model.metrics_text(), "llama_model_running_sequences") == 0
                 and metric(self.model.metrics_text(), "llama_model_queued_requests") == 0, what="model idle")

    def model_live(self) -> int:
        text = self.model.metrics_text()
        return int(metric(text, "llama_model_running_sequences") + metric(text, "llama_model_queued_requests"))

    def model_metric(self, name: str, **labels: str) -> float:
        return metric(self.model.metrics_text(), name, **labels)

    def close(self) -> None:
        self.channel.close()
        self.gateway.stop()
        self.model.stop()
        self.tokenizer.stop()


@pytest.fixture(scope="module")
def admitting():
    admitting = Admitting()
    yield admitting
    admitting.close()


def model_refusals(stack: Admitting) -> float:
    return stack.model_metric("llama_model_requests_total", method="Generate", code="RESOURCE_EXHAUSTED")


def templates(stack: Admitting) -> float:
    return metric(stack.tokenizer.metrics_text(), "llama_tokenizer_requests_total", method="ApplyChatTemplate",
                  code="OK")


def gateway_refusals(gateway) -> float:  # noqa: ANN001
    return metric(gateway.metrics_text(), "llama_gateway_admission_refused_total")


def wait_for(predicate, timeout: float = 30.0, what: str = "") -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_the_request_that_fills_capacity_is_admitted_and_the_next_refused_before_tokenising(admitting: Admitting):
    stack = admitting
    stack.wait_model_idle()
    calls = hold(stack, CAPACITY - 1)
    try:
        # The last place: admitted, and it runs (the model service would take it too).
        calls += hold(stack, 1)
        model_before, gateway_before = model_refusals(stack), gateway_refusals(stack.gateway)
        templates_before = templates(stack)
        with pytest.raises(grpc.RpcError) as refused:
            stack.stub.Generate(SHORT, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "every model replica is full" in refused.value.details(), refused.value.details()
        assert "6 of 6 sequences" in refused.value.details(), refused.value.details()
        # Refused by the gateway itself, before the chat template: never sent to either upstream.
        assert gateway_refusals(stack.gateway) == gateway_before + 1
        assert model_refusals(stack) == model_before
        assert templates(stack) == templates_before
    finally:
        for call in calls:
            call.cancel()
    # Their places are free again once the model service has dropped them (within an engine step).
    wait_for(lambda: _answers(stack.stub), what="a request admitted again")


def test_n_completions_take_n_places(admitting: Admitting):
    stack = admitting
    stack.wait_model_idle()
    calls = hold(stack, 2, n=2)  # 4 of 6 places
    try:
        model_before, gateway_before = model_refusals(stack), gateway_refusals(stack.gateway)
        with pytest.raises(grpc.RpcError) as refused:  # 3 more do not fit...
            stack.stub.Generate(gateway_pb2.GenerateRequest(messages=PARIS, n=3, stopping=SHORT.stopping), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (gateway_refusals(stack.gateway), model_refusals(stack)) == (gateway_before + 1, model_before)
        calls += hold(stack, 1, n=2)  # ...2 do, exactly, as the model service would take them
    finally:
        for call in calls:
            call.cancel()


def test_a_second_gateway_learns_from_the_model_service_that_it_is_full(admitting: Admitting):
    """Gateway A fills the replica; gateway B has no calls of its own there. B's first request is
    refused by the model service (the final word); from then on, and from B's next load report, B
    refuses at once by itself. When A's calls end, B admits again."""
    stack = admitting
    stack.wait_model_idle()
    with start_gateway(stack.tokenizer.address, stack.model.address) as other, \
            grpc.insecure_channel(other.wait_healthy(timeout=60).address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        calls = hold(stack, CAPACITY)
        try:
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as refused:
                    stub.Generate(SHORT, timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert gateway_refusals(other) >= 2, other.metrics_text()
        finally:
            for call in calls:
                call.cancel()
        wait_for(lambda: _answers(stub), what="the second gateway to admit again")


def _answers(stub: gateway_pb2_grpc.GatewayServiceStub) -> bool:
    try:
        return stub.Generate(SHORT, timeout=60).text == "The capital of"
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
        return False
