"""Iteration-level scheduling (Orca) over a paged KV cache (vLLM's PagedAttention), with prefix caching.

The scheduler owns every request's state and nothing else does:
- **where it is**: waiting (new, or preempted and waiting to be resumed), running, or finished;
- **its cache**: the KV cache is a pool of ``num_blocks`` blocks of ``block_size`` tokens; each
  running sequence has a *block table* (its i-th block holds positions ``[i*block_size,
  (i+1)*block_size)``), grown a block at a time as its tokens are computed;
- **when it ends**: ``append_token`` applies the stop checks (stop token, max_new_tokens, context).

Each step (``schedule``) is one forward over the running batch: one decode token for every
sequence that is generating, plus prompt chunks within a token budget (``prefill_chunk``), so a
long prompt costs running streams at most that many extra tokens per step. When the pool runs out,
the most recently admitted sequence is *preempted*: its blocks go back to the pool, it returns to the
front of the queue with every token it has, and it is later resumed by recomputing them (its full
blocks are usually still in the prefix cache, so it recomputes little). Greedy output is the same
as without preemption, and a seeded sample too (nothing is sampled twice).

**Prefix cache**: a block whose tokens are all computed is named by a SHA-256 digest of its tokens
and of every token before it (its parent block's digest; ``block_keys``): a cryptographic hash,
since a collision would hand one request another's keys and values (Python's ``hash`` of a tuple of
ints is 64 bits and unkeyed, so colliding prompts could be crafted). A new (or resumed) sequence
reuses every cached full block of its tokens, except that the last known token is always recomputed
(its logits give the next token); blocks are reference-counted, and unreferenced ones stay cached
until the pool needs them, least recently used first. A conversation's next turn therefore reuses
the previous turn's prompt and answer.

**Several completions of one prompt** (``n``): ``add`` the first sequence; in the step in which
its prompt completes (after ``advance``, ``seq.prefilled``), call ``fork(parent, child)`` for each
sibling. A fork shares the parent's full prompt blocks (reference-counted, so they cannot be
evicted meanwhile) and recomputes only the partial last block, whether or not the prefix cache is
on; forks go to the front of the queue, so they join the batch at the next step, at a point that
depends only on the schedule (never on timing), which keeps seeded output reproducible. Their
``cached_prompt_tokens`` counts the shared tokens. ``Engine.submit_group`` does this.

**One run of blocks when alone**: a growing table takes the block after its last one while that is
free (else the lowest free block). A sequence that decodes alone with a table that is not one run
(a prefix hit puts its own blocks after cached ones elsewhere) is moved into one run of free blocks:
its ``Work`` carries ``block_copies`` that the forward makes before writing anything, and the model
then attends over a view of the cache instead of gathering blocks in every layer (``_into_one_run``).

Plain Python: no tensors, no threads, no protobuf.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

# Free blocks after a moved sequence's own, when a run that long is free: room to grow before moving again.
RUN_HEADROOM = 8


class FinishReason(enum.Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP_TOKEN = "stop_token"  # the model's or the caller's stop token (not returned)
    CONTEXT_LIMIT = "context_limit"  # prompt + output filled the context
    CANCELLED = "cancelled"  # the caller went away, or the server is shutting down
    TIME_LIMIT = "time_limit"  # time_limit_ms ran out: the output so far is the answer


class Status(enum.Enum):
    WAITING = "waiting"  # never admitted yet
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting to be resumed (recomputed)
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One generation: its tokens, its stop rules, and (owned by the scheduler) its place in the cache."""

    tokens: list[int]  # prompt, then the generated tokens
    prompt_len: int
    max_new_tokens: int  # stop after this many generated tokens
    stop_ids: frozenset[int] = frozenset()  # stop (without returning it) on any of these
    use_prefix_cache: bool = True  # False when every prompt position must be computed (prompt logprobs)
    # ---- the scheduler's; read-only to everyone else ----
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens[:num_cached] have keys/values in the blocks
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache on first admission
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    _block_keys: list[bytes] = field(default_factory=list, repr=False)  # name of each full block, in order
    _num_registered: int = 0  # leading blocks of block_table already named in the prefix cache

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prefilled(self) -> bool:
        """The whole prompt is in the cache (its first token was sampled)."""
        return self.num_cached >= self.prompt_len


