"""Stop sequences matched on streamed text, across delta boundaries.

Text arrives in deltas ("Hel", "lo\nWor", ...). Text that could still be the start of a stop
sequence is held back until the next deltas decide it: either the stop sequence completes (the held
text is dropped, generation ends) or it cannot any more (the text is released). Released text is
therefore never part of a stop sequence, and nothing is held longer than the longest stop sequence
minus one character.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    stop_sequence: str
    start: int  # offset of the match in all text fed so far


class StopSequenceMatcher:
    """Feed text deltas; get back the text that is safe to show, and the match once one completes.

    Generation ends at the first stop sequence to complete; when several complete at the same
    character, the one that starts first wins (it returns the least text).
    """

    def __init__(self, stop_sequences: Sequence[str]) -> None:
        if any(not stop for stop in stop_sequences):
            raise ValueError("stop sequences must be non-empty")
        self.stop_sequences = tuple(dict.fromkeys(stop_sequences))  # dedupe, keep order
        self._prefixes = {stop[:n] for stop in self.stop_sequences for n in range(1, len(stop))}
        self._max_hold = max((len(stop) - 1 for stop in self.stop_sequences), default=0)
        self._pending = ""  # text fed but not released yet
        self._released = 0  # characters released so far
        self.match: StopMatch | None = None

    @property
    def released(self) -> int:
        """How many characters have been released (offset of the first held character)."""
        return self._released

    def feed(self, text: str) -> str:
        """Add ``text``; return what can be released now. After a match, returns "" forever."""
        if self.match is not None:
            return ""
        self._pending += text
        found = self._earliest_match()
        if found is not None:
            start, stop = found
            self.match = StopMatch(stop, self._released + start)
            out, self._pending = self._pending[:start], ""
            self._released += len(out)
            return out
        hold = self._held_suffix_length()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._released += len(out)
        return out

    def pass_through(self, text: str) -> str:
        """Release ``text`` unmatched: it can never be part of a stop sequence (it was generated before
        stopping.min_new_tokens). Only before the first ``feed``."""
        assert not self._pending and self.match is None
        self._released += len(text)
        return text

    def flush(self) -> str:
        """Generation ended without a match: release what was held."""
        if self.match is not None:
            return ""
        out, self._pending = self._pending, ""
        self._released += len(out)
        return out

    def _earliest_match(self) -> tuple[int, str] | None:
        """The stop that completes first (earliest end), the earliest-starting one on a tie.

        Ordering by end makes the answer independent of how the text was cut into deltas.
        """
        best: tuple[int, int, str] | None = None
        for stop in self.stop_sequences:
            start = self._pending.find(stop)
            if start >= 0 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        return None if best is None else (best[1], best[2])

    def _held_suffix_length(self) -> int:
        """Length of the longest suffix of the pending text that is a proper prefix of a stop."""
        for length in range(min(self._max_hold, len(self._pending)), 0, -1):
            if self._pending[-length:] in self._prefixes:
                return length
        return 0
