"""Choosing the next token: the reference's temperature + ``sample_top_p``, plus what serving needs.

Meta's ``generate`` does ``softmax(logits / temperature)`` then ``sample_top_p`` (keep the most
likely tokens until their mass reaches top_p, renormalise, draw), or ``argmax`` at temperature 0.
Here the same distribution is drawn from row by row over a batch of unrelated requests, each with
its own parameters and its own seeded generator, with two changes for speed that do not change the
distribution:

- the nucleus is found with ``topk`` over a prefix of the vocabulary (each row's widened until it
  holds that row's nucleus) instead of sorting all of it: sorting 16 x 49152 probabilities cost more
  than SmolLM2's forward pass;
- the draw is inverse-CDF with one uniform number per token from the request's own CPU generator,
  so other rows never change a row's draws, on CPU and GPU alike (the logits themselves may differ
  in the last bits with what shares the step: README, "Batch invariance").

Log-probabilities are those of the model (``log_softmax`` of the raw logits), as the reference's
``-cross_entropy(logits, tokens)``, not of the tempered or truncated distribution.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from .options import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_TOP_LOGPROBS, check_sampling

log = structlog.get_logger()

# Below this a temperature is sampled as if it were this (vLLM clamps the same way): dividing logits by
# 1e-38 overflows float32 to inf, and the softmax of a row with inf is NaN. At 0.01 the distribution is
# already one-hot for any realistic gap between the two best logits.
MIN_TEMPERATURE = 1e-2

__all__ = ["DEFAULT_TEMPERATURE", "DEFAULT_TOP_P", "MAX_TOP_LOGPROBS", "SamplingParams", "SamplingRow", "Sampled",
           "new_generator", "sample", "token_logprobs"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = DEFAULT_TEMPERATURE  # 0: greedy
    top_p: float = DEFAULT_TOP_P  # nucleus mass in (0, 1]
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh random seed per request
    min_p: float = 0.0  # 0: off
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens; 0: off
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict, hash=False)  # token id -> added to its logit

    def validate(self, vocab_size: int = 0) -> None:
        """InvalidArgument naming the field and its range (``options.check_sampling``, as the gateway)."""
        check_sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       repetition_penalty=self.repetition_penalty, seed=self.seed, min_p=self.min_p,
                       presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                       logit_bias=self.logit_bias, vocab_size=vocab_size)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalises_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def new_generator(seed: int | None) -> torch.Generator:
    """A CPU generator of the request's own; without a seed, one no other request shares."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


@dataclass
class SamplingRow:
    """One sequence's share of a sampling call, and the state its options need from step to step."""

    params: SamplingParams
    generator: torch.Generator | None  # CPU; None only for greedy rows
    seen: torch.Tensor | None = None  # [vocab] bool, tokens so far (prompt + output) for repetition_penalty
    logprobs: bool = False
    top_logprobs: int = 0
    counts: torch.Tensor | None = None  # [vocab] float, times each token was generated (presence/frequency)
    stop_token_ids: torch.Tensor | None = None  # [k] long: masked out while generated < min_new_tokens
    min_new_tokens: int = 0
    grammars: Any = None  # grammar.Grammars, with matcher: structured output
    matcher: Any = None  # llguidance.LLMatcher, advanced by observe()
    generated: int = 0

    def observe(self, token_id: int) -> None:
        """``token_id`` was generated and kept: update what the options look at next step."""
        self.generated += 1
        if self.seen is not None:
            self.seen[token_id] = True
        if self.counts is not None:
            self.counts[token_id] += 1
        if self.matcher is not None:
            self.matcher.consume_token(token_id)

    @property
    def suppresses_stops(self) -> bool:
        return self.stop_token_ids is not None and self.generated < self.min_new_tokens


@dataclass
class Sampled:
    token_id: int
    logprob: float | None  # of token_id under the model, when asked
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), most likely first
    error: str | None = None  # this row could not be sampled (token_id is meaningless); the other rows are unaffected


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL's penalty as Hugging Face applies it: divide positive logits of seen tokens, multiply negative.

    logits: [n, vocab]; seen: [n, vocab] bool; penalty: [n, 1].
    """
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_count_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                          frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``logit - count * frequency - (count > 0) * presence``.

    logits, counts: [n, vocab]; presence, frequency: [n, 1].
    """
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


NUCLEUS_PREFIX = 64  # first guess at how many of the most likely tokens hold the top_p mass: SmolLM2 at
# temperature 0.8 needs <= 4 for half its tokens, <= 44 for 90% and up to ~500 (top_p 0.95); a row whose
# nucleus is wider widens alone (x4 each time), so one flat row does not make every row sort more.


