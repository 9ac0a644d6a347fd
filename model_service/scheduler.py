"""Iteration-level scheduling (Orca): who gets a cache slot, and what each step feeds the model.

Every step is one forward over all sequences holding a slot: one decode token for each sequence
that is generating, plus prompt chunks of newly admitted sequences within a token budget
(``prefill_chunk``). Decode tokens never wait for the budget, so a long prompt costs running streams
at most ``prefill_chunk`` extra tokens per step instead of stalling them for the whole prompt.
Plain Python: no tensors, no threads, no protobuf.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(eq=False)
class Sequence:
    """A request's tokens and where its keys/values live in the cache."""

    tokens: list[int]  # prompt, then the generated tokens
    prompt_len: int
    slot: int = -1  # cache slot while running, -1 while waiting
    num_cached: int = 0  # tokens[:num_cached] have keys/values in the slot
    generated: list[int] = field(default_factory=list)

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prompt_len

    def ready(self) -> bool:
        """May be admitted now (a fork waits for the sequence it forks from to compute the prompt)."""
        return True


@dataclass(frozen=True)
class Work:
    """One sequence's share of a step: ``length`` tokens from position ``start``."""

    seq: Sequence
    start: int
    length: int

    @property
    def completes(self) -> bool:
        """After this step every known token is cached, so the logits predict a new token."""
        return self.start + self.length == len(self.seq.tokens)

    @property
    def token_ids(self) -> list[int]:
        return self.seq.tokens[self.start:self.start + self.length]


class Scheduler:
    """FIFO admission into ``max_batch_size`` cache slots; FIFO prompt chunks within the budget."""

    def __init__(self, max_batch_size: int, prefill_chunk: int) -> None:
        if max_batch_size < 1 or prefill_chunk < 1:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1")
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._free_slots = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget ``seq`` (finished, cancelled or failed); its slot is free for the next step."""
        if seq.slot >= 0:
            self.running.remove(seq)
            self._free_slots.append(seq.slot)
            seq.slot = -1
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def admit(self) -> list[Sequence]:
        """Give free slots to the longest-waiting sequences; return the newly admitted ones."""
        admitted = []
        for seq in list(self.waiting):
            if not self._free_slots:
                break
            if not seq.ready():
                continue
            self.waiting.remove(seq)
            seq.slot = self._free_slots.pop()
            seq.num_cached = 0  # whatever the slot held before is overwritten position by position
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def plan(self) -> list[Work]:
        """This step's work: every decoding sequence's next token, prompt chunks within the budget."""
        work = []
        budget = self.prefill_chunk
        for seq in self.running:
            remaining = len(seq.tokens) - seq.num_cached
            if not seq.prefilling:
                work.append(Work(seq, seq.num_cached, remaining))  # remaining == 1: the last sampled token
            elif budget > 0:
                length = min(remaining, budget)
                budget -= length
                work.append(Work(seq, seq.num_cached, length))
        return work

    @staticmethod
    def advance(work: list[Work]) -> None:
        """The step ran: the fed tokens are in the cache now."""
        for item in work:
            item.seq.num_cached = item.start + item.length
