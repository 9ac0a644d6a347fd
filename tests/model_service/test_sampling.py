"""Sampling against independent truths: Meta's sample_top_p (copied below), Hugging Face's logits
processors, torch's own log_softmax / argmax, and the frequencies of many draws."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from llama_grpc_runtime.errors import InvalidArgument
from model_service.sampling import (
    NUCLEUS_PREFIX,
    SamplingParams,
    SamplingRow,
    _filtered_probs,
    apply_repetition_penalty,
    new_generator,
    sample,
    token_logprobs,
)

VOCAB = 4096  # wider than NUCLEUS_PREFIX, so the prefix-widening path is exercised


def meta_distribution(logits: torch.Tensor, temperature: float, p: float) -> dict[int, float]:
    """What llama3/generation.py's sample_top_p draws from (its lines up to torch.multinomial, as
    published), after generate's softmax(logits / temperature); by token id."""
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return {int(t): float(q) for t, q in zip(probs_idx, probs_sort, strict=True) if q > 0}


def our_distribution(logits: torch.Tensor, temperature: float, top_p: float, top_k: int = 0) -> dict[int, float]:
    weights, ids = _filtered_probs(logits[None] / temperature, torch.tensor([[top_k or VOCAB]]),
                                   torch.tensor([[top_p]]))
    total = weights.sum()
    return {int(t): float(w / total) for t, w in zip(ids[0], weights[0], strict=True) if w > 0}


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def row(params: SamplingParams, **kwargs) -> SamplingRow:
    return SamplingRow(params, None if params.greedy else new_generator(params.seed), **kwargs)


def test_greedy_is_argmax_per_row():
    logits = random_logits(5)
    got = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(5)])
    assert [s.token_id for s in got] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("temperature,top_p,scale", [(0.6, 0.9, 3.0), (1.0, 1.0, 3.0), (0.3, 0.5, 3.0),
                                                      (1.5, 0.95, 3.0), (1.0, 0.9, 0.3)])
def test_draws_from_exactly_metas_nucleus(temperature, top_p, scale):
    # scale 0.3: a flat distribution whose nucleus is wider than the first prefix guessed
    logits = random_logits(1, seed=1)[0] / 3 * scale
    expected = meta_distribution(logits, temperature, top_p)
    got = our_distribution(logits, temperature, top_p)
    assert got.keys() == expected.keys()
    assert max(abs(got[t] - expected[t]) for t in got) < 1e-6
    if scale < 1 and top_p < 1:
        assert len(expected) > NUCLEUS_PREFIX


def test_each_row_widens_alone_and_keeps_metas_nucleus():
    # A peaked row beside a flat one whose nucleus is wider than the first prefix: each row's kept
    # tokens and weights are Meta's, and the same as when the row is sampled alone.
    peaked, flat = random_logits(1, seed=3)[0] * 2, random_logits(1, seed=4)[0] / 10
    batch = torch.stack([peaked, flat, peaked]) / 0.8
    weights, ids = _filtered_probs(batch, torch.full((3, 1), VOCAB), torch.full((3, 1), 0.95))
    for i, logits in enumerate([peaked, flat, peaked]):
        kept = {int(t): float(w) for t, w in zip(ids[i], weights[i], strict=True) if w > 0}
        total = sum(kept.values())
        expected = meta_distribution(logits, 0.8, 0.95)
        assert kept.keys() == expected.keys()
        assert max(abs(kept[t] / total - expected[t]) for t in kept) < 1e-6
        alone_w, alone_ids = _filtered_probs(batch[i:i + 1], torch.full((1, 1), VOCAB), torch.full((1, 1), 0.95))
        n = alone_w.shape[1]
        assert torch.equal(weights[i, :n], alone_w[0]) and torch.equal(ids[i, :n], alone_ids[0])
        assert not weights[i, n:].any()
    assert len(meta_distribution(flat, 0.8, 0.95)) > NUCLEUS_PREFIX > len(meta_distribution(peaked, 0.8, 0.95))


