"""Do the tokenizer and model services serve the same model? Checked before the gateway serves.

The rules:

- Vocabulary: the model's embedding must cover every id the tokenizer can produce, so a model
  vocabulary smaller than the tokenizer's is refused. A larger one is accepted when the difference
  is padding (checkpoints round the embedding up to a multiple of 64 or 128 for fast matmuls, e.g.
  Qwen2's 151,936 rows for 151,665 tokens); more than ``MAX_VOCAB_PADDING`` extra rows means a
  different model. Padded rows are never trained, so the model does not sample them in practice.
- Stop tokens: both sides must share at least one stop id (disjoint sets mean different models,
  e.g. Llama 3's 128001/128008/128009 against SmolLM2's 2) and every stop id must be a token of
  both. When the sets overlap but differ (a Hugging Face checkpoint may list end-of-turn in the
  tokenizer config and end-of-text in the model config), the gateway starts and passes the
  tokenizer's extra stop ids with every request, so generation ends on either side's stop tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

MAX_VOCAB_PADDING = 1024


@dataclass(frozen=True)
class Agreement:
    problems: tuple[str, ...]  # empty: they agree
    extra_stop_token_ids: tuple[int, ...]  # the tokenizer's stop ids that the model lacks

    @property
    def ok(self) -> bool:
        return not self.problems


def check_agreement(tokenizer_vocab: int, tokenizer_stops: Sequence[int],
                    model_vocab: int, model_stops: Sequence[int]) -> Agreement:
    problems = []
    if model_vocab < tokenizer_vocab:
        problems.append(f"vocabulary sizes differ: the tokenizer has {tokenizer_vocab} tokens but the model only "
                        f"{model_vocab} embeddings, so ids >= {model_vocab} could not be embedded")
    elif model_vocab - tokenizer_vocab >= MAX_VOCAB_PADDING:
        problems.append(f"vocabulary sizes differ: the tokenizer has {tokenizer_vocab} tokens, the model "
                        f"{model_vocab} (more than {MAX_VOCAB_PADDING - 1} rows of padding: a different model)")
    vocab = min(tokenizer_vocab, model_vocab)
    outside = sorted({i for i in (*tokenizer_stops, *model_stops) if not 0 <= i < vocab})
    if outside:
        problems.append(f"stop token ids {outside} are outside the shared vocabulary [0, {vocab})")
    if tokenizer_stops and model_stops and not set(tokenizer_stops) & set(model_stops):
        problems.append(f"stop token ids differ: the tokenizer stops on {sorted(set(tokenizer_stops))}, "
                        f"the model on {sorted(set(model_stops))}")
    extra = tuple(sorted(set(tokenizer_stops) - set(model_stops)))
    return Agreement(tuple(problems), extra)
