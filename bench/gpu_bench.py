"""Decode on one CUDA device: an 8B-shaped random checkpoint (Llama 3 8B's shapes), batch-1 decode against the
memory-bandwidth bound, and the aggregate of 64 streams; eager, compiled and CUDA graphs, bfloat16 and packed.

    make bench-gpu     # or: python bench/gpu_bench.py [--preset 8b] [--quantize none,int4] [--modes eager,reduce-overhead]

The bound: a batch-1 decode step reads every weight once (the embedding table but one row, unless the output
layer shares it), so tokens/s <= bandwidth / those bytes. The bandwidth is measured here, by copying 2 GiB on
the device (bytes read + written / time), not taken from a data sheet. Each rate is the best of two runs over
the same positions (the first records the CUDA graphs of "reduce-overhead"), a token's argmax read back each
step as the service's sampler does. The table prints, and JSON goes to ``--out``. With ``--device cpu
--preset tiny`` it is a quick check of this script on a machine without a GPU (no bound: no HBM to measure).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_grpc_devtools.make_checkpoint import PRESETS, write_checkpoint  # noqa: E402
from model_service.build import build  # noqa: E402
from model_service.model import COMPILE_MODES, Batch, KVCache, Transformer  # noqa: E402

PROMPT_LEN = 128
STEPS = 64
STREAMS = 64
REPEATS = 2


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_bandwidth(device: str) -> float | None:
    """Bytes a second a device-to-device copy of 2 GiB moves (read + write), best of 5; None on a CPU."""
    if not device.startswith("cuda"):
        return None
    source = torch.empty(2**30, dtype=torch.int16, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def decode_read_bytes(model: Transformer) -> int:
    """Bytes a batch-1 decode step reads from weights: every parameter and buffer but the KV cache and the
    RoPE table, and but the embedding table unless the output layer is the same tensor."""
    skipped = {id(t) for module in model.modules() if isinstance(module, KVCache) for t in module.buffers()}
    skipped.add(id(model.rope))
    output = {t.data_ptr() for t in (*model.output.parameters(), *model.output.buffers())}
    skipped |= {id(t) for t in (*model.tok_embeddings.parameters(), *model.tok_embeddings.buffers())
                if t.data_ptr() not in output}
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in skipped}
    return sum(t.nbytes for t in tensors.values())


def decode_rate(model: Transformer, device: str, streams: int) -> float:
    """Tokens a second over STEPS decode steps of ``streams`` sequences after a PROMPT_LEN-token prompt each."""
    prompts = torch.randint(0, model.vocab_size, (streams, PROMPT_LEN), generator=torch.Generator().manual_seed(0))
    slots = list(range(streams))
    first = model(Batch(prompts.reshape(-1), slots, [0] * streams, [PROMPT_LEN] * streams)).argmax(-1).cpu()
    best = float("inf")
    for _ in range(REPEATS):  # each repeat rewrites the same positions
        tokens = first
        synchronize(device)
        start = time.perf_counter()
        for step in range(STEPS):
            logits = model(Batch(tokens, slots, [PROMPT_LEN + step] * streams, [1] * streams))
            tokens = logits.argmax(-1).cpu()  # the host reads every step's tokens, as the sampler does
        best = min(best, time.perf_counter() - start)
    return streams * STEPS / best


def measure(path: Path, device: str, dtype: str, quantize: str, mode: str) -> dict:
    started = time.perf_counter()
    loaded = build(path, device=device, dtype=dtype, quantize=quantize, max_batch_size=STREAMS,
                   max_seq_len=PROMPT_LEN + STEPS + 1, kv_cache_tokens=STREAMS * (PROMPT_LEN + STEPS + 16),
                   compile=mode != "eager", compile_mode="default" if mode == "eager" else mode)
    row = {"weights": quantize, "quantization": loaded.info.quantization, "mode": mode, "build_s": time.perf_counter() - started,
           "read_bytes": decode_read_bytes(loaded.model)}
    row["batch1_tok_s"] = decode_rate(loaded.model, device, 1)
    row["streams64_tok_s"] = decode_rate(loaded.model, device, STREAMS)
    del loaded
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="8b", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--quantize", default="none,int4", help="comma-separated: none, int8, int4")
    parser.add_argument("--modes", default="eager,reduce-overhead",
                        help=f"comma-separated: eager, {', '.join(m for m in COMPILE_MODES if m != 'auto')}")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results") / "gpu.json")
    ns = parser.parse_args()
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here (for a check of this script: --device cpu --preset tiny)")
    name = torch.cuda.get_device_name() if ns.device.startswith("cuda") else "cpu"
    bandwidth = device_bandwidth(ns.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing a random {ns.preset} checkpoint ({ns.dtype}) ...", file=sys.stderr)
        path = write_checkpoint(Path(tmp) / ns.preset, "hf", preset=ns.preset, dtype=getattr(torch, ns.dtype))
        for quantize in ns.quantize.split(","):
            for mode in ns.modes.split(","):
                print(f"{quantize} / {mode} ...", file=sys.stderr)
                row = measure(path, ns.device, ns.dtype, quantize, mode)
                if bandwidth:
                    row["bound_tok_s"] = bandwidth / row["read_bytes"]
                rows.append(row)
    title = f"{name}, {ns.preset} random weights, {ns.dtype} activations, torch {torch.__version__}"
    if bandwidth:
        title += f", copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    print(f"\n{title}\n")
    print("| weights | mode | read a step (GB) | batch 1 tok/s | bound tok/s | of bound | 64 streams tok/s | build s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        bound = row.get("bound_tok_s")
        print(f"| {row['weights']} | {row['mode']} | {row['read_bytes'] / 1e9:.2f} | {row['batch1_tok_s']:.1f} | "
              + (f"{bound:.1f} | {row['batch1_tok_s'] / bound:.0%}" if bound else "- | -")
              + f" | {row['streams64_tok_s']:.1f} | {row['build_s']:.0f} |")
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps({"device": name, "preset": ns.preset, "dtype": ns.dtype, "torch": torch.__version__,
                                  "bandwidth_bytes_s": bandwidth, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
