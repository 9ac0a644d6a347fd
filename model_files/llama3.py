"""Meta's Llama 3 special tokens: 256 of them after the BPE ranks of ``tokenizer.model``.

The list is the one in ``llama_models/llama3/tokenizer.py`` of the ``llama-models`` wheel that ships
``tokenizer.model``. With 128,000 ranks, ``<|begin_of_text|>`` is 128000, ``<|end_of_text|>`` 128001,
``<|eom_id|>`` 128008 and ``<|eot_id|>`` 128009.
"""

from __future__ import annotations

from .chat import LLAMA3_CHAT_FORMAT
from .token_facts import TokenFacts

NUM_SPECIAL_TOKENS = 256
BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
END_OF_MESSAGE, END_OF_TURN = "<|eom_id|>", "<|eot_id|>"
_NAMED_SPECIAL_TOKENS = [
    BEGIN_OF_TEXT,
    END_OF_TEXT,
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    END_OF_MESSAGE,  # end of message
    END_OF_TURN,  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]
STOP_TOKENS = (END_OF_TEXT, END_OF_MESSAGE, END_OF_TURN)


def special_token_ids(num_base_tokens: int) -> dict[str, int]:
    """Each special token's id after ``num_base_tokens`` BPE ranks."""
    return {token: num_base_tokens + i for i, token in enumerate(SPECIAL_TOKENS)}


def llama3_token_facts(num_base_tokens: int) -> TokenFacts:
    ids = special_token_ids(num_base_tokens)
    return TokenFacts(bos_token_id=ids[BEGIN_OF_TEXT], eos_token_id=ids[END_OF_TEXT],
                      stop_token_ids=tuple(ids[token] for token in STOP_TOKENS), chat_format=LLAMA3_CHAT_FORMAT)


def llama3_token_facts_for_vocab(vocab_size: int) -> TokenFacts | None:
    """The facts of a Llama 3 vocabulary of ``vocab_size`` ids (BPE ranks + the special tokens), or
    None when it is too small to be one (a Meta checkpoint without its tokenizer.model)."""
    base = vocab_size - NUM_SPECIAL_TOKENS
    return llama3_token_facts(base) if base > 0 else None
