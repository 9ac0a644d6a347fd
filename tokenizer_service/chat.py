"""A tokenizer with the chat format its model files declare (Meta's shape: ``ChatFormat(tokenizer)``).

    Llama 3 ``tokenizer.model``         -> llama3_chat.Llama3ChatFormat (the reference's ChatFormat)
    GGUF / Hugging Face with a template -> chat_template.JinjaChatFormat (the model's own template)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_grpc_runtime.errors import FailedPrecondition
from model_files.chat import JINJA_CHAT_FORMAT, LLAMA3_CHAT_FORMAT, NO_CHAT_FORMAT

from .chat_format import ChatFormat, ChatPrompt, checked_messages
from .chat_template import JinjaChatFormat
from .llama3_chat import Llama3ChatFormat
from .tokenizer import Tokenizer
from .vocabulary import Vocabulary


def chat_format_for(tokenizer: Tokenizer, vocab: Vocabulary) -> ChatFormat | None:
    if vocab.chat_format == LLAMA3_CHAT_FORMAT:
        return Llama3ChatFormat(tokenizer)
    if vocab.chat_format == JINJA_CHAT_FORMAT and vocab.chat_template:
        return JinjaChatFormat(tokenizer, vocab)
    return None


class ChatTokenizer(Tokenizer):
    """What the service serves: the tokenizer core plus its chat format (None: no chat)."""

    def __init__(self, vocab: Vocabulary) -> None:
        super().__init__(vocab)
        self.chat = chat_format_for(self, vocab)
        self.chat_format = self.chat.name if self.chat else NO_CHAT_FORMAT

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, chat_format={self.chat_format!r})"

    def apply_chat_template(self, messages: Sequence[Any], *, add_generation_prompt: bool = True) -> ChatPrompt:
        """Messages ((role, content) pairs, or objects/mappings with role and content) -> prompt."""
        if self.chat is None:
            raise FailedPrecondition(f"{self.name} has no chat template")
        return self.chat.apply(checked_messages(messages), add_generation_prompt)
