"""One completion as a pipeline: prepare -> call upstreams -> shape responses.

    prompt / messages --Encode / ApplyChatTemplate--> prompt ids --Generate--> generated ids
    generated ids --the vocabulary's bytes (or DecodeStream, one id a message)--> each token's text
                  --stop matcher--> deltas

``stream`` validates the request and admits it (``ModelUpstream.admit``: RESOURCE_EXHAUSTED at once when
every model replica is full, before any tokenising), ``prepare`` turns it into prompt ids, ``call`` starts the model's stream
and an incremental decoder (in the gateway, from the vocabulary the tokenizer service sent once:
``--detokenize local``, the default; or the tokenizer's DecodeStream), ``respond`` turns what they return into ``Chunk`` values
(``shaping.py``). The upstreams are the ``TokenizerUpstream`` / ``ModelUpstream`` interfaces of ``interfaces.py``,
and what the gateway knows about them is one ``UpstreamState`` read once per request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from llama_grpc_runtime.context import current_request_id
from llama_grpc_runtime.errors import Unavailable

from .interfaces import (
    Admission,
    Candidate,
    Deadline,
    GenerationStream,
    ModelChunk,
    ModelUpstream,
    TextDecoder,
    TokenizerUpstream,
)
from .metrics import gateway_metrics
from .request import CompletionRequest, validate, validate_prompt_length
from .shaping import Chunk, Echo, ResponseShaper, Usage
from .state import UpstreamState

log = structlog.get_logger()


@dataclass(frozen=True)
class Prepared:
    """A validated request with its prompt ids: everything the upstream calls need."""

    request: CompletionRequest
    prompt_token_ids: list[int]
    echo_text: str  # the prompt's text, when output.echo asks for it
    extra_stop_token_ids: tuple[int, ...]


class CompletionPipeline:
    """Runs completions against one tokenizer and one (possibly replicated) model service."""

    def __init__(self, tokenizer: TokenizerUpstream, model: ModelUpstream, state: Callable[[], UpstreamState]) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.state = state

    async def prompt_token_ids(self, request: CompletionRequest, state: UpstreamState,
                               deadline: Deadline) -> list[int]:
        if request.messages:
            return await self.tokenizer.apply_chat_template(request.messages, deadline)
        # A text prompt starts with BOS, as the reference's text_completion does, where the model's
        # files ask for it (Llama 3 does; SmolLM2's GGUF says add_bos_token false, as HF does).
        return await self.tokenizer.encode(request.prompt, state.add_bos, deadline)

    async def prepare(self, request: CompletionRequest, state: UpstreamState, deadline: Deadline) -> Prepared:
        """Prompt ids of a validated request (checked against the context)."""
        prompt_ids = await self.prompt_token_ids(request, state, deadline)
        keep = request.stopping.truncate_prompt_tokens
        if keep and len(prompt_ids) > keep:  # the last N tokens: the end of the prompt matters most
            prompt_ids = prompt_ids[-keep:]
        validate_prompt_length(len(prompt_ids), request, state.limits)
        echo_text = await self.tokenizer.decode(prompt_ids, deadline) if request.output.echo else ""
        return Prepared(request, prompt_ids, echo_text, state.extra_stop_token_ids)

    def call(self, prepared: Prepared, deadline: Deadline, admission: Admission) -> GenerationStream:
        return self.model.generate(current_request_id(), prepared.prompt_token_ids, prepared.request,
                                   prepared.extra_stop_token_ids, deadline, admission)

    async def stream(self, request: CompletionRequest, timeout: float | None) -> AsyncIterator[Chunk]:
        deadline = Deadline(timeout)
        started = time.perf_counter()
        state = self.state()
        validate(request, state.limits)
        # Before the tokenizer is asked anything: when every replica is full the caller hears at once.
        admission = await self.model.admit(request.n)
        model_stream: GenerationStream | None = None
        decoders: dict[int, TextDecoder] = {}  # one incremental decode per completion
        try:
            prepared = await self.prepare(request, state, deadline)
            model_stream = self.call(prepared, deadline, admission)
            async for chunk in self.respond(prepared, model_stream, decoders, deadline, started):
                yield chunk
        finally:  # stop sequence, error, or the caller went away: the model's slot is freed now
            if model_stream is not None:
                model_stream.cancel()
            admission.release()
            for decoder in decoders.values():
                decoder.cancel()

    async def respond(self, prepared: Prepared, model_stream: GenerationStream, decoders: dict[int, TextDecoder],
                      deadline: Deadline, started: float) -> AsyncIterator[Chunk]:
        """The model's chunks (the n completions interleaved, by index) -> the caller's chunks. Each
        completion has its own decoder and shaper; usage rides on the last chunk, once all have ended.

        With n > 1 the completions share one model call, so a completion ended by a stop sequence
        cannot be cancelled alone: the gateway drops what the model still sends for it."""
        metrics = gateway_metrics()
        request = prepared.request
        shapers: dict[int, ResponseShaper] = {}
        generated: dict[int, int] = {}  # completion -> its generated tokens, once it has finished
        stopped_early = False
        first = True
        cached_prompt = 0
        async for model_chunk in model_stream:
            index = model_chunk.index
            if index in generated or not 0 <= index < request.n:
                continue
            if index not in shapers:
                shapers[index] = ResponseShaper(request.stopping.stop_sequences, len(prepared.prompt_token_ids),
                                                request.stopping.min_new_tokens)
                decoders[index] = self.tokenizer.decode_stream(deadline)
            shaper, decoder = shapers[index], decoders[index]
            chunk = Chunk(index=index)
            if first:
                metrics.time_to_first_chunk.observe(time.perf_counter() - started)
                if request.output.echo:
                    chunk.echo = await self._echo(prepared, model_chunk, deadline)
                first = False
            texts = await decoder.texts(model_chunk.token_ids)
            shaper.add(model_chunk, texts, await self._top_logprobs(model_chunk.top_logprobs, deadline), chunk)
            if shaper.stopped:
                stopped_early = True
                if request.n == 1:
                    model_stream.cancel()  # at once: the model's slot is free for others
            elif model_chunk.finish_reason:
                if index == 0:  # the prompt is computed once, by completion 0
                    cached_prompt = model_chunk.cached_prompt_tokens
                shaper.end(await decoder.finish(), model_chunk.finish_reason, model_chunk.generated_tokens, chunk)
            metrics.generated_tokens.inc(len(model_chunk.token_ids))
            if chunk.finish is not None:
                generated[index] = chunk.finish.generated_tokens
                metrics.finished.labels(chunk.finish.reason).inc()
                log.info("completion finished", finish_reason=chunk.finish.reason, index=index,
                         prompt_tokens=chunk.finish.prompt_tokens, generated_tokens=chunk.finish.generated_tokens,
                         seconds=round(time.perf_counter() - started, 4))
                if len(generated) == request.n:
                    chunk.usage = Usage(len(prepared.prompt_token_ids), sum(generated.values()), cached_prompt)
            if not chunk.is_empty():
                yield chunk
            if len(generated) == request.n:
                if not stopped_early:
                    await model_stream.wait_closed()
                return
        raise Unavailable(f"{self.model.name} at {self.model.address} ended the stream without a finish reason")

    async def _echo(self, prepared: Prepared, model_chunk: ModelChunk, deadline: Deadline) -> Echo:
        return Echo(prepared.echo_text, prepared.prompt_token_ids, model_chunk.prompt_logprobs,
                    await self._top_logprobs(model_chunk.prompt_top_logprobs, deadline))

    async def _top_logprobs(self, positions: list[list[Candidate]], deadline: Deadline) -> list[list[Candidate]]:
        """Fill in each candidate's text (the model knows ids only)."""
        if not positions:
            return positions
        texts = await self.tokenizer.token_texts([c.token_id for p in positions for c in p], deadline)
        return [[Candidate(c.token_id, c.logprob, texts[c.token_id]) for c in position] for position in positions]
