"""What a generation request may ask for: the ranges, the limits and the checks, in one place.

The model service (``engine.py``, ``sampling.py``) and the gateway (``gateway/request.py``) both
validate with these functions, so a request the gateway lets through is one the model service
accepts, and both say the same thing about one that is wrong. Torch-free: the gateway imports it.

Every error is ``InvalidArgument`` whose message starts with the field as a grpcurl user writes it
(``sampling.min_p``) and gives the allowed range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from llama_grpc_runtime.errors import InvalidArgument

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
MAX_TOP_LOGPROBS = 20
MAX_N = 16  # completions per request
PENALTY_LIMIT = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # each bias lies in [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_SEED = 2**64  # seeds are uint64
# Dividing or multiplying logits by the penalty: within these bounds a float32 logit cannot overflow.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)
CONSTRAINT_KINDS = ("json_schema", "regex", "grammar", "choice")
MAX_CONSTRAINT_CHARS = 64 * 1024  # a schema, regex or grammar; or all choices together
MAX_CHOICES = 1024

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "min_p", "presence_penalty",
                    "frequency_penalty", "logit_bias")
STOPPING_OPTIONS = ("max_new_tokens", "stop_token_ids", "strict_context_limit", "min_new_tokens", "time_limit_ms",
                    "truncate_prompt_tokens")


def check_sampling(*, temperature: float | None = None, top_p: float | None = None, top_k: int = 0,
                   repetition_penalty: float | None = None, seed: int | None = None, min_p: float | None = None,
                   presence_penalty: float | None = None, frequency_penalty: float | None = None,
                   logit_bias: Mapping[int, float] | None = None, vocab_size: int = 0) -> None:
    """None: unset (the default applies). ``vocab_size`` 0: token ids are only checked to be >= 0."""
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_p is not None and not (0 < top_p <= 1):  # NaN fails both comparisons
        raise InvalidArgument("sampling.top_p", f"must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0 (0: off), got {top_k}")
    low, high = REPETITION_PENALTY_RANGE
    if repetition_penalty is not None and not low <= repetition_penalty <= high:  # also refuses NaN
        raise InvalidArgument("sampling.repetition_penalty",
                              f"must lie in [{low:g}, {high:g}] (1 turns it off), got {repetition_penalty}")
    if seed is not None and not 0 <= seed < MAX_SEED:
        raise InvalidArgument("sampling.seed", f"must fit in 64 unsigned bits, got {seed}")
    if min_p is not None and not 0 <= min_p <= 1:
        raise InvalidArgument("sampling.min_p", f"must lie in [0, 1] (0: off), got {min_p}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
            raise InvalidArgument(f"sampling.{name}", f"must lie in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}] (0: off), "
                                  f"got {value}")
    if logit_bias:
        if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgument("sampling.logit_bias",
                                  f"{len(logit_bias)} entries, at most {MAX_LOGIT_BIAS_ENTRIES} allowed")
        for token_id, bias in logit_bias.items():
            if token_id < 0 or (vocab_size and token_id >= vocab_size):
                bound = f"[0, {vocab_size})" if vocab_size else ">= 0"
                raise InvalidArgument(f"sampling.logit_bias[{token_id}]", f"token id outside the vocabulary {bound}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidArgument(f"sampling.logit_bias[{token_id}]",
                                      f"bias must lie in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")


def check_stopping(*, max_new_tokens: int = 0, min_new_tokens: int = 0, time_limit_ms: int = 0,
                   truncate_prompt_tokens: int = 0) -> None:
    if max_new_tokens < 0:
        raise InvalidArgument("stopping.max_new_tokens", f"must be >= 0 (0: the default), got {max_new_tokens}")
    if min_new_tokens < 0:
        raise InvalidArgument("stopping.min_new_tokens", f"must be >= 0 (0: off), got {min_new_tokens}")
    if max_new_tokens and min_new_tokens > max_new_tokens:
        raise InvalidArgument("stopping.min_new_tokens", f"must be at most max_new_tokens ({max_new_tokens}), "
                              f"got {min_new_tokens}")
    if time_limit_ms < 0:
        raise InvalidArgument("stopping.time_limit_ms", f"must be >= 0 (0: no limit), got {time_limit_ms}")
    if truncate_prompt_tokens < 0:
        raise InvalidArgument("stopping.truncate_prompt_tokens",
                              f"must be >= 0 (0: keep the whole prompt), got {truncate_prompt_tokens}")


def check_output(*, top_logprobs: int = 0) -> None:
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument("output.top_logprobs", f"must lie in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs}")


def check_n(n: int) -> None:
    if not 0 <= n <= MAX_N:
        raise InvalidArgument("n", f"must lie in [1, {MAX_N}] (0 or unset: 1), got {n}")


@dataclass(frozen=True)
class Constraint:
    """Structured output: ``kind`` one of CONSTRAINT_KINDS; ``value`` the schema / regex / grammar text,
    or the choices."""

    kind: str
    value: str | tuple[str, ...]

    @property
    def field(self) -> str:
        return f"constraint.{self.kind}"

    def check(self) -> None:
        """The shape only; whether the schema / regex / grammar compiles is the grammar engine's call."""
        if self.kind not in CONSTRAINT_KINDS:
            raise InvalidArgument("constraint", f"unknown kind {self.kind!r}; use one of {', '.join(CONSTRAINT_KINDS)}")
        if isinstance(self.value, str):
            if not self.value.strip():
                raise InvalidArgument(self.field, "must not be empty")
            size = len(self.value)
        else:
            if not self.value:
                raise InvalidArgument("constraint.choice.choices", "must hold at least one choice")
            if len(self.value) > MAX_CHOICES:
                raise InvalidArgument("constraint.choice.choices",
                                      f"{len(self.value)} choices, at most {MAX_CHOICES} allowed")
            for index, choice in enumerate(self.value):
                if not choice:
                    raise InvalidArgument(f"constraint.choice.choices[{index}]", "must not be empty")
            size = sum(map(len, self.value))
        if size > MAX_CONSTRAINT_CHARS:
            raise InvalidArgument(self.field, f"{size} characters, at most {MAX_CONSTRAINT_CHARS} allowed")


def completion_seed(seed: int | None, index: int) -> int | None:
    """The seed of completion ``index`` of a request seeded with ``seed`` (n > 1).

    Completion 0 keeps the request's seed (so n = 1 is unchanged); the others get SplitMix64 of
    (seed, index): fixed for a given seed, unrelated to each other. Unseeded stays unseeded.
    """
    if seed is None or index == 0:
        return seed
    mask = MAX_SEED - 1
    z = (seed + index * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def constraint_from_message(message: Any) -> Constraint | None:
    """From a ``llama.common.v1.Constraint`` message (its oneof unset -> None)."""
    kind = message.WhichOneof("kind")
    if not kind:
        return None
    value = message.choice.choices if kind == "choice" else getattr(message, kind)
    return Constraint(kind, value if isinstance(value, str) else tuple(value))
