"""Health under abuse: how fast a server answers grpc.health.v1 while its limits are being hit.

    .venv/bin/python bench/abuse_bench.py [--samples 200]

Starts a tokenizer service (the shared runtime every server uses; Meta's Llama 3 tokenizer) with small
limits and, for each kind of abuse in turn, measures health Check latency from a separate client
while the abuse runs: every concurrent-call slot held by streams (the next calls get
RESOURCE_EXHAUSTED), a flood of unparseable and oversize requests from 8 threads, 4 streams whose
clients stopped reading; then a second server whose model's chat template loops, 4 calls at a time
on its 2 chat template worker processes: once ended by the template's own 2 s budget, once by
``--chat-template-timeout 0.5`` (each call's worker killed and a new one spawned). Prints p50 / p99 /
max latency and the refusals each abuse got. The issue's target: health answers in < 100 ms.

First, the cost of the normal case: ApplyChatTemplate latency of a short dialog on the embedded
model (its GGUF Jinja template, rendered in a worker process), one call at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from llama_grpc_devtools.process import ServiceProcess  # noqa: E402
from llama_grpc_runtime.assets import default_model_path, llama3_tokenizer_path  # noqa: E402
from llama_grpc_stubs.common.v1 import common_pb2  # noqa: E402
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb  # noqa: E402
from llama_grpc_stubs.tokenizer.v1.tokenizer_pb2_grpc import TokenizerServiceStub  # noqa: E402

SERVICE = "/llama.tokenizer.v1.TokenizerService"
MAX_CALLS = 16


def health_latencies(address: str, samples: int) -> list[float]:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=10)  # connected before timing
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
    return latencies


def held_streams(address: str, stop: threading.Event, codes: Counter) -> None:
    """Every slot taken by a DecodeStream that sends one id and waits; then keep knocking."""
    channel = grpc.insecure_channel(address)
    stub = TokenizerServiceStub(channel)

    def held() -> Iterator[pb.DecodeStreamRequest]:
        yield pb.DecodeStreamRequest(token_ids=[9906])
        stop.wait()

    streams = [stub.DecodeStream(held(), timeout=600) for _ in range(MAX_CALLS)]
    for stream in streams:
        next(stream)
    while not stop.is_set():
        try:
            stub.Encode(pb.EncodeRequest(text="hi"), timeout=10)
            codes["OK"] += 1
        except grpc.RpcError as error:
            codes[error.code().name] += 1
    for stream in streams:
        stream.cancel()
    channel.close()


def flood(address: str, stop: threading.Event, codes: Counter) -> None:
    """Bytes that are not protobuf, and messages over --max-message-bytes, as fast as they go."""
    with grpc.insecure_channel(address) as channel:
        raw = channel.unary_unary(f"{SERVICE}/Encode", request_serializer=None, response_deserializer=None)
        big = pb.EncodeRequest(text="x" * 300_000).SerializeToString()
        while not stop.is_set():
            for payload in (b"\xff\xff\xff\xff", big):
                try:
                    raw(payload, timeout=10)
                    codes["OK"] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1


def stalled_readers(address: str, stop: threading.Event, codes: Counter) -> None:
    """4 DecodeStreams at a time whose clients never read the (large) replies; each is ended by the
    server's --stall-timeout, and a new one takes its place."""
    with grpc.insecure_channel(address) as channel:
        stub = TokenizerServiceStub(channel)

        def requests() -> Iterator[pb.DecodeStreamRequest]:
            while not stop.is_set():
                yield pb.DecodeStreamRequest(token_ids=[3492] * 10_000)  # 50 KB replies, under the limit

        while not stop.is_set():
            calls = [stub.DecodeStream(requests(), timeout=600) for _ in range(4)]
            while not stop.is_set() and not all(call.done() for call in calls):
                time.sleep(0.05)
            for call in calls:
                if call.done():
                    codes[call.code().name] += 1
                call.cancel()


def hostile_template(address: str, stop: threading.Event, codes: Counter) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = TokenizerServiceStub(channel)
        request = pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role="user", content="hi")])
        while not stop.is_set():
            futures = [stub.ApplyChatTemplate.future(request, timeout=60) for _ in range(4)]
            for future in futures:
                codes[future.code().name] += 1


