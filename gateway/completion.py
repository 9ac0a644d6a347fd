"""One completion: tokenizer -> model -> tokenizer, with stop sequences, as a stream of plain chunks.

    prompt / messages --Encode / ApplyChatTemplate--> prompt ids --Generate--> generated ids
    generated ids --DecodeStream (one id a message)--> each token's text --stop matcher--> deltas

Every token gets its own text from the tokenizer's incremental decoder, so a stop sequence is
found at the token that completes it, whatever chunks the model sent: the joined output does not
depend on timing, which is why unary ``Generate`` equals the joined ``GenerateStream``.

A token is returned with the delta that releases the last of its text. Tokens with no text of
their own (the first bytes of a character split over tokens, a skipped special token) go out with
the next token that has text, or at the end. When a stop sequence matches, the tokens whose text
reaches into it are not returned and ``usage.generated_tokens`` counts the tokens up to and
including the one that completed it: what the model generated for this answer.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from llama_grpc_runtime.context import current_request_id
from llama_grpc_runtime.errors import Unavailable
from llama_grpc_stubs.common.v1 import common_pb2

from . import metrics
from .request import CompletionRequest, Limits, validate, validate_prompt_length
from .stops import StopSequenceMatcher
from .upstream import Candidate, Deadline, ModelChunk, ModelClient, TokenizerClient

log = structlog.get_logger()
FINISH_STOP_SEQUENCE = common_pb2.FINISH_REASON_STOP_SEQUENCE


@dataclass
class Echo:
    """The prompt as the model saw it (output.echo)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[Candidate]]


@dataclass
class Finish:
    reason: int  # llama.common.v1.FinishReason value
    prompt_tokens: int
    generated_tokens: int
    stop_sequence: str = ""


