"""BOS, EOS, stop tokens and chat format, as a model's files declare them.

One rule per file format, used by the tokenizer service (what it reports and encodes) and by the
model service (what ends a generation), so the two cannot read the same files differently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chat import JINJA_CHAT_FORMAT, NO_CHAT_FORMAT


@dataclass(frozen=True)
class TokenFacts:
    bos_token_id: int | None  # None: the model has no BOS token
    eos_token_id: int | None
    stop_token_ids: tuple[int, ...]  # the ids that end a generation, ascending
    chat_format: str  # model_files.chat: "llama3", "jinja" or "none"


def gguf_token_facts(metadata: Mapping[str, Any]) -> TokenFacts:
    """llama.cpp's keys: ``tokenizer.ggml.{bos,eos,eot,eom}_token_id``; a generation stops on EOS,
    end of turn and end of message."""
    def token_id(kind: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return None if value is None else int(value)

    eos = token_id("eos")
    stops = [i for i in (eos, token_id("eot"), token_id("eom")) if i is not None]
    return TokenFacts(bos_token_id=token_id("bos"), eos_token_id=eos, stop_token_ids=tuple(sorted(set(stops))),
                      chat_format=JINJA_CHAT_FORMAT if metadata.get("tokenizer.chat_template") else NO_CHAT_FORMAT)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content", "")
    return value or ""


def _ids(value: Any) -> list[int]:
    return [int(v) for v in value] if isinstance(value, list) else [] if value is None else [int(value)]


def hf_vocab(directory: Path) -> dict[str, int]:
    """tokenizer.json's token -> id, added tokens included ({} without a tokenizer.json)."""
    spec = _read_json(directory / "tokenizer.json")
    vocab = dict(spec.get("model", {}).get("vocab", {}))
    vocab.update({token["content"]: token["id"] for token in spec.get("added_tokens", [])})
    return vocab


def hf_token_facts(directory: Path, vocab: Mapping[str, int] | None = None) -> TokenFacts:
    """A Hugging Face directory: EOS and BOS are the tokenizer_config.json tokens (their ids looked
    up in ``vocab``, by default tokenizer.json's); a generation also stops on every id that
    generation_config.json (else config.json) gives as ``eos_token_id``: Llama 3 base models list
    end of turn there, not in the tokenizer config."""
    config = _read_json(directory / "tokenizer_config.json")
    generation = {**_read_json(directory / "config.json"), **_read_json(directory / "generation_config.json")}
    if vocab is None and config:
        vocab = hf_vocab(directory)
    vocab = vocab or {}
    eos_token, bos_token = token_text(config.get("eos_token")), token_text(config.get("bos_token"))
    eos = vocab.get(eos_token) if eos_token else None
    bos = vocab.get(bos_token) if bos_token else None
    generation_stops = _ids(generation.get("eos_token_id"))
    if eos is None and generation_stops:
        eos = generation_stops[0]
    if bos is None and generation.get("bos_token_id") is not None:
        bos = int(generation["bos_token_id"])
    stops = [eos] if eos is not None else []
    template = config.get("chat_template")
    return TokenFacts(bos_token_id=bos, eos_token_id=eos, stop_token_ids=tuple(sorted(set(stops + generation_stops))),
                      chat_format=JINJA_CHAT_FORMAT if template else NO_CHAT_FORMAT)
