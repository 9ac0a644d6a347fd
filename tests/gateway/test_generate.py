"""Completions through the real gateway, tokenizer and model processes (embedded SmolLM2).

Truths: the tokenizer service's own Decode/ApplyChatTemplate for text and ids, unary == joined
stream, the model's greedy answer to the Paris question, and the model service's metrics.
"""

from __future__ import annotations

import time
import uuid

import grpc
import pytest

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2

from .conftest import GREEDY, PARIS, Stack, joined, start_gateway, uncached

PARIS_ANSWER = "The capital of France is Paris."
STOP_SEQUENCE = common_pb2.FINISH_REASON_STOP_SEQUENCE


def paris(**stopping) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(messages=PARIS, sampling=GREEDY,
                                       stopping=common_pb2.StoppingCriteria(max_new_tokens=24, **stopping))


@pytest.fixture(scope="module")
def paris_answer(stack: Stack) -> gateway_pb2.GenerateResponse:
    return stack.stub.Generate(paris(), timeout=120)


def test_paris_greedy_chat(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    assert paris_answer.text == PARIS_ANSWER
    assert paris_answer.finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN
    chat_ids = stack.tokenizer_stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(messages=PARIS)).token_ids
    assert paris_answer.usage.prompt_tokens == len(chat_ids)
    assert paris_answer.usage.generated_tokens == len(paris_answer.token_ids)
    assert stack.decode(list(paris_answer.token_ids)) == PARIS_ANSWER


def test_stream_equals_unary_greedy(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    responses = stack.stream(paris())
    assert len([r for r in responses if r.text]) > 1  # it streams, it does not arrive in one piece
    assert uncached(joined(responses)) == uncached(paris_answer)
    # The same chat again: its prompt comes from the model service's prefix cache, all but the last token's block.
    assert joined(responses).usage.cached_prompt_tokens == (paris_answer.usage.prompt_tokens - 1) // 16 * 16 > 0
    assert all(r.finish_reason == 0 for r in responses[:-1]) and responses[-1].finish_reason != 0


def test_seeded_text_completion_repeats_and_stream_equals_unary(stack: Stack):
    def request(seed: int) -> gateway_pb2.GenerateRequest:
        return gateway_pb2.GenerateRequest(
            prompt="I believe the meaning of life is",
            sampling=common_pb2.SamplingParams(temperature=1.0, top_p=0.95, seed=seed),
            stopping=common_pb2.StoppingCriteria(max_new_tokens=20))

    first = stack.stub.Generate(request(1234), timeout=120)
    assert first.finish_reason == common_pb2.FINISH_REASON_LENGTH and first.usage.generated_tokens == 20
    assert stack.stub.Generate(request(1234), timeout=120) == first
    assert joined(stack.stream(request(1234))) == first
    others = {stack.stub.Generate(request(seed), timeout=120).text for seed in (1, 2)}
    assert others != {first.text}  # the seed matters
    prompt_ids = stack.stub.Tokenize(gateway_pb2.TokenizeRequest(text="I believe the meaning of life is")).token_ids
    assert first.usage.prompt_tokens == len(prompt_ids)
    # SmolLM2's GGUF says add_bos_token false, so a text prompt is the text's ids alone (as HF encodes it).
    assert list(prompt_ids) == stack.tokenizer_stub.Encode(
        tokenizer_pb2.EncodeRequest(text="I believe the meaning of life is")).token_ids


def test_deltas_are_whole_utf8_with_spaces(stack: Stack):
    # Emojis and accented text are multi-byte characters split over byte-level BPE tokens.
    request = gateway_pb2.GenerateRequest(
        messages=[common_pb2.Message(role="system", content="Always answer with emojis"),
                  common_pb2.Message(role="user", content="How to go from Beijing to NY? Réponds en français.")],
        sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=40))
    responses = stack.stream(request)
    result = joined(responses)
    assert result.text == stack.decode(list(result.token_ids))
    assert any(ord(ch) > 127 for ch in result.text), result.text
    # Token-by-token decoding would break characters apart; the gateway's deltas never do.
    pieces = "".join(stack.decode([token_id]) for token_id in result.token_ids)
    if pieces != result.text:
        assert "\ufffd" in pieces and "\ufffd" not in result.text
    unary = stack.stub.Generate(request, timeout=120)
    # The second call finds more of the same prompt in the prefix cache; everything else is equal.
    result.usage.cached_prompt_tokens = unary.usage.cached_prompt_tokens
    assert result == unary


