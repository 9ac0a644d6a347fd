"""The CPU matmul kernels PyTorch offers for quantised weights, at the rows a decode step multiplies.

    make bench-kernels          # or: .venv/bin/python bench/kernel_bench.py [--rows 1,16,64] [--threads 2]

What a model step costs in its projections alone, for each kernel: every layer's fused QKV, output,
gate/up and down projections (SmolLM2-135M's shapes by default: 30 layers, dim 576, hidden 1536, K/V
192 wide), each layer its own random weights so they stream from memory as in the model (values do
not change a kernel's speed). Kernels:

- int4 group-wise (``_weight_int4pack_mm_for_cpu``, bfloat16 activations): what the service runs, through
  its own layers (``Int4Linear``);
- int8 rows: the same layers with ``--packed-activations int8`` (from ``INT8_MIN_ROWS`` rows, fbgemm's
  int8 x int8 kernel on weights re-quantised per row, each activation row on its own scale, both rotated
  by Hadamard blocks except the attention output's, as in the service);
- the int4 kernel alone, and
- int8 per-row weight-only (``_weight_int8pack_mm``, bfloat16 activations): the service's output layer;
- bfloat16 dense (``F.linear``);
- int8 x int8 (``torch._int_mm``, activations quantised per row first, timed with it, eagerly; llama.cpp
  quantises them per block of 32 for its 4-bit dot products);
- fbgemm's dynamic int8 linear alone (``quantized.linear_dynamic``: one activation scale for the whole
  input; the int8 rows path pins that range so each row keeps its own).

The two served columns call the service's layers eagerly, so they include each call's own Python
(casts, the int8 rows' scaling: ~25-60 us a layer, 3-7 ms a step of 120), which the compiled service
mostly fuses away; the other columns are the bare kernels.

Prints ms per step and the ratio to the int4 kernel for each row count; JSON in
``bench/results/kernels.json``. Timings only (the int8 kernels' accuracy: ``tests/model_service/test_quant.py``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_service.quant import GROUP_SIZE, Int4Linear, attach_int8_rows  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"


def projection_shapes(dim: int, hidden: int, kv_dim: int) -> list[tuple[int, int]]:
    """(out, in) of one layer's fused QKV, output, fused gate/up and down projections."""
    return [(dim + 2 * kv_dim, dim), (dim, dim), (2 * hidden, dim), (dim, hidden)]


