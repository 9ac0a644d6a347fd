"""model_files: the one reading of a model's files that both services use.

Truths: the ``gguf`` package's own reader (an independent GGUF parser), Meta's golden Llama 3 ids,
and what each service reports when both are given the same path.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from llama_grpc_devtools.make_checkpoint import write_checkpoint
from llama_grpc_runtime.assets import default_model_path, llama3_tokenizer_path
from model_files.gguf_metadata import read_gguf_metadata
from model_files.llama3 import llama3_token_facts, llama3_token_facts_for_vocab
from model_files.token_facts import TokenFacts, gguf_token_facts, hf_token_facts
from model_service.checkpoint import open_checkpoint
from tokenizer_service import load_tokenizer


def test_gguf_metadata_matches_the_gguf_packages_reader() -> None:
    path = default_model_path()
    ours = read_gguf_metadata(path)
    theirs = gguf.GGUFReader(path).fields
    assert set(ours) == {key for key in theirs if not key.startswith("GGUF.")}
    for key, value in ours.items():
        expected = theirs[key].contents()
        if isinstance(value, float):
            assert value == pytest.approx(expected), key
        else:
            assert value == expected, key
    counted = read_gguf_metadata(path, count_only=frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges"}))
    assert counted["tokenizer.ggml.tokens"] == range(len(ours["tokenizer.ggml.tokens"]))
    assert counted["tokenizer.ggml.merges"] == range(len(ours["tokenizer.ggml.merges"]))
    assert {k: v for k, v in counted.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")} == \
        {k: v for k, v in ours.items() if k not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")}


def test_llama3_ids_are_metas() -> None:
    # llama-models' tokenizer.py: 128000 BPE ranks, then <|begin_of_text|>, <|end_of_text|>, ... <|eom_id|> 128008,
    # <|eot_id|> 128009; generation stops on end of text, end of message and end of turn.
    assert llama3_token_facts(128_000) == TokenFacts(128_000, 128_001, (128_001, 128_008, 128_009), "llama3")
    assert llama3_token_facts_for_vocab(128_256) == llama3_token_facts(128_000)
    assert llama3_token_facts_for_vocab(256) is None
    tokenizer = load_tokenizer(llama3_tokenizer_path())
    assert (tokenizer.bos_token_id, tokenizer.stop_token_ids) == (128_000, [128_001, 128_008, 128_009])


def test_both_services_read_the_same_gguf_file_alike() -> None:
    path = default_model_path()
    tokenizer, reader = load_tokenizer(path), open_checkpoint(path)
    facts = gguf_token_facts(read_gguf_metadata(path))
    assert reader.stop_token_ids == tokenizer.stop_token_ids == list(facts.stop_token_ids) == [2]
    assert facts.chat_format == tokenizer.chat_format == "jinja"
    assert reader.bos_token_id == facts.bos_token_id and tokenizer.bos_token_id == facts.bos_token_id


@pytest.mark.parametrize("fmt", ["meta", "hf", "gguf"])
def test_a_llama3_shaped_checkpoint_declares_metas_ids_in_every_format(tmp_path: Path, fmt: str) -> None:
    from model_service.args import ModelArgs

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128_256, multiple_of=16)
    reader = open_checkpoint(write_checkpoint(tmp_path / fmt, fmt, args=args))
    assert (reader.bos_token_id, reader.stop_token_ids) == (128_000, [128_001, 128_008, 128_009])


def test_hf_facts_join_the_tokenizer_config_and_the_generation_config(tmp_path: Path) -> None:
    vocab = {"<|begin_of_text|>": 128_000, "<|end_of_text|>": 128_001, "<|eot_id|>": 128_009, "hi": 5}
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {"hi": 5}},
        "added_tokens": [{"id": i, "content": t} for t, i in vocab.items() if t != "hi"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}, "chat_template": "{{ x }}"}))
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 128_000, "eos_token_id": 128_001}))
    expected = TokenFacts(128_000, 128_009, (128_001, 128_009), "jinja")
    assert hf_token_facts(tmp_path) == hf_token_facts(tmp_path, vocab) == expected
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128_001, 128_008, 128_009]}))
    assert hf_token_facts(tmp_path).stop_token_ids == (128_001, 128_008, 128_009)
    # A model directory without tokenizer files: the configs alone.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    assert hf_token_facts(tmp_path) == TokenFacts(128_000, 128_001, (128_001, 128_008, 128_009), "none")
