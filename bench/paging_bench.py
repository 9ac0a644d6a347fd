"""Decode speed of the paged KV cache vs the slot cache it replaced, on the same weights.

    make bench-paging      # or: .venv/bin/python bench/paging_bench.py [--quick]

Issue 13 asks that paging cost batch-1 and batch-16 decode at most 5%. The slot cache is the
model code of commit ``SLOT_COMMIT`` (each sequence owned ``max_seq_len`` consecutive positions),
read from git; the paged cache is this checkout's ``model_service/model.py``. Both run one random
SmolLM2-135M-shaped float32 checkpoint (the same tensors: ``load_state_dict(assign=True)``), so
the difference is the cache and attention code alone. Each step decodes one token for every
sequence at context ``--context``; the paged model runs two layouts: the blocks of each sequence
consecutive (a fresh pool) and interleaved across sequences (a pool after churn: every read is a
gather). Repetitions alternate between the models (noise on a shared machine hits all alike);
medians are reported.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_grpc_devtools.make_checkpoint import PRESETS  # noqa: E402
from model_service import distributed  # noqa: E402
from model_service import model as paged  # noqa: E402

SLOT_COMMIT = "b201937"  # the last model.py with the slot cache (before the paged cache landed)


def slot_module():
    """The slot-cache model.py of SLOT_COMMIT, imported under another name."""
    try:
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{SLOT_COMMIT}:model_service/model.py"],
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        sys.exit(f"paging_bench needs the git history (commit {SLOT_COMMIT}) for the slot cache: {error}")
    path = Path(tempfile.mkdtemp()) / "slot_model.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("slot_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["slot_model"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16", help="batch sizes (comma-separated)")
    parser.add_argument("--context", type=int, default=512, help="cache positions each sequence attends over")
    parser.add_argument("--steps", type=int, default=16, help="decode steps per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the bench runs")
    args = parser.parse_args()
    if args.quick:
        args.context, args.steps, args.repeats = 64, 2, 1
    batches = [int(b) for b in args.batch.split(",")]
    torch.manual_seed(0)
    distributed.ensure_initialized()
    model_args = PRESETS["135m"]
    max_seq_len = args.context + args.steps * args.repeats + 1
    max_batch = max(batches)

    slot = slot_module()
    slot_model = slot.Transformer(model_args)
    paged_model = paged.Transformer(model_args)
    state = {name: torch.randn(p.shape) * 0.02 for name, p in paged_model.state_dict().items()}
    for net in (slot_model, paged_model):
        net.load_state_dict(state, assign=True, strict=True)
        net.eval()
    slot_model.setup_caches(max_batch, max_seq_len, torch.float32, "cpu")
    bs = args.block_size
    per_seq = -(-max_seq_len // bs)
    paged_model.setup_caches(max_batch, max_seq_len, torch.float32, "cpu", num_blocks=max_batch * per_seq,
                             block_size=bs)

    def step_slot(b: int, pos: int) -> None:
        slot_model(slot.Batch(tokens=torch.full((b,), 7), slots=list(range(b)), start_pos=[pos] * b, lengths=[1] * b))

    def tables(b: int, interleaved: bool) -> list[list[int]]:
        if interleaved:  # block j of sequence i is block j * b + i: no two of a sequence's blocks adjacent
            return [[j * b + i for j in range(per_seq)] for i in range(b)]
        return [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]

    def step_paged(b: int, pos: int, interleaved: bool) -> None:
        paged_model(paged.Batch(tokens=torch.full((b,), 7), block_tables=tables(b, interleaved),
                                start_pos=[pos] * b, lengths=[1] * b))

    runs = {"slot cache": step_slot,
            "paged, consecutive blocks": lambda b, pos: step_paged(b, pos, False),
            "paged, interleaved blocks": lambda b, pos: step_paged(b, pos, True)}
    print(f"SmolLM2-135M shape, float32, {torch.get_num_threads()} threads, context {args.context}, "
          f"block size {bs}, {args.steps} steps x {args.repeats} repeats", flush=True)
    header = f"{'batch':>5}  {'cache':<26} {'tokens/s':>9} {'ms/step':>8} {'vs slot':>8}"
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for b in batches:
            times: dict[str, list[float]] = {name: [] for name in runs}
            for run in runs.values():  # warm-up
                run(b, args.context)
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    for step in range(args.steps):
                        run(b, args.context + step)
                    times[name].append((time.perf_counter() - start) / args.steps)
            base = statistics.median(times["slot cache"])
            for name, values in times.items():
                step = statistics.median(values)
                print(f"{b:>5}  {name:<26} {b / step:>9.1f} {step * 1000:>8.2f} {base / step:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
