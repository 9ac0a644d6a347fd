"""A model's tokenizer files -> ``Vocabulary``: Llama 3 ``tokenizer.model`` (tiktoken ranks), GGUF
metadata, or a Hugging Face tokenizer.json. BOS, EOS and stop tokens come from ``model_files``, the
rules the model service reads the same files by."""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Any

from model_files.gguf_metadata import read_gguf_metadata
from model_files.llama3 import BEGIN_OF_TEXT, END_OF_TEXT, llama3_token_facts, special_token_ids
from model_files.token_facts import gguf_token_facts, hf_token_facts, token_text

from .byte_level import check_rank_order, split_vocab
from .patterns import GGUF_PRE_TOKENIZERS, GPT2_PATTERN, LLAMA3_PATTERN, SMOLLM_PATTERN
from .vocabulary import UnsupportedTokenizer, Vocabulary

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_ORDINARY_TOKEN_TYPES = {1, 6}


def vocab_from_gguf(path: Path) -> Vocabulary:
    meta = read_gguf_metadata(path)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedTokenizer(f"{path}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise UnsupportedTokenizer(f"{path}: pre-tokenizer {pre!r} is not one of {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    special_ids = {i for i, kind in enumerate(types) if kind not in _ORDINARY_TOKEN_TYPES}
    check_rank_order(meta.get("tokenizer.ggml.merges", []), {t: i for i, t in enumerate(tokens)}, str(path))
    ranks, specials = split_vocab(tokens, special_ids)
    facts = gguf_token_facts(meta)
    if facts.eos_token_id is None:
        raise UnsupportedTokenizer(f"{path}: no tokenizer.ggml.eos_token_id")
    eos, bos = facts.eos_token_id, -1 if facts.bos_token_id is None else facts.bos_token_id
    return Vocabulary(
        name=path.name,
        pattern=GGUF_PRE_TOKENIZERS[pre],
        mergeable_ranks=ranks,
        special_tokens=specials,
        bos_token_id=bos,
        eos_token_id=eos,
        stop_token_ids=list(facts.stop_token_ids),
        chat_format=facts.chat_format,
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[bos] if 0 <= bos < len(tokens) else "",
        eos_token=tokens[eos],
        # llama.cpp's rule: the file's flag, else only the Llama 3 pre-tokenizer adds BOS.
        add_bos_token=bos >= 0 and bool(meta.get("tokenizer.ggml.add_bos_token", pre == "llama-bpe")),
    )


def _hf_pattern(pre_tokenizer: dict[str, Any] | None, source: str) -> str:
    """The one regex equivalent to a tokenizer.json pre-tokenizer, for the shapes byte-level BPEs use."""
    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space"):
        raise UnsupportedTokenizer(f"{source}: pre-tokenizer {kinds} is not a byte-level BPE without prefix space")
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return SMOLLM_PATTERN
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise UnsupportedTokenizer(f"{source}: pre-tokenizer {kinds} is not supported")


def vocab_from_hf_dir(directory: Path) -> Vocabulary:
    source = str(directory / "tokenizer.json")
    spec = json.loads((directory / "tokenizer.json").read_text())
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or spec.get("normalizer") is not None or model.get("byte_fallback"):
        raise UnsupportedTokenizer(f"{source}: only byte-level BPE without a normalizer is supported")
    pattern = _hf_pattern(spec.get("pre_tokenizer"), source)
    vocab: dict[str, int] = dict(model["vocab"])
    added = {token["id"]: token["content"] for token in spec.get("added_tokens", [])}
    for token_id, text in added.items():
        vocab[text] = token_id
    tokens = [""] * (max(vocab.values()) + 1)
    for text, token_id in vocab.items():
        tokens[token_id] = text
    holes = [i for i, text in enumerate(tokens) if not text]
    if holes:
        raise UnsupportedTokenizer(f"{source}: ids {holes[:5]} have no token")
    check_rank_order(model.get("merges", []), vocab, source)
    # Every added token is treated as special: text never turns into one unless allowed.
    ranks, specials = split_vocab(tokens, set(added))

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default", next(iter(named.values()), None))
    bos_token, eos_token = token_text(config.get("bos_token")), token_text(config.get("eos_token"))
    if eos_token not in vocab:
        raise UnsupportedTokenizer(f"{config_path}: eos_token {eos_token!r} is not in the vocab")
    facts = hf_token_facts(directory, vocab)
    extra = {key: token_text(config.get(key)) for key in ("unk_token", "pad_token") if config.get(key)}
    eos, bos_id = vocab[eos_token], -1 if facts.bos_token_id is None else facts.bos_token_id
    return Vocabulary(
        name=directory.name,
        pattern=pattern,
        mergeable_ranks=ranks,
        special_tokens=specials,
        bos_token_id=bos_id,
        eos_token_id=eos,
        stop_token_ids=list(facts.stop_token_ids),
        chat_format=facts.chat_format,
        chat_template=template,
        bos_token=bos_token,
        eos_token=eos_token,
        extra=extra,
        add_bos_token=bos_id >= 0 and bool(config.get("add_bos_token", _post_processor_adds(spec, bos_id))),
    )


def _post_processor_adds(spec: dict[str, Any], token_id: int) -> bool:
    """Whether tokenizer.json's post-processor puts ``token_id`` in front of a single sequence (Llama 3's
    TemplateProcessing does; SmolLM2's has none)."""
    processors = [spec.get("post_processor") or {}]
    if processors[0].get("type") == "Sequence":
        processors = processors[0].get("processors", [])
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            first = (processor.get("single") or [{}])[0].get("SpecialToken", {}).get("id")
            ids = processor.get("special_tokens", {}).get(first, {}).get("ids", [])
            return ids == [token_id]
    return False


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
    """A Llama 3 ``tokenizer.model`` -> the reference's vocabulary (Meta's ``llama/tokenizer.py``)."""
    try:
        ranks = parse_tiktoken_bpe(path.read_bytes() if contents is None else contents)
    except (ValueError, binascii.Error) as exc:  # a SentencePiece (Llama 2) model, or anything else
        raise UnsupportedTokenizer(f"{path} is not a tiktoken BPE file (Llama 3 tokenizer.model): {exc}") from exc
    if not ranks:
        raise UnsupportedTokenizer(f"{path} is empty")
    facts = llama3_token_facts(len(ranks))
    assert facts.bos_token_id is not None and facts.eos_token_id is not None
    return Vocabulary(
        name=path.name,
        pattern=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=special_token_ids(len(ranks)),
        bos_token_id=facts.bos_token_id,
        eos_token_id=facts.eos_token_id,
        stop_token_ids=list(facts.stop_token_ids),
        chat_format=facts.chat_format,
        meta_chunking=True,
        bos_token=BEGIN_OF_TEXT,
        eos_token=END_OF_TEXT,
    )
