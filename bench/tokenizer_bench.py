"""Encode throughput: the tokenizer service over gRPC vs tiktoken in-process, on the same text.

    make bench-tokenizer
    python bench/tokenizer_bench.py [--tokenizer PATH] [--size-mb 1] [--request-kb 100] [--concurrency 8]

The text (~1 MB, deterministic) mixes English documentation prose (Python's pydoc topics), Python
source code (the standard library) and multilingual text with emoji. It is cut into requests of
--request-kb each (and also sent whole) and encoded

- in-process: tiktoken's ``Encoding.encode_ordinary`` on the same ranks and pattern (the baseline),
  from 1 thread and from --concurrency threads, each with its own Encoding (tiktoken releases the GIL);
- through the service: ``Encode`` over a real channel to ``python -m tokenizer_service`` on
  127.0.0.1, one call at a time and --concurrency calls in flight.

Service and client share the machine's cores, as they would on one host. Best of --repeat runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from tokenizer_service import Tokenizer, load_tokenizer

REPO = Path(__file__).resolve().parent.parent

# A few sentences per script, recombined at random (seeded) for the multilingual share.
MULTILINGUAL = [
    "Les modèles de langage découpent le texte en jetons avant de le traiter.",
    "Sprachmodelle zerlegen Text in Tokens, bevor sie ihn verarbeiten – schnell und verlustfrei.",
    "Языковые модели разбивают текст на токены перед обработкой.",
    "言語モデルはテキストを処理する前にトークンに分割します。",
    "语言模型在处理文本之前会先将其切分为词元。",
    "언어 모델은 텍스트를 처리하기 전에 토큰으로 나눕니다.",
    "تقوم النماذج اللغوية بتقسيم النص إلى رموز قبل معالجته.",
    "मॉडल पाठ को संसाधित करने से पहले टोकन में विभाजित करते हैं।",
    "Τα γλωσσικά μοντέλα χωρίζουν το κείμενο σε διακριτικά.",
    "Emoji 🦙🚀👍🏽👨‍👩‍👧 and symbols ∑∫≠≈ → ✓ © ½ €100 ₿0.5",
]


def corpus(size: int) -> str:
    """~``size`` characters: 45% prose, 35% code, 20% multilingual, interleaved in 4 KB blocks."""
    from pydoc_data.topics import topics

    prose = "\n\n".join(topics[key] for key in sorted(topics))
    stdlib = Path(os.__file__).parent
    code = "".join((stdlib / name).read_text() for name in ("argparse.py", "typing.py", "inspect.py", "dataclasses.py"))
    rng = random.Random(0)
    multilingual = " ".join(rng.choice(MULTILINGUAL) for _ in range(size // 40))
    parts = {"prose": (prose, 0.45), "code": (code, 0.35), "multilingual": (multilingual, 0.20)}
    blocks = []
    for text, share in parts.values():
        wanted = int(size * share)
        text = (text * (wanted // len(text) + 1))[:wanted]
        blocks.append([text[i:i + 4096] for i in range(0, len(text), 4096)])
    mixed = []
    while any(blocks):
        for queue in blocks:
            if queue:
                mixed.append(queue.pop(0))
    return "".join(mixed)


def split_requests(text: str, request_chars: int) -> list[str]:
    return [text[i:i + request_chars] for i in range(0, len(text), request_chars)]


def best_of(repeat: int, run: Callable[[], int]) -> tuple[float, int]:
    """(seconds, tokens) of the fastest of ``repeat`` runs, after one warm-up."""
    tokens = run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        tokens = run()
        best = min(best, time.perf_counter() - start)
    return best, tokens


def in_process(tokenizer: Tokenizer, requests: list[str], concurrency: int) -> Callable[[], int]:
    """tiktoken's ``encode_ordinary`` on this thread, or on ``concurrency`` threads each with its own
    Encoding (tiktoken's regex is ~25% slower in threads sharing one: this is the faster baseline)."""
    if concurrency == 1:
        encoding = tokenizer.encoding()
        return lambda: sum(len(encoding.encode_ordinary(text)) for text in requests)
    pool = ThreadPoolExecutor(concurrency)
    return lambda: sum(pool.map(lambda text: len(tokenizer.encoding().encode_ordinary(text)), requests))


def through_service(address: str, requests: list[str], concurrency: int) -> Callable[[], int]:
    loop = asyncio.new_event_loop()

    async def connect() -> tokenizer_pb2_grpc.TokenizerServiceStub:  # an aio channel belongs to its loop
        channel = grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                              ("grpc.max_send_message_length", 64 << 20)])
        return tokenizer_pb2_grpc.TokenizerServiceStub(channel)

    stub = loop.run_until_complete(connect())
    messages = [tokenizer_pb2.EncodeRequest(text=text) for text in requests]

    async def run() -> int:
        pending = iter(messages)
        total = 0

        async def worker() -> None:
            nonlocal total
            for message in pending:  # the workers share one iterator: `concurrency` calls in flight
                reply = await stub.Encode(message)
                total += len(reply.token_ids)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total

    return lambda: loop.run_until_complete(run())