def test_decoding_in_the_gateway_streams_what_the_tokenizers_decode_stream_does(stack: Stack):
    """The default gateway decodes generated ids itself (the vocabulary's bytes, fetched once); a gateway
    with ``--detokenize tokenizer`` sends them through the tokenizer's DecodeStream. Same upstreams, same
    greedy requests (split characters, a stop sequence inside a token, top-logprob texts, echo): the same
    stream, response by response."""
    remote = start_gateway(stack.tokenizer.address, stack.model.address, "--detokenize", "tokenizer").wait_healthy()
    requests = [
        gateway_pb2.GenerateRequest(
            messages=[common_pb2.Message(role="system", content="Always answer with emojis"),
                      common_pb2.Message(role="user", content="How to go from Beijing to NY? Réponds en français.")],
            sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=40)),
        paris(stop_sequences=["apit", "Berlin"]),
        gateway_pb2.GenerateRequest(prompt="Caf\u00e9, na\u00efve, \u6f22\u5b57:", sampling=GREEDY,
                                    stopping=common_pb2.StoppingCriteria(max_new_tokens=12),
                                    output=common_pb2.OutputOptions(echo=True, logprobs=True, top_logprobs=3)),
    ]
    try:
        with grpc.insecure_channel(remote.address) as channel:
            remote_stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            for request in requests:
                stream_request = gateway_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
                request_id = f"remote-decode-{uuid.uuid4().hex[:12]}"
                theirs = list(remote_stub.GenerateStream(stream_request, timeout=120,
                                                         metadata=(("x-request-id", request_id),)))
                ours = stack.stream(request)
                assert [uncached(r) for r in ours] == [uncached(r) for r in theirs]
                result = joined(ours)
                if not result.stop_sequence:
                    assert result.text == stack.decode(list(result.token_ids))
                deadline = time.monotonic() + 10
                while not any(e.get("request_id") == request_id and e.get("method") == "DecodeStream"
                              for e in stack.tokenizer.log_events()):
                    assert time.monotonic() < deadline, "the remote gateway never opened a DecodeStream"
                    time.sleep(0.1)
        assert any(ord(ch) > 127 for ch in joined(stack.stream(requests[0])).text)
    finally:
        remote.stop()


# ---- stop sequences (the greedy answer is "The| capital| of| France| is| Paris|.") --------------

