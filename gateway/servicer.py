"""``llama.gateway.v1.GatewayService``: protobuf in, one call into the core, protobuf out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import grpc

from llama_grpc_runtime.errors import Unavailable
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from .completion import Chunk, Completions
from .request import ChatMessage, CompletionRequest, Output, Sampling, Stopping, validate_input
from .upstream import Candidate, Deadline


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
        ),
        stopping=Stopping(
            max_new_tokens=stopping.max_new_tokens,
            stop_sequences=tuple(stopping.stop_sequences),
            stop_token_ids=tuple(stopping.stop_token_ids),
            strict_context_limit=stopping.strict_context_limit,
        ),
        output=Output(logprobs=output.logprobs, top_logprobs=output.top_logprobs, echo=output.echo),
    )


def messages_of(messages: Sequence[common_pb2.Message]) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m.role, m.content) for m in messages)


def _top(positions: list[list[Candidate]]) -> list[common_pb2.TopLogprobs]:
    return [common_pb2.TopLogprobs(candidates=[common_pb2.TokenLogprob(token_id=c.token_id, logprob=c.logprob,
                                                                        text=c.text) for c in position])
            for position in positions]


def fill(response: gateway_pb2.GenerateResponse | gateway_pb2.GenerateStreamResponse, chunk: Chunk) -> None:
    """Append ``chunk`` to ``response`` (a stream message, or the unary reply being joined)."""
    response.text += chunk.text
    response.token_ids.extend(chunk.token_ids)
    response.logprobs.extend(chunk.logprobs)
    response.top_logprobs.extend(_top(chunk.top_logprobs))
    if chunk.echo is not None:
        response.prompt_text = chunk.echo.text
        response.prompt_token_ids.extend(chunk.echo.token_ids)
        response.prompt_logprobs.extend(chunk.echo.logprobs)
        response.prompt_top_logprobs.extend(_top(chunk.echo.top_logprobs))
    if chunk.finish is not None:
        response.finish_reason = chunk.finish.reason
        response.usage.prompt_tokens = chunk.finish.prompt_tokens
        response.usage.generated_tokens = chunk.finish.generated_tokens
        response.stop_sequence = chunk.finish.stop_sequence


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, completions: Completions) -> None:
        self.completions = completions
        # Set while the upstreams are known to disagree (a restarted upstream serving another model).
        self.refusal: str | None = None

    def _check_open(self) -> None:
        if self.refusal:
            raise Unavailable(self.refusal)

    async def Generate(self, request: gateway_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.GenerateResponse:
        self._check_open()
        response = gateway_pb2.GenerateResponse()
        async for chunk in self.completions.stream(completion_request(request), context.time_remaining()):
            fill(response, chunk)
        return response

    async def GenerateStream(self, request: gateway_pb2.GenerateStreamRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.GenerateStreamResponse]:
        self._check_open()
        async for chunk in self.completions.stream(completion_request(request), context.time_remaining()):
            response = gateway_pb2.GenerateStreamResponse()
            fill(response, chunk)
            yield response

    async def Tokenize(self, request: gateway_pb2.TokenizeRequest,
                       context: grpc.aio.ServicerContext) -> gateway_pb2.TokenizeResponse:
        self._check_open()
        validate_input(request.text, messages_of(request.messages), text_field="text")
        plain = CompletionRequest(prompt=request.text, messages=messages_of(request.messages))
        token_ids = await self.completions.prompt_token_ids(plain, Deadline(context.time_remaining()))
        return gateway_pb2.TokenizeResponse(token_ids=token_ids)

    async def GetInfo(self, request: gateway_pb2.GetInfoRequest,
                      context: grpc.aio.ServicerContext) -> gateway_pb2.GetInfoResponse:
        model, tokenizer = await asyncio.gather(self.completions.model.info(), self.completions.tokenizer.info())
        return gateway_pb2.GetInfoResponse(model=model, tokenizer=tokenizer)
