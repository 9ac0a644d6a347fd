"""The gateway's completion pipeline in-process: prepare -> call upstreams -> shape responses.

The tokenizer upstream is the real tokenizer core (the embedded SmolLM2 vocabulary) behind the
``TokenizerUpstream`` interface, with the gateway's own decoder of generated ids (``LocalDecoder``);
the model upstream replays a fixed list of generated ids in chunks of a chosen size. The truth each test checks against is independent of the pipeline: the
tokenizer's own one-shot ``decode`` and ``str.find`` on the whole generated text. The same
behaviour end to end over gRPC is in test_generate.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace

import pytest

from gateway.completion import CompletionPipeline
from gateway.interfaces import FINISH_STOP_SEQUENCE, Candidate, Deadline, ModelChunk, ModelInfo, TokenizerInfo
from gateway.request import ChatMessage, CompletionRequest, Limits, Output, Sampling, Stopping
from gateway.shaping import Chunk
from gateway.state import UpstreamState, agreed_state
from gateway.upstream import LocalDecoder
from llama_grpc_runtime.errors import InvalidArgument, ResourceExhausted, Unavailable
from model_files.detokenize import TokenTable
from tokenizer_service.loader import load_tokenizer
from tokenizer_service.tokenizer import Tokenizer

ANSWER = "The capital of France is Paris. Paris is on the Seine; it has 2.1 million people. Caf\u00e9 \U0001F600 au lait."


class RecordingDecoder(LocalDecoder):
    """The gateway's own decoder (generated ids -> text from the vocabulary's bytes, as ``--detokenize
    local`` runs it), noting whether the pipeline cancelled it."""

    def __init__(self, table: TokenTable) -> None:
        super().__init__(table)
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class LocalTokenizer:
    """The tokenizer core behind the gateway's ``TokenizerUpstream`` interface, with a call log."""

    name, address = "tokenizer service", "in-process"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.calls: list[str] = []
        self.decoders: list[RecordingDecoder] = []
        # What the gateway builds from GetVocabulary: every id's bytes.
        self.table = TokenTable(tokenizer.token_bytes(), tokenizer.special_tokens.values())

    async def encode(self, text: str, add_bos: bool, deadline: Deadline) -> list[int]:
        self.calls.append("encode")
        return self.tokenizer.encode(text, add_bos=add_bos)

    async def apply_chat_template(self, messages: Sequence[ChatMessage], deadline: Deadline) -> list[int]:
        self.calls.append("apply_chat_template")
        return self.tokenizer.apply_chat_template(messages).token_ids

    async def decode(self, token_ids: Sequence[int], deadline: Deadline) -> str:
        self.calls.append("decode")
        return self.tokenizer.decode(token_ids)

    async def token_texts(self, token_ids: Sequence[int], deadline: Deadline) -> dict[int, str]:
        return {token_id: self.tokenizer.decode([token_id]) for token_id in token_ids}

    def decode_stream(self, deadline: Deadline) -> RecordingDecoder:
        self.decoders.append(RecordingDecoder(self.table))
        return self.decoders[-1]

    async def info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(t.name, t.vocab_size, tuple(t.stop_token_ids), t.add_bos_token)


@dataclass
class ReplayStream:
    chunks: list[ModelChunk]
    cancelled: bool = False
    delivered: int = 0

    async def __aiter__(self) -> AsyncIterator[ModelChunk]:
        for chunk in self.chunks:
            if self.cancelled:
                return
            self.delivered += 1
            yield chunk

    async def wait_closed(self) -> None:
        pass

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Held:
    """A fake model's admission: whether the pipeline gave it back."""

    n: int
    released: bool = False

    def release(self) -> None:
        self.released = True


