"""Generation options in the gateway's pipeline, in-process (fakes of test_pipeline.py), and over the real
stack on SmolLM2: n completions, min_new_tokens against stop sequences, prompt truncation, structured
output, validation, and GetInfo's capabilities.

Truths: the tokenizer's own decode of each completion's ids, ``str.find`` on the generated text,
``jsonschema`` / ``re`` on constrained output, and the model service's limits from model_service.options.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import jsonschema
import pytest

from gateway.interfaces import Deadline, ModelChunk
from gateway.request import CompletionRequest, Sampling, Stopping
from llama_grpc_runtime.errors import InvalidArgument
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2
from model_service.options import MAX_N, MAX_TOP_LOGPROBS, Constraint
from tests.gateway.test_pipeline import Held, ReplayStream, pipeline_for, run
from tokenizer_service.loader import load_tokenizer
from tokenizer_service.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return load_tokenizer()


@dataclass
class InterleavedModel:
    """n completions (one id list each) sent round-robin one token at a time, each with its index."""

    completions: list[list[int]]
    name: str = "model service"
    address: str = "in-process"
    requests: list[tuple[list[int], CompletionRequest]] = field(default_factory=list)
    streams: list[ReplayStream] = field(default_factory=list)

    async def admit(self, n: int) -> Held:
        return Held(n)

    def generate(self, request_id: str, prompt_token_ids: list[int], request: CompletionRequest,
                 extra_stop_token_ids: Sequence[int], deadline: Deadline, admission: Held) -> ReplayStream:
        self.requests.append((prompt_token_ids, request))
        chunks = []
        for step in range(max(map(len, self.completions))):
            for index, ids in enumerate(self.completions):
                if step < len(ids):
                    last = step == len(ids) - 1
                    chunks.append(ModelChunk([ids[step]], [], [], index=index,
                                             finish_reason="FINISH_REASON_STOP_TOKEN" if last else "",
                                             generated_tokens=len(ids) if last else 0))
        self.streams.append(ReplayStream(chunks))
        return self.streams[-1]


def by_index(chunks) -> dict[int, tuple[str, list[int], str]]:
    out: dict[int, tuple[str, list[int], str]] = {}
    for chunk in chunks:
        text, ids, reason = out.get(chunk.index, ("", [], ""))
        out[chunk.index] = (text + chunk.text, ids + chunk.token_ids, chunk.finish.reason if chunk.finish else reason)
    return out


def test_n_completions_interleave_each_decoded_on_its_own(smollm):
    texts = ["Paris is the capital.", "It is Paris, café \U0001F600 included.", "Paris."]
    completions = [smollm.encode(text) for text in texts]
    model = InterleavedModel(completions)
    pipeline, local = pipeline_for(smollm, model)
    chunks = run(pipeline, CompletionRequest(prompt="Capital of France?", n=3))
    got = by_index(chunks)
    assert {i: (t, ids) for i, (t, ids, _) in got.items()} == {i: (texts[i], completions[i]) for i in range(3)}
    assert all(reason == "FINISH_REASON_STOP_TOKEN" for _, _, reason in got.values())
    assert len(local.decoders) == 3  # one incremental decode per completion
    assert [c.index for c in chunks[:3]] == [0, 1, 2]  # interleaved as the model sent them
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and chunks[-1].usage is usage[0]
    assert (usage[0].prompt_tokens, usage[0].generated_tokens) == (len(smollm.encode("Capital of France?")),
                                                                   sum(map(len, completions)))
    assert model.requests[0][1].n == 3


def test_a_stop_sequence_ends_one_completion_and_the_others_go_on(smollm):
    texts = ["one. two. three.", "alpha beta gamma delta"]
    model = InterleavedModel([smollm.encode(t) for t in texts])
    pipeline, _ = pipeline_for(smollm, model)
    chunks = run(pipeline, CompletionRequest(prompt="x", n=2, stopping=Stopping(stop_sequences=(" two",))))
    got = by_index(chunks)
    assert got[0][0] == texts[0][:texts[0].find(" two")] and got[0][2] == "FINISH_REASON_STOP_SEQUENCE"
    assert got[1][0] == texts[1] and got[1][2] == "FINISH_REASON_STOP_TOKEN"
    assert chunks[-1].usage is not None


@pytest.mark.parametrize("min_new_tokens", [0, 3, 6])
def test_min_new_tokens_ignores_stop_sequences_in_the_first_tokens(smollm, min_new_tokens):
    text = "Stop here. Then more words. Stop here. The end."
    ids = smollm.encode(text)
    model = InterleavedModel([ids])
    pipeline, _ = pipeline_for(smollm, model)
    chunks = run(pipeline, CompletionRequest(prompt="x", stopping=Stopping(stop_sequences=("Stop",),
                                                                           min_new_tokens=min_new_tokens)))
    produced = "".join(c.text for c in chunks)
    # The truth: the first "Stop" that starts after the text of the first min_new_tokens tokens.
    skipped = len(smollm.decode(ids[:min_new_tokens]))
    expected = text[:text.find("Stop", skipped)]
    assert produced == expected and chunks[-1].finish.reason == "FINISH_REASON_STOP_SEQUENCE"
    assert model.requests[0][1].stopping.min_new_tokens == min_new_tokens  # the model masks its stop tokens


def test_truncate_prompt_tokens_sends_the_last_tokens(smollm):
    model = InterleavedModel([smollm.encode("ok")])
    pipeline, _ = pipeline_for(smollm, model)
    prompt = "One two three four five six seven eight nine ten."
    chunks = run(pipeline, CompletionRequest(prompt=prompt, stopping=Stopping(truncate_prompt_tokens=4)))
    assert model.requests[0][0] == smollm.encode(prompt)[-4:]
    assert chunks[-1].usage.prompt_tokens == 4


@pytest.mark.parametrize("request_,field_name", [
    (CompletionRequest(prompt="x", sampling=Sampling(min_p=1.5)), "sampling.min_p"),
    (CompletionRequest(prompt="x", sampling=Sampling(presence_penalty=-3)), "sampling.presence_penalty"),
    (CompletionRequest(prompt="x", sampling=Sampling(frequency_penalty=2.5)), "sampling.frequency_penalty"),
    (CompletionRequest(prompt="x", sampling=Sampling(logit_bias={49152: 1.0})), "sampling.logit_bias[49152]"),
    (CompletionRequest(prompt="x", sampling=Sampling(logit_bias={5: -101.0})), "sampling.logit_bias[5]"),
    (CompletionRequest(prompt="x", sampling=Sampling(repetition_penalty=1000.0)), "sampling.repetition_penalty"),
    (CompletionRequest(prompt="x", stopping=Stopping(min_new_tokens=9, max_new_tokens=4)), "stopping.min_new_tokens"),
    (CompletionRequest(prompt="x", stopping=Stopping(time_limit_ms=-1)), "stopping.time_limit_ms"),
    (CompletionRequest(prompt="x", stopping=Stopping(truncate_prompt_tokens=-2)), "stopping.truncate_prompt_tokens"),
    (CompletionRequest(prompt="x", n=MAX_N + 1), "n"),
    (CompletionRequest(prompt="x", constraint=Constraint("choice", ())), "constraint.choice.choices"),
    (CompletionRequest(prompt="x", constraint=Constraint("regex", "")), "constraint.regex"),
])
def test_out_of_range_is_refused_before_any_upstream_call(smollm, request_, field_name):
    model = InterleavedModel([[1]])
    pipeline, local = pipeline_for(smollm, model)
    with pytest.raises(InvalidArgument) as error:
        run(pipeline, request_)
    assert error.value.field == field_name and not model.requests and not local.calls


# ---- the real stack (tests/gateway/conftest.py) ------------------------------------------------------

INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                                      "city": {"type": "string", "maxLength": 20}},
                     "required": ["name", "city"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "object", "properties": {"product": {"type": "string", "maxLength": 20},
                                                             "quantity": {"type": "integer", "minimum": 1}},
                            "required": ["product", "quantity"], "additionalProperties": False}},
        "status": {"enum": ["paid", "unpaid"]},
    },
    "required": ["customer", "items", "status"],
    "additionalProperties": False,
}
INVOICE_TEXT = "Invoice: Alice Martin from Lyon bought 3 lamps and 2 chairs. She has paid. Give it as JSON."


def _messages(text: str) -> list[common_pb2.Message]:
    return [common_pb2.Message(role="user", content=text)]


@pytest.mark.slow
@pytest.mark.parametrize("temperature,streamed", [(0.0, False), (1.0, True)])
def test_json_schema_through_the_gateway_unary_and_streamed(stack, temperature, streamed):
    request = gateway_pb2.GenerateRequest(
        messages=_messages(INVOICE_TEXT), n=2,
        sampling=common_pb2.SamplingParams(temperature=temperature, seed=7),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=150),
        constraint=common_pb2.Constraint(json_schema=json.dumps(INVOICE_SCHEMA)))
    if not streamed:
        unary = stack.stub.Generate(request, timeout=600)
        assert [c.index for c in unary.completions] == [0, 1]
        assert unary.text == unary.completions[0].text
        for completion in unary.completions:
            assert completion.finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN
            jsonschema.validate(json.loads(completion.text), INVOICE_SCHEMA)
        assert unary.usage.generated_tokens == sum(c.generated_tokens for c in unary.completions)
        return
    messages = stack.stream(request, timeout=600)
    for index in (0, 1):
        jsonschema.validate(json.loads("".join(m.text for m in messages if m.index == index)), INVOICE_SCHEMA)
    assert [m.finish_reason for m in messages if m.finish_reason] == [common_pb2.FINISH_REASON_STOP_TOKEN] * 2
    usage = [m.usage.generated_tokens for m in messages if m.HasField("usage")]
    assert usage == [sum(len(m.token_ids) for m in messages)] and messages[-1].HasField("usage")


@pytest.mark.slow
def test_regex_choice_and_a_bad_schema_through_the_gateway(stack):
    date = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    reply = stack.stub.Generate(gateway_pb2.GenerateRequest(
        messages=_messages("When did Apollo 11 land? Answer with a date."),
        sampling=common_pb2.SamplingParams(temperature=0), constraint=common_pb2.Constraint(regex=date)), timeout=600)
    assert re.fullmatch(date, reply.text) and reply.finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN
    choices = ["yes", "no"]
    reply = stack.stub.Generate(gateway_pb2.GenerateRequest(
        messages=_messages("Is Paris in France?"), sampling=common_pb2.SamplingParams(temperature=1.0, seed=3),
        constraint=common_pb2.Constraint(choice=common_pb2.Constraint.Choice(choices=choices))), timeout=600)
    assert reply.text in choices
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.Generate(gateway_pb2.GenerateRequest(
            prompt="x", constraint=common_pb2.Constraint(json_schema='{"type": "nonsense"}')), timeout=60)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith("constraint.json_schema:")


@pytest.mark.slow
def test_get_info_advertises_capabilities(stack):
    capabilities = stack.stub.GetInfo(gateway_pb2.GetInfoRequest(), timeout=30).capabilities
    assert set(capabilities.constraint_kinds) == {"json_schema", "regex", "grammar", "choice"}
    assert {"min_p", "presence_penalty", "frequency_penalty", "logit_bias"} <= set(capabilities.sampling_options)
    assert {"min_new_tokens", "time_limit_ms", "truncate_prompt_tokens", "stop_sequences"} <= \
        set(capabilities.stopping_options)
    assert (capabilities.max_n, capabilities.max_top_logprobs) == (MAX_N, MAX_TOP_LOGPROBS)
    assert capabilities.max_stop_sequences == 16 and capabilities.max_logit_bias == 100

