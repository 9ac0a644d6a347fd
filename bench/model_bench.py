"""Decode throughput of the model core, in-process, beside Hugging Face transformers' ``generate`` on the
same weights in the same run.

    make bench-model            # or: .venv/bin/python bench/model_bench.py [--models smollm2,1b] ...

Models: SmolLM2-135M-Instruct (the embedded Q4_1 GGUF; both sides run its dequantised weights, HF
from a safetensors copy written by llama_grpc_devtools.make_checkpoint) and a random Llama-3.2-1B-shaped
model (16 layers, dim 2048, GQA 32/8, vocab 128256, tied). Decode tokens/s counts every generated
token of every sequence over the decode steps only (prompt processing excluded): for ours the timed
loop of one-token forwards + argmax, for HF (generate(N) - generate(1)) so its prefill cancels out.
Each timing is the best of two runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_grpc_devtools.make_checkpoint import write_checkpoint  # noqa: E402
from model_service.build import build  # noqa: E402
from model_service.model import Batch  # noqa: E402

PROMPT_LEN = 32
REPEATS = 2


def our_decode_rate(path: Path, dtype: str, batch: int, steps: int) -> float:
    # quantize="none": the same dequantised weights HF runs (bench/peer_bench.py measures the packed path).
    model = build(path, dtype=dtype, max_batch_size=batch, max_seq_len=PROMPT_LEN + steps + 1, quantize="none").model
    vocab = model.vocab_size
    prompts = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    slots = list(range(batch))
    logits = model(Batch(prompts.reshape(-1), slots, [0] * batch, [PROMPT_LEN] * batch))
    # Warm-up step (first-call allocations), then the timed decode loop, best of REPEATS (the
    # machine is shared: the best run is the least disturbed one). Repeats rewrite the same positions.
    next_tokens = logits.argmax(-1)
    first = model(Batch(next_tokens, slots, [PROMPT_LEN] * batch, [1] * batch))
    elapsed = float("inf")
    for _ in range(REPEATS):
        logits = first
        start = time.perf_counter()
        for step in range(steps):
            next_tokens = logits.argmax(-1)
            logits = model(Batch(next_tokens, slots, [PROMPT_LEN + 1 + step] * batch, [1] * batch))
        elapsed = min(elapsed, time.perf_counter() - start)
    del model
    gc.collect()
    return batch * steps / elapsed


def hf_decode_rate(path: Path, dtype: str, batch: int, steps: int) -> float:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    prompts = torch.randint(0, model.config.vocab_size, (batch, PROMPT_LEN),
                            generator=torch.Generator().manual_seed(0))

    def generate(new_tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        return time.perf_counter() - start

    generate(2)  # warm-up
    prefill_and_one = min(generate(1) for _ in range(REPEATS))
    total = min(generate(steps + 1) for _ in range(REPEATS))
    return batch * steps / max(total - prefill_and_one, 1e-9)


def prepare(model: str, workdir: Path) -> tuple[str, Path, Path]:
    """(label, our checkpoint, HF safetensors of the same weights)."""
    if model == "smollm2":
        from llama_grpc_runtime.assets import default_model_path

        gguf = default_model_path()
        # float32: exactly the values our loader dequantises
        return "SmolLM2-135M (Q4_1 GGUF)", gguf, write_checkpoint(workdir / "smollm2-hf", "hf", source=gguf,
                                                                   dtype=torch.float32)
    if model == "1b":
        hf = write_checkpoint(workdir / "random-1b", "hf", preset="1b", dtype=torch.bfloat16)
        return "random Llama-3.2-1B-shaped", hf, hf
    raise ValueError(f"unknown model {model!r}; use smollm2 or 1b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2,1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--steps", type=int, default=0, help="decode steps (default: 32 for SmolLM2, 8 for 1B)")
    parser.add_argument("--impls", default="ours,hf")
    ns = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"prompt {PROMPT_LEN} tokens", flush=True)
    with tempfile.TemporaryDirectory(prefix="model-bench-") as tmp:
        for model in ns.models.split(","):
            label, ours_path, hf_path = prepare(model, Path(tmp))
            steps = ns.steps or (32 if model == "smollm2" else 8)
            for dtype in ns.dtypes.split(","):
                for batch in map(int, ns.batches.split(",")):
                    ours = our_decode_rate(ours_path, dtype, batch, steps) if "ours" in ns.impls else float("nan")
                    hf = hf_decode_rate(hf_path, dtype, batch, steps) if "hf" in ns.impls else float("nan")
                    gc.collect()  # free this pair of models before loading the next
                    rows.append((label, dtype, batch, ours, hf))
                    print(f"  {label} {dtype} batch {batch}: ours {ours:.1f} tok/s, HF generate {hf:.1f} tok/s",
                          file=sys.stderr, flush=True)
    print()
    print("| model | dtype | batch | ours decode tok/s | HF generate decode tok/s | ours / HF |")
    print("|---|---|---:|---:|---:|---:|")
    for label, dtype, batch, ours, hf in rows:
        print(f"| {label} | {dtype} | {batch} | {ours:.1f} | {hf:.1f} | {ours / hf:.2f}x |")


if __name__ == "__main__":
    main()
