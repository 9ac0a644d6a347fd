"""n completions of one prompt (``Engine.submit_group``), and identical prompts of separate requests
live at the same time (``Engine._live_twin``): the forks share the first one's cached prompt blocks.

Truths: the same requests each computing its own prompt (prefix cache off, which turns sharing off)
give the same tokens, greedy and seeded; forks feed the forward (n - 1) x (the prompt's full blocks,
all but its last token) fewer tokens, seeded ones too.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from llama_grpc_runtime.errors import DeadlineExceeded
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


async def read_all(stream) -> tuple[list[int], object]:
    """(tokens, the last chunk with the prompt logprobs of all, or the error the stream raised)."""
    tokens, last, prompt_logprobs = [], None, []
    try:
        async for chunk in stream:
            tokens += chunk.token_ids
            prompt_logprobs += chunk.prompt_logprobs
            last = chunk
    except Exception as error:  # noqa: BLE001 -- the stream's own error is the result
        return tokens, error
    last.prompt_logprobs = prompt_logprobs
    return tokens, last


def run_twins(model, requests: list[GenerationRequest], prefix_cache: bool, first_decoding: bool = False,  # noqa: F811
              ) -> tuple[list[tuple[list[int], object]], int]:
    """Separate requests (``submit``, not a group): all at once, or the rest once the first has a token.
    Steps of up to 96 tokens: 4 prompts of 21 fit one step, where the prefix cache could not help."""
    runner = CountingRunner(model)
    engine = Engine(runner, vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, max_batch_size=SLOTS, max_queue=8,
                    prefill_chunk=96, prefix_cache=prefix_cache)
    engine.start()

    async def go():
        if not first_decoding:
            return await asyncio.gather(*(read_all(engine.submit(r)) for r in requests))
        first = engine.submit(requests[0])
        head = await anext(aiter(first))  # its prompt is in the cache: it decodes
        rest = [engine.submit(r) for r in requests[1:]]
        tokens, last = await read_all(first)
        return [(head.token_ids + tokens, last or head), *await asyncio.gather(*(read_all(s) for s in rest))]

    try:
        results = asyncio.run(go())
    finally:
        engine.stop()
    return results, runner.tokens_fed


SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=3)


@pytest.mark.parametrize("first_decoding", [False, True], ids=["together", "while-the-first-decodes"])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_identical_live_prompts_are_computed_once(model, sampling, first_decoding):  # noqa: F811
    n, length = 4, 21  # one full block of 16 shared, the 5 tokens after it recomputed by each twin
    requests = [GenerationRequest(prompt(length), sampling if sampling.greedy else replace(sampling, seed=seed),
                                  max_new_tokens=8) for seed in range(n)]
    shared, fed_shared = run_twins(model, requests, prefix_cache=True, first_decoding=first_decoding)
    alone, fed_alone = run_twins(model, requests, prefix_cache=False, first_decoding=first_decoding)
    assert [tokens for tokens, _ in shared] == [tokens for tokens, _ in alone]
    assert all(len(tokens) == 8 for tokens, _ in shared)
    assert [last.cached_prompt_tokens for _, last in shared] == [0] + [16] * (n - 1)
    assert [last.cached_prompt_tokens for _, last in alone] == [0] * n
    assert fed_alone - fed_shared == (n - 1) * 16
    if not sampling.greedy:
        assert len({tuple(tokens) for tokens, _ in shared}) > 1  # each twin draws from its own seed


def test_a_twin_whose_first_ends_before_its_prompt_is_cached_computes_its_own(model):  # noqa: F811
    """The first one's deadline has passed when the engine takes both in: it ends at once, and its
    twin, which was waiting to fork from it, computes the prompt itself."""
    twin = GenerationRequest(prompt(21), SEEDED, max_new_tokens=5)
    expired = replace(twin, timeout=1e-9)
    (first, second), fed = run_twins(model, [expired, twin], prefix_cache=True)
    ((reference, _),), _ = run_twins(model, [twin], prefix_cache=False)
    assert first[0] == [] and isinstance(first[1], DeadlineExceeded)
    assert second == (reference, second[1]) and second[1].cached_prompt_tokens == 0
    assert fed == 21 + 4  # the twin's prompt, then one token a step


def test_a_request_that_wants_its_prompt_logprobs_computes_every_position(model):  # noqa: F811
    plain = GenerationRequest(prompt(21), GREEDY, max_new_tokens=3)
    echo = replace(plain, echo=True, logprobs=True)
    (_, (_, last)), _ = run_twins(model, [plain, echo], prefix_cache=True)
    ((_, reference),), _ = run_twins(model, [echo], prefix_cache=False)
    assert last.cached_prompt_tokens == 0
    assert len(last.prompt_logprobs) == 21 and last.prompt_logprobs == pytest.approx(reference.prompt_logprobs)