def start_service(tokenizer: str | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "tokenizer_service", "--host", "127.0.0.1", "--port", str(port),
               "--metrics-port", "0", "--log-level", "warning"]
    if tokenizer:
        command += ["--tokenizer", tokenizer]
    process = subprocess.Popen(command, cwd=REPO)
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return process, address
            except grpc.RpcError:
                pass
            if process.poll() is not None:
                raise SystemExit(f"the tokenizer service exited with {process.returncode}")
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the tokenizer service did not become healthy")


def main() -> None:
    flags = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_argument("--tokenizer", default=None, help="tokenizer path (default: Meta's Llama 3 tokenizer.model)")
    flags.add_argument("--size-mb", type=float, default=1.0)
    flags.add_argument("--request-kb", type=int, default=100)
    flags.add_argument("--concurrency", type=int, default=8)
    flags.add_argument("--repeat", type=int, default=3)
    flags.add_argument("--address", default=None, help="use a running service instead of starting one")
    args = flags.parse_args()

    if args.tokenizer is None:
        from llama_grpc_runtime.assets import llama3_tokenizer_path

        args.tokenizer = str(llama3_tokenizer_path())
    tokenizer = load_tokenizer(args.tokenizer)
    text = corpus(int(args.size_mb * 1_000_000))
    size_mb = len(text.encode()) / 1e6
    process, address = (None, args.address) if args.address else start_service(args.tokenizer)
    try:
        # The baseline is the bare tiktoken Encoding (same ranks, same pattern) and agrees with the core.
        assert tokenizer.encode(text[:100_000]) == tokenizer.encoding().encode_ordinary(text[:100_000])
        rows = []
        for label, requests in [(f"{args.request_kb} KB requests", split_requests(text, args.request_kb * 1000)),
                                (f"{size_mb:.1f} MB in one request", [text])]:
            for concurrency in sorted({1, args.concurrency if len(requests) > 1 else 1}):
                local = best_of(args.repeat, in_process(tokenizer, requests, concurrency))
                remote = best_of(args.repeat, through_service(address, requests, concurrency))
                rows.append((label, concurrency, local, remote))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)

    print(f"\ntokenizer {tokenizer.name}; text {size_mb:.2f} MB, {rows[0][2][1]:,} tokens; "
          f"{os.cpu_count()} CPUs; best of {args.repeat}\n")
    print("| requests | in flight | in-process MB/s | in-process tok/s | service MB/s | service tok/s | service / in-process |")
    print("|---|---|---|---|---|---|---|")
    for label, concurrency, (local_s, tokens), (remote_s, _) in rows:
        print(f"| {label} | {concurrency} | {size_mb / local_s:.2f} | {tokens / local_s:,.0f} | "
              f"{size_mb / remote_s:.2f} | {tokens / remote_s:,.0f} | {local_s / remote_s:.0%} |")


if __name__ == "__main__":
    main()
