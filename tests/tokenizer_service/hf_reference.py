"""Independent references for the tokenizer tests: Hugging Face ``tokenizers`` built from a GGUF
file's vocab/merges as read by the ``gguf`` package (not by our reader)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers


def _strings(reader: GGUFReader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[index]).decode("utf-8") for index in field.data]


@cache
def gguf_fields(path: Path) -> dict:
    reader = GGUFReader(str(path))
    types = reader.fields["tokenizer.ggml.token_type"]
    template = reader.fields["tokenizer.chat_template"]
    return {
        "tokens": _strings(reader, "tokenizer.ggml.tokens"),
        "merges": _strings(reader, "tokenizer.ggml.merges"),
        "types": [int(types.parts[index][0]) for index in types.data],
        "chat_template": bytes(template.parts[template.data[0]]).decode("utf-8"),
    }


@cache
def hf_tokenizer_from_gguf(path: Path) -> Tokenizer:
    """SmolLM2's tokenizer.json pipeline: Digits(individual) + ByteLevel pre-tokenizer, BPE, ByteLevel decoder."""
    fields = gguf_fields(path)
    vocab = {token: index for index, token in enumerate(fields["tokens"])}
    merges = [tuple(merge.split(" ", 1)) for merge in fields["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token, kind in zip(fields["tokens"], fields["types"], strict=True) if kind == 3])
    return tokenizer


def hf_llama3_split_regex() -> Regex:
    return Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
