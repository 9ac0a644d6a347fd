"""What the completion pipeline needs from its upstreams, as plain Python.

``upstream.py`` implements these over gRPC (protobuf stays there and in ``servicer.py``); the unit
tests implement them in-process. Finish reasons travel as the proto enum's value name
(``FINISH_REASON_STOP``, ...), so the numbers are written only in ``common.proto``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .request import ChatMessage, CompletionRequest

FINISH_STOP_SEQUENCE = "FINISH_REASON_STOP_SEQUENCE"


class Deadline:
    """What is left of the caller's deadline, for each upstream call (None: no deadline)."""

    def __init__(self, seconds: float | None) -> None:
        self._at = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        if self._at is None:
            return None
        return max(self._at - time.monotonic(), 0.001)


@dataclass
class Candidate:
    token_id: int
    logprob: float
    text: str = ""


@dataclass
class ModelChunk:
    """One message of the model service's Generate stream."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[Candidate]]
    finish_reason: str = ""  # a FinishReason name; "" until the last message
    generated_tokens: int = 0  # usage, last message only
    cached_prompt_tokens: int = 0  # usage, last message only: prompt tokens the model service had cached
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[list[Candidate]] = field(default_factory=list)
    index: int = 0  # which of the request's n completions


@dataclass(frozen=True)
class TokenizerInfo:
    """What the gateway uses of GetTokenizerInfo; ``message`` is the reply as received (GetInfo relays it)."""

    name: str
    vocab_size: int
    stop_token_ids: tuple[int, ...]
    add_bos_token: bool
    message: bytes = b""


@dataclass(frozen=True)
class ModelInfo:
    """What the gateway uses of GetModelInfo; ``message`` is the reply as received."""

    model_name: str
    vocab_size: int
    max_seq_len: int
    stop_token_ids: tuple[int, ...]
    message: bytes = b""


class TextDecoder(Protocol):
    """One incremental decode: each id's text delta (whole UTF-8) in order."""

    async def texts(self, token_ids: Sequence[int]) -> list[str]: ...

    async def finish(self) -> str: ...

    def cancel(self) -> None: ...


class TokenizerUpstream(Protocol):
    name: str
    address: str

    async def encode(self, text: str, add_bos: bool, deadline: Deadline) -> list[int]: ...

    async def apply_chat_template(self, messages: Sequence[ChatMessage], deadline: Deadline) -> list[int]: ...

    async def decode(self, token_ids: Sequence[int], deadline: Deadline) -> str: ...

    async def token_texts(self, token_ids: Sequence[int], deadline: Deadline) -> dict[int, str]: ...

    def decode_stream(self, deadline: Deadline) -> TextDecoder: ...

    async def info(self) -> TokenizerInfo: ...


class GenerationStream(Protocol):
    """A running generation; ``cancel()`` frees the model's cache slot at once."""

    def __aiter__(self) -> AsyncIterator[ModelChunk]: ...

    async def wait_closed(self) -> None: ...

    def cancel(self) -> None: ...


class Admission(Protocol):
    """Room held on the model service for one request's sequences, until ``release()`` (idempotent)."""

    def release(self) -> None: ...


class ModelUpstream(Protocol):
    name: str
    address: str

    async def admit(self, n: int) -> Admission:
        """Room for ``n`` sequences, or ResourceExhausted at once (before the prompt is tokenised)."""
        ...

    def generate(self, request_id: str, prompt_token_ids: list[int], request: CompletionRequest,
                 extra_stop_token_ids: Sequence[int], deadline: Deadline, admission: Admission) -> GenerationStream:
        """Start the generation on the replica the routing picks; the stream gives ``admission`` back."""
        ...

    async def info(self) -> ModelInfo: ...
