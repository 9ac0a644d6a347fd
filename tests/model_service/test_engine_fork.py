"""n completions of one prompt (``Engine.submit_group``): the forks share the first completion's
cached prompt blocks.

Truths: the same requests submitted independently (each computing its own prompt, prefix cache
off) give the same tokens, greedy and seeded; forks feed the forward (n - 1) x (the prompt's full
blocks, all but its last token) fewer tokens, seeded groups too.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from model_service.engine import Engine, GenerationRequest, LocalRunner
from model_service.options import completion_seed
from model_service.sampling import SamplingParams
from tests.model_service.test_engine import GREEDY, MAX_SEQ_LEN, SLOTS, VOCAB, model, prompt  # noqa: F401


class CountingRunner(LocalRunner):
    """The real model, counting the tokens each forward is fed."""

    def __init__(self, model) -> None:  # noqa: F811
        super().__init__(model, "cpu")
        self.tokens_fed = 0

    def forward(self, work, all_logits):
        self.tokens_fed += sum(item.length for item in work)
        return super().forward(work, all_logits)


def run_group(model, requests: list[GenerationRequest], fork: bool) -> tuple[list[list[int]], int]:  # noqa: F811
    runner = CountingRunner(model)
    engine = Engine(runner, vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, max_batch_size=SLOTS, max_queue=8,
                    prefill_chunk=8, prefix_cache=False)
    engine.start()

    async def go():
        streams = engine.submit_group(requests) if fork else [engine.submit(request) for request in requests]

        async def read(stream):
            return [t async for chunk in stream for t in chunk.token_ids]

        return await asyncio.gather(*(read(s) for s in streams))

    try:
        outputs = asyncio.run(go())
    finally:
        engine.stop()
    return outputs, runner.tokens_fed


@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=1.0, top_p=0.95, seed=3)])
def test_forks_equal_independent_completions_and_skip_the_prompt(model, sampling):  # noqa: F811
    n, length = 4, 21  # 21 tokens: 3 prefill chunks of 8 for the first; each fork shares 1 block of 16
    base = GenerationRequest(prompt(length), sampling, max_new_tokens=6)
    requests = [replace(base, sampling=replace(sampling, seed=completion_seed(sampling.seed, i))) for i in range(n)]
    forked, fed_forked = run_group(model, requests, fork=True)
    alone, fed_alone = run_group(model, requests, fork=False)
    assert forked == alone
    assert all(len(tokens) == 6 for tokens in forked)
    assert fed_alone - fed_forked == (n - 1) * 16  # seeded or greedy, every fork skips the shared block
    if sampling.temperature:
        assert len({tuple(t) for t in forked}) > 1  # the derived seeds differ


def test_a_fork_of_a_finished_or_cancelled_completion_computes_its_own_prompt(model):  # noqa: F811
    first = GenerationRequest(prompt(12), GREEDY, max_new_tokens=1)  # done in the step its prompt completes
    second = replace(first, max_new_tokens=5)
    (a, b), _ = run_group(model, [first, second], fork=True)
    (_, b_alone), _ = run_group(model, [first, second], fork=False)
    assert len(a) == 1 and b == b_alone
