"""llama-grpc beside llama.cpp and Hugging Face transformers on the same weights, in one run.

    make bench-peers        # needs `make peers` for the llama.cpp column (it is left out, and says so, without)
    .venv/bin/python bench/peer_bench.py [--checkpoint FILE.gguf] [--streams 1,4,16,64] [--json OUT]

Same file for everyone: the embedded SmolLM2-135M-Instruct Q4_1 GGUF unless --checkpoint. llama.cpp
(llama-cpp-python, 2 threads) runs the file's blocks; llama-grpc serves them natively (packed int4 /
int8, its default); transformers cannot run GGUF blocks, so it gets the dequantised float32 weights
(a safetensors copy written by llama_grpc_devtools.make_checkpoint), which is the best it can do on CPU.

Columns: llama.cpp; HF transformers (``generate``); llama-grpc in-process (the model core's forward in a
loop, no engine, no gRPC); llama-grpc model service (gRPC straight to it); llama-grpc full stack
(gateway -> tokenizer + model services). Rows: batch-1 decode tokens/s (greedy, prompt excluded);
time to first token for 128- and 1024-token prompts; aggregate tokens/s and p50/p99 inter-token
latency at 1/4/16/64 concurrent streams (HF: one batched ``generate``; llama.cpp: one sequence at a
time, so its aggregate is its single-stream rate); resident memory of the model process. Each timing
is the best of two where cheap. Everything shares the machine's cores with the load generator.

Time to first token is measured on fresh prompts only: every trial of every system gets its own prompt
(``Trial K:`` before the filler text), so neither llama.cpp's prompt cache nor our prefix cache can serve
it from an earlier trial (the model service and the full stack share one prefix cache: their trials
are numbered apart).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama_grpc_devtools.process import ServiceProcess  # noqa: E402
from llama_grpc_stubs.common.v1 import common_pb2  # noqa: E402
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc  # noqa: E402
from model_service.model import COMPILE_MODES  # noqa: E402

PEER_PYTHON = Path(os.environ.get("LLAMA_PEERS_VENV", ROOT / ".peers" / "venv")) / "bin" / "python"
QUESTION = "Write a long story about a lighthouse keeper."
FILLER = ("The printing press changed how ideas moved across Europe. Workshops in Mainz, Venice and "
          "Antwerp produced books faster than scribes ever could, and prices fell. ") * 80
TTFT_LENGTHS = (128, 1024)
TTFT_TRIALS = 2  # per system and prompt length, each on its own fresh prompt
# Trial numbers by system: no two trials anywhere share a prompt (services share one prefix cache).
TRIAL_BASE = {"in_process": 0, "llama_cpp": 0, "hf": 0, "model": 100, "gateway": 200}


def trial_text(trial: int, n_tokens: int) -> str:
    """A fresh prompt of about ``n_tokens`` tokens: a numbered head, then the filler."""
    return f"Trial {trial}: " + " ".join(FILLER.split(" ")[: int(n_tokens * 0.75)])


def rss_mb(pid: int | str = "self") -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[name].split()[0]) / 1024 for key, name in (("rss_mb", "VmRSS"), ("peak_mb", "VmHWM"))}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---- llama.cpp -----------------------------------------------------------------------------------

def llama_cpp(model: Path, ids: dict[int, list[int]], new_tokens: int) -> dict:
    if not PEER_PYTHON.exists():
        return {"missing": "llama.cpp peer not installed (make peers)"}
    jobs = [{"prompt_ids": ids["chat"], "max_new_tokens": new_tokens}] * 2
    jobs += [{"prompt_ids": prompt, "max_new_tokens": 1} for n in TTFT_LENGTHS for prompt in ids["ttft"][n]]
    spec = {"model": str(model), "threads": torch.get_num_threads(), "n_ctx": 2048, "jobs": jobs}
    done = subprocess.run([str(PEER_PYTHON), str(ROOT / "bench" / "llama_cpp_peer.py")], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=900, check=True)
    out = json.loads(done.stdout)
    results = out["results"]
    decode = max(r["decode_tok_s"] for r in results[:2])
    row = {"decode_tok_s": decode, "rss_mb": out["rss_mb"]}
    for i, n in enumerate(TTFT_LENGTHS):
        trials = results[2 + TTFT_TRIALS * i: 2 + TTFT_TRIALS * (i + 1)]
        row[f"ttft_{n}_ms"] = 1000 * min(r["ttft_s"] for r in trials)
    for streams in STREAMS:  # one sequence at a time: N streams share its single-stream rate
        row[f"agg_{streams}_tok_s"] = decode
    return row


# ---- Hugging Face transformers --------------------------------------------------------------------

def hf(path: Path, ids: dict[int, list[int]], new_tokens: int) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chat = torch.tensor([ids["chat"]])

    def generate(prompts: torch.Tensor, n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=0)
        return time.perf_counter() - started

    generate(chat, 2)  # warm-up
    row = {}
    for n in TTFT_LENGTHS:
        row[f"ttft_{n}_ms"] = 1000 * min(generate(torch.tensor([prompt]), 1) for prompt in ids["ttft"][n])
    for streams in STREAMS:
        batch = chat.repeat(streams, 1)
        steps = new_tokens if streams <= 16 else new_tokens // 4  # bound the run time
        rate = streams * steps / max(generate(batch, steps + 1) - generate(batch, 1), 1e-9)
        row[f"agg_{streams}_tok_s"] = rate
        if streams == 1:
            row["decode_tok_s"] = rate
    gc.collect()
    row["rss_mb"] = rss_mb()["peak_mb"]  # of this process, which also held the other in-process models
    return row


# ---- llama-grpc in-process -----------------------------------------------------------------------

def in_process(path: Path, ids: dict[int, list[int]], new_tokens: int, dtype: str, compile: bool,
               packed_activations: str, compile_mode: str) -> dict:
    from model_service.build import build
    from model_service.model import Batch

    max_streams = max(STREAMS)
    loaded = build(path, max_batch_size=max_streams, max_seq_len=1024 + new_tokens + 8, dtype=dtype, compile=compile,
                   packed_activations=packed_activations, compile_mode=compile_mode)
    model = loaded.model
    row: dict = {"quantization": loaded.info.quantization}

    def ttft(prompt: list[int]) -> float:
        started = time.perf_counter()
        int(model(Batch(torch.tensor(prompt), [0], [0], [len(prompt)]))[0].argmax())
        return time.perf_counter() - started

    ttft(ids["chat"])  # warm-up
    for n in TTFT_LENGTHS:
        row[f"ttft_{n}_ms"] = 1000 * min(ttft(prompt) for prompt in ids["ttft"][n])
    chat = ids["chat"]
    for streams in STREAMS:
        slots = list(range(streams))
        logits = model(Batch(torch.tensor(chat * streams), slots, [0] * streams, [len(chat)] * streams))
        gaps = []
        for step in range(new_tokens):
            started = time.perf_counter()
            tokens = logits.argmax(-1)
            logits = model(Batch(tokens, slots, [len(chat) + step] * streams, [1] * streams))
            gaps.append(time.perf_counter() - started)
        gaps = gaps[1:]  # first step: allocations
        row[f"agg_{streams}_tok_s"] = streams * len(gaps) / sum(gaps)
        row[f"itl_{streams}_p50_ms"] = 1000 * percentile(gaps, 0.5)
        row[f"itl_{streams}_p99_ms"] = 1000 * percentile(gaps, 0.99)
        if streams == 1:
            row["decode_tok_s"] = row["agg_1_tok_s"]
    gc.collect()
    return row


# ---- llama-grpc services -------------------------------------------------------------------------

async def stream(kind: str, stubs: dict, prompt: str | list[int] | list[common_pb2.Message], new_tokens: int,
                 seed: int | None,
                 ) -> tuple[float, list[float], int, float]:
    """(time to first token, per-token arrival gaps, tokens, seconds) of one streamed request."""
    sampling = common_pb2.SamplingParams(temperature=0.0) if seed is None else common_pb2.SamplingParams(
        temperature=0.8, top_p=0.95, seed=seed)
    stopping = common_pb2.StoppingCriteria(max_new_tokens=new_tokens)
    if kind == "model":
        call = stubs["model"].Generate(model_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling,
                                                                 stopping=stopping))
    else:
        text = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
        call = stubs["gateway"].GenerateStream(gateway_pb2.GenerateStreamRequest(
            **text, sampling=sampling, stopping=stopping))
    started = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async for reply in call:
        now = time.perf_counter()
        n = len(reply.token_ids)
        if not n:
            continue
        if first is None:
            first = now
        elif last is not None:
            gaps += [(now - last) / n] * n  # several tokens in one message: the reader lagged
        last, tokens = now, tokens + n
    end = time.perf_counter()
    return (first or end) - started, gaps, tokens, end - started


async def services(stubs: dict, kind: str, prompts: dict, new_tokens: int) -> dict:
    row: dict = {}
    chat = prompts["chat"]
    await stream(kind, stubs, chat, 4, None)  # warm-up
    for n in TTFT_LENGTHS:  # fresh prompts: no trial can hit the prefix cache
        row[f"ttft_{n}_ms"] = 1000 * min([(await stream(kind, stubs, prompt, 1, None))[0]
                                          for prompt in prompts["ttft"][n]])
    best = 0.0
    for _ in range(2):
        _, gaps, tokens, _ = await stream(kind, stubs, chat, 2 * new_tokens, None)
        best = max(best, len(gaps) / sum(gaps) if gaps else 0.0)
    row["decode_tok_s"] = best
    for streams in STREAMS:
        started = time.perf_counter()
        results = await asyncio.gather(*(stream(kind, stubs, chat, new_tokens, 1000 + i) for i in range(streams)))
        wall = time.perf_counter() - started
        gaps = [gap for result in results for gap in result[1]]
        row[f"agg_{streams}_tok_s"] = sum(result[2] for result in results) / wall
        row[f"itl_{streams}_p50_ms"] = 1000 * percentile(gaps, 0.5)
        row[f"itl_{streams}_p99_ms"] = 1000 * percentile(gaps, 0.99)
    return row


def full_stack(checkpoint: Path, new_tokens: int, model_args: list[str]) -> tuple[dict, dict, dict]:
    tokenizer = ServiceProcess("tokenizer_service", "--tokenizer", str(checkpoint))
    model = ServiceProcess("model_service", "--checkpoint", str(checkpoint), *model_args)
    gateway = None
    try:
        tokenizer.wait_healthy()
        model.wait_healthy(timeout=600)
        gateway = ServiceProcess("gateway", "--tokenizer-address", tokenizer.address,
                                 "--model-address", model.address).wait_healthy()

        async def run() -> tuple[dict, dict, dict]:
            async with grpc.aio.insecure_channel(model.address) as mc, grpc.aio.insecure_channel(gateway.address) as gc_:
                stubs = {"model": model_pb2_grpc.ModelServiceStub(mc), "gateway": gateway_pb2_grpc.GatewayServiceStub(gc_)}
                info = await stubs["model"].GetModelInfo(model_pb2.GetModelInfoRequest())
                messages = [common_pb2.Message(role="user", content=QUESTION)]
                chat = list((await stubs["gateway"].Tokenize(gateway_pb2.TokenizeRequest(messages=messages))).token_ids)

                async def fresh_ids(trial: int, n: int) -> list[int]:
                    request = gateway_pb2.TokenizeRequest(text=trial_text(trial, 2 * n))
                    prompt = list((await stubs["gateway"].Tokenize(request)).token_ids)[:n]
                    assert len(prompt) == n, f"the filler gave {len(prompt)} tokens, not {n}"
                    return prompt

                # Token ids of trials 0.. for the in-process and peer columns, 100.. for the model service;
                # the gateway takes text (about N tokens: trials 200..).
                ids = {"chat": chat, "ttft": {n: [await fresh_ids(t, n) for t in range(TTFT_TRIALS)]
                                              for n in TTFT_LENGTHS}}
                direct_ids = {"chat": chat, "ttft": {n: [await fresh_ids(TRIAL_BASE["model"] + t, n)
                                                         for t in range(TTFT_TRIALS)] for n in TTFT_LENGTHS}}
                texts = {"chat": messages, "ttft": {n: [trial_text(TRIAL_BASE["gateway"] + t, n)
                                                        for t in range(TTFT_TRIALS)] for n in TTFT_LENGTHS}}
                direct = await services(stubs, "model", direct_ids, new_tokens)
                via_gateway = await services(stubs, "gateway", texts, new_tokens)
                meta = {"ids": ids, "quantization": info.quantization, "compile": info.compile,
                        "kv_cache_tokens": info.kv_cache_tokens}
                return meta, direct, via_gateway

        meta, direct, via_gateway = asyncio.run(run())
        direct.update(rss_mb(model.process.pid))
        return meta, direct, via_gateway
    finally:
        for process in (gateway, model, tokenizer):
            if process is not None:
                process.stop()


STREAMS = [1, 4, 16, 64]
COLUMNS = [("llama_cpp", "llama.cpp"), ("hf", "HF transformers"), ("in_process", "llama-grpc in-process"),
           ("model_service", "llama-grpc model service"), ("full_stack", "llama-grpc full stack")]


def table(results: dict) -> str:
    rows = [("batch-1 decode tok/s", "decode_tok_s"), ("TTFT 128-token prompt (ms)", "ttft_128_ms"),
            ("TTFT 1024-token prompt (ms)", "ttft_1024_ms")]
    for s in STREAMS:
        rows += [(f"{s} streams: aggregate tok/s", f"agg_{s}_tok_s"), (f"{s} streams: ITL p50 (ms)", f"itl_{s}_p50_ms"),
                 (f"{s} streams: ITL p99 (ms)", f"itl_{s}_p99_ms")]
    rows.append(("resident memory of the model process (MB)", "rss_mb"))
    header = "| | " + " | ".join(label for _, label in COLUMNS) + " | full stack / llama.cpp |"
    lines = [header, "|---" * (len(COLUMNS) + 2) + "|"]
    for label, key in rows:
        cells = []
        for column, _ in COLUMNS:
            value = results.get(column, {}).get(key)
            cells.append("—" if value is None else f"{value:,.1f}")
        ours, theirs = results.get("full_stack", {}).get(key), results.get("llama_cpp", {}).get(key)
        ratio = f"{ours / theirs:.2f}x" if ours and theirs and key != "rss_mb" else "—"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines)


def goals(results: dict, gguf_bytes: int, cache_mb: float) -> str:
    cpp, stack, direct = (results.get(k, {}) for k in ("llama_cpp", "full_stack", "model_service"))
    lines = []

    def goal(text: str, value: float | None, target: str, ok: bool | None) -> None:
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"- {text}: {shown} (goal {target}) {'' if ok is None else 'MET' if ok else 'NOT MET'}")

    base = cpp.get("decode_tok_s")
    r1 = stack.get("decode_tok_s") / base if base else None
    goal("full-stack single-stream decode / llama.cpp", r1, ">= 1.0", None if r1 is None else r1 >= 1.0)
    r16 = stack["agg_16_tok_s"] / base if base and stack.get("agg_16_tok_s") else None
    goal("16-stream aggregate / llama.cpp single stream", r16, ">= 5", None if r16 is None else r16 >= 5)
    t = stack.get("ttft_1024_ms") / cpp["ttft_1024_ms"] if cpp.get("ttft_1024_ms") else None
    goal("TTFT 1024-token prompt, full stack / llama.cpp", t, "<= 1.0", None if t is None else t <= 1.0)
    split = 1 - stack["decode_tok_s"] / direct["decode_tok_s"] if direct.get("decode_tok_s") else None
    goal("split cost (1 - full stack / model service, decode)", split, "<= 0.05", None if split is None else split <= 0.05)
    limit = 2 * gguf_bytes / 2**20 + cache_mb
    goal(f"model-service RSS MB vs 2 x GGUF ({gguf_bytes / 2**20:.0f} MB) + KV cache ({cache_mb:.0f} MB) = "
         f"{limit:.0f} MB", direct.get("rss_mb"), f"<= {limit:.0f}",
         None if direct.get("rss_mb") is None else direct["rss_mb"] <= limit)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a GGUF file (default: the embedded SmolLM2 Q4_1)")
    parser.add_argument("--streams", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="llama-grpc's activations (the service default: float32)")
    parser.add_argument("--packed-activations", default="bfloat16", choices=["bfloat16", "float32", "int8"],
                        help="what llama-grpc's int4/int8 kernels multiply (the service default: bfloat16, one call; "
                             "float32: two bfloat16 halves and the scales' rounding, exact and slower; int8: steps "
                             "of 5+ rows through fbgemm's int8 kernel)")
    parser.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                        help="llama-grpc's --compile-mode (compiled runs only; max-autotune: GEMM templates)")
    parser.add_argument("--model-threads", type=int, default=0,
                        help="the model service's --threads (0: its default, the cores it may use)")
    parser.add_argument("--skip", default="", help="columns to leave out, e.g. hf,llama_cpp")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="llama-grpc with --compile / --no-compile (default: the service's default, on for CPU)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "peers.json"))
    ns = parser.parse_args()
    STREAMS[:] = [int(s) for s in ns.streams.split(",")]
    if ns.checkpoint is None:
        from llama_grpc_runtime.assets import default_model_path

        checkpoint = default_model_path()
    else:
        checkpoint = Path(ns.checkpoint)
    skip = set(ns.skip.split(",")) - {""}
    started = time.monotonic()
    max_seq_len = 1024 + 2 * ns.new_tokens + 16
    # Cache for every stream's chat prompt and tokens, and for the longest prompt (in blocks of 16).
    kv_tokens = -(-max(max(STREAMS) * (128 + ns.new_tokens), 2 * max_seq_len) // 16) * 16
    model_args = ["--max-batch-size", str(max(STREAMS)), "--max-seq-len", str(max_seq_len), "--dtype", ns.dtype,
                  "--kv-cache-tokens", str(kv_tokens),
                  "--packed-activations", ns.packed_activations, "--threads", str(ns.model_threads)]
    if ns.compile is not None:
        model_args.append("--compile" if ns.compile else "--no-compile")
    else:  # in-process as the service: compiled where the service would compile
        from model_service.server import parse_args

        ns.compile = parse_args([]).compile
    if ns.compile_mode != "auto":
        model_args += ["--compile-mode", ns.compile_mode]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {checkpoint.name}, "
          f"{ns.new_tokens} new tokens per stream, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    results: dict = {}
    meta, results["model_service"], results["full_stack"] = full_stack(checkpoint, ns.new_tokens, model_args)
    ids = meta["ids"]
    print(f"  services done ({time.monotonic() - started:.0f} s): {meta['quantization']}", file=sys.stderr, flush=True)
    if "in_process" not in skip:
        results["in_process"] = in_process(checkpoint, ids, ns.new_tokens, ns.dtype, ns.compile, ns.packed_activations,
                                           ns.compile_mode)
        print(f"  in-process done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    if "llama_cpp" not in skip:
        results["llama_cpp"] = llama_cpp(checkpoint, ids, 2 * ns.new_tokens)
        print(f"  llama.cpp done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    if "hf" not in skip:
        from llama_grpc_devtools.make_checkpoint import write_checkpoint

        with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
            hf_path = write_checkpoint(Path(tmp) / "hf", "hf", source=checkpoint, dtype=torch.float32)
            results["hf"] = hf(hf_path, ids, ns.new_tokens)
        print(f"  HF done ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
    from model_service.checkpoint import open_checkpoint

    args = open_checkpoint(checkpoint).args
    # The model service's KV cache as allocated (GetModelInfo.kv_cache_tokens), what the memory goal adds.
    item_bytes = 4 if ns.dtype == "float32" else 2
    cache_mb = meta["kv_cache_tokens"] * 2 * args.n_layers * args.kv_heads * args.head_dim * item_bytes / 2**20
    report = {"checkpoint": str(checkpoint), "quantization": meta["quantization"], "compile": meta["compile"],
              "dtype": ns.dtype, "packed_activations": ns.packed_activations,
              "compile_mode": ns.compile_mode, "model_threads": ns.model_threads,
              "streams": STREAMS,
              "new_tokens": ns.new_tokens, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "seconds": time.monotonic() - started, "kv_cache_mb": cache_mb, "results": results}
    Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.json).write_text(json.dumps(report, indent=1, default=str))
    if "missing" in results.get("llama_cpp", {}):
        print(f"NOTE: the llama.cpp column is empty: {results['llama_cpp']['missing']} "
              f"(looked for {PEER_PYTHON}); ratios to llama.cpp are n/a.")
    print(table(results))
    print()
    print(goals(results, checkpoint.stat().st_size, cache_mb))
    print(f"\n({time.monotonic() - started:.0f} s; JSON: {ns.json})")


if __name__ == "__main__":
    main()
