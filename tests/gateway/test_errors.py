"""Every gateway error in API.md's status table, through the real processes.

Malformed requests get INVALID_ARGUMENT naming the field; a too-long prompt gets both numbers; a
full model queue RESOURCE_EXHAUSTED; a passed deadline DEADLINE_EXCEEDED with the model's slot freed;
a caller cancel frees the slot too. No message ever carries a traceback.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import grpc
import pytest

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2

from .conftest import GREEDY, PARIS, Stack

USER = common_pb2.Message(role="user", content="Hi")


def request(**fields) -> gateway_pb2.GenerateRequest:
    fields.setdefault("messages", [USER])
    return gateway_pb2.GenerateRequest(**fields)


def sampling(**fields) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)


def stopping(**fields) -> common_pb2.StoppingCriteria:
    return common_pb2.StoppingCriteria(**fields)


INVALID = {
    "empty input": (gateway_pb2.GenerateRequest(), "prompt"),
    "empty prompt and messages": (gateway_pb2.GenerateRequest(prompt=""), "empty input"),
    "prompt and messages": (request(prompt="Hi"), "exactly one of prompt and messages"),
    "unknown role": (request(messages=[USER, common_pb2.Message(role="wizard", content="x")]), "messages[1].role"),
    "temperature < 0": (request(sampling=sampling(temperature=-0.1)), "sampling.temperature"),
    "temperature NaN": (request(sampling=sampling(temperature=math.nan)), "sampling.temperature"),
    "temperature inf": (request(sampling=sampling(temperature=math.inf)), "sampling.temperature"),
    "top_p 0": (request(sampling=sampling(top_p=0)), "sampling.top_p"),
    "top_p > 1": (request(sampling=sampling(top_p=1.5)), "sampling.top_p"),
    "top_p NaN": (request(sampling=sampling(top_p=math.nan)), "sampling.top_p"),
    "top_k < 0": (request(sampling=sampling(top_k=-1)), "sampling.top_k"),
    "repetition_penalty 0": (request(sampling=sampling(repetition_penalty=0)), "sampling.repetition_penalty"),
    "max_new_tokens < 0": (request(stopping=stopping(max_new_tokens=-5)), "stopping.max_new_tokens"),
    "top_logprobs < 0": (request(output=common_pb2.OutputOptions(top_logprobs=-1)), "output.top_logprobs"),
    "top_logprobs > 20": (request(output=common_pb2.OutputOptions(top_logprobs=21)), "output.top_logprobs"),
    "too many stop sequences": (request(stopping=stopping(stop_sequences=[str(i) for i in range(17)])),
                                "stopping.stop_sequences: 17 stop sequences, at most 16"),
    "stop sequence too long": (request(stopping=stopping(stop_sequences=["ok", "x" * 257])),
                               "stopping.stop_sequences[1]: 257 characters, at most 256"),
    "empty stop sequence": (request(stopping=stopping(stop_sequences=[""])), "stopping.stop_sequences[0]"),
    "stop token id out of vocab": (request(stopping=stopping(stop_token_ids=[2, 49152])),
                                   "stopping.stop_token_ids[1]: token id 49152 outside the vocabulary [0, 49152)"),
    "negative stop token id": (request(stopping=stopping(stop_token_ids=[-1])), "stopping.stop_token_ids[0]"),
}


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    for fragment in fragments:
        assert fragment in error.details(), error.details()
    assert "Traceback" not in error.details() and 'File "' not in error.details()


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_argument_names_the_field(stack: Stack, case: str):
    bad, fragment = INVALID[case]
    with pytest.raises(grpc.RpcError) as unary:
        stack.stub.Generate(bad, timeout=30)
    assert_status(unary.value, grpc.StatusCode.INVALID_ARGUMENT, fragment)
    with pytest.raises(grpc.RpcError) as streamed:
        stack.stream(bad, timeout=30)
    assert_status(streamed.value, grpc.StatusCode.INVALID_ARGUMENT, fragment)


@pytest.mark.parametrize(("bad", "fragment"), [
    (gateway_pb2.TokenizeRequest(), "text"),
    (gateway_pb2.TokenizeRequest(text="a", messages=[USER]), "exactly one of text and messages"),
    (gateway_pb2.TokenizeRequest(messages=[common_pb2.Message(role="", content="x")]), "messages[0].role"),
])
def test_tokenize_invalid_argument(stack: Stack, bad: gateway_pb2.TokenizeRequest, fragment: str):
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.Tokenize(bad, timeout=30)
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_prompt_longer_than_the_context_gives_both_numbers(stack: Stack):
    prompt = "one two three four " * 150
    prompt_tokens = len(stack.stub.Tokenize(gateway_pb2.TokenizeRequest(text=prompt)).token_ids)
    assert prompt_tokens > 512
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.Generate(gateway_pb2.GenerateRequest(prompt=prompt), timeout=30)
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, "prompt", str(prompt_tokens), "512")


def test_strict_context_limit_gives_both_numbers(stack: Stack):
    bad = gateway_pb2.GenerateRequest(messages=PARIS, stopping=stopping(max_new_tokens=1000, strict_context_limit=True))
    prompt_tokens = len(stack.stub.Tokenize(gateway_pb2.TokenizeRequest(messages=PARIS)).token_ids)
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.Generate(bad, timeout=30)
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, "stopping.max_new_tokens", str(prompt_tokens),
                  "1000", "512")


LONG = gateway_pb2.GenerateStreamRequest(prompt="Once upon a time", sampling=GREEDY,
                                         stopping=stopping(max_new_tokens=400))


def test_deadline_exceeded_frees_the_slot(stack: Stack):
    with pytest.raises(grpc.RpcError) as error:
        list(stack.stub.GenerateStream(LONG, timeout=1.0))
    assert_status(error.value, grpc.StatusCode.DEADLINE_EXCEEDED)
    stack.wait_model_idle()


def test_caller_cancel_cancels_the_model_stream(stack: Stack):
    request_id = f"caller-cancel-{uuid.uuid4().hex[:12]}"
    call = stack.stub.GenerateStream(LONG, timeout=120, metadata=(("x-request-id", request_id),))
    next(call), next(call)
    call.cancel()
    stack.wait_model_idle()
    finished = stack.model_finished(request_id)
    assert finished and finished[0]["finish_reason"] == "cancelled", finished
    assert finished[0]["generated_tokens"] < 400


def test_queue_full_is_resource_exhausted(stack: Stack):
    # 4 slots + 2 waiting: an 8th concurrent request is one too many.
    calls = [stack.stub.GenerateStream(LONG, timeout=120) for _ in range(8)]
    codes: list[grpc.StatusCode] = []
    errors: list[grpc.RpcError] = []

    def first_message(call: grpc.Call) -> None:
        try:
            next(call)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as error:
            codes.append(error.code())
            errors.append(error)

    threads = [threading.Thread(target=first_message, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60  # queued calls get no message until a slot frees: do not wait for them
    while grpc.StatusCode.RESOURCE_EXHAUSTED not in codes and time.monotonic() < deadline:
        time.sleep(0.05)
    for call in calls:
        call.cancel()
    for thread in threads:
        thread.join(30)
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes, codes
    exhausted = [e for e in errors if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert_status(exhausted[0], grpc.StatusCode.RESOURCE_EXHAUSTED)
    stack.wait_model_idle(timeout=30)