def test_stop_sequence_split_across_deltas(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    responses = stack.stream(paris(stop_sequences=["is Par"]))
    result = joined(responses)
    assert result.text == "The capital of France "
    assert (result.finish_reason, result.stop_sequence) == (STOP_SEQUENCE, "is Par")
    assert list(result.token_ids) == list(paris_answer.token_ids[:4])  # " is" reaches into the stop
    assert result.usage.generated_tokens == 6  # up to " Paris", which completed it
    assert not any("is" in r.text for r in responses)  # held back, then dropped
    assert uncached(stack.stub.Generate(paris(stop_sequences=["is Par"]), timeout=120)) == uncached(result)


def test_stop_sequence_inside_a_token(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    result = stack.stub.Generate(paris(stop_sequences=["apit"]), timeout=120)
    assert result.text == "The c"
    assert list(result.token_ids) == list(paris_answer.token_ids[:1])


def test_stop_sequence_at_the_very_start(stack: Stack):
    result = stack.stub.Generate(paris(stop_sequences=["The"]), timeout=120)
    assert (result.text, list(result.token_ids)) == ("", [])
    assert (result.finish_reason, result.stop_sequence, result.usage.generated_tokens) == (STOP_SEQUENCE, "The", 1)


def test_stop_sequence_never_matched(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    result = stack.stub.Generate(paris(stop_sequences=["Berlin", "Paris!", "\n\n"]), timeout=120)
    assert uncached(result) == uncached(paris_answer)


def test_several_stop_sequences_first_to_complete_wins(stack: Stack):
    result = stack.stub.Generate(paris(stop_sequences=["Paris", "France", " capital"]), timeout=120)
    assert (result.text, result.stop_sequence) == ("The", " capital")


def test_stop_sequence_cancels_the_model_stream(stack: Stack):
    request = gateway_pb2.GenerateRequest(
        prompt="1, 2, 3, 4, 5, 6,", sampling=GREEDY,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=300, stop_sequences=[" 9,"]))
    request_id = f"stop-cancel-{uuid.uuid4().hex[:12]}"
    result = stack.stub.Generate(request, timeout=120, metadata=(("x-request-id", request_id),))
    assert result.finish_reason == STOP_SEQUENCE and result.text == " 7, 8,"
    stack.wait_model_idle()
    # The model service's own account of this request: cancelled, soon after the stop sequence
    # (not run on to max_new_tokens).
    finished = stack.model_finished(request_id)
    assert finished and finished[0]["finish_reason"] == "cancelled", finished
    assert finished[0]["generated_tokens"] < result.usage.generated_tokens + 20


# ---- logprobs, echo, token ids -----------------------------------------------------------------

def test_logprobs_and_top_logprobs(stack: Stack, paris_answer: gateway_pb2.GenerateResponse):
    request = paris()
    request.output.logprobs = True
    request.output.top_logprobs = 3
    result = joined(stack.stream(request))
    assert result.text == PARIS_ANSWER and list(result.token_ids) == list(paris_answer.token_ids)
    assert len(result.logprobs) == len(result.top_logprobs) == len(result.token_ids)
    for token_id, logprob, top in zip(result.token_ids, result.logprobs, result.top_logprobs, strict=True):
        assert logprob <= 0
        assert len(top.candidates) == 3
        values = [c.logprob for c in top.candidates]
        assert values == sorted(values, reverse=True)
        assert top.candidates[0].token_id == token_id  # greedy picks the most likely token
        assert top.candidates[0].logprob == pytest.approx(logprob, abs=1e-4)
        for candidate in top.candidates:
            assert candidate.text == stack.decode([candidate.token_id], skip_special_tokens=False)


def test_echo_returns_the_prompt_with_its_logprobs(stack: Stack):
    request = gateway_pb2.GenerateRequest(
        prompt="The capital of France is", sampling=GREEDY,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=3),
        output=common_pb2.OutputOptions(echo=True, logprobs=True, top_logprobs=2))
    responses = stack.stream(request)
    first = responses[0]
    prompt_ids = list(stack.stub.Tokenize(gateway_pb2.TokenizeRequest(text="The capital of France is")).token_ids)
    assert list(first.prompt_token_ids) == prompt_ids
    assert first.prompt_text == stack.decode(prompt_ids, skip_special_tokens=False)
    assert first.prompt_text.endswith("The capital of France is")
    assert len(first.prompt_logprobs) == len(first.prompt_top_logprobs) == len(prompt_ids)
    assert first.prompt_logprobs[0] == 0 and all(lp < 0 for lp in first.prompt_logprobs[1:])
    assert all(not r.prompt_token_ids and not r.prompt_text for r in responses[1:])
    unary = stack.stub.Generate(gateway_pb2.GenerateRequest.FromString(request.SerializeToString()), timeout=120)
    assert uncached(joined(responses)) == uncached(unary)


def test_tokenize_and_info(stack: Stack):
    chat_ids = stack.tokenizer_stub.ApplyChatTemplate(tokenizer_pb2.ApplyChatTemplateRequest(messages=PARIS)).token_ids
    assert stack.stub.Tokenize(gateway_pb2.TokenizeRequest(messages=PARIS)).token_ids == chat_ids
    encoded = stack.tokenizer_stub.Encode(tokenizer_pb2.EncodeRequest(text="Hello world")).token_ids
    assert stack.stub.Tokenize(gateway_pb2.TokenizeRequest(text="Hello world")).token_ids == encoded
    info = stack.stub.GetInfo(gateway_pb2.GetInfoRequest())
    assert not info.tokenizer.add_bos_token and info.tokenizer.bos_token_id not in encoded
    assert info.model.vocab_size == info.tokenizer.vocab_size == 49152
    assert list(info.model.stop_token_ids) == list(info.tokenizer.stop_token_ids) == [2]
    assert info.model.max_seq_len == 512 and info.model.max_batch_size == 4


def test_request_id_reaches_all_three_services(stack: Stack):
    request_id = f"gateway-test-{uuid.uuid4().hex[:12]}"
    call = stack.stub.GenerateStream(gateway_pb2.GenerateStreamRequest(
        messages=PARIS, sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=4)),
        metadata=(("x-request-id", request_id),), timeout=120)
    assert dict(call.initial_metadata())["x-request-id"] == request_id
    assert list(call)
    deadline = time.monotonic() + 10
    while True:
        seen = {name: [e for e in process.log_events() if e.get("request_id") == request_id]
                for name, process in (("tokenizer", stack.tokenizer), ("model", stack.model),
                                      ("gateway", stack.gateway))}
        if all(seen.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert all(seen.values()), {name: len(events) for name, events in seen.items()}
    # The gateway's own lines about the request: the completion summary among them.
    assert any(e["event"] == "completion finished" for e in seen["gateway"])
    # The tokenizer method the completion used logged it; generated tokens were decoded in the gateway
    # (--detokenize local, the default), so no DecodeStream was opened for them.
    methods = {e.get("method") for e in seen["tokenizer"]}
    assert "ApplyChatTemplate" in methods and "DecodeStream" not in methods, methods
