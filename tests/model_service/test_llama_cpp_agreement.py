"""Greedy tokens of the native int4 path agree with llama.cpp's on the same GGUF file (SmolLM2-135M
Q4_1). Both run the file's own 4-bit weights, but llama.cpp multiplies them with activations it
quantises to 8 bits (Q8_1) and we with bfloat16 pairs (two bfloat16 halves of each float32), so a near-tie between two candidate tokens can
break differently and the continuations then part ways: agreement is measured as the share of
generated tokens before the first difference, over a fixed set of prompts.

Needs the llama.cpp peer (`make peers`: .peers/venv, or LLAMA_PEERS_VENV); skips without it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from llama_grpc_runtime.assets import default_model_path
from model_service.build import build
from model_service.model import Batch

ROOT = Path(__file__).resolve().parents[2]
PEER_PYTHON = Path(os.environ.get("LLAMA_PEERS_VENV", ROOT / ".peers" / "venv")) / "bin" / "python"
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count from one to ten.", "What is 2 + 2?",
             "Write a haiku about the sea.", "Who wrote Hamlet?", "Give me a synonym for happy.",
             "Explain gravity in one sentence."]
NEW_TOKENS = 24
# Measured 2026-12-01 on this machine, 8 prompts x 24 tokens: 0.84 (114/136) with the default float32
# activations (split into two bfloat16 halves); 0.58 with a single bfloat16 call, 0.99 for the file
# dequantised to float32 (the int8 re-quantised output layer and bfloat16 kernel outputs make the rest).
# The bound leaves room for a near-tie or two on another CPU.
MIN_AGREEMENT = 0.75


def llama_cpp_greedy(model: Path, prompts: list[str]) -> list[dict]:
    spec = {"model": str(model), "threads": 2, "n_ctx": 512,
            "jobs": [{"prompt": p, "max_new_tokens": NEW_TOKENS} for p in prompts]}
    done = subprocess.run([str(PEER_PYTHON), str(ROOT / "bench" / "llama_cpp_peer.py")], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=600, check=True)
    return json.loads(done.stdout)["results"]


def ours_greedy(model, prompt_ids: list[int], stop_ids: list[int]) -> list[int]:
    generated: list[int] = []
    logits = model(Batch(torch.tensor(prompt_ids), [0], [0], [len(prompt_ids)]))
    while len(generated) < NEW_TOKENS:
        token = int(logits[0].argmax())
        if token in stop_ids:
            break
        generated.append(token)
        logits = model(Batch(torch.tensor([token]), [0], [len(prompt_ids) + len(generated) - 1], [1]))
    return generated


def agreed_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1 min on a quiet machine; llama.cpp and ours each decode 8 x 24 tokens
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="llama.cpp peer not installed (make peers)")
def test_int4_greedy_tokens_agree_with_llama_cpp():
    path = default_model_path()
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    theirs = llama_cpp_greedy(path, prompts)
    loaded = build(path, max_batch_size=1, max_seq_len=256)  # the file's own Q4_1 blocks, int4 kernels
    assert "int4 (Q4_1 as stored) x210" in loaded.info.quantization
    agreed, total = 0, 0
    for result in theirs:
        ours = ours_greedy(loaded.model, result["prompt_ids"], loaded.info.stop_token_ids)
        agreed += agreed_prefix(ours, result["token_ids"])
        total += max(len(ours), len(result["token_ids"]))
    print(f"greedy agreement with llama.cpp: {agreed}/{total} tokens = {agreed / total:.3f}")
    assert agreed / total >= MIN_AGREEMENT
