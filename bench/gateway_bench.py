"""What the gateway costs: the same generations straight from the model service and through the gateway.

    .venv/bin/python bench/gateway_bench.py [--concurrency 1,8] [--rounds 3] [--max-new-tokens 64]

Starts the tokenizer service, the model service (embedded SmolLM2-135M unless --checkpoint) and the
gateway on free ports. At each concurrency C, C closed-loop clients send ``rounds`` text-completion
requests apiece, back to back, first to the model service directly (prompt ids encoded up front),
then to the gateway (which also encodes, decodes every token through DecodeStream and runs the
stop-sequence matcher with one stop sequence). Every request samples with its own seed, so both
paths generate the same tokens. Reported: time to first token p50, per-stream tokens/s (median),
aggregate tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama_grpc_devtools.process import ServiceProcess  # noqa: E402
from llama_grpc_stubs.common.v1 import common_pb2  # noqa: E402
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc  # noqa: E402

PROMPTS = [
    "The history of the printing press begins",
    "A good recipe for bread needs",
    "The three laws of motion say that",
    "In the morning the harbour was",
]
STOP = "\n\n\n\n"  # present so the matcher runs; long enough that it never matches


async def one_request(kind: str, stubs: dict, prompt: str, prompt_ids: list[int], seed: int,
                      max_new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, seconds after the first token, tokens) for one streamed request."""
    sampling = common_pb2.SamplingParams(temperature=0.8, top_p=0.95, seed=seed)
    started = time.perf_counter()
    first = None
    tokens = 0
    if kind == "model":
        call = stubs["model"].Generate(model_pb2.GenerateRequest(
            prompt_token_ids=prompt_ids, sampling=sampling,
            stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens)))
    else:
        call = stubs["gateway"].GenerateStream(gateway_pb2.GenerateStreamRequest(
            prompt=prompt, sampling=sampling,
            stopping=common_pb2.StoppingCriteria(max_new_tokens=max_new_tokens, stop_sequences=[STOP])))
    async for reply in call:
        if reply.token_ids and first is None:
            first = time.perf_counter()
        tokens += len(reply.token_ids)
    end = time.perf_counter()
    first = first or end
    return first - started, end - first, tokens


async def level(kind: str, stubs: dict, prompt_ids: dict, concurrency: int, rounds: int,
                max_new_tokens: int) -> dict:
    results: list[tuple[float, float, int]] = []

    async def client(index: int) -> None:
        for round_ in range(rounds):
            prompt = PROMPTS[(index + round_) % len(PROMPTS)]
            results.append(await one_request(kind, stubs, prompt, prompt_ids[prompt], 1000 * index + round_,
                                             max_new_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "ttft_p50_ms": 1000 * statistics.median(r[0] for r in results),
        "stream_tps": statistics.median((r[2] - 1) / r[1] for r in results if r[2] > 1 and r[1] > 0),
        "aggregate_tps": sum(r[2] for r in results) / wall,
        "tokens": sum(r[2] for r in results),
    }


async def run(args: argparse.Namespace, model: str, gateway: str) -> None:
    async with grpc.aio.insecure_channel(model) as model_channel, \
            grpc.aio.insecure_channel(gateway) as gateway_channel:
        stubs = {"model": model_pb2_grpc.ModelServiceStub(model_channel),
                 "gateway": gateway_pb2_grpc.GatewayServiceStub(gateway_channel)}
        # The very ids the gateway sends upstream for each prompt (BOS or not, as the model's files say).
        tokenize = stubs["gateway"].Tokenize
        prompt_ids = {p: list((await tokenize(gateway_pb2.TokenizeRequest(text=p))).token_ids) for p in PROMPTS}
        await level("model", stubs, prompt_ids, 1, 1, 8)  # warm up both paths
        await level("gateway", stubs, prompt_ids, 1, 1, 8)
        print("| concurrency | path | TTFT p50 (ms) | per-stream tokens/s | aggregate tokens/s | tokens |")
        print("|---|---|---|---|---|---|")
        for concurrency in args.concurrency:
            for kind in ("model", "gateway"):
                row = await level(kind, stubs, prompt_ids, concurrency, args.rounds, args.max_new_tokens)
                label = "model service direct" if kind == "model" else "through the gateway"
                print(f"| {concurrency} | {label} | {row['ttft_p50_ms']:.0f} | {row['stream_tps']:.1f} | "
                      f"{row['aggregate_tps']:.1f} | {row['tokens']} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", default=None)
    args = parser.parse_args()
    path = ("--checkpoint", args.checkpoint) if args.checkpoint else ()
    tokenizer = ServiceProcess("tokenizer_service", *(("--tokenizer", args.checkpoint) if args.checkpoint else ()))
    model = ServiceProcess("model_service", *path, "--max-batch-size", str(max(args.concurrency)))
    gateway = None
    try:
        tokenizer.wait_healthy()
        model.wait_healthy(timeout=600)
        gateway = ServiceProcess("gateway", "--tokenizer-address", tokenizer.address,
                                 "--model-address", model.address).wait_healthy()
        asyncio.run(run(args, model.address, gateway.address))
    finally:
        for process in (gateway, model, tokenizer):
            if process is not None:
                process.stop()


if __name__ == "__main__":
    main()
