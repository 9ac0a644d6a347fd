"""What the gateway knows about its upstreams, as one immutable value.

The health monitor builds a new ``UpstreamState`` whenever the upstreams are (re)checked and swaps it
in whole; a request reads it once, so it never sees limits from one model and stop ids from another.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .agreement import check_agreement
from .interfaces import ModelInfo, TokenizerInfo
from .request import Limits


@dataclass(frozen=True)
class UpstreamState:
    limits: Limits
    extra_stop_token_ids: tuple[int, ...] = ()  # the tokenizer's stop ids the model lacks (agreement.py)
    add_bos: bool = True  # a text prompt starts with BOS (what the tokenizer's files say)
    refusal: str | None = None  # set while the upstreams are known to disagree: calls get UNAVAILABLE


def agreed_state(previous: UpstreamState, base_limits: Limits, tokenizer: TokenizerInfo, tokenizer_address: str,
                 model: ModelInfo, model_address: str) -> UpstreamState:
    """The state after comparing the two upstreams: the served model's limits, or a refusal (the
    previous limits kept) when they do not serve the same model."""
    agreement = check_agreement(tokenizer.vocab_size, tokenizer.stop_token_ids, model.vocab_size,
                                model.stop_token_ids)
    if not agreement.ok:
        return replace(previous, refusal=(
            f"tokenizer service at {tokenizer_address} ({tokenizer.name or 'tokenizer'}) and model service at "
            f"{model_address} ({model.model_name or 'model'}) do not serve the same model: "
            + "; ".join(agreement.problems)))
    return UpstreamState(
        limits=replace(base_limits, vocab_size=tokenizer.vocab_size, max_seq_len=model.max_seq_len),
        extra_stop_token_ids=agreement.extra_stop_token_ids,
        add_bos=tokenizer.add_bos_token,
    )
