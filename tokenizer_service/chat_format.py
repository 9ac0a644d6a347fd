"""What every chat format shares: the prompt it returns, and the messages it accepts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from llama_grpc_runtime.errors import InvalidArgument
from model_files.chat import ROLES


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list[int]
    text: str  # the rendered prompt, special tokens included


class ChatFormat(Protocol):
    name: str

    def apply(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> ChatPrompt: ...


def role_and_content(index: int, message: Any) -> tuple[str, str]:
    """A (role, content) pair, an object or a mapping with role and content -> a checked pair."""
    if isinstance(message, Mapping):
        role, content = message.get("role"), message.get("content")
    elif isinstance(message, tuple | list) and len(message) == 2:
        role, content = message
    else:
        role, content = getattr(message, "role", None), getattr(message, "content", None)
    if not isinstance(role, str):
        raise InvalidArgument(f"messages[{index}].role", "must be a string")
    if not isinstance(content, str):
        raise InvalidArgument(f"messages[{index}].content", "must be a string")
    if role not in ROLES:
        raise InvalidArgument(f"messages[{index}].role", f"unknown role {role[:40]!r}; use one of {', '.join(ROLES)}")
    return role, content


def checked_messages(messages: Sequence[Any]) -> list[tuple[str, str]]:
    if not messages:
        raise InvalidArgument("messages", "at least one message is required")
    return [role_and_content(index, message) for index, message in enumerate(messages)]