def test_draw_frequencies_follow_the_distribution():
    logits = random_logits(1, seed=2) / 3
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=6)
    probabilities = our_distribution(logits[0], 1.0, 0.9, top_k=6)
    n = 4000
    rows = [SamplingRow(params, new_generator(seed)) for seed in range(n)]  # n independent requests
    drawn = [s.token_id for s in sample(logits.expand(n, VOCAB), rows)]
    assert set(drawn) <= probabilities.keys()
    for token, q in probabilities.items():
        sigma = math.sqrt(q * (1 - q) / n)
        assert abs(drawn.count(token) / n - q) < 5 * sigma + 1e-3


def test_a_seed_draws_the_same_tokens_alone_and_in_a_mixed_batch():
    logits = random_logits(4, seed=1)
    target = 2
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=1234)
    alone, in_batch = row(params), row(params)
    others = [row(SamplingParams(temperature=0.0)), row(SamplingParams(temperature=1.0, top_k=5000, seed=7)),
              None, row(SamplingParams(temperature=0.8, top_p=1.0, repetition_penalty=1.3, seed=9),
                        seen=torch.rand(VOCAB) > 0.5)]
    got_alone, got_batch = [], []
    for _ in range(20):  # consecutive draws, as a request's steps make them
        got_alone.append(sample(logits[target:target + 1], [alone])[0].token_id)
        batch_rows = [in_batch if r is None else r for r in others]
        got_batch.append(sample(logits, batch_rows)[target].token_id)
    assert got_alone == got_batch
    assert set(got_alone) <= meta_distribution(logits[target], 0.7, 0.9).keys()


def test_seed_decides_the_draws():
    logits = torch.zeros(1, VOCAB)  # uniform: every draw is the generator's choice
    def draws(seed):
        r = row(SamplingParams(temperature=1.0, top_p=1.0, seed=seed))
        return [sample(logits, [r])[0].token_id for _ in range(10)]
    assert draws(5) == draws(5)
    assert draws(5) != draws(6)
    unseeded = [row(SamplingParams(temperature=1.0, top_p=1.0)) for _ in range(2)]
    assert [sample(logits, [unseeded[0]])[0].token_id for _ in range(10)] != \
        [sample(logits, [unseeded[1]])[0].token_id for _ in range(10)]


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (10, 1.0), (10, 0.5), (50, 0.8), (1, 0.9), (2000, 0.95)])
def test_kept_tokens_match_hugging_face_top_k_then_top_p(top_k, top_p):
    logits = random_logits(3, seed=3)
    temperature = 0.7
    scores = logits / temperature
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    for i in range(3):
        ours = our_distribution(logits[i], temperature, top_p, top_k)
        kept = torch.nonzero(scores[i] > -math.inf).flatten()
        assert ours.keys() == set(kept.tolist())
        # what is kept keeps its relative odds
        expected = torch.softmax(scores[i][kept], -1)
        assert max(abs(ours[int(t)] - float(q)) for t, q in zip(kept, expected, strict=True)) < 1e-6


def test_draws_stay_inside_top_k():
    logits = random_logits(1, seed=4)
    allowed = set(logits[0].topk(3).indices.tolist())
    r = row(SamplingParams(temperature=2.0, top_p=1.0, top_k=3, seed=0))
    drawn = {sample(logits, [r])[0].token_id for _ in range(200)}
    assert drawn <= allowed and len(drawn) == 3


def test_repetition_penalty_matches_hugging_face():
    logits = random_logits(2, seed=5)
    input_ids = torch.tensor([[1, 5, 5, 9, 300], [0, 2, 4, 6, 8]])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits.clone())
    seen = torch.zeros(2, VOCAB, dtype=torch.bool)
    seen.scatter_(1, input_ids, True)
    got = apply_repetition_penalty(logits, seen, torch.full((2, 1), 1.3))
    assert torch.allclose(got, expected)


def test_greedy_with_repetition_penalty_avoids_the_seen_argmax():
    logits = torch.zeros(1, VOCAB)
    logits[0, 7], logits[0, 8] = 5.0, 4.5
    seen = torch.zeros(VOCAB, dtype=torch.bool)
    seen[7] = True
    plain = sample(logits, [row(SamplingParams(temperature=0.0))])[0].token_id
    penalised = sample(logits, [row(SamplingParams(temperature=0.0, repetition_penalty=2.0), seen=seen)])[0].token_id
    assert (plain, penalised) == (7, 8)