def _filtered_probs(tempered: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                    min_p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of tempered logits, then top-k, then the reference's top-p, then min-p (Hugging Face's
    order), each row with its own parameters.

    tempered: [m, vocab] logits / temperature; top_p, min_p: [m, 1] float; top_k: [m, 1] long (vocab
    where off). min-p drops tokens less likely than min_p times the most likely one (a ratio, so the
    same before or after renormalising).
    Returns (weights [m, width], token ids [m, width]): most likely first, dropped tokens at 0,
    not renormalised (the draw scales by the row's total instead). Columns past ``width`` would all
    be dropped. Each row is cut from the sorted prefix that its own nucleus needs (its top_k, or
    NUCLEUS_PREFIX widened until the prefix's last token is dropped), with cumulative sums only, so a
    row's weights do not depend on the other rows of the batch.
    """
    probs = torch.softmax(tempered, dim=-1)  # [m, vocab]
    m, vocab = probs.shape
    widths = torch.where(top_k < vocab, top_k, 0).clamp(min=NUCLEUS_PREFIX, max=vocab)[:, 0].tolist()
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # row -> (weights [w], ids [w])
    pending = list(range(m))
    while pending:
        width = min(widths[i] for i in pending)  # the rows at the narrowest prefix still needed, together
        rows = [i for i in pending if widths[i] == width]
        every = len(rows) == m  # the usual case: the rows as they are, no copies
        index = None if every else torch.tensor(rows, device=probs.device)

        def pick(values: torch.Tensor, index: torch.Tensor | None = index) -> torch.Tensor:  # these rows' share
            return values if index is None else values[index]

        sub = pick(probs)
        if width < vocab:
            probs_sort, probs_idx = torch.topk(sub, width, dim=-1)  # sorted, most likely first
        else:
            probs_sort, probs_idx = torch.sort(sub, dim=-1, descending=True)
        ranks = torch.arange(width, device=probs.device)[None, :]
        row_top_k = pick(top_k)
        probs_sort = probs_sort.masked_fill(ranks >= row_top_k, 0.0)
        cumulative = torch.cumsum(probs_sort, dim=-1)
        # Meta's mask is ``cumsum - p > top_p`` on probabilities summing to 1; after top-k they sum
        # to the kept mass instead (Hugging Face renormalises there), so scale the threshold.
        mass = torch.where(row_top_k < vocab, cumulative[:, -1:], 1.0)
        dropped = cumulative - probs_sort > pick(top_p) * mass
        if min_p is not None:
            dropped |= probs_sort < pick(min_p) * probs_sort[:, :1]
        # The prefix is enough when its last column is dropped (so is every later one, the mask
        # being monotone), or top-k already cut everything after it, or it is the whole vocabulary.
        enough = (dropped[:, -1] | (row_top_k[:, 0] <= width) | (width == vocab)).tolist()
        weights = probs_sort.masked_fill(dropped, 0.0)
        if every and all(enough):  # the usual case: one prefix holds every row
            return weights, probs_idx
        for j, i in enumerate(rows):
            if enough[j]:
                done[i] = (weights[j], probs_idx[j])
            else:
                widths[i] = min(vocab, width * 4)
        pending = [i for i in pending if i not in done]
    width = max(w.shape[0] for w, _ in done.values())
    weights = probs.new_zeros(m, width)
    ids = torch.zeros(m, width, dtype=torch.long, device=probs.device)
    for i, (w, idx) in done.items():  # narrower rows padded with dropped (zero-weight) columns
        weights[i, : w.shape[0]] = w
        ids[i, : idx.shape[0]] = idx
    return weights, ids


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[m] bool: rows of ``x`` [m, vocab] with no NaN and no +-inf, i.e. ``isfinite(x).all(-1)``, from
    two vectorised reductions (NaN propagates through both) instead of elementwise passes: 16 rows of
    49,152 in ~0.05 ms, not ~0.9."""
    return torch.isfinite(x.amax(dim=-1)) & torch.isfinite(x.amin(dim=-1))


def _draw(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one column per row. weights: [m, width] >= 0; uniforms: [m] -> [m] column indices."""
    cdf = torch.cumsum(weights, dim=-1)  # [m, width]
    targets = (uniforms.to(weights.device, cdf.dtype) * cdf[:, -1])[:, None]
    choice = torch.searchsorted(cdf, targets, right=True).squeeze(-1)  # first column whose cdf exceeds
    last_kept = (weights > 0).sum(-1) - 1  # guards u * total rounding up to the total itself
    return torch.minimum(choice, last_kept)


def _adjusted_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[torch.Tensor, list[str | None]]:
    """The logits each row samples from: its penalties, biases, suppressed stops and grammar mask
    applied to its own row only. Returns (logits, per-row error); a copy when anything changed."""
    device = logits.device
    errors: list[str | None] = [None] * len(rows)
    original = logits
    penalised = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0 and row.seen is not None]
    counted = [i for i, row in enumerate(rows) if row.params.penalises_counts and row.counts is not None]
    biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
    suppressing = [i for i, row in enumerate(rows) if row.suppresses_stops]
    constrained = [i for i, row in enumerate(rows) if row.matcher is not None]
    if not (penalised or counted or biased or suppressing or constrained):
        return logits, errors
    logits = logits.clone()
    if penalised:
        penalty = torch.tensor([rows[i].params.repetition_penalty for i in penalised], device=device)[:, None]
        seen = torch.stack([rows[i].seen for i in penalised])
        logits[penalised] = apply_repetition_penalty(logits[penalised], seen, penalty)
    if counted:
        presence = torch.tensor([rows[i].params.presence_penalty for i in counted], device=device)[:, None]
        frequency = torch.tensor([rows[i].params.frequency_penalty for i in counted], device=device)[:, None]
        counts = torch.stack([rows[i].counts for i in counted])
        logits[counted] = apply_count_penalties(logits[counted], counts, presence, frequency)
    for i in biased:
        bias = rows[i].params.logit_bias
        ids = torch.tensor(list(bias), dtype=torch.long, device=device)
        logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=device)
    for i in suppressing:
        logits[i, rows[i].stop_token_ids] = float("-inf")
    if constrained:
        failed = [i for i in constrained if rows[i].matcher.is_error()]
        for i in failed:
            errors[i] = f"constraint: {rows[i].matcher.get_error()}"[:500]
        constrained = [i for i in constrained if errors[i] is None]
    if constrained:
        allowed = rows[constrained[0]].grammars.allowed([rows[i].matcher for i in constrained]).to(device)
        masked = logits[constrained].masked_fill(~allowed, float("-inf"))
        # min_new_tokens against a grammar that is complete: the grammar wins (its stop token).
        stuck = torch.isneginf(masked).all(-1)
        if bool(stuck.any()):
            fallback = original[constrained].masked_fill(~allowed, float("-inf"))
            masked = torch.where(stuck[:, None], fallback, masked)
        logits[constrained] = masked
    return logits, errors


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sampled]:
    """The next token of each row. logits: [n, vocab] float32, one row per entry of ``rows``.

    Rows are independent: a row whose logits are not finite, or whose sampling raises, comes back
    with ``error`` set, and every other row gets exactly the token it would get alone (its uniform
    number is drawn before anything can fail, so the row-by-row retry draws the same one).
    """
    uniforms = [None if row.params.greedy else torch.rand(1, generator=row.generator, dtype=torch.float64)
                for row in rows]
    try:
        return _sample(logits, rows, uniforms)
    except Exception as exc:  # noqa: BLE001 -- confined below to the row(s) that raise
        log.warning("batched sampling failed; sampling row by row", error=repr(exc), rows=len(rows))
    results = []
    for i, row in enumerate(rows):
        try:
            results += _sample(logits[i:i + 1], [row], uniforms[i:i + 1])
        except Exception as exc:  # noqa: BLE001 -- this row alone fails
            log.exception("sampling failed for one sequence")
            results.append(Sampled(0, None, [], error=f"sampling failed ({type(exc).__name__})"))
    return results


def _sample(logits: torch.Tensor, rows: list[SamplingRow], uniforms: list[torch.Tensor | None]) -> list[Sampled]:
    n, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    want_logprobs = [i for i, row in enumerate(rows) if row.logprobs or row.top_logprobs]
    model_logprobs = torch.log_softmax(logits[want_logprobs], dim=-1) if want_logprobs else None
    finite = _finite_rows(logits)  # [n]: the model's own scores
    logits, errors = _adjusted_logits(logits, rows)  # options may set -inf (a mask), never NaN or +inf
    next_ids = torch.empty(n, dtype=torch.long, device=device)
    greedy = [i for i, row in enumerate(rows) if row.params.greedy]
    if greedy:
        next_ids[greedy] = torch.argmax(logits[greedy], dim=-1)
    drawn = [i for i, row in enumerate(rows) if not row.params.greedy]
    if drawn:
        params = [rows[i].params for i in drawn]
        temperature = torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params], device=device)[:, None]
        top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
        top_k = torch.tensor([min(p.top_k, vocab) or vocab for p in params], device=device)[:, None]
        min_p = torch.tensor([p.min_p for p in params], device=device)[:, None] if any(p.min_p for p in params) \
            else None
        tempered = (logits if len(drawn) == n else logits[drawn]) / temperature  # [m, vocab]
        # Masked tokens are -inf (fine for softmax while one token is left); NaN or +inf are not, nor
        # a row of nothing but -inf. Its largest value tells: NaN propagates through max, +inf is the
        # max, and it is -inf only when every value is (one reduction, not a pass per check).
        tempered_ok = torch.isfinite(tempered.amax(dim=-1))  # [m]
        finite[drawn] &= tempered_ok
        if not bool(tempered_ok.all()):  # a bad row is sampled from zeros (harmlessly), its result thrown away
            tempered = torch.where(tempered_ok[:, None], tempered, 0.0)
        weights, token_ids = _filtered_probs(tempered, top_k, top_p, min_p)
        choices = _draw(weights, torch.cat([uniforms[i] for i in drawn]))  # [m]
        next_ids[drawn] = token_ids.gather(-1, choices[:, None]).squeeze(-1)

    token_ids = next_ids.tolist()
    ok = finite.tolist()
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
        if ok[i] and errors[i] is None else Sampled(0, None, [], error=errors[i] or NON_FINITE)
        for i, token_id in enumerate(token_ids)
    ]


NON_FINITE = "the model's scores for this request's next token are not finite numbers"


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
