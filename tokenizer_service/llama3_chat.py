"""Meta's Llama 3 chat format (``ChatFormat`` in the reference's ``llama/tokenizer.py``), exactly."""

from __future__ import annotations

from model_files.chat import LLAMA3_CHAT_FORMAT

from .chat_format import ChatPrompt
from .tokenizer import Tokenizer


class Llama3ChatFormat:
    """The reference ``ChatFormat``: header, ``content.strip()``, ``<|eot_id|>`` per message, then the
    assistant header. Content is encoded as plain text, so special-token text in it stays text."""

    name = LLAMA3_CHAT_FORMAT

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, role: str) -> list[int]:
        tokens = [self.special["<|start_header_id|>"]]
        # "tool" is llama-models' name for the role whose header reads "ipython".
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
        """Messages whose roles are already checked (chat_format.checked_messages) -> the prompt."""
        tokens = [self.special["<|begin_of_text|>"]]
        for role, content in messages:
            tokens.extend(self.encode_message(role, content))
        if add_generation_prompt:  # the start of an assistant message for the model to complete
            tokens.extend(self.encode_header("assistant"))
        return ChatPrompt(token_ids=tokens, text=self.tokenizer.decode(tokens))