@dataclass(frozen=True)
class Work:
    """One sequence's share of a step: ``length`` tokens from position ``start``, and where its cache is."""

    seq: Sequence
    start: int
    length: int
    token_ids: tuple[int, ...]
    block_table: tuple[int, ...]  # enough blocks for positions [0, start + length)
    # (from, to) blocks whose keys and values the forward copies before anything else (the sequence
    # moved to ``block_table`` this step; ``from`` blocks may be reused after this step, not during it).
    block_copies: tuple[tuple[int, int], ...] = ()

    @property
    def completes(self) -> bool:
        """After this step every known token is cached, so the logits predict a new token."""
        return self.start + self.length == len(self.seq.tokens)


@dataclass(frozen=True)
class StepPlan:
    """What ``schedule`` decided: the forward's work, and who lost their cache this step."""

    work: list[Work]
    admitted: list[Sequence]  # newly admitted or resumed this step
    preempted: list[Sequence]  # sent back to the queue; they recompute their tokens when resumed


def block_keys(tokens: list[int], block_size: int, parents: list[bytes] | None = None) -> list[bytes]:
    """The name of each full block of ``tokens``: SHA-256 of the parent block's name and the block's ids.

    ``parents``: names already known for the leading blocks (extended in place and returned).
    """
    keys = [] if parents is None else parents
    for i in range(len(keys), len(tokens) // block_size):
        digest = hashlib.sha256(keys[-1] if keys else b"")
        digest.update(array("I", tokens[i * block_size:(i + 1) * block_size]).tobytes())
        keys.append(digest.digest())
    return keys


class BlockPool:
    """``num_blocks`` KV-cache blocks: free, held (reference-counted), or cached and unreferenced (LRU)."""

    def __init__(self, num_blocks: int, prefix_cache: bool) -> None:
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        # 1 = free. Bytes, so the lowest free block and the lowest free run are found by ``find`` (C speed).
        self._is_free = bytearray(b"\x01") * num_blocks
        self._num_free = num_blocks
        self.runs_freed = 0  # blocks freed so far: a free run can only have grown when this moved
        self._refs = [0] * num_blocks
        self._key_of: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block name -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; oldest first

    @property
    def available(self) -> int:
        """Blocks an allocation can take now (free ones, then cached ones nobody holds)."""
        return self._num_free + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.available

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """``n`` blocks for a table whose last block is ``after`` (None: a new table).

        Each goes right after the one before it when that block is free, else the lowest free block,
        else the least recently used cached one: a sequence that grows alone keeps its blocks in one
        run, which the model reads as a view of the cache instead of gathering them.
        """
        if n > self.available:
            raise RuntimeError(f"asked for {n} blocks with {self.available} available")
        blocks = []
        for _ in range(n):
            if self._num_free:
                following = self.num_blocks if after is None else after + 1
                block = following if following < self.num_blocks and self._is_free[following] \
                    else self._is_free.find(1)
                self._take_free(block)
            else:
                block, _ = self._evictable.popitem(last=False)  # least recently used
                del self._cached[self._key_of[block]]
                self._key_of[block] = None
            self._refs[block] = 1
            blocks.append(block)
            after = block
        return blocks

    def first_free_run(self, length: int) -> int | None:
        """The first block of the lowest run of ``length`` free blocks (None: there is none).
        ``runs_freed`` says when a search that found none may find one again."""
        start = self._is_free.find(b"\x01" * length)
        return None if start < 0 else start

    def take_run(self, start: int, n: int) -> list[int]:
        """Blocks ``start .. start + n - 1``, all free (from ``first_free_run``)."""
        for block in range(start, start + n):
            if not self._is_free[block]:
                raise RuntimeError(f"block {block} is not free")
            self._take_free(block)
            self._refs[block] = 1
        return list(range(start, start + n))

    def _take_free(self, block: int) -> None:
        self._is_free[block] = 0
        self._num_free -= 1

    def _put_free(self, block: int) -> None:
        self._is_free[block] = 1
        self._num_free += 1
        self.runs_freed += 1

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each; pass a table in reverse so its tail is evicted before its head."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._key_of[block] is not None:
                    self._evictable[block] = None  # most recently used at the end
                else:
                    self._put_free(block)

    def share(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._evictable[block]
        self._refs[block] += 1

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``keys`` (each key names its whole prefix)."""
        hits = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def register(self, block: int, key: bytes) -> None:
        """``block`` is full and holds what ``key`` names; later sequences may reuse it."""
        if self.prefix_cache and key not in self._cached and self._key_of[block] is None:
            self._cached[key] = block
            self._key_of[block] = key

    def reclaimable(self, blocks: list[int]) -> int:
        """How many of ``blocks`` would leave ``available`` if shared (cached ones nobody holds)."""
        return sum(1 for block in blocks if self._refs[block] == 0)


class Scheduler:
    """FIFO admission up to ``max_batch_size`` running sequences and the pool's blocks; FIFO prompt chunks."""

    def __init__(self, max_batch_size: int, prefill_chunk: int, *, num_blocks: int, block_size: int = 16,
                 prefix_cache: bool = True, max_seq_len: int | None = None) -> None:
        if max_batch_size < 1 or prefill_chunk < 1 or num_blocks < 1 or block_size < 1:
            raise ValueError("max_batch_size, prefill_chunk, num_blocks and block_size must be >= 1")
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, prefix_cache)
        # Longest sequence: the context, and never more than the whole pool.
        self.max_seq_len = min(max_seq_len or num_blocks * block_size, num_blocks * block_size)
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # in admission order
        self._no_run_since: int | None = None  # pool.runs_freed when no free run was long enough

    # ---- state, for the engine and metrics -----------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.pool.num_blocks * self.block_size

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_cached_tokens(self) -> int:
        return sum(seq.num_cached for seq in self._running)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._running)

    def sequences(self) -> Iterator[Sequence]:
        """Every unfinished sequence, running ones first (a snapshot: safe to finish them while iterating)."""
        return iter([*self._running, *self._waiting])

    # ---- life cycle ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self._waiting.append(seq)

    def fork(self, parent: Sequence, child: Sequence | None = None, first: bool = True) -> Sequence:
        """A sibling of ``parent`` (same prompt) sharing its full prompt blocks, queued first in line
        (``first=False``: last, as a new arrival).

        Call once ``parent.prefilled`` (e.g. right after the ``advance`` that completed its prompt);
        the sibling recomputes only the prompt's partial last block (at least its last token, whose
        logits start the sibling's own output). ``child``: a new sequence with the parent's prompt and
        its own stop rules (default: a copy of the parent's).
        """
        if parent.status is not Status.RUNNING or not parent.prefilled:
            raise ValueError("fork() needs a running sequence whose prompt is in the cache")
        prompt = parent.tokens[:parent.prompt_len]
        if child is None:
            child = Sequence(tokens=list(prompt), prompt_len=parent.prompt_len, max_new_tokens=parent.max_new_tokens,
                             stop_ids=parent.stop_ids, use_prefix_cache=parent.use_prefix_cache)
        elif child.tokens != prompt or child.status is not Status.WAITING or child.block_table:
            raise ValueError("fork() needs a new sequence whose tokens are the parent's prompt")
        shared = parent.block_table[:(parent.prompt_len - 1) // self.block_size]
        for block in shared:
            self.pool.share(block)
        child.block_table = list(shared)
        child.num_cached = child.cached_prompt_tokens = len(shared) * self.block_size
        child._block_keys = parent._block_keys[:len(shared)]
        child._num_registered = min(parent._num_registered, len(shared))
        if first:
            self._waiting.appendleft(child)
        else:
            self._waiting.append(child)
        return child

    def finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        """Take ``seq`` out (finished, cancelled or failed); its blocks are free for the next step."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self._running.remove(seq)
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._free_blocks(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason

    def append_token(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """A sampled token: stop on it (not kept), or keep it and apply the length limits.

        Returns why the sequence finished (it is already out of the batch), or None.
        """
        reason = None
        if token_id in seq.stop_ids:
            reason = FinishReason.STOP_TOKEN
        else:
            seq.tokens.append(token_id)
            if len(seq.tokens) - seq.prompt_len >= seq.max_new_tokens:
                reason = FinishReason.LENGTH
            elif len(seq.tokens) >= self.max_seq_len:
                reason = FinishReason.CONTEXT_LIMIT
        if reason is not None:
            self.finish(seq, reason)
        return reason

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """This step: every running sequence's next token or chunk (preempting if the pool runs out),
        then new or preempted sequences admitted FIFO while slots, blocks and budget last."""
        budget = self.prefill_chunk
        work: list[Work] = []
        preempted: list[Sequence] = []
        for seq in list(self._running):
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            remaining = len(seq.tokens) - seq.num_cached
            if remaining > 1 and budget == 0:
                continue
            length = 1 if remaining == 1 else min(remaining, budget)
            need = self._blocks_needed(seq, seq.num_cached + length)
            while need > self.pool.available:
                victim = self._running[-1]  # the most recently admitted
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # it was the last one: nothing after it is running
            seq.block_table += self.pool.allocate(need, seq.block_table[-1] if seq.block_table else None)
            if remaining > 1:
                budget -= length
            work.append(self._work(seq, length))
        admitted = self._admit(budget, work) if not preempted else []
        if len(work) == 1 and not preempted:
            work[0] = self._into_one_run(work[0])
        return StepPlan(work, admitted, preempted)

    def advance(self, work: list[Work]) -> None:
        """The step ran: the fed tokens are in the cache, and blocks they filled are named for reuse."""
        for item in work:
            seq = item.seq
            if seq.status is not Status.RUNNING:
                continue
            seq.num_cached = item.start + item.length
            self._register_full_blocks(seq)

    # ---- internals -----------------------------------------------------------------------------

    def _admit(self, budget: int, work: list[Work]) -> list[Sequence]:
        admitted = []
        while self._waiting and len(self._running) < self.max_batch_size and budget > 0:
            seq = self._waiting[0]
            hits = []
            if seq.use_prefix_cache and self.pool.prefix_cache and not seq.block_table:
                known = (len(seq.tokens) - 1) // self.block_size  # always recompute the last token
                hits = self.pool.lookup(self._keys(seq, known))
            cached = len(seq.block_table) * self.block_size if seq.block_table else len(hits) * self.block_size
            length = min(len(seq.tokens) - cached, budget)
            need = -(-(cached + length) // self.block_size) - max(len(seq.block_table), len(hits))
            if need > self.pool.available - self.pool.reclaimable(hits):
                break  # FIFO: nobody overtakes the head of the queue
            self._waiting.popleft()
            if hits:
                for block in hits:
                    self.pool.share(block)
                seq.block_table = list(hits)
                seq._num_registered = len(hits)
                seq.num_cached = cached
            if seq.status is Status.WAITING:
                seq.cached_prompt_tokens = min(seq.num_cached, seq.prompt_len)
            seq.block_table += self.pool.allocate(need, seq.block_table[-1] if seq.block_table else None)
            seq.status = Status.RUNNING
            self._running.append(seq)
            admitted.append(seq)
            budget -= length
            work.append(self._work(seq, length))
        return admitted

    def _into_one_run(self, item: Work) -> Work:
        """A sequence decoding alone whose blocks are not one run (a prefix-cache hit, then blocks from
        elsewhere) moves into one run of free blocks, its filled blocks copied by this step's forward.
        The model then attends over a view of the cache instead of gathering the blocks in every layer
        of every step (~10% of a batch-1 token on CPU); growing, it takes the next block while free.
        The blocks it leaves keep what they hold (cached prefix blocks stay cached)."""
        seq, table = item.seq, item.block_table
        if item.length != 1 or table == tuple(range(table[0], table[0] + len(table))) \
                or self._no_run_since == self.pool.runs_freed:
            return item
        start = self.pool.first_free_run(len(table) + RUN_HEADROOM)
        if start is None:
            start = self.pool.first_free_run(len(table) + 1)  # at least room for one more block
        if start is None:
            self._no_run_since = self.pool.runs_freed
            return item
        run = self.pool.take_run(start, len(table))
        filled = -(-item.start // self.block_size)  # blocks holding positions before this step's token
        self.pool.release(list(table[::-1]))
        seq.block_table = run
        copies = tuple(zip(table[:filled], run[:filled], strict=True))
        return Work(seq, item.start, item.length, item.token_ids, tuple(run), copies)

    def _work(self, seq: Sequence, length: int) -> Work:
        start = seq.num_cached
        return Work(seq, start, length, tuple(seq.tokens[start:start + length]), tuple(seq.block_table))

    def _blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def _preempt(self, seq: Sequence) -> None:
        self._running.remove(seq)
        self._free_blocks(seq)
        seq.status = Status.PREEMPTED
        seq.num_preemptions += 1
        self._waiting.appendleft(seq)

    def _free_blocks(self, seq: Sequence) -> None:
        self.pool.release(seq.block_table[::-1])
        seq.block_table = []
        seq.num_cached = 0
        seq._num_registered = 0

    def _keys(self, seq: Sequence, n_blocks: int) -> list[bytes]:
        """Names of the first ``n_blocks`` full blocks of ``seq.tokens`` (memoised on the sequence)."""
        if len(seq._block_keys) < n_blocks:
            block_keys(seq.tokens[:n_blocks * self.block_size], self.block_size, seq._block_keys)
        return seq._block_keys[:n_blocks]

    def _register_full_blocks(self, seq: Sequence) -> None:
        full = seq.num_cached // self.block_size
        if full <= seq._num_registered or not self.pool.prefix_cache:
            return
        keys = self._keys(seq, full)
        for i in range(seq._num_registered, full):
            self.pool.register(seq.block_table[i], keys[i])
        seq._num_registered = full
