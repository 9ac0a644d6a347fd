"""The paged KV cache and the prefix cache, measured against the model service.

    make bench-cache       # or: .venv/bin/python bench/cache_bench.py [--quick]

Starts ``python -m model_service`` (the embedded SmolLM2-135M unless --checkpoint) and reports:

1. time to first token of a request sharing a 1,500-token system prompt with an earlier one
   (prefix cache hit) vs the first (cold), median over a few system prompts;
2. concurrent sequences in the memory of 16 x 2048 slots (--kv-cache-tokens 32768) with a mix of
   lengths (prompts 30-1,000 tokens, outputs 20-200, log-uniform), read from the service's own
   ``llama_model_running_sequences`` gauge while the load runs (a slot cache holds 16);
3. aggregate generated tokens/s of 64 concurrent streams sharing a system prompt, with and
   without the prefix cache.

Prefix routing across replicas is not measured here (the gateway's ``--routing prefix`` is not
implemented yet). Every phase is bounded by its sizes; --quick shrinks them for a smoke run.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protos"))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llama_grpc_devtools.process import ServiceProcess  # noqa: E402
from llama_grpc_stubs.common.v1 import common_pb2  # noqa: E402
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc  # noqa: E402

VOCAB_LOW, VOCAB_HIGH = 1000, 40000  # ordinary token ids of SmolLM2's vocabulary


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]


def start(checkpoint: str | None, *flags: str) -> ServiceProcess:
    args = ["--checkpoint", checkpoint] if checkpoint else []
    proc = ServiceProcess("model_service", *args, *flags)
    proc.wait_healthy(timeout=600)
    return proc


def gauge(proc: ServiceProcess, name: str) -> float:
    for family in text_string_to_metric_families(proc.metrics_text()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


def request(prompt: list[int], max_new_tokens: int) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(prompt_token_ids=prompt,
                                     sampling=common_pb2.SamplingParams(temperature=0.0),
                                     stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens))


async def generate(stub, req) -> tuple[float, int, int]:
    """(seconds to the first token, tokens generated, prompt tokens served from the cache)."""
    started = time.perf_counter()
    first, count, cached = None, 0, 0
    async for response in stub.Generate(req):
        if response.token_ids and first is None:
            first = time.perf_counter() - started
        count += len(response.token_ids)
        if response.finish_reason:
            cached = response.usage.cached_prompt_tokens
    return first if first is not None else time.perf_counter() - started, count, cached


def ttft(proc: ServiceProcess, system_len: int, families: int) -> tuple[float, float, int]:
    rng = random.Random(1)

    async def run():
        cold, warm, hits = [], [], []
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            for _ in range(families):
                system = tokens(rng, system_len)
                first = await generate(stub, request(system + tokens(rng, 20), 1))
                second = await generate(stub, request(system + tokens(rng, 20), 1))
                cold.append(first[0])
                warm.append(second[0])
                hits.append(second[2])
        return statistics.median(cold), statistics.median(warm), min(hits)

    return asyncio.run(run())


def concurrency(proc: ServiceProcess, n_requests: int, quick: bool = False) -> tuple[float, float, int, float]:
    """(peak running sequences, mean while busy, preemptions, wall seconds)."""
    rng = random.Random(2)

    def log_uniform(low: int, high: int) -> int:
        return int(math.exp(rng.uniform(math.log(low), math.log(high))))

    prompt_max, output_max = (300, 40) if quick else (1000, 200)
    reqs = [request(tokens(rng, log_uniform(30, prompt_max)), log_uniform(20, output_max)) for _ in range(n_requests)]
    samples: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            samples.append(gauge(proc, "llama_model_running_sequences"))
            time.sleep(0.25)

    async def run():
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            await asyncio.gather(*(generate(stub, r) for r in reqs))

    preempted = gauge(proc, "llama_model_preemptions_total")
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    started = time.perf_counter()
    asyncio.run(run())
    wall = time.perf_counter() - started
    done.set()
    poller.join()
    busy = [s for s in samples if s > 0] or [0.0]
    return max(samples or [0.0]), statistics.mean(busy), int(gauge(proc, "llama_model_preemptions_total") - preempted), wall


def streams(proc: ServiceProcess, n: int, system_len: int, new_tokens: int) -> tuple[float, int]:
    """(aggregate generated tokens/s, prompt tokens served from the cache)."""
    rng = random.Random(3)
    system = tokens(rng, system_len)

    async def run():
        async with grpc.aio.insecure_channel(proc.address) as channel:
            stub = model_pb2_grpc.ModelServiceStub(channel)
            await generate(stub, request(system + tokens(rng, 10), 1))  # the system prompt, once
            started = time.perf_counter()
            results = await asyncio.gather(*(generate(stub, request(system + tokens(rng, 20), new_tokens))
                                             for _ in range(n)))
            return sum(r[1] for r in results) / (time.perf_counter() - started), sum(r[2] for r in results)

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the bench runs")
    args = parser.parse_args()
    q = args.quick
    system_len = 300 if q else 1500
    rows = []

    proc = start(args.checkpoint, "--max-seq-len", "2048", "--kv-cache-tokens", "32768", "--max-batch-size",
                 "128" if not q else "16", "--max-queue", "256", "--prefill-chunk", "512")
    try:
        cold, warm, hits = ttft(proc, system_len, 2 if q else 3)
        rows.append(("TTFT, shared system prompt", f"first {cold * 1000:.0f} ms, second {warm * 1000:.0f} ms "
                     f"({cold / warm:.1f}x; {hits} of {system_len + 20} prompt tokens from the cache)"))
        peak, mean, preempted, wall = concurrency(proc, 12 if q else 160, q)
        rows.append(("concurrent sequences in 16 x 2048 slots' memory",
                     f"peak {peak:.0f}, mean {mean:.1f} while busy (slot cache: 16; {preempted} preemptions, "
                     f"{wall:.0f} s)"))
    finally:
        proc.stop()

    n, new_tokens = (8, 8) if q else (64, 32)
    stream_len = 200 if q else 1000
    rates = {}
    for label, flags in (("with prefix cache", ()), ("without prefix cache", ("--no-prefix-cache",))):
        proc = start(args.checkpoint, "--max-seq-len", "2048", "--kv-cache-tokens", str(n * (stream_len + 64) + 2048),
                     "--max-batch-size", str(n), "--max-queue", str(n), "--prefill-chunk", "512", *flags)
        try:
            rate, cached = streams(proc, n, stream_len, new_tokens)
        finally:
            proc.stop()
        rates[label] = rate
        rows.append((f"{n} streams, {stream_len}-token shared system prompt, {label}",
                     f"{rate:.1f} tok/s aggregate ({cached} prompt tokens from the cache)"))
    rows.append((f"{n} streams: prefix cache speed-up",
                 f"{rates['with prefix cache'] / rates['without prefix cache']:.1f}x"))

    width = max(len(name) for name, _ in rows)
    print(f"\n{'measurement':<{width}}  result")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
