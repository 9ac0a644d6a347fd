"""Shaping the response: generated tokens and their texts -> the chunks a caller receives.

Every token gets its own text from the tokenizer's incremental decoder, so a stop sequence is
found at the token that completes it, whatever chunks the model sent: the joined output does not
depend on timing, which is why unary ``Generate`` equals the joined ``GenerateStream``.

A token is returned with the delta that releases the last of its text. Tokens with no text of
their own (the first bytes of a character split over tokens, a skipped special token) go out with
the next token that has text, or at the end. When a stop sequence matches, the tokens whose text
reaches into it are not returned and ``usage.generated_tokens`` counts the tokens up to and
including the one that completed it: what the model generated for this answer.

Plain Python, no I/O: ``ResponseShaper`` is fed what the upstreams returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .interfaces import FINISH_STOP_SEQUENCE, Candidate, ModelChunk
from .stops import StopSequenceMatcher


@dataclass
class Echo:
    """The prompt as the model saw it (output.echo)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[Candidate]]


@dataclass
class Finish:
    """The end of one completion."""

    reason: str  # a llama.common.v1.FinishReason value name
    prompt_tokens: int
    generated_tokens: int  # this completion's
    stop_sequence: str = ""


@dataclass
class Usage:
    """On the last chunk of a request: the prompt once, and every completion's generated tokens."""

    prompt_tokens: int
    generated_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, served from the model service's prefix cache


@dataclass
class Chunk:
    """What one streamed response carries."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[Candidate]] = field(default_factory=list)
    echo: Echo | None = None
    finish: Finish | None = None
    index: int = 0  # which of the request's n completions
    usage: Usage | None = None

    def is_empty(self) -> bool:
        return not (self.text or self.token_ids or self.echo or self.finish or self.usage)


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


class ResponseShaper:
    """One completion's text, tokens and finish, built chunk by chunk."""

    def __init__(self, stop_sequences: Sequence[str], prompt_tokens: int, min_new_tokens: int = 0) -> None:
        self.matcher = StopSequenceMatcher(stop_sequences)
        self.held = _HeldTokens()
        self.prompt_tokens = prompt_tokens
        self.min_new_tokens = min_new_tokens  # stop sequences are looked for only in text after these tokens
        self.generated = 0

    @property
    def stopped(self) -> bool:
        """A stop sequence matched: the model's stream is no longer needed."""
        return self.matcher.match is not None

    def add(self, model_chunk: ModelChunk, texts: Sequence[str], tops: Sequence[list[Candidate]],
            chunk: Chunk) -> None:
        """Feed one model chunk (each token's text, its top candidates with text) into ``chunk``."""
        for index, (token_id, text) in enumerate(zip(model_chunk.token_ids, texts, strict=True)):
            self.generated += 1
            if self.generated <= self.min_new_tokens:
                chunk.text += self.matcher.pass_through(text)
            else:
                chunk.text += self.matcher.feed(text)
            self.held.add(token_id, text,
                          model_chunk.logprobs[index] if index < len(model_chunk.logprobs) else None,
                          tops[index] if index < len(tops) else None)
            if self.stopped:
                break
            self.held.release(self.matcher.released, chunk)
        if self.stopped:
            self._finish_on_stop_sequence(chunk)

    def end(self, tail_text: str, reason: str, model_generated_tokens: int, chunk: Chunk) -> None:
        """The model finished; ``tail_text`` is what the decoder still held (an unfinished character)."""
        chunk.text += self.matcher.feed(tail_text)
        if self.stopped:
            self._finish_on_stop_sequence(chunk)
            return
        chunk.text += self.matcher.flush()
        self.held.release(None, chunk)
        chunk.finish = Finish(reason, self.prompt_tokens, model_generated_tokens or self.generated)

    def _finish_on_stop_sequence(self, chunk: Chunk) -> None:
        match = self.matcher.match
        assert match is not None
        self.held.release(match.start, chunk)
        chunk.finish = Finish(FINISH_STOP_SEQUENCE, self.prompt_tokens, self.generated, match.stop_sequence)