@dataclass
class ReplayModel:
    """Generates ``token_ids`` in chunks of ``chunk_size``, then finishes with ``finish_reason``."""

    token_ids: list[int]
    chunk_size: int = 1
    finish_reason: str = "FINISH_REASON_LENGTH"
    name: str = "model service"
    address: str = "in-process"
    with_logprobs: bool = True
    streams: list[ReplayStream] = field(default_factory=list)
    requests: list[tuple[list[int], tuple[int, ...]]] = field(default_factory=list)
    admissions: list[Held] = field(default_factory=list)

    async def admit(self, n: int) -> Held:
        self.admissions.append(Held(n))
        return self.admissions[-1]

    def generate(self, request_id: str, prompt_token_ids: list[int], request: CompletionRequest,
                 extra_stop_token_ids: Sequence[int], deadline: Deadline, admission: Held) -> ReplayStream:
        self.requests.append((prompt_token_ids, tuple(extra_stop_token_ids)))
        ids, size = self.token_ids, self.chunk_size
        chunks = [ModelChunk(token_ids=ids[i:i + size],
                             logprobs=[-0.5 - j for j in range(i, min(i + size, len(ids)))] if self.with_logprobs else [],
                             top_logprobs=[]) for i in range(0, len(ids), size)]
        if chunks and self.finish_reason:
            chunks[-1].finish_reason = self.finish_reason
            chunks[-1].generated_tokens = len(ids)
        if request.output.echo and chunks:
            chunks[0].prompt_logprobs = [-1.0] * len(prompt_token_ids)
        self.streams.append(ReplayStream(chunks))
        return self.streams[-1]

    async def info(self) -> ModelInfo:
        return ModelInfo("replay", 49152, 2048, (2,))


@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return load_tokenizer()


def run(pipeline: CompletionPipeline, request: CompletionRequest) -> list[Chunk]:
    async def collect() -> list[Chunk]:
        return [chunk async for chunk in pipeline.stream(request, timeout=30)]
    return asyncio.run(collect())


def pipeline_for(tokenizer: Tokenizer, model: ReplayModel, state: UpstreamState | None = None,
                 ) -> tuple[CompletionPipeline, LocalTokenizer]:
    local = LocalTokenizer(tokenizer)
    state = state or UpstreamState(Limits(vocab_size=tokenizer.vocab_size, max_seq_len=2048), add_bos=False)
    return CompletionPipeline(local, model, lambda: state), local


def joined(chunks: list[Chunk]) -> tuple[str, list[int], list[float]]:
    return ("".join(c.text for c in chunks), [i for c in chunks for i in c.token_ids],
            [p for c in chunks for p in c.logprobs])


def assert_text_of(tokenizer: Tokenizer, token_ids: list[int], text: str) -> None:
    """``text`` is what ``token_ids`` decode to, but for the first bytes of a character that the
    last token starts and the next one finishes."""
    raw, released = tokenizer.decode_bytes(token_ids), text.encode()
    assert raw.startswith(released) and len(raw) - len(released) < 4, (raw, released)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
def test_text_and_tokens_are_the_tokenizers_decode_whatever_the_chunking(smollm: Tokenizer, chunk_size: int) -> None:
    generated = smollm.encode(ANSWER)
    model = ReplayModel(generated, chunk_size)
    pipeline, local = pipeline_for(smollm, model)
    chunks = run(pipeline, CompletionRequest(prompt="Tell me about Paris."))
    text, token_ids, logprobs = joined(chunks)
    assert text == smollm.decode(generated) == ANSWER
    assert token_ids == generated
    assert logprobs == [-0.5 - j for j in range(len(generated))]
    finish = chunks[-1].finish
    assert finish is not None and finish.reason == "FINISH_REASON_LENGTH" and finish.stop_sequence == ""
    assert (finish.prompt_tokens, finish.generated_tokens) == (len(smollm.encode("Tell me about Paris.")), len(generated))
    assert all(chunk.finish is None for chunk in chunks[:-1])
    # Every token goes out with the chunk that releases the last of its text, never before it.
    released_text = ""
    released_ids: list[int] = []
    for chunk in chunks:
        released_text += chunk.text
        released_ids += chunk.token_ids
        assert_text_of(smollm, released_ids, released_text)


