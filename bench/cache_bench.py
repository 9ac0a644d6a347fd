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

4. two model replicas behind the gateway, ``--routing round_robin`` vs ``--routing prefix``, on a
   shared-prefix chat workload: several families of requests, each family sharing a long system
   prompt, in shuffled order from a few concurrent clients (each policy gets families of its own, so
   neither finds the other's prompts cached): prefix-hit rate (prompt tokens served from the cache,
   as the replicas report them in usage), time to first token p50 / p99 through the gateway, and how
   the requests split over the replicas.

Every phase is bounded by its sizes; --quick shrinks them for a smoke run; --only routing runs the
last section alone.
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
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
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


def counter(proc: ServiceProcess, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(sample.value for family in text_string_to_metric_families(proc.metrics_text())
               for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


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


WORDS = ("river mountain lantern copper violet harbor orchard thunder meadow silver glacier canyon falcon ember "
         "willow quartz prairie cobalt tundra marble beacon saffron juniper basalt").split()


def system_prompt(rng: random.Random, words: int) -> str:
    return f"You are assistant {rng.randrange(10**6)}. Keep to these notes: " + " ".join(
        rng.choice(WORDS) for _ in range(words))


async def chat_stream(stub, system: str, question: str, new_tokens: int) -> tuple[float, int, int]:
    """(seconds to the first token, prompt tokens, of which from the cache) for one gateway stream."""
    request = gateway_pb2.GenerateStreamRequest(
        messages=[common_pb2.Message(role="system", content=system), common_pb2.Message(role="user", content=question)],
        sampling=common_pb2.SamplingParams(temperature=0.0),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
    started = time.perf_counter()
    first = None
    prompt = cached = 0
    async for response in stub.GenerateStream(request, timeout=600):
        if response.token_ids and first is None:
            first = time.perf_counter() - started
        if response.usage.prompt_tokens:
            prompt, cached = response.usage.prompt_tokens, response.usage.cached_prompt_tokens
    return first if first is not None else time.perf_counter() - started, prompt, cached


def shared_prefix_workload(address: str, seed: int, families: int, per_family: int, system_words: int,
                           concurrency: int, new_tokens: int) -> tuple[list[float], int, int]:
    """``families`` x ``per_family`` chat requests, shuffled, from ``concurrency`` clients:
    (each time to first token, prompt tokens, prompt tokens from the cache)."""
    rng = random.Random(seed)
    systems = [system_prompt(rng, system_words) for _ in range(families)]
    work = [(systems[f], f"Question {q}: what is note {rng.randrange(100)} about?")
            for f in range(families) for q in range(per_family)]
    rng.shuffle(work)

    async def run():
        queue: asyncio.Queue = asyncio.Queue()
        for item in work:
            queue.put_nowait(item)
        results = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def client() -> None:
                while not queue.empty():
                    system, question = queue.get_nowait()
                    results.append(await chat_stream(stub, system, question, new_tokens))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        return results

    results = asyncio.run(run())
    return [r[0] for r in results], sum(r[1] for r in results), sum(r[2] for r in results)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def routing(checkpoint: str | None, quick: bool) -> list[tuple[str, str]]:
    """Section 4: two replicas, round robin vs prefix routing through the gateway."""
    families, per_family, system_words, concurrency, new_tokens = (4, 4, 150, 4, 4) if quick else (8, 8, 600, 8, 8)
    tokenizer = ServiceProcess("tokenizer_service", *(["--tokenizer", checkpoint] if checkpoint else []))
    rows = []
    try:
        tokenizer.wait_healthy(timeout=120)
        runs = [(kv, policy) for kv in ((4096,) if quick else (8192, 3072)) for policy in ("round_robin", "prefix")]
        for number, (kv_tokens, policy) in enumerate(runs):
            # Fresh replicas for each policy (both start cold), one core each (OMP_NUM_THREADS=1): two
            # replicas with two OpenMP threads each on 2 cores spin against each other, and that noise
            # would swamp what routing changes.
            models = [ServiceProcess("model_service", *(["--checkpoint", checkpoint] if checkpoint else []),
                                     "--max-seq-len", "2048", "--kv-cache-tokens", str(kv_tokens),
                                     "--max-batch-size", "16", "--max-queue", "256", "--prefill-chunk", "512",
                                     env={"OMP_NUM_THREADS": "1"})
                      for _ in range(2)]
            gateway = None
            try:
                for model in models:
                    model.wait_healthy(timeout=600)
                gateway = ServiceProcess("gateway", "--tokenizer-address", tokenizer.address, "--model-address",
                                         ",".join(m.address for m in models), "--routing", policy,
                                         "--health-interval", "0.5")
                gateway.wait_healthy(timeout=120)
                shared_prefix_workload(gateway.address, 1000 + number, 2, 1, 20, 2, 2)  # warm-up, other prompts
                served = [counter(m, "llama_model_requests_total", method="Generate") for m in models]
                before = [gauge(m, "llama_model_prefix_cache_hit_tokens_total") for m in models]
                started = time.perf_counter()
                ttfts, prompt, cached = shared_prefix_workload(gateway.address, 0, families, per_family,
                                                                system_words, concurrency, new_tokens)
                wall = time.perf_counter() - started
                split = [counter(m, "llama_model_requests_total", method="Generate") - s
                         for m, s in zip(models, served, strict=True)]
                hits = [gauge(m, "llama_model_prefix_cache_hit_tokens_total") - b
                        for m, b in zip(models, before, strict=True)]
            finally:
                for process in ([gateway] if gateway else []) + models:
                    process.stop()
            rows.append((f"2 replicas of {kv_tokens} cache tokens, --routing {policy}",
                         f"prefix hits {cached / max(prompt, 1):.0%} of {prompt} prompt tokens "
                         f"(replicas' own count: {sum(hits):.0f}), TTFT p50 {statistics.median(ttfts) * 1000:.0f} ms "
                         f"p99 {percentile(ttfts, 0.99) * 1000:.0f} ms, calls per replica "
                         f"{'/'.join(f'{c:.0f}' for c in split)}, {wall:.0f} s"))
    finally:
        tokenizer.stop()
    rows.insert(0, ("routing workload", f"{families} families x {per_family} chats, ~{system_words}-word shared "
                                        f"system prompt each, {concurrency} clients, {new_tokens} new tokens"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the bench runs")
    parser.add_argument("--only", choices=["all", "routing"], default="all",
                        help="routing: only section 4 (two replicas, prefix routing vs round robin)")
    args = parser.parse_args()
    q = args.quick
    if args.only == "routing":
        print_table(routing(args.checkpoint, q))
        return
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
    rows += routing(args.checkpoint, q)
    print_table(rows)


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measurement':<{width}}  result")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
