"""The scheduler's promises, on plain sequences (no model): FIFO slots, decode never waits for
prompts, prompt tokens per step bounded by the budget, slots reused."""

from __future__ import annotations

from model_service.scheduler import Scheduler, Sequence


def seq(prompt_len: int) -> Sequence:
    return Sequence(tokens=list(range(prompt_len)), prompt_len=prompt_len)


def run_step(scheduler: Scheduler) -> list:
    scheduler.admit()
    work = scheduler.plan()
    completes = [item.completes for item in work]
    scheduler.advance(work)
    for item, done in zip(work, completes, strict=True):  # "sample" for sequences whose tokens are all cached
        if done:
            item.seq.tokens.append(0)
    return work, completes


def test_admission_is_fifo_into_distinct_slots_and_freed_slots_are_reused():
    scheduler = Scheduler(max_batch_size=2, prefill_chunk=100)
    a, b, c = seq(3), seq(3), seq(3)
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.admit() == [a, b]
    assert {a.slot, b.slot} == {0, 1} and c.slot == -1
    slot_of_a = a.slot
    scheduler.remove(a)
    assert a.slot == -1
    assert scheduler.admit() == [c] and c.slot == slot_of_a
    assert len(scheduler) == 2


def test_removing_a_waiting_sequence():
    scheduler = Scheduler(max_batch_size=1, prefill_chunk=10)
    a, b = seq(2), seq(2)
    scheduler.add(a)
    scheduler.add(b)
    scheduler.admit()
    scheduler.remove(b)
    assert list(scheduler.waiting) == [] and scheduler.running == [a]


def test_long_prompt_is_chunked_and_running_streams_keep_decoding():
    scheduler = Scheduler(max_batch_size=4, prefill_chunk=8)
    short = seq(3)
    scheduler.add(short)
    run_step(scheduler)  # short's prompt in one step, then it decodes
    assert not short.prefilling
    long = seq(30)
    scheduler.add(long)
    steps = []
    while long.prefilling:
        work, _ = run_step(scheduler)
        by_seq = {id(item.seq): item for item in work}
        assert by_seq[id(short)].length == 1  # the running stream got its token every step
        steps.append(by_seq[id(long)].length)
        assert sum(item.length for item in work if item.seq is not short) <= 8
    assert steps == [8, 8, 8, 6]
    assert long.num_cached == 30 and len(long.tokens) == 31  # the last chunk produced its first token


def test_budget_is_shared_in_arrival_order():
    scheduler = Scheduler(max_batch_size=4, prefill_chunk=10)
    a, b, c = seq(6), seq(6), seq(6)
    for s in (a, b, c):
        scheduler.add(s)
    work, completes = run_step(scheduler)
    assert [(item.seq, item.start, item.length) for item in work] == [(a, 0, 6), (b, 0, 4)]
    assert completes == [True, False]
    work, completes = run_step(scheduler)
    assert [(item.seq, item.start, item.length) for item in work] == [(a, 6, 1), (b, 4, 2), (c, 0, 6)]
    assert completes == [True, True, True]


def test_work_carries_the_right_tokens_and_positions():
    scheduler = Scheduler(max_batch_size=1, prefill_chunk=4)
    s = Sequence(tokens=[10, 11, 12, 13, 14, 15], prompt_len=6)
    scheduler.add(s)
    scheduler.admit()
    (first,) = scheduler.plan()
    assert (first.start, first.token_ids, first.completes) == (0, [10, 11, 12, 13], False)
    scheduler.advance([first])
    (second,) = scheduler.plan()
    assert (second.start, second.token_ids, second.completes) == (4, [14, 15], True)
    scheduler.advance([second])
    s.tokens.append(99)  # the sampled token
    (third,) = scheduler.plan()
    assert (third.start, third.token_ids, third.completes) == (6, [99], True)
