"""Generation options through the model service, on the real embedded SmolLM2-135M-Instruct.

Truths: ``jsonschema`` / ``re`` on the decoded output of constrained requests; the same request
alone (n = 1, or another prompt) for n, truncation and batch independence; the model's own stop
behaviour for min_new_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import grpc
import jsonschema
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from tokenizer_service.loader import load_tokenizer

pytestmark = pytest.mark.slow

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["engineer", "doctor", "teacher", "other"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "country": {"type": "string", "maxLength": 30}},
                    "required": ["city", "country"], "additionalProperties": False},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "skills"],
    "additionalProperties": False,
}
PERSON_TEXT = ("Marie Curie, 66, was a physicist and chemist in Paris, France. She was skilled in radioactivity "
               "research and teaching. Extract her as JSON with name, age, role, address and skills.")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def service():
    # Float weights (--quantize none): the GGUF's native int4 path computes a token's logits differently
    # when a step holds few tokens (measured 0.19 apart), so seeded outputs would depend on what else
    # runs in the batch; these tests compare runs of the same request.
    with ServiceProcess("model_service", "--max-seq-len", "512", "--max-batch-size", "8",
                        "--quantize", "none") as proc:
        proc.wait_healthy(timeout=300)
        yield proc


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([("user", text)]).token_ids


async def _generate(address: str, requests: list[model_pb2.GenerateRequest]) -> list[list[model_pb2.GenerateResponse]]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = model_pb2_grpc.ModelServiceStub(channel)

        async def one(req):
            return [r async for r in stub.Generate(req, timeout=300)]

        return await asyncio.gather(*(one(r) for r in requests))


def generate(service, *requests: model_pb2.GenerateRequest) -> list[list[model_pb2.GenerateResponse]]:
    return asyncio.run(_generate(service.address, list(requests)))


def by_index(responses: list[model_pb2.GenerateResponse]) -> dict[int, tuple[list[int], int]]:
    """index -> (token ids, finish reason)."""
    out: dict[int, tuple[list[int], int]] = {}
    for r in responses:
        tokens, reason = out.get(r.index, ([], 0))
        out[r.index] = (tokens + list(r.token_ids), r.finish_reason or reason)
    return out


def req(prompt: list[int], *, temperature: float = 0.0, seed: int | None = None, max_new_tokens: int = 64,
        constraint: common_pb2.Constraint | None = None, n: int = 0, **stopping) -> model_pb2.GenerateRequest:
    sampling = common_pb2.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return model_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling, n=n, constraint=constraint,
                                     stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, **stopping))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates_with_n_completions(service, tokenizer, temperature):
    constraint = common_pb2.Constraint(json_schema=json.dumps(PERSON_SCHEMA))
    [responses] = generate(service, req(chat(tokenizer, PERSON_TEXT), temperature=temperature, seed=5,
                                        max_new_tokens=200, constraint=constraint, n=3))
    completions = by_index(responses)
    assert sorted(completions) == [0, 1, 2]
    for tokens, reason in completions.values():
        assert reason == common_pb2.FINISH_REASON_STOP_TOKEN
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), PERSON_SCHEMA)
    usage = [r.usage.generated_tokens for r in responses if r.finish_reason]
    assert sum(usage) == sum(len(t) for t, _ in completions.values())


def test_length_cuts_a_constrained_answer_before_the_grammar_completes(service, tokenizer):
    constraint = common_pb2.Constraint(json_schema=json.dumps(PERSON_SCHEMA))
    [responses] = generate(service, req(chat(tokenizer, PERSON_TEXT), max_new_tokens=5, constraint=constraint))
    tokens, reason = by_index(responses)[0]
    assert reason == common_pb2.FINISH_REASON_LENGTH and len(tokens) == 5
    assert tokenizer.decode(tokens).startswith('{"')


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_regex_and_choice(service, tokenizer, temperature):
    date = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    choices = ["positive", "negative", "neutral"]
    regex_req = req(chat(tokenizer, "When did the first man land on the moon? Answer with a date."),
                    temperature=temperature, seed=1, constraint=common_pb2.Constraint(regex=date), n=2)
    choice_req = req(chat(tokenizer, "Is 'I love this film' positive, negative or neutral?"), temperature=temperature,
                     seed=2, constraint=common_pb2.Constraint(choice=common_pb2.Constraint.Choice(choices=choices)))
    regex_responses, choice_responses = generate(service, regex_req, choice_req)
    for tokens, reason in by_index(regex_responses).values():
        assert reason == common_pb2.FINISH_REASON_STOP_TOKEN and re.fullmatch(date, tokenizer.decode(tokens))
    tokens, reason = by_index(choice_responses)[0]
    assert reason == common_pb2.FINISH_REASON_STOP_TOKEN and tokenizer.decode(tokens) in choices


def test_bad_constraint_is_invalid_argument_with_the_engines_reason(service, tokenizer):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        generate(service, req(chat(tokenizer, "hi"), constraint=common_pb2.Constraint(regex="[0-9")))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("constraint.regex:") and "regex" in error.value.details()[17:]


def test_n_is_reproducible_with_a_seed_and_completion_0_is_the_single_request(service, tokenizer):
    prompt = chat(tokenizer, "Write a short poem about the sea.")
    first, second, single = generate(service, req(prompt, temperature=1.0, seed=11, n=4, max_new_tokens=24),
                                     req(prompt, temperature=1.0, seed=11, n=4, max_new_tokens=24),
                                     req(prompt, temperature=1.0, seed=11, max_new_tokens=24))
    assert by_index(first) == by_index(second)
    assert by_index(first)[0] == by_index(single)[0]
    assert len({tuple(tokens) for tokens, _ in by_index(first).values()}) > 1


def test_mixed_options_in_a_batch_equal_each_request_alone(service, tokenizer):
    prompts = [chat(tokenizer, q) for q in ("Name three colours.", "Count from one to ten.", "What is 2 + 2?",
                                            "Describe a cat.")]
    requests = [
        model_pb2.GenerateRequest(prompt_token_ids=prompts[0], sampling=common_pb2.SamplingParams(
            temperature=0.9, min_p=0.1, seed=1), stopping=common_pb2.StoppingCriteria(max_new_tokens=24)),
        model_pb2.GenerateRequest(prompt_token_ids=prompts[1], sampling=common_pb2.SamplingParams(
            temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5),
            stopping=common_pb2.StoppingCriteria(max_new_tokens=24)),
        model_pb2.GenerateRequest(prompt_token_ids=prompts[2], sampling=common_pb2.SamplingParams(
            temperature=1.0, seed=3, logit_bias={17: -100.0, 28: 5.0}),
            stopping=common_pb2.StoppingCriteria(max_new_tokens=24, min_new_tokens=20)),
        req(prompts[3], temperature=1.0, seed=4, max_new_tokens=24,
            constraint=common_pb2.Constraint(regex="[A-Za-z ,.]{10,60}")),
    ]
    together = generate(service, *requests)
    alone = [generate(service, r)[0] for r in requests]
    assert [by_index(r) for r in together] == [by_index(r) for r in alone]


def test_min_new_tokens_time_limit_and_truncation(service, tokenizer):
    prompt = chat(tokenizer, "What is the capital of France?")
    [plain] = generate(service, req(prompt, max_new_tokens=64))
    plain_tokens, plain_reason = by_index(plain)[0]
    assert plain_reason == common_pb2.FINISH_REASON_STOP_TOKEN and len(plain_tokens) < 30
    [longer] = generate(service, req(prompt, max_new_tokens=64, min_new_tokens=40))
    tokens, _ = by_index(longer)[0]
    assert len(tokens) >= 40 and tokens[:len(plain_tokens)] == plain_tokens  # greedy until the stop was due
    assert not set(tokens[:40]) & set(tokenizer.stop_token_ids)

    [timed] = generate(service, req(chat(tokenizer, "Write a very long story."), max_new_tokens=400,
                                    time_limit_ms=300))
    tokens, reason = by_index(timed)[0]
    assert reason == common_pb2.FINISH_REASON_TIME_LIMIT and len(tokens) < 400
    assert timed[-1].usage.generated_tokens == len(tokens)

    keep = 12
    [truncated, tail_only] = generate(service, req(prompt, truncate_prompt_tokens=keep),
                                      req(prompt[-keep:]))
    assert truncated[-1].usage.prompt_tokens == keep
    assert by_index(truncated) == by_index(tail_only)


def test_model_info_advertises_capabilities(service):
    async def info():
        async with grpc.aio.insecure_channel(service.address) as channel:
            return await model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())

    capabilities = asyncio.run(info()).capabilities
    assert set(capabilities.constraint_kinds) == {"json_schema", "regex", "grammar", "choice"}
    assert {"min_p", "logit_bias", "presence_penalty"} <= set(capabilities.sampling_options)
    assert capabilities.max_n == 16 and capabilities.max_top_logprobs == 20
    assert capabilities.grammar_engine.startswith("llguidance")


def test_cancelling_an_n_call_ends_every_completion(service, tokenizer):
    """The caller goes away after the first message: all n sequences leave the batch (the service's
    own log says each was cancelled)."""
    request_id = "options-cancel-n"

    async def first_then_cancel():
        async with grpc.aio.insecure_channel(service.address) as channel:
            call = model_pb2_grpc.ModelServiceStub(channel).Generate(
                req(chat(tokenizer, "Write a very long story."), temperature=1.0, seed=1, max_new_tokens=400, n=4),
                metadata=(("x-request-id", request_id),))
            await call.read()
            call.cancel()

    asyncio.run(first_then_cancel())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        finished = [e for e in service.log_events()
                    if e.get("request_id") == request_id and e.get("event") == "generation finished"]
        if len(finished) == 4:
            break
        time.sleep(0.1)
    assert [e["finish_reason"] for e in finished] == ["cancelled"] * 4
    assert all(e["generated_tokens"] < 400 for e in finished)


def test_the_grammar_engine_is_built_by_the_first_constrained_request(tokenizer):
    """Its vocabulary (~60 MB) is not built at start, nor by plain requests or GetModelInfo (which still
    advertises structured output); the first constrained request builds it, once (the service's own
    log: one "grammar engine ready"), and its output follows the constraint."""
    def built(proc) -> int:
        return sum(event.get("event") == "grammar engine ready" for event in proc.log_events())

    async def info(address):
        async with grpc.aio.insecure_channel(address) as channel:
            return await model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())

    with ServiceProcess("model_service", "--max-seq-len", "256", "--max-batch-size", "4",
                        "--kv-cache-tokens", "1024") as proc:
        proc.wait_healthy(timeout=300)
        [plain] = generate(proc, req(chat(tokenizer, "Say hello."), max_new_tokens=4))
        assert sum(len(r.token_ids) for r in plain) == 4
        assert set(asyncio.run(info(proc.address)).capabilities.constraint_kinds) == set(
            ["json_schema", "regex", "grammar", "choice"])
        assert built(proc) == 0
        digits = r"[0-9]{2,4}"
        for question in ("How many legs does a spider have?", "In which year did the Berlin Wall fall?"):
            [responses] = generate(proc, req(chat(tokenizer, question), constraint=common_pb2.Constraint(regex=digits)))
            tokens, reason = by_index(responses)[0]
            assert reason == common_pb2.FINISH_REASON_STOP_TOKEN and re.fullmatch(digits, tokenizer.decode(tokens))
        assert built(proc) == 1