@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("stops", [["Paris"], ["Seine;", "million"], ["\U0001F600"], ["2.1 mi", "2.1"]])
def test_a_stop_sequence_cuts_the_text_where_str_find_does(smollm: Tokenizer, chunk_size: int,
                                                           stops: list[str]) -> None:
    generated = smollm.encode(ANSWER)
    model = ReplayModel(generated, chunk_size)
    pipeline, local = pipeline_for(smollm, model)
    request = CompletionRequest(prompt="Tell me.", stopping=Stopping(stop_sequences=tuple(stops)))
    chunks = run(pipeline, request)
    text, token_ids, _ = joined(chunks)
    # The stop that ends first wins (the earlier start on a tie); the text stops where it starts.
    first = min((ANSWER.find(stop) + len(stop), ANSWER.find(stop), stop) for stop in stops if stop in ANSWER)
    assert text == ANSWER[:first[1]]
    finish = chunks[-1].finish
    assert finish is not None and (finish.reason, finish.stop_sequence) == (FINISH_STOP_SEQUENCE, first[2])
    # The tokens returned are those whose text lies wholly before the stop sequence: the next one
    # reaches into it.
    def whole_text(ids: list[int]) -> str:  # the bytes of an unfinished character left out
        return smollm.decode_bytes(ids).decode("utf-8", "ignore")

    assert generated[:len(token_ids)] == token_ids
    assert text.startswith(whole_text(token_ids))
    assert len(whole_text(generated[:len(token_ids) + 1])) > len(text)
    # usage counts the tokens the model generated up to the one that completed the stop sequence.
    completing = next(n for n in range(1, len(generated) + 1) if len(whole_text(generated[:n])) >= first[0])
    assert finish.generated_tokens == completing
    # The model's stream was cancelled at once, and so was the decoder.
    assert model.streams[0].cancelled and local.decoders[0].cancelled
    assert model.streams[0].delivered == -(-completing // chunk_size)


def test_a_stop_sequence_completed_by_the_last_bytes_is_still_found(smollm: Tokenizer) -> None:
    generated = smollm.encode("ok \U0001F600")
    cut = len(generated) - 1  # the model stops in the middle of the emoji's bytes
    model = ReplayModel(generated[:cut], 1, finish_reason="FINISH_REASON_LENGTH")
    pipeline, _ = pipeline_for(smollm, model)
    chunks = run(pipeline, CompletionRequest(prompt="x", stopping=Stopping(stop_sequences=("\ufffd",))))
    text, token_ids, _ = joined(chunks)
    assert smollm.decode(generated[:cut]) == "ok \ufffd"
    assert text == "ok " and chunks[-1].finish.reason == FINISH_STOP_SEQUENCE


def test_prepare_rejects_a_bad_request_before_any_upstream_call(smollm: Tokenizer) -> None:
    model = ReplayModel(smollm.encode(ANSWER))
    pipeline, local = pipeline_for(smollm, model)
    for request, field_name in [
        (CompletionRequest(prompt="hi", sampling=Sampling(top_p=2.0)), "sampling.top_p"),
        (CompletionRequest(prompt="hi", messages=(ChatMessage("user", "hi"),)), "prompt"),
        (CompletionRequest(prompt="hi", stopping=Stopping(stop_token_ids=(smollm.vocab_size,))),
         "stopping.stop_token_ids[0]"),
    ]:
        with pytest.raises(InvalidArgument) as error:
            run(pipeline, request)
        assert error.value.field == field_name
    assert local.calls == [] and model.requests == []


def test_prepare_checks_the_prompt_against_the_models_context(smollm: Tokenizer) -> None:
    prompt = "word " * 40
    prompt_tokens = len(smollm.encode(prompt))
    state = UpstreamState(Limits(vocab_size=smollm.vocab_size, max_seq_len=prompt_tokens), add_bos=False)
    model = ReplayModel(smollm.encode(ANSWER))
    pipeline, local = pipeline_for(smollm, model, state)
    with pytest.raises(InvalidArgument) as error:
        run(pipeline, CompletionRequest(prompt=prompt))
    assert error.value.field == "prompt" and local.calls == ["encode"] and model.requests == []
    roomy = replace(state, limits=replace(state.limits, max_seq_len=prompt_tokens + 1))
    pipeline, _ = pipeline_for(smollm, model, roomy)
    assert joined(run(pipeline, CompletionRequest(prompt=prompt)))[0] == ANSWER


def test_the_upstream_state_decides_bos_and_extra_stop_ids(smollm: Tokenizer) -> None:
    model = ReplayModel(smollm.encode("fine"))
    state = UpstreamState(Limits(), extra_stop_token_ids=(7, 9), add_bos=True)
    pipeline, _ = pipeline_for(smollm, model, state)
    run(pipeline, CompletionRequest(prompt="Hello"))
    prompt_ids, extra = model.requests[0]
    assert prompt_ids == [smollm.bos_token_id, *smollm.encode("Hello")] and extra == (7, 9)


def test_chat_messages_go_through_the_chat_template_and_echo_returns_the_prompt(smollm: Tokenizer) -> None:
    model = ReplayModel(smollm.encode("Paris."), chunk_size=2)
    pipeline, local = pipeline_for(smollm, model)
    messages = (ChatMessage("user", "What is the capital of France?"),)
    chunks = run(pipeline, CompletionRequest(messages=messages, output=Output(echo=True)))
    expected = smollm.apply_chat_template(messages)
    assert model.requests[0][0] == expected.token_ids
    echo = chunks[0].echo
    assert echo is not None and echo.token_ids == expected.token_ids and echo.text == expected.text
    assert echo.logprobs == [-1.0] * len(expected.token_ids)
    assert [c.echo for c in chunks[1:]] == [None] * (len(chunks) - 1)


def test_top_logprob_candidates_get_their_text(smollm: Tokenizer) -> None:
    generated = smollm.encode("Paris is")
    model = ReplayModel(generated, chunk_size=10)
    pipeline, _ = pipeline_for(smollm, model)
    original = model.generate

    def with_candidates(*args, **kwargs) -> ReplayStream:
        stream = original(*args, **kwargs)
        for chunk in stream.chunks:
            chunk.top_logprobs = [[Candidate(token_id, -0.1)] for token_id in chunk.token_ids]
        return stream

    model.generate = with_candidates  # type: ignore[method-assign]
    chunks = run(pipeline, CompletionRequest(prompt="x", output=Output(logprobs=True, top_logprobs=1)))
    tops = [position for chunk in chunks for position in chunk.top_logprobs]
    assert [[c.text for c in position] for position in tops] == [[smollm.decode([i])] for i in generated]


def test_a_model_stream_without_a_finish_is_unavailable(smollm: Tokenizer) -> None:
    model = ReplayModel(smollm.encode("cut short"), finish_reason="")
    pipeline, local = pipeline_for(smollm, model)
    with pytest.raises(Unavailable, match="ended the stream without a finish reason"):
        run(pipeline, CompletionRequest(prompt="x"))
    assert model.streams[0].cancelled and local.decoders[0].cancelled


def test_agreed_state_takes_the_models_limits_or_keeps_the_old_ones_with_a_refusal() -> None:
    base = Limits(max_stop_sequences=3)
    tokenizer = TokenizerInfo("tok", 128256, (128001, 128008, 128009), True)
    model = ModelInfo("Llama-3", 128256, 8192, (128001, 128009))
    agreed = agreed_state(UpstreamState(base), base, tokenizer, "t:1", model, "m:2")
    assert agreed == UpstreamState(replace(base, vocab_size=128256, max_seq_len=8192), (128008,), True, None)
    other = ModelInfo("SmolLM2", 49152, 2048, (2,))
    refused = agreed_state(agreed, base, tokenizer, "t:1", other, "m:2")
    assert refused.limits == agreed.limits and refused.extra_stop_token_ids == (128008,)
    assert refused.refusal is not None and "t:1 (tok)" in refused.refusal and "m:2 (SmolLM2)" in refused.refusal


class FullModel(ReplayModel):
    """A model upstream with no room: admission refuses."""

    async def admit(self, n: int) -> Held:
        raise ResourceExhausted("every model replica is full")


def test_admission_comes_before_the_tokenizer_and_is_given_back(smollm):
    model = ReplayModel(smollm.encode("fine"))
    pipeline, local = pipeline_for(smollm, model)
    run(pipeline, CompletionRequest(messages=(ChatMessage("user", "hi"),)))
    assert [(held.n, held.released) for held in model.admissions] == [(1, True)]

    full = FullModel(smollm.encode("fine"))
    pipeline, local = pipeline_for(smollm, full)
    with pytest.raises(ResourceExhausted):
        run(pipeline, CompletionRequest(messages=(ChatMessage("user", "hi"),)))
    assert local.calls == [] and full.requests == []  # refused before the chat template


def test_admission_is_given_back_when_the_prompt_is_refused(smollm):
    model = ReplayModel(smollm.encode("fine"))
    state = UpstreamState(Limits(vocab_size=smollm.vocab_size, max_seq_len=8), add_bos=False)
    pipeline, local = pipeline_for(smollm, model, state)
    with pytest.raises(InvalidArgument):  # longer than the context, found after tokenising
        run(pipeline, CompletionRequest(prompt="a prompt that is surely longer than eight tokens, isn't it?"))
    assert local.calls == ["encode"] and model.requests == []
    assert [(held.n, held.released) for held in model.admissions] == [(1, True)]
