"""The scheduler's promises, on plain sequences (no model): FIFO admission, decode never waits for
prompts, prompt tokens per step bounded by the budget, blocks allocated as sequences grow and never
shared by two live sequences unless they hold the same tokens, prefix hits, LRU eviction,
preemption that frees blocks and resumes with every token, forks, stop checks."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from model_service.scheduler import FinishReason, Scheduler, Sequence, Status, block_keys

BS = 4  # block size in these tests


def seq(prompt_len: int, *, first: int = 0, max_new: int = 1000, stop: frozenset[int] = frozenset()) -> Sequence:
    return Sequence(tokens=list(range(first, first + prompt_len)), prompt_len=prompt_len, max_new_tokens=max_new,
                    stop_ids=stop)


def make(max_batch_size: int = 4, prefill_chunk: int = 100, num_blocks: int = 64, **kwargs) -> Scheduler:
    return Scheduler(max_batch_size, prefill_chunk, num_blocks=num_blocks, block_size=BS, **kwargs)


def run_step(scheduler: Scheduler, sample: int = 7, contents: CacheContents | None = None):
    plan = scheduler.schedule()
    completes = [item.completes for item in plan.work]
    check_tables(scheduler, plan.work)
    if contents is not None:
        contents.step(plan.work)
    scheduler.advance(plan.work)
    for item, done in zip(plan.work, completes, strict=True):  # "sample" where every known token is cached
        if done:
            scheduler.append_token(item.seq, sample)
    return plan.work, completes


def check_tables(scheduler: Scheduler, work) -> None:
    """Each work item's table covers its positions; a block is shared only by sequences that agree on
    every token it holds (so no sequence writes into another's keys/values)."""
    owner: dict[int, tuple] = {}
    for item in work:
        assert len(item.block_table) * BS >= item.start + item.length
    for s in scheduler.sequences():
        for i, block in enumerate(s.block_table):
            content = tuple(s.tokens[: (i + 1) * BS])
            if block in owner:
                full_before = min(s.num_cached, (i + 1) * BS) == (i + 1) * BS
                assert full_before and owner[block] == content, f"block {block} shared by different prefixes"
            owner[block] = content


def test_admission_is_fifo_and_bounded_by_the_batch():
    scheduler = make(max_batch_size=2)
    a, b, c = seq(3), seq(3, first=10), seq(3, first=20)
    for s in (a, b, c):
        scheduler.add(s)
    plan = scheduler.schedule()
    assert plan.admitted == [a, b] and c.status is Status.WAITING
    assert len(set(a.block_table) | set(b.block_table)) == 2  # one block each, distinct
    scheduler.finish(a, FinishReason.CANCELLED)
    assert a.block_table == [] and a.status is Status.FINISHED
    assert scheduler.schedule().admitted == [c]
    assert len(scheduler) == 2


def test_finishing_a_waiting_sequence():
    scheduler = make(max_batch_size=1)
    a, b = seq(2), seq(2)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.schedule()
    scheduler.finish(b, None)
    assert list(scheduler.sequences()) == [a] and scheduler.num_waiting == 0


def test_long_prompt_is_chunked_and_running_streams_keep_decoding():
    scheduler = make(prefill_chunk=8)
    short = seq(3)
    scheduler.add(short)
    run_step(scheduler)  # short's prompt in one step, then it decodes
    assert short.prefilled
    long = seq(30, first=100)
    scheduler.add(long)
    steps = []
    while not long.prefilled:
        work, _ = run_step(scheduler)
        by_seq = {id(item.seq): item for item in work}
        assert by_seq[id(short)].length == 1  # the running stream got its token every step
        steps.append(by_seq[id(long)].length)
        assert sum(item.length for item in work if item.seq is not short) <= 8
    assert steps == [8, 8, 8, 6]
    assert long.num_cached == 30 and len(long.tokens) == 31  # the last chunk produced its first token
    assert len(long.block_table) == 8  # ceil(30 / 4): blocks for what is computed, no more


def test_budget_is_shared_in_arrival_order():
    scheduler = make(prefill_chunk=10)
    a, b, c = seq(6), seq(6, first=10), seq(6, first=20)
    for s in (a, b, c):
        scheduler.add(s)
    work, completes = run_step(scheduler)
    assert [(item.seq, item.start, item.length) for item in work] == [(a, 0, 6), (b, 0, 4)]
    assert completes == [True, False]
    work, completes = run_step(scheduler)
    assert [(item.seq, item.start, item.length) for item in work] == [(a, 6, 1), (b, 4, 2), (c, 0, 6)]
    assert completes == [True, True, True]


def test_work_carries_the_right_tokens_and_positions():
    scheduler = make(max_batch_size=1, prefill_chunk=4)
    s = Sequence(tokens=[10, 11, 12, 13, 14, 15], prompt_len=6, max_new_tokens=10)
    scheduler.add(s)
    plan = scheduler.schedule()
    (first,) = plan.work
    assert (first.start, first.token_ids, first.completes) == (0, (10, 11, 12, 13), False)
    scheduler.advance(plan.work)
    (second,) = scheduler.schedule().work
    assert (second.start, second.token_ids, second.completes) == (4, (14, 15), True)
    scheduler.advance([second])
    assert scheduler.append_token(s, 99) is None
    (third,) = scheduler.schedule().work
    assert (third.start, third.token_ids, third.completes) == (6, (99,), True)


def test_stop_checks():
    scheduler = make()
    a, b = seq(3, max_new=2), seq(3, first=10, stop=frozenset({5}))
    for s in (a, b):
        scheduler.add(s)
    run_step(scheduler, sample=1)
    assert scheduler.append_token(b, 5) is FinishReason.STOP_TOKEN and b.generated == [1]  # 5 is not kept
    assert scheduler.append_token(a, 2) is FinishReason.LENGTH and a.generated == [1, 2]
    assert a.status is b.status is Status.FINISHED and scheduler.pool.used == 0
    small = make(num_blocks=2)  # 8 tokens: the context of any sequence
    c = seq(6)
    small.add(c)
    run_step(small)
    assert c.status is Status.RUNNING
    assert small.append_token(c, 3) is FinishReason.CONTEXT_LIMIT and len(c.tokens) == 8


def test_prefix_hits_reuse_full_blocks_and_always_recompute_the_last_token():
    scheduler = make()
    first = Sequence(tokens=list(range(10)), prompt_len=10, max_new_tokens=5)
    scheduler.add(first)
    run_step(scheduler)  # blocks [0-3] and [4-7] are full and named; [8, 9] is partial
    # Same 10 tokens: 2 blocks hit, tokens 8 and 9 recomputed.
    same = Sequence(tokens=list(range(10)), prompt_len=10, max_new_tokens=5)
    # Exactly 8 tokens: only 1 block hits (token 7 is recomputed, in a block of its own).
    boundary = Sequence(tokens=list(range(8)), prompt_len=8, max_new_tokens=5)
    # Diverges inside the second block: 1 block hits.
    diverging = Sequence(tokens=[0, 1, 2, 3, 4, 99, 6, 7, 8], prompt_len=9, max_new_tokens=5)
    for s in (same, boundary, diverging):
        scheduler.add(s)
    work, _ = run_step(scheduler)
    starts = {id(item.seq): (item.start, item.length) for item in work}
    assert starts[id(same)] == (8, 2) and same.cached_prompt_tokens == 8
    assert same.block_table[:2] == first.block_table[:2]
    assert starts[id(boundary)] == (4, 4) and boundary.cached_prompt_tokens == 4
    assert boundary.block_table[0] == first.block_table[0] and boundary.block_table[1] != first.block_table[1]
    assert starts[id(diverging)] == (4, 5) and diverging.cached_prompt_tokens == 4
    off = make(prefix_cache=False)
    for s in (Sequence(list(range(10)), 10, 5), Sequence(list(range(10)), 10, 5)):
        off.add(s)
        run_step(off)
        assert s.cached_prompt_tokens == 0


def test_generated_tokens_fill_blocks_that_the_next_turn_reuses():
    scheduler = make()
    turn1 = Sequence(tokens=list(range(6)), prompt_len=6, max_new_tokens=6)
    scheduler.add(turn1)
    while turn1.status is not Status.FINISHED:
        run_step(scheduler, sample=50 + len(turn1.tokens))
    history = turn1.tokens  # 6 prompt + 6 generated; the last generated one was never computed
    turn2 = Sequence(tokens=history + [90, 91, 92], prompt_len=15, max_new_tokens=3)
    scheduler.add(turn2)
    run_step(scheduler)
    assert turn2.cached_prompt_tokens == 8  # blocks [0-3], [4-7]; [8-11] holds the uncomputed last token


def test_unreferenced_cached_blocks_are_evicted_least_recently_used_first():
    scheduler = make(num_blocks=4)
    old, recent = seq(5), seq(5, first=100)
    for s in (old, recent):
        scheduler.add(s)
        run_step(scheduler)
        scheduler.finish(s, FinishReason.LENGTH)
    assert scheduler.pool.used == 0 and scheduler.pool.available == 4
    newcomer = seq(5, first=200)  # needs 2 blocks: the 2 free ones (partial blocks of old and recent)
    scheduler.add(newcomer)
    run_step(scheduler)
    another = seq(5, first=300)  # needs 2 more: evicts old's full block, then recent's
    scheduler.add(another)
    run_step(scheduler)
    scheduler.finish(newcomer, None)
    scheduler.finish(another, None)
    again = seq(5, first=100)
    scheduler.add(again)
    run_step(scheduler)
    assert again.cached_prompt_tokens == 0  # both were needed: everything was evicted
    # With room for one: the older one goes first.
    scheduler = make(num_blocks=5)
    old, recent = seq(5), seq(5, first=100)
    for s in (old, recent):
        scheduler.add(s)
        run_step(scheduler)
        scheduler.finish(s, FinishReason.LENGTH)
    filler = seq(13, first=500)  # 4 blocks: the 3 free ones, then the least recently used cached one
    scheduler.add(filler)
    run_step(scheduler)
    scheduler.finish(filler, None)
    hits = []
    for first in (100, 0):
        s = seq(5, first=first)
        scheduler.add(s)
        run_step(scheduler)
        hits.append(s.cached_prompt_tokens)
        scheduler.finish(s, None)
    assert hits == [4, 0]


def test_a_full_pool_preempts_the_newest_and_resumes_it_with_every_token():
    scheduler = make(num_blocks=4, prefill_chunk=100)
    a, b = seq(3), seq(3, first=10)
    for s in (a, b):
        scheduler.add(s)
    run_step(scheduler)  # each holds 1 block; each has 4 tokens now
    preempted = []
    for _ in range(10):
        plan = scheduler.schedule()
        preempted += plan.preempted
        check_tables(scheduler, plan.work)
        scheduler.advance(plan.work)
        for item in plan.work:
            if item.completes:
                scheduler.append_token(item.seq, 7)
        if preempted:
            break
    assert preempted == [b] and b.status is Status.PREEMPTED and b.block_table == [] and b.num_cached == 0
    assert len(b.tokens) > 3  # it keeps what it generated
    scheduler.finish(a, FinishReason.LENGTH)
    kept = list(b.tokens)
    plan = scheduler.schedule()
    assert plan.admitted == [b] and b.status is Status.RUNNING
    (item,) = plan.work
    # Recomputes every token but the full blocks it left in the prefix cache.
    assert item.start + item.length == len(kept) and item.token_ids == tuple(kept[item.start:])
    assert b.cached_prompt_tokens == 0  # counted on first admission only


def test_nothing_fails_and_nobody_starves_under_random_pressure():
    rng = random.Random(0)
    scheduler = make(max_batch_size=8, prefill_chunk=16, num_blocks=12)  # 48 tokens for everyone
    live = []
    for i in range(40):
        s = seq(rng.randint(1, 20), first=rng.choice([0, 1000 + i]), max_new=rng.randint(1, 20))
        scheduler.add(s)
        live.append(s)
    steps = 0
    while len(scheduler):
        run_step(scheduler, sample=rng.randint(0, 9))
        steps += 1
        assert scheduler.pool.used <= 12 and steps < 5000
    assert all(s.finish_reason in (FinishReason.LENGTH, FinishReason.CONTEXT_LIMIT) for s in live)
    assert all(len(s.generated) == s.max_new_tokens for s in live if len(s.tokens) < 48)
    assert scheduler.pool.used == 0


def test_fork_shares_the_prompt_blocks_and_recomputes_the_partial_one():
    for prefix_cache in (True, False):
        scheduler = make(prefix_cache=prefix_cache)
        parent = Sequence(tokens=list(range(10)), prompt_len=10, max_new_tokens=5)
        scheduler.add(parent)
        with pytest.raises(ValueError, match="prefilled|prompt is in the cache"):
            scheduler.fork(parent)
        plan = scheduler.schedule()
        scheduler.advance(plan.work)  # the prompt is in the cache: fork before sampling
        child = scheduler.fork(parent)
        with pytest.raises(ValueError, match="parent's prompt"):
            scheduler.fork(parent, Sequence(tokens=[1, 2], prompt_len=2, max_new_tokens=3))
        scheduler.append_token(parent, 42)
        assert child.tokens == list(range(10)) and child.cached_prompt_tokens == 8
        scheduler.finish(parent, FinishReason.CANCELLED)  # the shared blocks stay held by the child
        work, _ = run_step(scheduler)
        (item,) = work
        assert (item.seq, item.start, item.length) == (child, 8, 2)
        assert len(child.generated) == 1


def test_a_request_bigger_than_the_pool_is_never_admitted_by_itself():
    scheduler = make(num_blocks=2)
    assert scheduler.max_seq_len == 8  # the engine refuses prompts this long up front


token_lists = st.lists(st.integers(0, 2**31 - 1), max_size=40)


@given(token_lists, token_lists, st.integers(1, 8))
def test_block_names_are_equal_exactly_when_the_whole_prefix_is(a, b, size):
    """Block i of two sequences has the same name iff their first (i + 1) * size tokens are equal; the
    names are 32-byte digests, and extending known names gives what naming all at once gives."""
    keys_a, keys_b = block_keys(a, size), block_keys(b, size)
    assert len(keys_a) == len(a) // size and all(len(key) == 32 for key in keys_a)
    for i, (key_a, key_b) in enumerate(zip(keys_a, keys_b, strict=False)):
        assert (key_a == key_b) == (a[:(i + 1) * size] == b[:(i + 1) * size])
    assert block_keys(a, size, block_keys(a[:size * (len(a) // size // 2)], size)) == keys_a


def test_block_names_do_not_collide_where_pythons_hash_does():
    """hash() of small ints is the int itself, and -1 hashes like -2: tuples differing that way share a
    64-bit hash. Token ids are non-negative, but the names must not rest on hash()'s properties at all:
    a name is the SHA-256 of its parent's name and the block's ids as 32-bit words (checked here
    against hashlib directly)."""
    assert hash((None, (-1,))) == hash((None, (-2,)))  # why hash() was never fit to name blocks
    first = hashlib.sha256(b"" + (5).to_bytes(4, "little") + (6).to_bytes(4, "little")).digest()
    second = hashlib.sha256(first + (7).to_bytes(4, "little") + (8).to_bytes(4, "little")).digest()
    assert block_keys([5, 6, 7, 8, 9], 2) == [first, second]


class CacheContents:
    """What the model's cache holds after each step: the scheduler's block copies, then its writes,
    applied to blocks of token ids; before a step reads a sequence's earlier positions they must hold
    that sequence's own tokens (so a moved sequence attends over exactly what it computed)."""

    def __init__(self) -> None:
        self.blocks: dict[int, list[int | None]] = {}
        self.moves = 0

    def step(self, work) -> None:
        for item in work:  # the forward copies before it writes anything
            self.moves += bool(item.block_copies)
            for source, target in item.block_copies:
                self.blocks[target] = list(self.blocks[source])
        for item in work:
            for pos in range(item.start):
                held = self.blocks[item.block_table[pos // BS]][pos % BS]
                assert held == item.seq.tokens[pos], f"position {pos} holds {held}, not {item.seq.tokens[pos]}"
            for pos, token in enumerate(item.token_ids, start=item.start):
                self.blocks.setdefault(item.block_table[pos // BS], [None] * BS)[pos % BS] = token


def is_run(table) -> bool:
    return list(table) == list(range(table[0], table[0] + len(table)))


def test_a_lone_decoding_sequence_moves_into_one_run_of_blocks():
    scheduler = make(num_blocks=64)
    contents = CacheContents()

    def step(sample: int = 7):
        return run_step(scheduler, sample, contents)[0]

    first = seq(10, max_new=6)
    scheduler.add(first)
    while first.status is not Status.FINISHED:
        step(sample=50 + len(first.tokens))
    assert first.block_table == [] and scheduler.pool.used == 0  # blocks 0-2 cached, 3 free
    again = seq(10, max_new=20)  # hits blocks 0 and 1; block 2 is cached (not free): it gets block 3
    scheduler.add(again)
    (prefill,) = step()
    assert prefill.block_table == (0, 1, 3) and prefill.block_copies == ()  # a chunk is not moved
    (moved,) = step()
    # Into the lowest run with room to grow; the blocks holding positions 0-10 are copied.
    assert moved.block_table == (4, 5, 6) and moved.block_copies == ((0, 4), (1, 5), (3, 6))
    for _ in range(18):
        (item,) = step()
        assert is_run(item.block_table) and item.block_copies == ()  # it grows into the next free block
    assert again.status is Status.FINISHED and contents.moves == 1
    # The blocks it left keep their names: the same prompt still hits both.
    third = seq(10, max_new=2)
    scheduler.add(third)
    step()
    assert third.cached_prompt_tokens == 8


def test_sequences_are_not_moved_in_company_or_without_room():
    scheduler = make(num_blocks=64)
    first = seq(10, max_new=6)
    scheduler.add(first)
    while first.status is not Status.FINISHED:
        run_step(scheduler, sample=50 + len(first.tokens))
    pair = [seq(10, max_new=20), seq(5, first=300, max_new=20)]
    for s in pair:
        scheduler.add(s)
    for _ in range(8):
        plan = scheduler.schedule()
        assert len(plan.work) == 2 and all(item.block_copies == () for item in plan.work)
        scheduler.advance(plan.work)
        for item in plan.work:
            if item.completes:
                scheduler.append_token(item.seq, 7)
    assert not is_run(pair[0].block_table)
    # A pool with no free run longer than the sequence's table: it stays where it is.
    tight = make(num_blocks=5)
    head = seq(8, max_new=1)
    tight.add(head)
    while head.status is not Status.FINISHED:
        run_step(tight)
    blocker = seq(3, first=500, max_new=30)  # the next lowest free block (2), held throughout
    tail = seq(8, max_new=10)  # hits block 0; 1 is cached, so 3, then 4: [0, 3, 4], and nothing is free
    for s in (blocker, tail):
        tight.add(s)
    run_step(tight)
    tight.finish(blocker, None)
    for _ in range(3):
        plan = tight.schedule()
        assert [item.block_copies for item in plan.work] == [()]
        tight.advance(plan.work)
        tight.append_token(tail, 7)
    assert tail.block_table == [0, 3, 4]  # after the blocker left, the only free run is [2]: too short


def test_every_step_reads_its_own_tokens_under_random_pressure_with_moves():
    # Shared prefixes, arrivals now and then (so sequences run alone, or in company), a small pool:
    # moves, prefix hits, evictions and preemptions, with the cache's contents checked against each
    # sequence's tokens at every step.
    moves = 0
    for seed in range(9):
        rng = random.Random(seed)
        scheduler = make(max_batch_size=[1, 2, 3][seed % 3], prefill_chunk=8, num_blocks=32)
        contents = CacheContents()
        arriving = [seq(rng.randint(1, 24), first=rng.choice([0, 0, 1000 + i]), max_new=rng.randint(1, 30))
                    for i in range(30)]
        live = list(arriving)
        while arriving or len(scheduler):
            if arriving and (not len(scheduler) or rng.random() < 0.1):
                scheduler.add(arriving.pop())
            run_step(scheduler, rng.randint(0, 9), contents)
        assert all(s.status is Status.FINISHED for s in live) and scheduler.pool.used == 0
        moves += contents.moves
    assert moves >= 5  # the runs did move sequences (11 with these seeds)
