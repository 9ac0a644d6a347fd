"""Token ids -> text: the one rule the tokenizer service and the gateway both decode by.

Every tokenizer this project runs is byte-level BPE through tiktoken, so a token is a run of bytes
and decoding is concatenation: ``Decode(ids)`` is each id's bytes joined, read as UTF-8 with bad or
unfinished sequences as U+FFFD (as Meta's reference does). Special tokens decode to their text unless
skipped. A stream of ids decodes to whole characters only: a character split over tokens is held back
until its last byte arrives, and the deltas joined equal ``Decode`` of all the ids.

The tokenizer service decodes with tiktoken; the gateway decodes generated tokens itself from a
``TokenTable`` (every id's bytes, which the tokenizer service sends once: ``GetVocabulary``), so a
generated token costs no call to the tokenizer. Both use ``StreamDecoder`` and ``check_token_ids``.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Collection, Sequence
from collections.abc import Set as AbstractSet

from llama_grpc_runtime.errors import InvalidArgument


def check_token_ids(ids: Sequence[int], vocab_size: int, holes: AbstractSet[int], field: str = "token_ids") -> None:
    """INVALID_ARGUMENT naming the first id that is outside the vocabulary or that no token has."""
    if not ids:
        return
    if min(ids) < 0 or max(ids) >= vocab_size or (holes and not holes.isdisjoint(ids)):
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size or token_id in holes:
                raise InvalidArgument(f"{field}[{index}]", f"token id {token_id} is not in the vocabulary "
                                      f"(0..{vocab_size - 1})")


class StreamDecoder:
    """Decodes ids as they arrive; ``push`` returns only whole UTF-8 text. A character split over
    tokens is held back until its last byte arrives. ``push``... + ``flush()`` == ``decode(all)``."""

    def __init__(self, decode_bytes: Callable[[Sequence[int]], bytes]) -> None:
        self._decode_bytes = decode_bytes
        # The incremental decoder replaces bad bytes exactly as a one-shot decode(errors="replace").
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        return self._utf8.decode(self._decode_bytes(ids), final=False)

    def push_each(self, ids: Sequence[int]) -> list[str]:
        """Each id's own delta, in order (stop sequences are cut at token boundaries)."""
        return [self.push((token_id,)) for token_id in ids]

    def flush(self) -> str:
        """The end of the stream: an incomplete character left over becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


class TokenTable:
    """A vocabulary as the bytes each id decodes to (special tokens: their text, UTF-8).

    ``token_bytes[i]`` empty means no token has id ``i`` (a hole in the vocabulary): decoding it is
    refused, as the tokenizer service refuses it.
    """

    def __init__(self, token_bytes: Sequence[bytes], special_ids: Collection[int]) -> None:
        self.token_bytes = list(token_bytes)
        self.vocab_size = len(self.token_bytes)
        self.special_ids = frozenset(special_ids)
        outside = sorted(i for i in self.special_ids if not 0 <= i < self.vocab_size)
        if outside:
            raise ValueError(f"special token ids {outside[:8]} are outside the table of {self.vocab_size} tokens")
        self.holes = frozenset(i for i, raw in enumerate(self.token_bytes) if not raw)

    def decode_bytes(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> bytes:
        check_token_ids(ids, self.vocab_size, self.holes)
        table = self.token_bytes
        if skip_special_tokens:
            return b"".join(table[i] for i in ids if i not in self.special_ids)
        return b"".join(table[i] for i in ids)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(lambda ids: self.decode_bytes(ids, skip_special_tokens=skip_special_tokens))
