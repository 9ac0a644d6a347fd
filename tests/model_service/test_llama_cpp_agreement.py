"""Greedy tokens of the native int4 path agree with llama.cpp's on the same GGUF file (SmolLM2-135M
Q4_1). Both run the file's own 4-bit weights, but llama.cpp multiplies them with activations it
quantises to 8 bits (Q8_1), and we with activations rounded to bfloat16 (``--packed-activations
bfloat16``, the default) or split into two bfloat16 halves (``float32``), so a near-tie between two
candidate tokens can break differently; ``int8`` (steps of several rows: 8-bit activations per row,
weights re-quantised per row, both rotated by Hadamard blocks) is held to its own, lower bounds. Two measures, over a fixed set of prompts:
- next-token agreement given the same context (teacher-forced: llama.cpp's tokens as input, our
  top-1 against its next token), the per-token fidelity;
- the share of generated tokens before the first difference (free-running), which one early
  near-tie cuts short: the stricter, noisier measure.

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
             "Explain gravity in one sentence.", "Describe a cat.", "What is the boiling point of water?",
             "List four fruits.", "Translate 'thank you' to French.", "Why is the sky blue?",
             "What is a prime number?", "Tell me a joke.", "How many legs does a spider have?"]
NEW_TOKENS = 32
# Measured 2026-12-01 on this machine, 16 prompts x 32 tokens (380 positions), next-token / free-running:
# bfloat16 activations 0.971 / 0.622, float32 (two halves) 0.968 / 0.790, float32 halves without the
# scales' rounding 0.974 / 0.648. The bounds leave room for a near-tie or two on another CPU.
# int8 (2026-12-02; the teacher-forced pass is one prompt-sized step, so every position goes through int8
# rows; free-running, the prompt does and the one-token steps do not): 0.882 / 0.413 per-row as first
# built; what cost most, measured by putting each part back in float (next-token): 8-bit activations per
# row 0.903, per-row int8 weights 0.937. Rotated in Hadamard blocks of 32 (quant.ROTATION_BLOCK):
# 0.953 / 0.632 (blocks of 64 with the attention output rotated too: 0.953 / 0.731).
MIN_NEXT_TOKEN = {"bfloat16": 0.95, "float32": 0.95, "int8": 0.92}
MIN_FREE_RUNNING = {"bfloat16": 0.5, "float32": 0.7, "int8": 0.5}


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


def next_token_agreement(model, prompt_ids: list[int], theirs: list[int]) -> int:
    """How many of ``theirs`` are our top-1 given the prompt and their tokens before it."""
    if not theirs:
        return 0
    seq = prompt_ids + theirs
    logits = model(Batch(torch.tensor(seq), [0], [0], [len(seq)]), all_logits=True)
    predicted = logits[len(prompt_ids) - 1: len(seq) - 1].argmax(-1).tolist()
    return sum(a == b for a, b in zip(predicted, theirs, strict=True))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~1.5 min on a quiet machine; llama.cpp and ours twice decode 16 x 32 tokens
@pytest.mark.skipif(not PEER_PYTHON.exists(), reason="llama.cpp peer not installed (make peers)")
def test_int4_greedy_tokens_agree_with_llama_cpp():
    path = default_model_path()
    prompts = [f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in QUESTIONS]
    theirs = llama_cpp_greedy(path, prompts)
    for activations in ("bfloat16", "float32", "int8"):
        # the file's own Q4_1 blocks, int4 kernels
        loaded = build(path, max_batch_size=1, max_seq_len=256, packed_activations=activations)
        assert "int4 (Q4_1 as stored) x210" in loaded.info.quantization
        assert loaded.info.packed_activations == activations
        agreed = total = next_agreed = positions = 0
        for result in theirs:
            ours = ours_greedy(loaded.model, result["prompt_ids"], loaded.info.stop_token_ids)
            agreed += agreed_prefix(ours, result["token_ids"])
            total += max(len(ours), len(result["token_ids"]))
            next_agreed += next_token_agreement(loaded.model, result["prompt_ids"], result["token_ids"])
            positions += len(result["token_ids"])
        print(f"{activations} activations: next-token agreement with llama.cpp {next_agreed}/{positions} = "
              f"{next_agreed / positions:.3f}; free-running {agreed}/{total} = {agreed / total:.3f}")
        assert next_agreed / positions >= MIN_NEXT_TOKEN[activations], activations
        assert agreed / total >= MIN_FREE_RUNNING[activations], activations
