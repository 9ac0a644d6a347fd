"""The gateway's caps: message size (4 MiB by default), messages, prompt characters, stop token ids,
echoed top logprobs, and how many Decode calls one request keeps in flight."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from gateway.interfaces import Deadline
from gateway.request import (
    ChatMessage,
    CompletionRequest,
    Limits,
    Output,
    Stopping,
    validate,
    validate_prompt_length,
)
from gateway.upstream import TokenizerClient
from llama_grpc_runtime.errors import InvalidArgument
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.gateway.conftest import GREEDY, Stack, start_gateway

LIMITS = Limits(max_messages=2, max_prompt_chars=20, max_stop_token_ids=3, max_echo_top_logprobs=100)


@pytest.mark.parametrize(("request_", "field", "fragment"), [
    (CompletionRequest(messages=(ChatMessage("user", "a"),) * 3), "messages", "3 messages, at most 2"),
    (CompletionRequest(prompt="x" * 21), "prompt", "21 characters, at most 20"),
    # roles count: 9 + 12 = 21
    (CompletionRequest(messages=(ChatMessage("assistant", "x" * 12),)), "messages", "21 characters, at most 20"),
    (CompletionRequest(prompt="hi", stopping=Stopping(stop_token_ids=(1, 2, 3, 4))), "stopping.stop_token_ids",
     "4 ids, at most 3"),
], ids=["messages", "prompt-chars", "roles-count", "stop-token-ids"])
def test_caps_name_the_field_and_the_limit(request_: CompletionRequest, field: str, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(request_, LIMITS)
    assert caught.value.field == field and fragment in str(caught.value)


def test_at_the_caps_is_accepted() -> None:
    validate(CompletionRequest(messages=(ChatMessage("user", "x" * 16),) * 1), LIMITS)  # 4 + 16 = 20
    validate(CompletionRequest(prompt="x" * 20, stopping=Stopping(stop_token_ids=(1, 2, 3))), LIMITS)


def test_echoed_top_logprobs_are_bounded_by_prompt_tokens_times_candidates() -> None:
    echo = CompletionRequest(prompt="hi", output=Output(top_logprobs=5, echo=True))
    validate_prompt_length(20, echo, LIMITS)  # 100 candidates
    with pytest.raises(InvalidArgument) as caught:
        validate_prompt_length(21, echo, LIMITS)
    assert caught.value.field == "output.top_logprobs" and "105 candidates, at most 100" in str(caught.value)
    validate_prompt_length(1000, CompletionRequest(prompt="hi", output=Output(top_logprobs=5)), LIMITS)  # no echo


def test_top_logprob_texts_keep_at_most_the_fanout_in_flight() -> None:
    async def run() -> tuple[int, dict[int, str]]:
        client = TokenizerClient("127.0.0.1:1", max_decode_fanout=3)
        in_flight = peak = 0

        async def decode(token_ids: list[int], deadline: Deadline, **_: bool) -> str:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return f"<{token_ids[0]}>"

        client.decode = decode
        texts = await client.token_texts(list(range(40)), Deadline(10))
        await client.close()
        return peak, texts

    peak, texts = asyncio.run(run())
    assert peak == 3
    assert texts == {token_id: f"<{token_id}>" for token_id in range(40)}


@pytest.fixture(scope="module")
def capped(stack: Stack):
    gateway = start_gateway(stack.tokenizer.address, stack.model.address, "--max-messages", "2",
                            "--max-prompt-chars", "100").wait_healthy()
    with grpc.insecure_channel(gateway.address) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)
    gateway.stop()


def test_flags_set_the_caps_of_a_real_gateway(capped: gateway_pb2_grpc.GatewayServiceStub) -> None:
    messages = [common_pb2.Message(role="user", content="hi")] * 3
    with pytest.raises(grpc.RpcError) as caught:
        capped.Generate(gateway_pb2.GenerateRequest(messages=messages, sampling=GREEDY), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages: 3 messages, at most 2 allowed (--max-messages)" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        capped.Generate(gateway_pb2.GenerateRequest(prompt="x" * 101), timeout=30)
    assert "prompt: 101 characters, at most 100 allowed" in caught.value.details()
    reply = capped.Generate(gateway_pb2.GenerateRequest(
        messages=messages[:2], sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=2)), timeout=60)
    assert reply.usage.generated_tokens == 2


def test_messages_over_4_mib_are_refused_by_default(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stack.stub.Generate(gateway_pb2.GenerateRequest(prompt="x" * (4 * 1024 * 1024 + 1)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
