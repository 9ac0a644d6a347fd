"""``llama.gateway.v1.GatewayService``: protobuf in, one call into the core, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from llama_grpc_runtime.errors import Unavailable
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.model.v1 import model_pb2
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2
from model_service.options import constraint_from_message

from .completion import CompletionPipeline
from .interfaces import Candidate, Deadline
from .request import ChatMessage, CompletionRequest, Output, Sampling, Stopping, validate_input
from .shaping import Chunk
from .state import UpstreamState


def _optional(message: object, name: str) -> object | None:
    return getattr(message, name) if message.HasField(name) else None  # type: ignore[attr-defined]


def completion_request(request: gateway_pb2.GenerateRequest | gateway_pb2.GenerateStreamRequest) -> CompletionRequest:
    sampling, stopping, output = request.sampling, request.stopping, request.output
    return CompletionRequest(
        prompt=request.prompt,
        messages=messages_of(request.messages),
        sampling=Sampling(
            temperature=_optional(sampling, "temperature"),
            top_p=_optional(sampling, "top_p"),
            top_k=sampling.top_k,
            repetition_penalty=_optional(sampling, "repetition_penalty"),
            seed=_optional(sampling, "seed"),
            min_p=_optional(sampling, "min_p"),
            presence_penalty=_optional(sampling, "presence_penalty"),
            frequency_penalty=_optional(sampling, "frequency_penalty"),
            logit_bias=dict(sampling.logit_bias),
        ),
        stopping=Stopping(
            max_new_tokens=stopping.max_new_tokens,
            stop_sequences=tuple(stopping.stop_sequences),
            stop_token_ids=tuple(stopping.stop_token_ids),
            strict_context_limit=stopping.strict_context_limit,
            min_new_tokens=stopping.min_new_tokens,
            time_limit_ms=stopping.time_limit_ms,
            truncate_prompt_tokens=stopping.truncate_prompt_tokens,
        ),
        output=Output(logprobs=output.logprobs, top_logprobs=output.top_logprobs, echo=output.echo),
        n=request.n or 1,
        constraint=constraint_from_message(request.constraint),
    )


def messages_of(messages: Sequence[common_pb2.Message]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in messages)


def _top(positions: list[list[Candidate]]) -> list[common_pb2.TopLogprobs]:
    return [common_pb2.TopLogprobs(candidates=[common_pb2.TokenLogprob(token_id=c.token_id, logprob=c.logprob,
                                                                        text=c.text) for c in position])
            for position in positions]


def fill(response: gateway_pb2.GenerateResponse | gateway_pb2.GenerateStreamResponse | gateway_pb2.Completion,
         chunk: Chunk) -> None:
    """Append ``chunk`` to ``response`` (a stream message, or a unary completion being joined)."""
    response.index = chunk.index
    response.text += chunk.text
    response.token_ids.extend(chunk.token_ids)
    response.logprobs.extend(chunk.logprobs)
    response.top_logprobs.extend(_top(chunk.top_logprobs))
    if chunk.finish is not None:
        response.finish_reason = common_pb2.FinishReason.Value(chunk.finish.reason)
        response.stop_sequence = chunk.finish.stop_sequence
    if isinstance(response, gateway_pb2.Completion):
        if chunk.finish is not None:
            response.generated_tokens = chunk.finish.generated_tokens
        return
    if chunk.usage is not None:
        response.usage.prompt_tokens = chunk.usage.prompt_tokens
        response.usage.generated_tokens = chunk.usage.generated_tokens
        response.usage.cached_prompt_tokens = chunk.usage.cached_prompt_tokens
    if chunk.echo is not None:
        response.prompt_text = chunk.echo.text
        response.prompt_token_ids.extend(chunk.echo.token_ids)
        response.prompt_logprobs.extend(chunk.echo.logprobs)
        response.prompt_top_logprobs.extend(_top(chunk.echo.top_logprobs))


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, pipeline: CompletionPipeline, state: Callable[[], UpstreamState]) -> None:
        self.pipeline = pipeline
        self.state = state

    def _open_state(self) -> UpstreamState:
        """The upstream state this call uses; UNAVAILABLE while the upstreams are known to disagree
        (a restarted upstream serving another model)."""
        state = self.state()
        if state.refusal:
            raise Unavailable(state.refusal)
        return state

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.GenerateResponse:
        self._open_state()
        completion = completion_request(request)
        response = gateway_pb2.GenerateResponse()
        completions = [gateway_pb2.Completion(index=index) for index in range(max(completion.n, 1))]
        async for chunk in self.pipeline.stream(completion, context.time_remaining()):
            fill(completions[chunk.index], chunk)
            if chunk.index == 0:  # the top-level fields are completion 0, as with n = 1
                fill(response, chunk)
            elif chunk.usage is not None or chunk.echo is not None:
                fill(response, Chunk(usage=chunk.usage, echo=chunk.echo))
        if completion.n > 1:
            response.completions.extend(completions)
        return response

    async def GenerateStream(self, request: gateway_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateStreamResponse]:
        self._open_state()
        async for chunk in self.pipeline.stream(completion_request(request), context.time_remaining()):
            response = gateway_pb2.GenerateStreamResponse()
            fill(response, chunk)
            yield response

    async def Tokenize(self, request: gateway_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.TokenizeResponse:
        state = self._open_state()
        validate_input(request.text, messages_of(request.messages), text_field="text")
        plain = CompletionRequest(prompt=request.text, messages=messages_of(request.messages))
        token_ids = await self.pipeline.prompt_token_ids(plain, state, Deadline(context.time_remaining()))
        return gateway_pb2.TokenizeResponse(token_ids=token_ids)

    async def GetInfo(self, request: gateway_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> gateway_pb2.GetInfoResponse:
        model, tokenizer = await asyncio.gather(self.pipeline.model.info(), self.pipeline.tokenizer.info())
        # The upstreams' own replies, relayed whole: fields added to them reach the caller unchanged.
        model_info = model_pb2.GetModelInfoResponse.FromString(model.message)
        return gateway_pb2.GetInfoResponse(model=model_info,
                                           tokenizer=tokenizer_pb2.GetTokenizerInfoResponse.FromString(tokenizer.message),
                                           capabilities=self._capabilities(model_info.capabilities))

    def _capabilities(self, model: common_pb2.GenerationCapabilities) -> common_pb2.GenerationCapabilities:
        """What the model service accepts, plus what the gateway adds (stop sequences) and its own limits."""
        limits = self.state().limits
        capabilities = common_pb2.GenerationCapabilities()
        capabilities.CopyFrom(model)
        if "stop_sequences" not in capabilities.stopping_options:
            capabilities.stopping_options.append("stop_sequences")
        capabilities.max_stop_sequences = limits.max_stop_sequences
        capabilities.max_stop_sequence_chars = limits.max_stop_sequence_chars
        return capabilities