def packed_layers(layers: list[list[tuple[int, int]]], int8_rows: bool) -> Callable[[dict], None]:
    """The service's own int4 layers (random 4-bit groups), with or without ``--packed-activations int8``."""
    built = []
    for shapes in layers:
        row = []
        for index, (n, k) in enumerate(shapes):
            layer = Int4Linear(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // GROUP_SIZE) / 100,
                               torch.randn(n, k // GROUP_SIZE) / 100, device=torch.device("cpu"))
            if int8_rows:
                attach_int8_rows(layer, rotate=index != 1)  # the attention output is not rotated (build.py)
            row.append((k, layer))
        built.append(row)

    def run(x: dict) -> None:
        for layer in built:
            for k, linear in layer:
                linear(x["f32"][k])
    return run


def int4_kernel(layers: list[list[tuple[int, int]]]) -> Callable[[dict], None]:
    packed = [[(k, torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.randint(0, 16, (n, k), dtype=torch.int32), 1),
        torch.randn(k // GROUP_SIZE, n, 2, dtype=torch.bfloat16)) for n, k in shapes] for shapes in layers]

    def run(x: dict) -> None:
        for layer in packed:
            for k, weight, scales_zeros in layer:
                torch.ops.aten._weight_int4pack_mm_for_cpu(x["bf16"][k], weight, GROUP_SIZE, scales_zeros)
    return run


def int8_weight_only_kernel(layers: list[list[tuple[int, int]]]) -> Callable[[dict], None]:
    weights = [[(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, dtype=torch.bfloat16))
                for n, k in shapes] for shapes in layers]

    def run(x: dict) -> None:
        for layer in weights:
            for weight, scales in layer:
                torch.ops.aten._weight_int8pack_mm(x["bf16"][weight.shape[1]], weight, scales)
    return run


def bf16_kernel(layers: list[list[tuple[int, int]]]) -> Callable[[dict], None]:
    weights = [[torch.randn(n, k, dtype=torch.bfloat16) for n, k in shapes] for shapes in layers]

    def run(x: dict) -> None:
        for layer in weights:
            for weight in layer:
                F.linear(x["bf16"][weight.shape[1]], weight)
    return run


def int8_int8_kernel(layers: list[list[tuple[int, int]]]) -> Callable[[dict], None]:
    weights = [[(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n)) for n, k in shapes]
               for shapes in layers]

    def run(x: dict) -> None:
        for layer in weights:
            for weight, scales in layer:
                rows = x["f32"][weight.shape[1]]
                step = (rows.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-10)
                quantised = (rows / step).round_().clamp_(-127, 127).to(torch.int8)
                torch._int_mm(quantised, weight.t()).float().mul_(step).mul_(scales)
    return run


def fbgemm_dynamic_kernel(layers: list[list[tuple[int, int]]]) -> Callable[[dict], None]:
    def prepack(n: int, k: int):
        weight = torch.randn(n, k)
        scales = weight.abs().amax(1) / 127
        q = torch.quantize_per_channel(weight, scales, torch.zeros(n, dtype=torch.int64), 0, torch.qint8)
        return k, torch.ops.quantized.linear_prepack(q, None)
    weights = [[prepack(n, k) for n, k in shapes] for shapes in layers]

    def run(x: dict) -> None:
        for layer in weights:
            for k, packed in layer:
                torch.ops.quantized.linear_dynamic(x["f32"][k], packed, False)
    return run


KERNELS = {
    "int4 group-wise (served)": lambda layers: packed_layers(layers, int8_rows=False),
    "int8 rows (--packed-activations int8)": lambda layers: packed_layers(layers, int8_rows=True),
    "int4 kernel alone": int4_kernel,
    "int8 weight-only": int8_weight_only_kernel,
    "bfloat16 dense": bf16_kernel,
    "int8 x int8 (_int_mm)": int8_int8_kernel,
    "fbgemm dynamic int8": fbgemm_dynamic_kernel,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="1,2,4,16,64,256", help="rows a step multiplies (tokens in the step)")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dim", type=int, default=576)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--kv-dim", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = projection_shapes(args.dim, args.hidden, args.kv_dim)
    layers = [shapes] * args.layers
    runs = {name: build(layers) for name, build in KERNELS.items()}
    inputs = {k for _, k in shapes}
    results: dict[str, dict[str, float]] = {}
    for rows in (int(r) for r in args.rows.split(",")):
        x = {"f32": {k: torch.randn(rows, k) for k in inputs}}
        x["bf16"] = {k: v.bfloat16() for k, v in x["f32"].items()}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for run in runs.values():
            run(x)  # warm-up: first-call setup, page faults
        for _ in range(args.reps):  # interleaved, so a shared machine's load hits every kernel alike
            for name, run in runs.items():
                started = time.perf_counter()
                run(x)
                times[name].append(1000 * (time.perf_counter() - started))
        results[str(rows)] = {name: statistics.median(t) for name, t in times.items()}
        print(f"rows {rows}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in results[str(rows)].items()),
              file=sys.stderr)

    names = list(KERNELS)
    base = names[0]
    weight_mb = sum(n * k for n, k in shapes) * args.layers / 1e6
    print(f"\nProjections of one step, {args.layers} layers x {len(shapes)} matmuls ({weight_mb:.0f} M weights), "
          f"{args.threads} threads, median of {args.reps}: ms (ratio to the int4 kernel)\n")
    print("| rows | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for rows, row in results.items():
        cells = [f"{row[name]:.2f}" + ("" if name == base else f" ({row[name] / row[base]:.2f}x)") for name in names]
        print(f"| {rows} | " + " | ".join(cells) + " |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": args.threads, "layers": args.layers, "shapes": shapes,
                                   "ms_per_step": results}, indent=2))
    print(f"\nJSON: {RESULTS}")


if __name__ == "__main__":
    main()
