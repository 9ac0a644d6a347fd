"""Choosing the next token: the reference's temperature + ``sample_top_p``, plus what serving needs.

Meta's ``generate`` does ``softmax(logits / temperature)`` then ``sample_top_p``, or ``argmax`` at
temperature 0. Here the same maths runs row by row over a batch of unrelated requests, each with
its own parameters and its own seeded ``torch.Generator``: a row's draw depends only on its own
logits and generator, so a seed gives the same tokens whatever else shares the batch.
Log-probabilities are those of the model (``log_softmax`` of the raw logits), as the reference's
``-cross_entropy(logits, tokens)``, not of the tempered or truncated distribution.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch
from llama.serving.errors import InvalidArgument

DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.9
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_p: float = DEFAULT_TOP_P  # nucleus mass in (0, 1]
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh random seed per request

    def validate(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument("sampling.temperature", f"must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):  # also refuses NaN
            raise InvalidArgument("sampling.top_p", f"must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument("sampling.top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidArgument("sampling.repetition_penalty",
                                  f"must be a finite number > 0 (1 turns it off), got {self.repetition_penalty}")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise InvalidArgument("sampling.seed", f"must fit in 64 unsigned bits, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample_top_p(probs: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Meta's ``sample_top_p`` (llama3 ``generation.py``), with a generator for per-request seeds.

    probs: [bsz, vocab] -> [bsz, 1] token ids. Keeps the smallest set of most likely tokens whose
    mass reaches ``p`` and draws from it renormalised.
    """
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


def new_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    """A generator of its own per request; without a seed, one no other request shares."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


@dataclass
class SamplingRow:
    """One sequence's share of a sampling call."""

    params: SamplingParams
    generator: torch.Generator | None  # None only for greedy rows
    seen: torch.Tensor | None = None  # [vocab] bool, tokens so far (prompt + output) for repetition_penalty
    logprobs: bool = False
    top_logprobs: int = 0


@dataclass
class Sampled:
    token_id: int
    logprob: float | None  # of token_id under the model, when asked
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty as Hugging Face applies it: divide positive logits of seen tokens, multiply negative.

    logits: [n, vocab]; seen: [n, vocab] bool; penalty: [n, 1].
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def _filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                    top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tempered softmax, then top-k, then the reference's top-p, each row with its own parameters.

    logits: [m, vocab]; temperature, top_p: [m, 1] float; top_k: [m, 1] long (vocab where off).
    Returns (probs_sort [m, vocab] renormalised with dropped tokens at 0, probs_idx [m, vocab]).
    """
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]  # [1, vocab]
    probs_sort = probs_sort.masked_fill(ranks >= top_k, 0.0)
    # Top-k first and renormalised (Hugging Face's order). Rows without top-k are left bit for bit
    # as the reference has them, so they draw exactly what sample_top_p draws.
    probs_sort.div_(torch.where(top_k < probs.shape[-1], probs_sort.sum(dim=-1, keepdim=True), 1.0))
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > top_p] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled]:
    """The next token of each row. logits: [n, vocab] float32, one row per entry of ``rows``."""
    n, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    want_logprobs = [i for i, row in enumerate(rows) if row.logprobs or row.top_logprobs]
    model_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None

    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0 and row.seen is not None]
    if penalised:
        logits = logits.clone()
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in penalised], device=device)[:, None]
        seen = torch.stack([rows[i].seen for i in penalised])
        logits[penalised] = apply_repetition_penalty(logits[penalised], seen, penalty)

    next_ids = torch.empty(n, dtype=torch.long, device=device)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if greedy:
        next_ids[greedy] = torch.argmax(logits[greedy], dim=-1)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        params = [rows[i].params for i in drawn]
        temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]
        probs_sort, probs_idx = _filtered_probs(logits[drawn], temperature, top_k, top_p)
        # One draw per row from the row's own generator: what makes a seed batch-independent.
        choices = torch.cat([torch.multinomial(probs_sort[j], 1, generator=rows[i].generator)
                             for j, i in enumerate(drawn)])  # [m]
        next_ids[drawn] = probs_idx.gather(-1, choices[:, None]).squeeze(-1)

    token_ids = next_ids.tolist()
    chosen: dict[int, float] = {}
    alternatives: dict[int, list[tuple[int, float]]] = {}
    if model_logprobs is not None:
        index = torch.tensor([token_ids[i] for i in want_logprobs], device=device)[:, None]
        chosen = dict(zip(want_logprobs, model_logprobs.gather(-1, index).squeeze(-1).tolist(), strict=True))
        top_n = max(rows[i].top_logprobs for i in want_logprobs)
        if top_n:
            values, indices = torch.topk(model_logprobs, min(top_n, vocab), dim=-1)
            for j, (ids, lps) in enumerate(zip(indices.tolist(), values.tolist(), strict=True)):
                i = want_logprobs[j]
                alternatives[i] = list(zip(ids, lps, strict=True))[: rows[i].top_logprobs]
    return [
        Sampled(token_id, chosen.get(i) if rows[i].logprobs else None, alternatives.get(i, []))
        for i, token_id in enumerate(token_ids)
    ]


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                   top_n: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probability of each target given the logits before it, and the top_n alternatives.

    logits: [n, vocab]; targets: [n] long. For echo's prompt log-probabilities.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    chosen = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
    if not top_n:
        return chosen, [[] for _ in chosen]
    values, indices = torch.topk(logprobs, min(top_n, logprobs.shape[-1]), dim=-1)
    return chosen, [list(zip(ids, lps, strict=True)) for ids, lps in zip(indices.tolist(), values.tolist(), strict=True)]
