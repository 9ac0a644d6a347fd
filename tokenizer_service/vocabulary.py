"""``Vocabulary``: everything needed to run a tokenizer with tiktoken, whatever file it came from."""

from __future__ import annotations

from dataclasses import dataclass, field

from model_files.chat import NO_CHAT_FORMAT


class UnsupportedTokenizer(ValueError):
    """The files describe a tokenizer this service cannot run exactly (it refuses instead of guessing)."""


@dataclass
class Vocabulary:
    name: str
    pattern: str  # the pre-tokenizer regex (patterns.py)
    mergeable_ranks: dict[bytes, int]
    special_tokens: dict[str, int]
    bos_token_id: int  # -1: none
    eos_token_id: int
    stop_token_ids: list[int]
    chat_format: str = NO_CHAT_FORMAT  # model_files.chat: "llama3", "jinja" (chat_template) or "none"
    chat_template: str | None = None  # Jinja source, for the "jinja" chat format
    # Meta's reference cuts input into 400k-char pieces and 25k-char runs; HF/llama.cpp do not.
    meta_chunking: bool = False
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = True  # a plain text prompt starts with BOS (text completion)
    extra: dict[str, str] = field(default_factory=dict)  # more template variables (unk_token, ...)

    @property
    def vocab_size(self) -> int:
        return max(max(self.mergeable_ranks.values()), max(self.special_tokens.values(), default=-1)) + 1
