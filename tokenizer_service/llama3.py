"""Meta's Llama 3 tokenizer (``llama/tokenizer.py``) and chat format (``ChatFormat``), exactly.

The special-token list is the one in ``llama_models/llama3/tokenizer.py`` of the ``llama-models``
wheel that ships ``tokenizer.model``: 256 tokens after the 128,000 BPE ranks.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING

from llama_grpc_runtime.errors import InvalidArgument

from .byte_level import LLAMA3_PATTERN, UnsupportedTokenizer, Vocabulary

if TYPE_CHECKING:
    from .tokenizer import ChatPrompt, Tokenizer

NUM_RESERVED_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{2 + i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS))
]


def parse_tiktoken_bpe(contents: bytes) -> dict[bytes, int]:
    """tiktoken's ``load_tiktoken_bpe`` format (a base64 token and its rank per line), from bytes
    already read: the file is opened once, so it may be a pipe."""
    ranks = {}
    for line in contents.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
    return ranks


def vocab_from_tiktoken_model(path: Path, contents: bytes | None = None) -> Vocabulary:
    """A Llama 3 ``tokenizer.model`` -> the reference's vocabulary."""
    try:
        ranks = parse_tiktoken_bpe(path.read_bytes() if contents is None else contents)
    except (ValueError, binascii.Error) as exc:  # a SentencePiece (Llama 2) model, or anything else
        raise UnsupportedTokenizer(f"{path} is not a tiktoken BPE file (Llama 3 tokenizer.model): {exc}") from exc
    if not ranks:
        raise UnsupportedTokenizer(f"{path} is empty")
    num_base_tokens = len(ranks)
    special = {token: num_base_tokens + i for i, token in enumerate(SPECIAL_TOKENS)}
    return Vocabulary(
        name=path.name,
        pattern=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special,
        bos_token_id=special["<|begin_of_text|>"],
        eos_token_id=special["<|end_of_text|>"],
        stop_token_ids=[special["<|end_of_text|>"], special["<|eom_id|>"], special["<|eot_id|>"]],
        meta_chunking=True,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
    )


class Llama3ChatFormat:
    """The reference ``ChatFormat``: header, ``content.strip()``, ``<|eot_id|>`` per message, then the
    assistant header. Content is encoded as plain text, so special-token text in it stays text."""

    name = "llama3"
    # "tool" is llama-models' name for the role whose header reads "ipython".
    roles = ("system", "user", "assistant", "ipython", "tool")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, role: str) -> list[int]:
        tokens = [self.special["<|start_header_id|>"]]
        tokens.extend(self.tokenizer.encode("ipython" if role == "tool" else role))
        tokens.append(self.special["<|end_header_id|>"])
        tokens.extend(self.tokenizer.encode("\n\n"))
        return tokens

    def encode_message(self, role: str, content: str) -> list[int]:
        tokens = self.encode_header(role)
        tokens.extend(self.tokenizer.encode(content.strip()))
        tokens.append(self.special["<|eot_id|>"])
        return tokens

    def apply(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> ChatPrompt:
        from .tokenizer import ChatPrompt

        for index, (role, _) in enumerate(messages):
            if role not in self.roles:
                raise InvalidArgument(f"messages[{index}].role", f"unknown role {role!r}; expected one of "
                                      f"{', '.join(self.roles)}")
        tokens = [self.special["<|begin_of_text|>"]]
        for role, content in messages:
            tokens.extend(self.encode_message(role, content))
        if add_generation_prompt:  # the start of an assistant message for the model to complete
            tokens.extend(self.encode_header("assistant"))
        return ChatPrompt(token_ids=tokens, text=self.tokenizer.decode(tokens))
