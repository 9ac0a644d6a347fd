"""``llama.tokenizer.v1.TokenizerService``: protobuf <-> the plain tokenizer core, nothing more.

Errors are raised, not aborted: the shared interceptor maps ``InvalidArgument`` & co. to statuses.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter

from llama_grpc_runtime.errors import InvalidArgument, Unavailable
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .chat import ChatTokenizer
from .chat_format import checked_messages
from .chat_template import JinjaChatFormat
from .loader import load_tokenizer
from .template_workers import TemplateWorkers

# Work on fewer characters (or 4 x ids) than this runs on the event loop: a thread hop costs more.
# Larger work goes to the worker threads (tiktoken releases the GIL), so concurrent calls use cores.
_INLINE_CHARS = 8192
# GetVocabulary sends the token table in chunks of about this many bytes (far below any message limit).
VOCABULARY_CHUNK_BYTES = 256 * 1024
_T = TypeVar("_T")


@dataclass(frozen=True)
class TokenMetrics:
    encoded: Counter
    decoded: Counter


def vocabulary_chunks(token_bytes: list[bytes]) -> list[tokenizer_pb2.GetVocabularyResponse]:
    """GetVocabulary's replies: every id's bytes in id order, at most ``VOCABULARY_CHUNK_BYTES`` a reply
    (a token longer than that alone in a reply of its own). Built once, when the tokenizer loads."""
    chunks, first = [], 0
    while first < len(token_bytes):
        end, size = first + 1, len(token_bytes[first])
        while end < len(token_bytes) and size + len(token_bytes[end]) <= VOCABULARY_CHUNK_BYTES:
            size += len(token_bytes[end])
            end += 1
        chunks.append(tokenizer_pb2.GetVocabularyResponse(first_token_id=first, token_bytes=token_bytes[first:end]))
        first = end
    return chunks


@cache
def token_metrics() -> TokenMetrics:
    return TokenMetrics(
        encoded=Counter("llama_tokenizer_tokens_encoded_total", "Token ids produced by Encode and ApplyChatTemplate"),
        decoded=Counter("llama_tokenizer_tokens_decoded_total", "Token ids turned into text by Decode and DecodeStream"),
    )


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, max_input_chars: int, threads: int, max_decode_ids: int = 1_000_000,
                 max_chat_messages: int = 4096, template_workers: int = 2, template_timeout: float = 10.0) -> None:
        self.tokenizer: ChatTokenizer | None = None  # set by load(); until then calls get UNAVAILABLE
        self.vocabulary: list[tokenizer_pb2.GetVocabularyResponse] = []  # GetVocabulary's replies, built by load()
        self.max_input_chars = max_input_chars
        self.max_decode_ids = max_decode_ids
        self.max_chat_messages = max_chat_messages
        self.metrics = token_metrics()
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="tokenizer")
        self._encodes_in_flight = 0  # large Encode calls whose parts are with the workers
        self.template_processes = template_workers
        self.template_timeout = template_timeout
        self.template_workers: TemplateWorkers | None = None  # started by load() for a Jinja chat template

    async def load(self, path: str | None) -> ChatTokenizer:
        """Load in a worker thread, then give every worker (and the loop's thread) its tiktoken
        Encoding up front, so the first calls do not pay for building them."""
        loop = asyncio.get_running_loop()
        tokenizer = await loop.run_in_executor(self.pool, load_tokenizer, path)
        barrier = threading.Barrier(self.threads)  # holds each worker until all have one

        def warm_up() -> None:
            tokenizer.encoding()
            barrier.wait(timeout=60)

        await asyncio.gather(*(loop.run_in_executor(self.pool, warm_up) for _ in range(self.threads)))
        tokenizer.encoding()
        if isinstance(tokenizer.chat, JinjaChatFormat):
            workers = TemplateWorkers(tokenizer.chat.spec, self.template_processes, self.template_timeout)
            await loop.run_in_executor(self.pool, workers.start)
            self.template_workers = workers
        self.vocabulary = await loop.run_in_executor(self.pool, lambda: vocabulary_chunks(tokenizer.token_bytes()))
        self.tokenizer = tokenizer
        return tokenizer

    def close(self) -> None:
        """Stop the chat template workers (the server has stopped)."""
        if self.template_workers is not None:
            self.template_workers.close()

    def _ready(self) -> ChatTokenizer:
        if self.tokenizer is None:
            raise Unavailable("the tokenizer is still loading")
        return self.tokenizer

    def _check_size(self, field: str, chars: int) -> None:
        if chars > self.max_input_chars:
            raise InvalidArgument(field, f"{chars} characters is more than the limit of {self.max_input_chars} "
                                  "(--max-input-chars)")

    def _check_ids(self, field: str, count: int) -> None:
        if count > self.max_decode_ids:
            raise InvalidArgument(field, f"{count} token ids is more than the limit of {self.max_decode_ids} "
                                  "(--max-decode-ids)")

    async def _run(self, size: int, work: Callable[[], _T]) -> _T:
        if size <= _INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)

    async def _encode(self, tokenizer: ChatTokenizer, text: str, **options: bool) -> list[int]:
        if len(text) <= _INLINE_CHARS:
            return tokenizer.encode(text, **options)
        # Idle workers take a share of this text, cut where the result cannot change: one large
        # request then keeps every worker busy, as concurrent requests do (which need no cuts).
        ways = max(1, self.threads - self._encodes_in_flight)
        split_chars = max(2 * _INLINE_CHARS, -(-len(text) // ways)) if ways > 1 else None
        plan = tokenizer.encode_plan(text, split_chars=split_chars, **options)
        loop = asyncio.get_running_loop()
        self._encodes_in_flight += 1
        try:
            runs = iter(await asyncio.gather(*(loop.run_in_executor(self.pool, tokenizer.encode_ordinary, part)
                                               for part in plan if isinstance(part, str))))
        finally:
            self._encodes_in_flight -= 1
        ids: list[int] = []
        for part in plan:
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(next(runs))
        return ids

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> Any:
        tokenizer = self._ready()
        text = request.text
        self._check_size("text", len(text))
        ids = await self._encode(tokenizer, text, add_bos=request.add_bos, add_eos=request.add_eos,
                                 allow_special=request.allow_special)
        self.metrics.encoded.inc(len(ids))
        return tokenizer_pb2.EncodeResponse(token_ids=ids)

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context: grpc.aio.ServicerContext) -> Any:
        tokenizer = self._ready()
        self._check_ids("token_ids", len(request.token_ids))
        ids = list(request.token_ids)
        text = await self._run(len(ids) * 4, lambda: tokenizer.decode(
            ids, skip_special_tokens=request.skip_special_tokens))
        self.metrics.decoded.inc(len(ids))
        return tokenizer_pb2.DecodeResponse(text=text)

    async def DecodeStream(self, request_iterator: AsyncIterator[tokenizer_pb2.DecodeStreamRequest],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[tokenizer_pb2.DecodeStreamResponse]:
        tokenizer = self._ready()
        decoder = None
        total = 0  # ids over the whole stream: one generation's worth at most
        async for request in request_iterator:
            if decoder is None:  # options come from the first message
                decoder = tokenizer.stream_decoder(skip_special_tokens=request.skip_special_tokens)
            total += len(request.token_ids)
            self._check_ids("token_ids (this stream's total)", total)
            ids = list(request.token_ids)
            text = await self._run(len(ids) * 4, functools.partial(decoder.push, ids))
            self.metrics.decoded.inc(len(ids))
            # One reply per request (empty while a character is incomplete) keeps callers in lockstep.
            yield tokenizer_pb2.DecodeStreamResponse(text=text)
        if decoder is not None and (tail := decoder.flush()):
            yield tokenizer_pb2.DecodeStreamResponse(text=tail)

    async def ApplyChatTemplate(self, request: tokenizer_pb2.ApplyChatTemplateRequest,
                                context: grpc.aio.ServicerContext) -> Any:
        tokenizer = self._ready()
        if len(request.messages) > self.max_chat_messages:
            raise InvalidArgument("messages", f"{len(request.messages)} messages is more than the limit of "
                                  f"{self.max_chat_messages} (--max-chat-messages)")
        messages = [(message.role, message.content) for message in request.messages]
        chars = sum(len(role) + len(content) for role, content in messages)  # roles count too
        self._check_size("messages", chars)
        add_generation_prompt = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        if self.template_workers is not None and isinstance(tokenizer.chat, JinjaChatFormat):
            # A model's own template may do a lot of work on small input: it runs in another process,
            # so that even a hostile one cannot hold this process's GIL (health must keep answering).
            prompt = await self.template_workers.apply(tokenizer.chat, checked_messages(messages),
                                                       add_generation_prompt)
        else:  # Llama 3's ChatFormat (our own code: encodes each message) or no chat format (refused)
            prompt = await self._run(chars, lambda: tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt))
        self.metrics.encoded.inc(len(prompt.token_ids))
        return tokenizer_pb2.ApplyChatTemplateResponse(token_ids=prompt.token_ids, text=prompt.text)

    async def GetTokenizerInfo(self, request: tokenizer_pb2.GetTokenizerInfoRequest,
                               context: grpc.aio.ServicerContext) -> Any:
        tokenizer = self._ready()
        return tokenizer_pb2.GetTokenizerInfoResponse(
            vocab_size=tokenizer.vocab_size,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stop_token_ids=tokenizer.stop_token_ids,
            special_tokens=tokenizer.special_tokens,
            chat_format=tokenizer.chat_format,
            name=tokenizer.name,
            add_bos_token=tokenizer.add_bos_token,
        )

    async def GetVocabulary(self, request: tokenizer_pb2.GetVocabularyRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[tokenizer_pb2.GetVocabularyResponse]:
        self._ready()
        for chunk in self.vocabulary:
            yield chunk
