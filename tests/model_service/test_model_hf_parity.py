"""Our Transformer against Hugging Face transformers' LlamaForCausalLM, an implementation nobody here
wrote, on the same random weights (GQA and Llama 3.1 scaled RoPE on), and every other format of those
weights against the same truth."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_service.build import build
from model_service.model import Batch

transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW_TOKENS = 40, 32


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoints: dict[str, Path]):
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_checkpoints["hf"], dtype=torch.float32)
    # The scaled-RoPE checkpoint must really have scaled RoPE on the HF side too.
    assert model.config.rope_parameters["rope_type"] == "llama3"
    return model.eval()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(0, 512, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))


def hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(tokens[None]).logits[0].float()  # [n_tokens, vocab]


def our_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = build(path, max_batch_size=1, max_seq_len=128).model
    return model(Batch(tokens, block_tables=[0], start_pos=[0], lengths=[len(tokens)]), all_logits=True)


@pytest.mark.parametrize("fmt", ["hf", "meta", "meta2", "gguf"])
def test_prompt_logits_match_transformers(fmt, tiny_checkpoints, hf_model, prompt):
    expected = hf_logits(hf_model, prompt)
    got = our_logits(tiny_checkpoints[fmt], prompt)
    assert got.shape == expected.shape == (PROMPT_LEN, 512)
    assert expected.std() > 0.5  # logits carry signal, so a match is not trivial
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_tokens_match_transformers(tiny_checkpoints, hf_model, prompt):
    # Ours: prompt once, then one token at a time through the KV cache.
    model = build(tiny_checkpoints["hf"], max_batch_size=2, max_seq_len=128).model
    ours = prompt.tolist()
    logits = model(Batch(prompt, block_tables=[1], start_pos=[0], lengths=[PROMPT_LEN]))
    for _ in range(NEW_TOKENS):
        ours.append(int(logits[0].argmax()))
        logits = model(Batch(torch.tensor(ours[-1:]), block_tables=[1], start_pos=[len(ours) - 1], lengths=[1]))
    # Theirs: recompute the whole sequence at every step, no cache.
    theirs = prompt.tolist()
    for _ in range(NEW_TOKENS):
        theirs.append(int(hf_logits(hf_model, torch.tensor(theirs))[-1].argmax()))
    assert ours[PROMPT_LEN:] == theirs[PROMPT_LEN:]
    assert len(set(ours[PROMPT_LEN:])) > 4  # not a degenerate repeat of one token


def test_bfloat16_on_cpu_tracks_float32(tiny_checkpoints, prompt):
    exact = our_logits(tiny_checkpoints["hf"], prompt)
    model = build(tiny_checkpoints["hf"], dtype="bfloat16", max_batch_size=1, max_seq_len=128).model
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].attention.cache.k.dtype == torch.bfloat16
    approx = model(Batch(prompt, block_tables=[0], start_pos=[0], lengths=[PROMPT_LEN]), all_logits=True)
    assert approx.dtype == torch.float32  # logits are always float32
    cosine = torch.nn.functional.cosine_similarity(approx, exact, dim=-1)
    assert cosine.min().item() > 0.99
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean().item() > 0.8