DIALOG = [("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
          ("assistant", "Paris."), ("user", "And of Italy? Answer in one word.")]


def chat_latencies(address: str, samples: int) -> list[float]:
    """ApplyChatTemplate of a short 4-message dialog, one call at a time (the normal, harmless case)."""
    request = pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role=role, content=content)
                                                    for role, content in DIALOG])
    with grpc.insecure_channel(address) as channel:
        stub = TokenizerServiceStub(channel)
        for _ in range(20):  # connected and warm before timing
            stub.ApplyChatTemplate(request, timeout=10)
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            stub.ApplyChatTemplate(request, timeout=10)
            latencies.append(time.perf_counter() - started)
    return sorted(latencies)


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    """p50, p99 and max of sorted latencies, in ms."""
    return (statistics.median(latencies) * 1000, latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
            latencies[-1] * 1000)


def measure(name: str, address: str, abuse: Callable | None, samples: int) -> dict:
    stop = threading.Event()
    codes: Counter = Counter()
    threads = [threading.Thread(target=abuse, args=(address, stop, codes), daemon=True)
               for _ in range(8 if abuse is flood else 1)] if abuse else []
    for thread in threads:
        thread.start()
    time.sleep(2.0 if abuse else 0)  # let the abuse reach its steady state
    latencies = sorted(health_latencies(address, samples))
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    p50, p99, worst = percentiles(latencies)
    return {"abuse": name, "p50 ms": p50, "p99 ms": p99, "max ms": worst,
            "refusals": ", ".join(f"{code} {count}" for code, count in codes.most_common() if code != "OK") or "-"}


def hostile_tokenizer_dir(directory: Path) -> Path:
    """The embedded model's tokenizer with a chat template that loops for ever."""
    from tests.tokenizer_service.hf_reference import hf_tokenizer_from_gguf

    hf_tokenizer_from_gguf(default_model_path()).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"}))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200, help="health checks per abuse")
    parser.add_argument("--chat-samples", type=int, default=500, help="ApplyChatTemplate calls timed")
    args = parser.parse_args()
    flags = ["--tokenizer", str(llama3_tokenizer_path()), "--max-concurrent-rpcs", str(MAX_CALLS),
             "--max-message-bytes", "100000", "--stall-timeout", "1"]
    with ServiceProcess("tokenizer_service") as server:  # the embedded model: its GGUF Jinja template
        server.wait_healthy()
        chat = percentiles(chat_latencies(server.address, args.chat_samples))
    print(f"\nApplyChatTemplate of a 4-message dialog on the embedded model (its own Jinja template), one call "
          f"at a time ({args.chat_samples} calls): p50 {chat[0]:.2f} ms, p99 {chat[1]:.2f} ms, max {chat[2]:.2f} ms")
    rows = []
    with ServiceProcess("tokenizer_service", *flags) as server:
        server.wait_healthy()
        for name, abuse in (("none", None), (f"{MAX_CALLS} calls held (the limit)", held_streams),
                            ("unparseable + oversize flood, 8 threads", flood),
                            ("4 clients stopped reading", stalled_readers)):
            rows.append(measure(name, server.address, abuse, args.samples))
    with tempfile.TemporaryDirectory() as tmp:
        hostile_dir = str(hostile_tokenizer_dir(Path(tmp)))
        for name, flags in (("hostile chat template on every worker", []),
                            ("the same, killed at --chat-template-timeout 0.5", ["--chat-template-timeout", "0.5"])):
            with ServiceProcess("tokenizer_service", "--tokenizer", hostile_dir, "--chat-template-workers", "2",
                                *flags) as server:
                server.wait_healthy()
                rows.append(measure(name, server.address, hostile_template, args.samples))
    print(f"\nhealth Check latency while a tokenizer service is abused ({args.samples} checks each)\n")
    print(f"| {'abuse':<48} | p50 ms | p99 ms | max ms | refusals the abuse got |")
    print(f"|{'-' * 50}|-------:|-------:|-------:|---|")
    for row in rows:
        print(f"| {row['abuse']:<48} | {row['p50 ms']:6.1f} | {row['p99 ms']:6.1f} | {row['max ms']:6.1f} | "
              f"{row['refusals']} |")


if __name__ == "__main__":
    main()
