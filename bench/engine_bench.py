"""Load generator for the model service: continuous batching against one-request-at-a-time.

    make bench-engine          # or: .venv/bin/python bench/engine_bench.py [--concurrency 1,4,16,64] ...

Starts ``python -m model_service`` (the embedded SmolLM2-135M unless --checkpoint) twice: batched
(--max-batch-size = the highest concurrency) and one-at-a-time (--max-batch-size 1, the contrast).
At each concurrency level C, C closed-loop clients (grpc.aio, one channel each) send ``rounds``
chat requests apiece, back to back; every request samples (temperature 0.6, top_p 0.9, a seed of
its own) up to --max-new-tokens tokens.

Reported per level: time to first token p50/p99 (send -> first token), inter-token latency
p50/p99 (a chunk of k tokens after a gap g counts k gaps of g/k), per-stream decode tokens/s
(median over requests of tokens after the first / time after the first), aggregate tokens/s (all
generated tokens / wall time of the level), and mean sequences per engine step (from the
service's own metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llama_grpc_devtools.process import ServiceProcess  # noqa: E402
from llama_grpc_stubs.common.v1 import common_pb2  # noqa: E402
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc  # noqa: E402

QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a walk through a busy market in the morning.",
    "Give me a detailed recipe for vegetable soup.",
    "Why is the sky blue? Explain it to a curious child.",
    "Write a letter to a friend about your summer holidays.",
    "List ten ideas for a rainy weekend and explain each one.",
    "Tell the history of the printing press in a few paragraphs.",
]


@dataclass
class Level:
    concurrency: int
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    stream_rates: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    steps: float = 0.0


def prompts(checkpoint: str | None) -> list[list[int]]:
    from tokenizer_service.loader import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}]).token_ids) for q in QUESTIONS]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def metric(proc: ServiceProcess, name: str) -> float:
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


async def one_request(stub, prompt: list[int], seed: int, max_new_tokens: int, level: Level) -> None:
    request = model_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(seed=seed),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens))
    sent = time.perf_counter()
    first = last = None
    count = 0
    async for response in stub.Generate(request):
        now = time.perf_counter()
        k = len(response.token_ids)
        if not k:
            continue
        if first is None:
            first = now
            level.ttft.append(now - sent)
        else:
            level.itl.extend([(now - last) / k] * k)
        count += k
        last = now
    level.tokens += count
    level.requests += 1
    if first is not None and last is not None and count > 1 and last > first:
        level.stream_rates.append((count - 1) / (last - first))


async def run_level(address: str, concurrency: int, rounds: int, all_prompts: list[list[int]],
                    max_new_tokens: int) -> Level:
    level = Level(concurrency)

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            for round_ in range(rounds):
                n = index * rounds + round_
                await one_request(stub, all_prompts[n % len(all_prompts)], seed=n, max_new_tokens=max_new_tokens,
                                  level=level)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    level.wall_s = time.perf_counter() - started
    return level


def serve(checkpoint: str | None, max_batch_size: int, max_queue: int, max_seq_len: int) -> ServiceProcess:
    args = ["--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue), "--max-seq-len", str(max_seq_len),
            "--log-level", "warning"]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    return ServiceProcess("model_service", *args).wait_healthy(timeout=600)


def bench(proc: ServiceProcess, label: str, levels: list[int], rounds: int, all_prompts: list[list[int]],
          max_new_tokens: int) -> list[tuple[str, Level]]:
    results = []
    for concurrency in levels:
        steps_before = metric(proc, "llama_model_step_seconds_count")
        level = asyncio.run(run_level(proc.address, concurrency, rounds, all_prompts, max_new_tokens))
        level.steps = metric(proc, "llama_model_step_seconds_count") - steps_before
        results.append((label, level))
        print(f"  {label:<14} c={concurrency:<3} {level.tokens} tokens in {level.wall_s:.1f} s", file=sys.stderr)
    return results


def table(rows: list[tuple[str, Level]], baseline: float) -> str:
    lines = ["| server | concurrency | requests | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | per-stream tok/s "
             "| aggregate tok/s | vs c=1 | tokens per step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, lv in rows:
        aggregate = lv.tokens / lv.wall_s
        per_step = lv.tokens / lv.steps if lv.steps else float("nan")
        lines.append(
            f"| {label} | {lv.concurrency} | {lv.requests} | {1000 * percentile(lv.ttft, 0.5):.0f} / "
            f"{1000 * percentile(lv.ttft, 0.99):.0f} | {1000 * percentile(lv.itl, 0.5):.0f} / "
            f"{1000 * percentile(lv.itl, 0.99):.0f} | {statistics.median(lv.stream_rates or [float('nan')]):.1f} "
            f"| {aggregate:.1f} | {aggregate / baseline:.1f}x | {per_step:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="model to serve (default: the embedded SmolLM2-135M)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="client concurrency levels")
    parser.add_argument("--contrast", default="1,4,16",
                        help="levels also run against a --max-batch-size 1 server (one request at a time); "
                             "its throughput does not depend on concurrency, only its latency does")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends, back to back")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]
    contrast = [int(c) for c in args.contrast.split(",") if c]
    all_prompts = prompts(args.checkpoint)
    queue = max(levels + contrast)

    print(f"batched server: --max-batch-size {max(levels)}", file=sys.stderr)
    with serve(args.checkpoint, max(levels), queue, args.max_seq_len) as proc:
        rows = bench(proc, "batched", levels, args.rounds, all_prompts, args.max_new_tokens)
    if contrast:
        print("one-at-a-time server: --max-batch-size 1", file=sys.stderr)
        with serve(args.checkpoint, 1, queue, args.max_seq_len) as proc:
            rows += bench(proc, "one at a time", contrast, args.rounds, all_prompts, args.max_new_tokens)
    baseline = next(lv.tokens / lv.wall_s for label, lv in rows if label == "batched" and lv.concurrency == min(levels))
    print(f"\nmodel service, {args.checkpoint or 'SmolLM2-135M-Instruct (embedded)'}, float32 CPU; "
          f"{args.rounds} requests per client, up to {args.max_new_tokens} new tokens, temperature 0.6 / top_p 0.9\n")
    print(table(rows, baseline))


if __name__ == "__main__":
    main()
