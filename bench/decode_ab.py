"""Per-token cost of the model core's decode options, A/B in one process (SmolLM2 Q4_1, packed weights).

    make bench-decode           # or: .venv/bin/python bench/decode_ab.py [--batches 1,16] [--reps 15] [--dtype float32]

One model, each option toggled in place, the variants interleaved in short blocks of decode steps
(`--reps` alternations of `--steps` steps) so a shared machine's load hits them alike; medians and
minima per variant. Variants: the Q/K/V and gate/up projections separate vs fused (what build() does),
the fused model's packed kernels fed float32 activations exactly (``--packed-activations float32``: two
bfloat16 halves and the scales' rounding) vs rounded to bfloat16 (the default), and the fused model eager
vs ``--compile``, every layer one graph (its first compile is timed; later runs load inductor's cache).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model_service.build as build_module  # noqa: E402
from model_service.model import Batch, Transformer  # noqa: E402
from model_service.quant import _QuantLinear, fuse_linears  # noqa: E402


def variants(model: Transformer) -> dict:
    """name -> a function that puts the model in that variant."""
    fused = [(fuse_linears([layer.attention.wq, layer.attention.wk, layer.attention.wv]),
              fuse_linears([layer.feed_forward.w1, layer.feed_forward.w3])) for layer in model.layers]
    started = time.perf_counter()
    model.compile()
    compiled = model._compiled_layers

    packed = [m for m in model.modules() if isinstance(m, _QuantLinear)] + \
        [m for pair in fused for m in pair if isinstance(m, _QuantLinear)]

    def setting(fuse: bool, compile: bool, exact: bool = False):
        def apply() -> None:
            for layer, (wqkv, w13) in zip(model.layers, fused, strict=True):
                layer.attention.wqkv = wqkv if fuse else None
                layer.feed_forward.w13 = w13 if fuse else None
            for module in packed:
                module.exact = exact
            model._compiled_layers = compiled if compile else None
        return apply

    out = {"separate": setting(False, False), "fused, exact float32 activations": setting(True, False, True),
           "fused": setting(True, False), "fused + compile": setting(True, True)}
    out["fused + compile"]()
    for n in (3, 1):  # compile both graphs (several tokens, one token) before timing anything
        model(Batch(torch.arange(n), [0], [0], [n]))
    print(f"compile (first forwards): {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ns = parser.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    build_module.fuse_projections = lambda model: None  # keep the separate layers: the variants fuse them
    # Built exact (the scales' rounding kept), so each variant can switch exactness in place.
    model = build_module.build(None, max_batch_size=max(batches), max_seq_len=512, dtype=ns.dtype,
                               packed_activations="float32").model
    settings = variants(model)
    times: dict[tuple[int, str], list[float]] = {}
    for batch in batches:
        slots = list(range(batch))
        logits = model(Batch(torch.randint(0, 1000, (batch * 16,)), slots, [0] * batch, [16] * batch))
        position = 16
        for _ in range(ns.reps):
            for name, apply in settings.items():
                apply()
                started = time.perf_counter()
                for _ in range(ns.steps):
                    logits = model(Batch(logits.argmax(-1), slots, [position] * batch, [1] * batch))
                    position += 1
                times.setdefault((batch, name), []).append((time.perf_counter() - started) / ns.steps * 1000)
                if position > 480:  # rewrite the same cache positions: shapes stay comparable
                    position = 16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ns.dtype}, {ns.reps} x {ns.steps} steps")
    print("| batch | variant | median ms/step | min ms/step | tok/s (median) |")
    print("|---:|---|---:|---:|---:|")
    for (batch, name), values in times.items():
        median = statistics.median(values)
        print(f"| {batch} | {name} | {median:.2f} | {min(values):.2f} | {batch * 1000 / median:.1f} |")


if __name__ == "__main__":
    main()
