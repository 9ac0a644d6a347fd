"""Byte-level BPE (GPT-2 style), as GGUF files and Hugging Face ``tokenizer.json`` store it.

Both store tokens as GPT-2's printable stand-ins for bytes ("Ġ" for a space) plus a merge list.
tiktoken wants ``bytes -> rank`` and merges greedily by rank, so the strings are turned back into
bytes and each token's id serves as its rank. That is only right when merge results rise in id
in merge order (measured true for SmolLM2 and Llama 3); ``check_rank_order`` refuses a vocabulary
where it is not, rather than tokenizing it subtly wrong.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from .vocabulary import UnsupportedTokenizer


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