@dataclass
class Chunk:
    """What one streamed response carries."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[Candidate]] = field(default_factory=list)
    echo: Echo | None = None
    finish: Finish | None = None

    def is_empty(self) -> bool:
        return not (self.text or self.token_ids or self.echo or self.finish)


@dataclass
class _Token:
    token_id: int
    end: int  # offset just past this token's text in the generated text
    has_text: bool
    logprob: float | None
    top_logprobs: list[Candidate] | None


class _HeldTokens:
    """Generated tokens waiting for their text to be released by the stop matcher."""

    def __init__(self) -> None:
        self.tokens: list[_Token] = []
        self.end = 0

    def add(self, token_id: int, text: str, logprob: float | None, top: list[Candidate] | None) -> None:
        self.end += len(text)
        self.tokens.append(_Token(token_id, self.end, bool(text), logprob, top))

    def release(self, upto: int | None, chunk: Chunk) -> None:
        """Move to ``chunk`` every token up to the last one with text that ends by ``upto`` (None: all)."""
        count = len(self.tokens)
        if upto is not None:
            count = 0
            for index, token in enumerate(self.tokens):
                if token.end > upto:
                    break
                if token.has_text:
                    count = index + 1
        for token in self.tokens[:count]:
            chunk.token_ids.append(token.token_id)
            if token.logprob is not None:
                chunk.logprobs.append(token.logprob)
            if token.top_logprobs is not None:
                chunk.top_logprobs.append(token.top_logprobs)
        del self.tokens[:count]


class Completions:
    """Runs completions against one tokenizer service and one (possibly replicated) model service."""

    def __init__(self, tokenizer: TokenizerClient, model: ModelClient, limits: Limits,
                 extra_stop_token_ids: tuple[int, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.limits = limits
        # Stop ids the tokenizer declares and the model does not (see agreement.py).
        self.extra_stop_token_ids = extra_stop_token_ids

    async def prompt_token_ids(self, request: CompletionRequest, deadline: Deadline) -> list[int]:
        if request.messages:
            return await self.tokenizer.apply_chat_template(request.messages, deadline)
        return await self.tokenizer.encode(request.prompt, deadline)

    async def stream(self, request: CompletionRequest, timeout: float | None) -> AsyncIterator[Chunk]:
        validate(request, self.limits)
        deadline = Deadline(timeout)
        started = time.perf_counter()
        prompt_ids = await self.prompt_token_ids(request, deadline)
        validate_prompt_length(len(prompt_ids), request, self.limits)
        echo_text = await self.tokenizer.decode(prompt_ids, deadline) if request.output.echo else ""

        model_stream = self.model.generate(current_request_id(), prompt_ids, request,
                                           self.extra_stop_token_ids, deadline)
        decoder = self.tokenizer.decode_stream(deadline)
        matcher = StopSequenceMatcher(request.stopping.stop_sequences)
        held = _HeldTokens()
        generated = 0
        first = True
        try:
            async for model_chunk in model_stream:
                chunk = Chunk()
                if first:
                    metrics.TIME_TO_FIRST_CHUNK.observe(time.perf_counter() - started)
                    if request.output.echo:
                        chunk.echo = await self._echo(echo_text, prompt_ids, model_chunk, deadline)
                    first = False
                texts = await decoder.texts(model_chunk.token_ids)
                tops = await self._top_logprobs(model_chunk.top_logprobs, deadline)
                for index, (token_id, text) in enumerate(zip(model_chunk.token_ids, texts, strict=True)):
                    generated += 1
                    chunk.text += matcher.feed(text)
                    held.add(token_id,
                             text,
                             model_chunk.logprobs[index] if index < len(model_chunk.logprobs) else None,
                             tops[index] if index < len(tops) else None)
                    if matcher.match is not None:
                        break
                    held.release(matcher.released, chunk)
                if matcher.match is not None:
                    model_stream.cancel()  # at once: the model's slot is free for others
                    held.release(matcher.match.start, chunk)
                    chunk.finish = Finish(FINISH_STOP_SEQUENCE, len(prompt_ids), generated,
                                          matcher.match.stop_sequence)
                elif model_chunk.finish_reason:
                    chunk.text += matcher.feed(await decoder.finish())  # an unfinished character's bytes
                    if matcher.match is not None:
                        held.release(matcher.match.start, chunk)
                        chunk.finish = Finish(FINISH_STOP_SEQUENCE, len(prompt_ids), generated,
                                              matcher.match.stop_sequence)
                    else:
                        chunk.text += matcher.flush()
                        held.release(None, chunk)
                        chunk.finish = Finish(model_chunk.finish_reason, len(prompt_ids),
                                              model_chunk.generated_tokens or generated)
                metrics.GENERATED_TOKENS.inc(len(model_chunk.token_ids))
                if not chunk.is_empty():
                    yield chunk
                if chunk.finish is not None:
                    reason = common_pb2.FinishReason.Name(chunk.finish.reason)
                    metrics.FINISHED.labels(reason).inc()
                    log.info("completion finished", finish_reason=reason, prompt_tokens=len(prompt_ids),
                             generated_tokens=chunk.finish.generated_tokens,
                             seconds=round(time.perf_counter() - started, 4))
                    if chunk.finish.reason != FINISH_STOP_SEQUENCE:
                        await model_stream.wait_closed()
                    return
            raise Unavailable(f"{self.model.name} at {self.model.address} ended the stream without a finish reason")
        finally:  # stop sequence, error, or the caller went away: the model's slot is freed now
            model_stream.cancel()
            decoder.cancel()

    async def _echo(self, text: str, prompt_ids: list[int], model_chunk: ModelChunk, deadline: Deadline) -> Echo:
        return Echo(text, prompt_ids, model_chunk.prompt_logprobs,
                    await self._top_logprobs(model_chunk.prompt_top_logprobs, deadline))

    async def _top_logprobs(self, positions: list[list[Candidate]], deadline: Deadline) -> list[list[Candidate]]:
        """Fill in each candidate's text (the model knows ids only)."""
        if not positions:
            return positions
        texts = await self.tokenizer.token_texts([c.token_id for p in positions for c in p], deadline)
        return [[Candidate(c.token_id, c.logprob, texts[c.token_id]) for c in position] for position in positions]
