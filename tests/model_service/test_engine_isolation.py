"""One request's failure stays its own: its batch neighbours get exactly the tokens they get alone.

The engine runs the tiny random Transformer in-process. Failures are provoked where they can arise
in a real deployment: a forward that raises for one sequence's input, a sequence whose scores are
not finite (NaN/inf from the model), and a sampler that raises for one row. The truth for each
innocent request is the same engine serving it alone.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
import torch

from llama_grpc_runtime.errors import ServiceError
from model_service import sampling
from model_service.engine import FinishReason, GenerationRequest, LocalRunner
from model_service.sampling import SamplingParams
from tests.model_service.test_engine import GREEDY, VOCAB, collect, make_engine, prompt, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


POISON = VOCAB - 1  # a prompt made of this token makes the wrapped runner misbehave for its sequence


class PoisonRunner(LocalRunner):
    """The real model, but a sequence whose new tokens are all POISON gets NaN logits, or makes the
    whole forward raise (``mode="raise"``), as a numerically broken input would."""

    def __init__(self, model, mode: str) -> None:
        super().__init__(model, "cpu")
        self.mode = mode

    def forward(self, work, all_logits: bool) -> torch.Tensor:
        poisoned = [i for i, item in enumerate(work) if all(token == POISON for token in item.token_ids)]
        if poisoned and self.mode == "raise":
            raise RuntimeError("forward failed on a poisoned sequence")
        logits = super().forward(work, all_logits)
        if poisoned:
            logits = logits.clone()
            lengths = [item.length for item in work]
            rows = poisoned if not all_logits else [sum(lengths[:i + 1]) - 1 for i in poisoned]
            logits[rows] = float("nan")
        return logits


INNOCENTS = [
    GenerationRequest(prompt(5), GREEDY, max_new_tokens=24),
    GenerationRequest(prompt(9, offset=4), SamplingParams(temperature=1.0, top_p=0.95, seed=11), max_new_tokens=24),
    GenerationRequest(prompt(3, offset=8), SamplingParams(temperature=0.7, top_k=5, seed=3), max_new_tokens=24,
                      logprobs=True),
]
BAD = GenerationRequest([POISON] * 6, SamplingParams(temperature=0.9, seed=5), max_new_tokens=24)


def serve(engine, requests) -> list:
    async def run():
        return await asyncio.gather(*(collect(engine, r) for r in requests), return_exceptions=True)

    try:
        return asyncio.run(run())
    finally:
        engine.stop()


def alone(model, request) -> list[int]:
    (tokens, chunks), = serve(make_engine(model), [request])
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    return tokens


@pytest.mark.parametrize(("mode", "fatal_errors"), [("nan", False), ("raise", False), ("nan", True)])
def test_a_failing_sequence_fails_alone(model, mode, fatal_errors):
    """fatal_errors: as under tensor parallelism, where only a failed forward is fatal; a sequence
    whose scores are bad is dealt with on rank 0 after the forward and must not take the service down."""
    from model_service.engine import Engine

    expected = [alone(model, r) for r in INNOCENTS]
    runner = PoisonRunner(model, mode)
    runner.fatal_errors = fatal_errors
    fatal = []
    engine = Engine(runner, vocab_size=VOCAB, max_seq_len=96, max_batch_size=4, max_queue=4, prefill_chunk=8,
                    on_fatal=fatal.append)
    engine.start()
    # The bad one arrives while the innocent ones are in the batch, and again after.
    results = serve(engine, [*INNOCENTS, BAD, BAD])
    for (tokens, chunks), want in zip(results[:3], expected, strict=True):
        assert tokens == want and chunks[-1].finish_reason is FinishReason.LENGTH
    for failure in results[3:]:
        assert isinstance(failure, ServiceError) and "Traceback" not in str(failure)
    assert fatal == []


def test_a_sampler_that_raises_for_one_row_fails_only_that_row(model, monkeypatch):
    real = sampling._sample

    def fragile(logits, rows, uniforms):
        if any(row.params.top_p == 0.123 for row in rows):
            raise FloatingPointError("this row's numbers broke the sampler")
        return real(logits, rows, uniforms)

    expected = [alone(model, r) for r in INNOCENTS]
    monkeypatch.setattr(sampling, "_sample", fragile)
    bad = GenerationRequest(prompt(4, offset=2), SamplingParams(temperature=1.0, top_p=0.123, seed=1),
                            max_new_tokens=24)
    results = serve(make_engine(model), [*INNOCENTS, bad])
    for (tokens, _), want in zip(results[:3], expected, strict=True):
        assert tokens == want  # seeded rows too: the retry row by row reuses each row's uniform number
    assert isinstance(results[3], ServiceError)


@pytest.mark.parametrize("extreme", [
    SamplingParams(temperature=1e-38, seed=1),
    SamplingParams(temperature=1e-45, seed=1),  # float32's smallest subnormal
    SamplingParams(temperature=3.4e38, seed=1),
    SamplingParams(temperature=1.0, top_p=1e-38, seed=1),
    SamplingParams(temperature=1.0, top_k=2**31 - 1, seed=1),
    SamplingParams(temperature=1.0, top_k=2**31 - 1, top_p=1e-38, seed=1),
    SamplingParams(temperature=1.0, repetition_penalty=1e-2, seed=1),
    SamplingParams(temperature=1e-38, repetition_penalty=1e2, seed=1),
])
def test_extreme_but_valid_parameters_answer_normally(model, extreme):
    innocent = INNOCENTS[0]
    expected = alone(model, innocent)
    request = GenerationRequest(prompt(7, offset=1), extreme, max_new_tokens=16)
    request.validate(VOCAB, 96)
    (tokens, _), (extreme_tokens, extreme_chunks) = serve(make_engine(model), [innocent, request])
    assert tokens == expected
    assert extreme_chunks[-1].finish_reason is FinishReason.LENGTH and len(extreme_tokens) == 16
    assert all(0 <= t < VOCAB for t in extreme_tokens)
    if extreme.temperature < sampling.MIN_TEMPERATURE and extreme.repetition_penalty == 1.0:
        # Sampled at the clamped temperature: on these well-separated logits, the greedy tokens.
        assert extreme_tokens == alone(model, GenerationRequest(request.prompt_token_ids, GREEDY, max_new_tokens=16))


@pytest.mark.parametrize(("field", "params"), [
    ("sampling.repetition_penalty", SamplingParams(repetition_penalty=1e-38)),
    ("sampling.repetition_penalty", SamplingParams(repetition_penalty=1e38)),
    ("sampling.repetition_penalty", SamplingParams(repetition_penalty=float("nan"))),
    ("sampling.temperature", SamplingParams(temperature=float("inf"))),
    ("sampling.top_p", SamplingParams(top_p=0.0)),
])
def test_parameters_that_could_overflow_are_refused_naming_the_field(field, params):
    from llama_grpc_runtime.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=field.replace(".", r"\.")):
        GenerationRequest([1, 2, 3], params).validate(VOCAB, 96)


class BrokenDevice(LocalRunner):
    def forward(self, batch, all_logits: bool) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_steps_that_keep_failing_fail_the_engine(model):
    """An unusable device fails every forward: after max_step_failures such steps the engine gives up
    (on_fatal: the service goes NOT_SERVING and exits non-zero), and waiting requests hear UNAVAILABLE."""
    from llama_grpc_runtime.errors import Unavailable
    from model_service.engine import Engine, EngineBroken

    fatal = []
    engine = Engine(BrokenDevice(model, "cpu"), vocab_size=VOCAB, max_seq_len=96, max_batch_size=2, max_queue=8,
                    prefill_chunk=8, on_fatal=fatal.append, max_step_failures=3)
    engine.start()
    results = serve(engine, [GenerationRequest(prompt(4, offset=i), GREEDY, max_new_tokens=4) for i in range(10)])
    assert len(fatal) == 1 and isinstance(fatal[0], EngineBroken)
    assert all(isinstance(r, ServiceError) for r in results)
    assert any(isinstance(r, Unavailable) for r in results)  # those still queued when it gave up


def test_a_bad_request_now_and_then_is_not_a_broken_device(model):
    """Failed steps must be consecutive: a good step in between resets the count. (Three different
    prompts each way: identical ones live together would share one prompt, ``Engine._live_twin``.)"""
    from model_service.engine import Engine

    fatal = []
    engine = Engine(PoisonRunner(model, "raise"), vocab_size=VOCAB, max_seq_len=96, max_batch_size=1,
                    max_queue=8, prefill_chunk=8, on_fatal=fatal.append, max_step_failures=2)
    engine.start()
    bad = [replace(BAD, prompt_token_ids=[POISON] * n) for n in (6, 7, 8)]
    good = [GenerationRequest(prompt(n), GREEDY, max_new_tokens=2) for n in (3, 4, 5)]
    results = serve(engine, [bad[0], good[0], bad[1], good[1], bad[2], good[2]])
    assert fatal == []
    assert [isinstance(r, ServiceError) for r in results] == [True, False] * 3
