"""Byte-level BPE vocabularies (GPT-2 style) from a GGUF file or a Hugging Face ``tokenizer.json``.

Both store tokens as GPT-2's printable stand-ins for bytes ("Ġ" for a space) plus a merge list.
tiktoken wants ``bytes -> rank`` and merges greedily by rank, so the strings are turned back into
bytes and each token's id serves as its rank. That is only right when merge results rise in id
in merge order (measured true for SmolLM2 and Llama 3); ``check_rank_order`` refuses a vocabulary
where it is not, rather than tokenizing it subtly wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache

# Pre-tokenizer regexes, by the name llama.cpp writes to ``tokenizer.ggml.pre``.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's tokenizer.json runs Digits(individual_digits) then GPT-2's ByteLevel regex; this single
# pattern reproduces that pair exactly (the digits split is why a space before a digit stands alone).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_TOKENIZERS = {
    "default": GPT2_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
}


class UnsupportedTokenizer(ValueError):
    """The files describe a tokenizer this service cannot run exactly (it refuses instead of guessing)."""


@cache
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable bytes stand for themselves, the other 68
    bytes map to U+0100.. in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def token_bytes(token: str) -> bytes:
    table = unicode_to_byte()
    try:
        return bytes(table[char] for char in token)
    except KeyError as exc:
        raise UnsupportedTokenizer(f"token {token!r} is not byte-level BPE (character {exc} has no byte)") from None


@dataclass
class Vocabulary:
    """Everything needed to run a tokenizer with tiktoken, whatever file it came from."""

    name: str
    pattern: str
    mergeable_ranks: dict[bytes, int]
    special_tokens: dict[str, int]
    bos_token_id: int
    eos_token_id: int
    stop_token_ids: list[int]
    chat_template: str | None = None  # Jinja source; None: Meta's Llama 3 ChatFormat
    # Meta's reference cuts input into 400k-char pieces and 25k-char runs; HF/llama.cpp do not.
    meta_chunking: bool = False
    bos_token: str = ""
    eos_token: str = ""
    add_bos_token: bool = True  # a plain text prompt starts with BOS (text completion)
    extra: dict[str, str] = field(default_factory=dict)  # more template variables (unk_token, ...)

    @property
    def vocab_size(self) -> int:
        return max(max(self.mergeable_ranks.values()), max(self.special_tokens.values(), default=-1)) + 1


def check_rank_order(merges: Iterable[str | list[str]], token_ids: dict[str, int], source: str) -> None:
    """Refuse a vocabulary whose merge results do not rise in id (rank = id would be wrong)."""
    previous = -1
    for index, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = token_ids.get(left + right)
        if merged is None:
            raise UnsupportedTokenizer(f"{source}: merge {index} ({left!r} {right!r}) makes a token not in the vocab")
        if merged <= previous:
            raise UnsupportedTokenizer(
                f"{source}: merge {index} makes id {merged} after id {previous}; tiktoken needs merge "
                "results in rising id order")
        previous = merged


def split_vocab(tokens: list[str], special_ids: set[int]) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ordinary tokens -> tiktoken's ``bytes -> rank``; special/control tokens -> ``text -> id``.

    Special tokens stay out of the mergeable ranks so that no run of ordinary text can merge into one.
    """
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token_id in special_ids:
            specials[token] = token_id
            continue
        raw = token_bytes(token)
        if raw in ranks:
            raise UnsupportedTokenizer(f"tokens {ranks[raw]} and {token_id} are the same bytes {raw!r}")
        ranks[raw] = token_id
    return ranks, specials