def test_logprobs_are_the_models_not_the_tempered_ones():
    logits = random_logits(3, seed=6)
    rows = [row(SamplingParams(temperature=0.5, seed=1), logprobs=True, top_logprobs=4),
            row(SamplingParams(temperature=0.0)),
            row(SamplingParams(temperature=0.0), logprobs=True)]
    got = sample(logits, rows)
    reference = torch.log_softmax(logits, -1)
    for i in (0, 2):
        assert got[i].logprob == pytest.approx(reference[i, got[i].token_id].item(), abs=1e-5)
    values, indices = reference[0].topk(4)
    assert [t for t, _ in got[0].top_logprobs] == indices.tolist()
    assert [lp for _, lp in got[0].top_logprobs] == pytest.approx(values.tolist(), abs=1e-5)
    assert got[1].logprob is None and got[1].top_logprobs == []
    assert got[2].top_logprobs == []


def test_token_logprobs_score_each_target():
    logits = random_logits(4, seed=7)
    targets = torch.tensor([3, 10, 0, 511])
    chosen, alternatives = token_logprobs(logits, targets, top_n=2)
    reference = torch.log_softmax(logits, -1)
    assert chosen == pytest.approx(reference.gather(1, targets[:, None]).squeeze(1).tolist(), abs=1e-5)
    assert [[t for t, _ in a] for a in alternatives] == reference.topk(2).indices.tolist()


@pytest.mark.parametrize("params,field", [
    (SamplingParams(temperature=-0.1), "sampling.temperature"),
    (SamplingParams(temperature=float("nan")), "sampling.temperature"),
    (SamplingParams(temperature=float("inf")), "sampling.temperature"),
    (SamplingParams(top_p=0.0), "sampling.top_p"),
    (SamplingParams(top_p=1.01), "sampling.top_p"),
    (SamplingParams(top_p=float("nan")), "sampling.top_p"),
    (SamplingParams(top_k=-1), "sampling.top_k"),
    (SamplingParams(repetition_penalty=0.0), "sampling.repetition_penalty"),
    (SamplingParams(repetition_penalty=float("nan")), "sampling.repetition_penalty"),
])
def test_invalid_parameters_name_their_field(params, field):
    with pytest.raises(InvalidArgument) as error:
        params.validate()
    assert error.value.field == field and str(error.value).startswith(field)


def test_valid_edges_pass():
    for params in (SamplingParams(temperature=0.0), SamplingParams(top_p=1.0), SamplingParams(top_k=0),
                   SamplingParams(seed=2**64 - 1)):
        params.validate()


def make_rows(n: int) -> list[SamplingRow]:
    """Even rows greedy, odd rows sampled with seed = row."""
    return [SamplingRow(SamplingParams(temperature=0.8, top_p=0.95, seed=i), new_generator(i)) if i % 2
            else SamplingRow(SamplingParams(temperature=0.0), None) for i in range(n)]


@pytest.mark.parametrize("seed", range(4))
def test_a_row_with_one_nan_or_inf_fails_alone_and_the_others_draw_their_own_tokens(seed):
    # The finiteness checks are reductions (a row's max and min), not elementwise passes: one bad value
    # anywhere in a row must still be found, and -inf alone only fails a row when it is the model's.
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, VOCAB, generator=g) * 3
    for row, value in {1: float("nan"), 4: float("inf"), 6: float("-inf"), 9: float("nan"), 10: float("inf")}.items():
        logits[row, int(torch.randint(0, VOCAB, (1,), generator=g))] = value
    logits[11] = float("-inf")
    out = sample(logits, make_rows(12))
    assert [o.error is not None for o in out] == (~torch.isfinite(logits).all(-1)).tolist()
    for i in (0, 2, 3, 5, 7, 8):
        (alone,) = sample(logits[i:i + 1], make_rows(i + 1)[i:])
        assert out[i].error is None and out[i].token_id == alone.token_id
