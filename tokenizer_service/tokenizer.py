"""The tokenizer core: tiktoken over a ``Vocabulary``: encode, decode, streaming decode.

Chat formats are built on top of it (``chat.py``, as Meta's ``ChatFormat(tokenizer)``); it knows
nothing of them.

Plain Python in, plain Python out (no protobuf); bad input raises ``InvalidArgument`` naming the field.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from functools import lru_cache, partial

import regex
import tiktoken

from llama_grpc_runtime.errors import InvalidArgument
from model_files.detokenize import StreamDecoder, check_token_ids

from .patterns import GPT2_PATTERN, LLAMA3_PATTERN, SMOLLM_PATTERN
from .vocabulary import Vocabulary

# Meta's reference: "The tiktoken tokenizer can handle <=400k chars without pyo3_runtime.PanicException"
# and https://github.com/openai/tiktoken/issues/195 for runs of (non-)whitespace.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
# Pre-tokenizers for which split_at_word_gaps is exact (checked by the tests, pattern by pattern).
WORD_GAP_PATTERNS = (LLAMA3_PATTERN, GPT2_PATTERN, SMOLLM_PATTERN)


def split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Meta's ``_split_whitespaces_or_nonwhitespaces``, verbatim: pieces with no run of more than
    ``max_consecutive_slice_len`` whitespace or non-whitespace characters."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive_slice_len:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


@lru_cache
def _run_from(length: int) -> re.Pattern[str]:
    """Matches where a run of at least ``length`` same-class characters starts (``re``'s ``\\s`` is
    ``str.isspace``, the reference's test)."""
    return re.compile(rf"\s{{{length}}}|\S{{{length}}}")


def cut_long_runs(text: str, limit: int = MAX_NO_WHITESPACES_CHARS) -> Sequence[str] | Iterator[str]:
    """What ``split_whitespaces_or_nonwhitespaces`` yields, without its per-character Python loop for
    the usual text with no long run.

    A run of more than ``limit`` characters covers a checkpoint (every ``step`` characters) within
    ``step - 1`` of its start, and goes on from there for at least ``limit + 2 - step`` characters.
    So when no checkpoint starts such a stretch there is no long run, and the reference yields the
    text whole; otherwise the reference's own loop decides. A few anchored matches per 100 KB.
    """
    step = (limit + 1) // 2
    stretch = _run_from(limit + 2 - step)
    if any(stretch.match(text, checkpoint) for checkpoint in range(0, len(text), step)):
        return split_whitespaces_or_nonwhitespaces(text, limit)
    return (text,)


def split_at_word_gaps(text: str, size: int) -> list[str]:
    """``text`` cut into parts of about ``size`` characters, each cut just before a space that has a
    letter on both sides. For the pre-tokenizer patterns in ``WORD_GAP_PATTERNS`` that position is
    always a piece boundary: no alternative matches a letter followed by a space, and nothing before
    it looks past the space (there is no lookbehind; the lookaheads only follow whitespace), so the
    parts tokenize exactly as the whole does.
    """
    parts = []
    start = 0
    while len(text) - start > size:
        cut = text.find(" ", start + size)
        while cut != -1 and not (text[cut - 1].isalpha() and text[cut + 1:cut + 2].isalpha()):
            cut = text.find(" ", cut + 1)
        if cut == -1:
            break
        parts.append(text[start:cut])
        start = cut
    parts.append(text[start:])
    return parts


class Tokenizer:
    def __init__(self, vocab: Vocabulary) -> None:
        self.name = vocab.name
        self.vocab_size = vocab.vocab_size
        self.bos_token_id = vocab.bos_token_id
        self.add_bos_token = vocab.add_bos_token
        self.eos_token_id = vocab.eos_token_id
        self.stop_token_ids = list(vocab.stop_token_ids)
        self.special_tokens = dict(vocab.special_tokens)
        self._special_ids = frozenset(self.special_tokens.values())
        self._meta_chunking = vocab.meta_chunking
        self._encoding_args = {"name": vocab.name, "pat_str": vocab.pattern,
                               "mergeable_ranks": vocab.mergeable_ranks, "special_tokens": vocab.special_tokens}
        self._per_thread = threading.local()
        self.encoding()  # builds (and so validates) the vocabulary now, not on first use
        known = set(vocab.mergeable_ranks.values()) | self._special_ids
        self._holes = frozenset(range(self.vocab_size)) - known  # ids no token has (tiktoken cannot decode)
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        # Bytes with no token of their own make tiktoken panic; Hugging Face drops them from each
        # pre-tokenized piece, and so do we (slowly, only for text that has them).
        missing = bytes(b for b in range(256) if bytes([b]) not in vocab.mergeable_ranks)
        self._missing_bytes = missing
        self._has_missing = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in missing) + b"]").search \
            if missing else None
        self._pieces = regex.compile(vocab.pattern)
        self._word_gaps_are_boundaries = vocab.pattern in WORD_GAP_PATTERNS

    def encoding(self) -> tiktoken.Encoding:
        """This thread's tiktoken ``Encoding``. Measured: an Encoding's regex runs ~25% slower in
        every thread but the first one that used it, so each thread gets its own copy (~36 MB for
        Llama 3; built in ~0.1 s on a thread's first call)."""
        encoding = getattr(self._per_thread, "encoding", None)
        if encoding is None:
            encoding = self._per_thread.encoding = tiktoken.Encoding(**self._encoding_args)
        return encoding

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size})"

    # --- encode --------------------------------------------------------------------------------
    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Text -> ids. Special-token text is ordinary text unless ``allow_special``."""
        ids: list[int] = []
        for part in self.encode_plan(text, add_bos=add_bos, add_eos=add_eos, allow_special=allow_special):
            if isinstance(part, int):
                ids.append(part)
            else:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_plan(self, text: str, *, add_bos: bool = False, add_eos: bool = False, allow_special: bool = False,
                    split_chars: int | None = None) -> list[str | int]:
        """``encode``'s work as independent parts: ids (BOS, EOS, allowed special tokens) and runs of
        ordinary text, where ``encode_ordinary`` of each run, concatenated, is ``encode(text)``.

        With ``split_chars``, runs longer than that are also cut at word gaps (letter, space,
        letter), which are piece boundaries of the pre-tokenizer whatever surrounds them, so the
        parts can be encoded in parallel with the same result.
        """
        if not isinstance(text, str):
            raise InvalidArgument("text", f"must be a string, not {type(text).__name__}")
        plan: list[str | int] = []
        if add_bos:
            if self.bos_token_id < 0:
                raise InvalidArgument("add_bos", f"{self.name} has no BOS token")
            plan.append(self.bos_token_id)
        for chunk in self._chunks(text):
            position = 0
            if allow_special and self._special_pattern is not None:
                for match in self._special_pattern.finditer(chunk):
                    plan.append(chunk[position:match.start()])
                    plan.append(self.special_tokens[match.group()])
                    position = match.end()
            plan.append(chunk[position:])
        if add_eos:
            plan.append(self.eos_token_id)
        if split_chars and self._word_gaps_are_boundaries:
            plan = [piece for part in plan
                    for piece in (split_at_word_gaps(part, split_chars) if isinstance(part, str) else (part,))]
        return [part for part in plan if part != ""]

    def _chunks(self, text: str) -> Iterator[str]:
        if not self._meta_chunking:
            yield text
            return
        for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            yield from cut_long_runs(text[start:start + TIKTOKEN_MAX_ENCODE_CHARS])

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text, with no chunking (a run from ``encode_plan``)."""
        if not text:
            return []
        if self._has_missing is None or not self._has_missing(text.encode("utf-8", "surrogatepass")):
            return self.encoding().encode_ordinary(text)
        ids: list[int] = []
        encoding = self.encoding()
        for piece in self._pieces.findall(text):
            raw = piece.encode("utf-8", "surrogatepass").translate(None, self._missing_bytes)
            if raw:
                ids.extend(encoding._encode_single_piece(raw))
        return ids

    # --- decode --------------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[int], field: str = "token_ids") -> None:
        check_token_ids(ids, self.vocab_size, self._holes, field)

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        self.check_ids(ids)
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in self._special_ids]
        return self.encoding().decode_bytes(list(ids))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """Ids -> text; bytes that are not whole UTF-8 read as U+FFFD, as in the reference."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(partial(self.decode_bytes, skip_special_tokens=skip_special_tokens))

    def token_bytes(self) -> list[bytes]:
        """Every id's bytes, in id order, as ``decode_bytes`` joins them (special tokens: their text);
        empty for an id no token has. What ``GetVocabulary`` sends (``model_files.detokenize.TokenTable``)."""
        encoding = self.encoding()
        return [b"" if token_id in self._holes else encoding.decode_single_token_bytes(token_id)
                for token_id in range(self.vocab_size)]

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

