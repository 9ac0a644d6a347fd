"""What the gateway costs: the same generations straight from the model service and through the gateway.

    make bench-gateway     # or: .venv/bin/python bench/gateway_bench.py [--concurrency 1,8] [--rounds 3]
                           #     [--repeats 3] [--max-new-tokens 64] [--json OUT]

Starts the tokenizer service, the model service (embedded SmolLM2-135M unless --checkpoint) and two
gateways on free ports: one decoding generated tokens itself (``--detokenize local``, the default) and
one sending them through the tokenizer's DecodeStream (``--detokenize tokenizer``). At each
concurrency C, C closed-loop clients send ``rounds`` text-completion requests apiece, back to back, to
the model service directly (prompt ids encoded up front), and to each gateway (which also encodes,
decodes and runs the stop-sequence matcher with one stop sequence); the three paths take turns,
``repeats`` times, in alternating order, so a slow spell of the machine hits them alike. Every request
samples with its own seed, so every path generates the same tokens (up to what batching changes in the
last bits: README, "Batch invariance"). Reported (medians over the
repeats): time to first token p50, per-stream tokens/s (median), aggregate tokens/s, the path's
aggregate over the model service's in the same repeat (the split), and the CPU time each process took
per generated token (from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
        call = stubs[kind].GenerateStream(gateway_pb2.GenerateStreamRequest(
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


PATHS = {"model": "model service direct", "gateway": "gateway, decoding itself (default)",
         "gateway_tokenizer": "gateway, DecodeStream (--detokenize tokenizer)"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace, addresses: dict[str, str], pids: dict[str, int]) -> list[dict]:
    channels = {kind: grpc.aio.insecure_channel(address) for kind, address in addresses.items()}
    try:
        stubs = {"model": model_pb2_grpc.ModelServiceStub(channels["model"])}
        for kind in ("gateway", "gateway_tokenizer"):
            stubs[kind] = gateway_pb2_grpc.GatewayServiceStub(channels[kind])
        # The very ids the gateway sends upstream for each prompt (BOS or not, as the model's files say).
        tokenize = stubs["gateway"].Tokenize
        prompt_ids = {p: list((await tokenize(gateway_pb2.TokenizeRequest(text=p))).token_ids) for p in PROMPTS}
        for kind in PATHS:  # warm up every path
            await level(kind, stubs, prompt_ids, 1, 1, 8)
        rows = []
        for concurrency in args.concurrency:
            runs: dict[str, list[dict]] = {kind: [] for kind in PATHS}
            for repeat in range(args.repeats):
                order = list(PATHS) if repeat % 2 == 0 else list(reversed(PATHS))
                for kind in order:
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    row = await level(kind, stubs, prompt_ids, concurrency, args.rounds, args.max_new_tokens)
                    row["cpu_ms_per_token"] = {name: 1000 * (cpu_seconds(pid) - before[name]) / row["tokens"]
                                               for name, pid in pids.items()}
                    runs[kind].append(row)
            for kind in PATHS:
                splits = [1 - ours["aggregate_tps"] / model["aggregate_tps"]
                          for ours, model in zip(runs[kind], runs["model"], strict=True)]
                rows.append({
                    "concurrency": concurrency, "path": kind, "runs": runs[kind],
                    **{key: statistics.median(r[key] for r in runs[kind])
                       for key in ("ttft_p50_ms", "stream_tps", "aggregate_tps", "tokens")},
                    "split": statistics.median(splits),
                    "cpu_ms_per_token": {name: statistics.median(r["cpu_ms_per_token"][name] for r in runs[kind])
                                         for name in pids},
                })
        return rows
    finally:
        for channel in channels.values():
            await channel.close()


def table(rows: list[dict]) -> str:
    lines = ["| concurrency | path | TTFT p50 (ms) | per-stream tok/s | aggregate tok/s | cost vs direct (split) | "
             "CPU ms per token: tokenizer / gateway / model |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cpu = row["cpu_ms_per_token"]
        gateway = cpu.get(row["path"], 0.0) if row["path"] != "model" else 0.0
        split = "—" if row["path"] == "model" else f"{100 * row['split']:.1f}%"
        lines.append(f"| {row['concurrency']} | {PATHS[row['path']]} | {row['ttft_p50_ms']:.0f} | "
                     f"{row['stream_tps']:.1f} | {row['aggregate_tps']:.1f} | {split} | "
                     f"{cpu['tokenizer']:.2f} / {gateway:.2f} / {cpu['model']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "gateway.json"))
    args = parser.parse_args()
    path = ("--checkpoint", args.checkpoint) if args.checkpoint else ()
    tokenizer = ServiceProcess("tokenizer_service", *(("--tokenizer", args.checkpoint) if args.checkpoint else ()))
    model = ServiceProcess("model_service", *path, "--max-batch-size", str(max(args.concurrency)))
    gateways: dict[str, ServiceProcess] = {}
    try:
        tokenizer.wait_healthy()
        model.wait_healthy(timeout=600)
        for kind, mode in (("gateway", "local"), ("gateway_tokenizer", "tokenizer")):
            gateways[kind] = ServiceProcess("gateway", "--tokenizer-address", tokenizer.address, "--model-address",
                                            model.address, "--detokenize", mode).wait_healthy()
        addresses = {"model": model.address, **{kind: g.address for kind, g in gateways.items()}}
        pids = {"tokenizer": tokenizer.process.pid, "model": model.process.pid,
                **{kind: g.process.pid for kind, g in gateways.items()}}
        rows = asyncio.run(run(args, addresses, pids))
        print(table(rows))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        print(f"JSON: {args.json}")
    finally:
        for process in (*gateways.values(), model, tokenizer):
            process.stop()


if __name__ == "__main__":
    main()
