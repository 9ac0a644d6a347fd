"""A completion request as plain Python, and the checks it must pass before any upstream call.

Error messages start with the field as a grpcurl user writes it (``sampling.top_p``,
``messages[2].role``) and say what is allowed, so a caller can fix the request without reading code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_grpc_runtime.errors import InvalidArgument
from model_files.chat import ROLES
from model_service.options import Constraint, check_n, check_output, check_sampling, check_stopping


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None  # None: the model service default (0.6)
    top_p: float | None = None  # None: 0.9
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Stopping:
    max_new_tokens: int = 0  # 0: the model service default
    stop_sequences: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    strict_context_limit: bool = False
    min_new_tokens: int = 0  # stop tokens and stop sequences are ignored until this many were generated
    time_limit_ms: int = 0
    truncate_prompt_tokens: int = 0  # the gateway keeps the last N prompt tokens


@dataclass(frozen=True)
class Output:
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    sampling: Sampling = field(default_factory=Sampling)
    stopping: Stopping = field(default_factory=Stopping)
    output: Output = field(default_factory=Output)
    n: int = 1  # completions of the prompt
    constraint: Constraint | None = None  # structured output (compiled and enforced by the model service)


@dataclass(frozen=True)
class Limits:
    """What the gateway accepts (flags), and what the served model allows (from GetModelInfo)."""

    max_stop_sequences: int = 16
    max_stop_sequence_chars: int = 256
    max_stop_token_ids: int = 64
    max_messages: int = 256
    max_prompt_chars: int = 1_000_000  # prompt, or all messages' roles and content
    max_echo_top_logprobs: int = 65_536  # prompt tokens x top_logprobs when echo asks for them
    vocab_size: int = 0  # 0: unknown, token ids are not range-checked here
    max_seq_len: int = 0  # 0: unknown, prompt length is left to the model service


def validate_input(prompt: str, messages: tuple[ChatMessage, ...], *, text_field: str = "prompt") -> None:
    """Exactly one of text / messages, non-empty, with known roles."""
    if prompt and messages:
        raise InvalidArgument(text_field, f"set exactly one of {text_field} and messages, not both")
    if not prompt and not messages:
        raise InvalidArgument(text_field, f"empty input: set {text_field} (text) or messages (chat)")
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{index}].role",
                                  f"unknown role {message.role[:40]!r}; use one of {', '.join(ROLES)}")


def validate(request: CompletionRequest, limits: Limits) -> None:
    """Raise ``InvalidArgument`` naming the first field that is wrong."""
    _validate_size(request, limits)
    validate_input(request.prompt, request.messages)
    sampling = request.sampling
    # The ranges are model_service.options', which the model service checks too.
    check_sampling(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                   repetition_penalty=sampling.repetition_penalty, seed=sampling.seed, min_p=sampling.min_p,
                   presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                   logit_bias=sampling.logit_bias, vocab_size=limits.vocab_size)
    _validate_stopping(request.stopping, limits)
    check_output(top_logprobs=request.output.top_logprobs)
    check_n(request.n)
    if request.constraint is not None:
        request.constraint.check()


def _validate_size(request: CompletionRequest, limits: Limits) -> None:
    """Before anything else reads the input: how much of it there is."""
    if len(request.messages) > limits.max_messages:
        raise InvalidArgument("messages", f"{len(request.messages)} messages, at most {limits.max_messages} allowed "
                              "(--max-messages)")
    chars = len(request.prompt) + sum(len(message.role) + len(message.content) for message in request.messages)
    if chars > limits.max_prompt_chars:
        raise InvalidArgument("messages" if request.messages else "prompt",
                              f"{chars} characters, at most {limits.max_prompt_chars} allowed (--max-prompt-chars)")
    if len(request.stopping.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidArgument("stopping.stop_token_ids", f"{len(request.stopping.stop_token_ids)} ids, at most "
                              f"{limits.max_stop_token_ids} allowed (--max-stop-token-ids)")


def _validate_stopping(stopping: Stopping, limits: Limits) -> None:
    check_stopping(max_new_tokens=stopping.max_new_tokens, min_new_tokens=stopping.min_new_tokens,
                   time_limit_ms=stopping.time_limit_ms, truncate_prompt_tokens=stopping.truncate_prompt_tokens)
    stops = stopping.stop_sequences
    if len(stops) > limits.max_stop_sequences:
        raise InvalidArgument("stopping.stop_sequences",
                              f"{len(stops)} stop sequences, at most {limits.max_stop_sequences} allowed")
    for index, stop in enumerate(stops):
        if not stop:
            raise InvalidArgument(f"stopping.stop_sequences[{index}]", "must not be empty")
        if len(stop) > limits.max_stop_sequence_chars:
            raise InvalidArgument(f"stopping.stop_sequences[{index}]",
                                  f"{len(stop)} characters, at most {limits.max_stop_sequence_chars} allowed")
    for index, token_id in enumerate(stopping.stop_token_ids):
        if token_id < 0 or (limits.vocab_size and token_id >= limits.vocab_size):
            bound = f"[0, {limits.vocab_size})" if limits.vocab_size else ">= 0"
            raise InvalidArgument(f"stopping.stop_token_ids[{index}]", f"token id {token_id} outside the vocabulary {bound}")


def validate_prompt_length(prompt_tokens: int, request: CompletionRequest, limits: Limits) -> None:
    """The prompt must leave room for at least one generated token (or all of max_new_tokens when strict);
    echoed top logprobs (a text lookup per candidate) are bounded."""
    output = request.output
    if output.echo and prompt_tokens * output.top_logprobs > limits.max_echo_top_logprobs:
        raise InvalidArgument("output.top_logprobs", f"echo with top_logprobs {output.top_logprobs} over a prompt of "
                              f"{prompt_tokens} tokens is {prompt_tokens * output.top_logprobs} candidates, at most "
                              f"{limits.max_echo_top_logprobs} allowed (--max-echo-top-logprobs)")
    if not limits.max_seq_len:
        return
    stopping = request.stopping
    if prompt_tokens >= limits.max_seq_len:
        field_name = "prompt" if request.prompt else "messages"
        raise InvalidArgument(field_name, f"the prompt is {prompt_tokens} tokens; the model's context is "
                                        f"{limits.max_seq_len} tokens and must also fit at least one new token")
    if stopping.strict_context_limit and prompt_tokens + stopping.max_new_tokens > limits.max_seq_len:
        raise InvalidArgument("stopping.max_new_tokens",
                              f"prompt {prompt_tokens} tokens + max_new_tokens {stopping.max_new_tokens} = "
                              f"{prompt_tokens + stopping.max_new_tokens} exceeds the model's context of "
                              f"{limits.max_seq_len} tokens (strict_context_limit is set)")
