"""Grammar engines for structured output: xgrammar against llguidance, on our own vocabularies.

    make bench-grammar          # or: .venv/bin/python bench/grammar_bench.py [--walks 40] [--steps 64]

Both engines get the vocabulary from the tokenizer service's loaders (``load_tokenizer``: SmolLM2's
GGUF and Llama 3's ``tokenizer.model``, both byte-level BPE), the way the model service builds it.
Per engine and vocabulary:

- vocab setup: building the engine's tokenizer object from our ``Tokenizer`` (once per process);
- compile: a realistic extraction schema (nested objects, arrays, enums, required fields), cold
  (xgrammar's cache off), median of 5;
- mask b16: filling the token bitmask of 16 sequences in mid-generation (each at its own position of
  a random walk through the grammar), per decode step, median over ``--steps`` steps;
- correct: random walks (each step a token drawn uniformly from the allowed ones, the stop token
  when allowed) decoded with our tokenizer, parsed with ``json.loads`` and validated with
  ``jsonschema``: valid / finished walks (walks that hit the step cap are counted apart).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protos"))

from llama_grpc_runtime.assets import default_model_path  # noqa: E402
from tokenizer_service.loader import load_tokenizer  # noqa: E402

LLAMA3_TOKENIZER = Path("~/.cache/llama-grpc/llama-models-0.3.0/tokenizer.model").expanduser()

SCHEMA = {
    "type": "object",
    "properties": {
        "invoice_number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "status": {"enum": ["draft", "sent", "paid", "overdue"]},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 40},
                "address": {
                    "type": "object",
                    "properties": {"street": {"type": "string", "maxLength": 40},
                                   "city": {"type": "string", "maxLength": 30},
                                   "country": {"enum": ["FR", "DE", "US", "GB", "JP"]}},
                    "required": ["city", "country"],
                    "additionalProperties": False,
                },
            },
            "required": ["name", "address"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {"description": {"type": "string", "maxLength": 30},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 1000},
                               "unit_price": {"type": "number"}},
                "required": ["description", "quantity", "unit_price"],
                "additionalProperties": False,
            },
        },
        "paid": {"type": "boolean"},
        "notes": {"type": ["string", "null"], "maxLength": 40},
    },
    "required": ["invoice_number", "status", "customer", "items", "paid"],
    "additionalProperties": False,
}


def allowed_ids(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


class XGrammarEngine:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        started = time.perf_counter()
        encoded = [b""] * vocab_size  # special tokens: empty (xgrammar never allows them inside a grammar)
        for raw, token_id in tokenizer._encoding_args["mergeable_ranks"].items():
            encoded[token_id] = raw
        self.stop = tokenizer.stop_token_ids
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=self.stop)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher()
        self.setup = time.perf_counter() - started
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.accept_token(token_id)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class LLGuidanceEngine:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance
        import llguidance.tiktoken
        import llguidance.torch

        self.ll = llguidance
        self.lltorch = llguidance.torch
        started = time.perf_counter()
        self.stop = tokenizer.stop_token_ids
        self.tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
            tokenizer.encoding(), n_vocab=vocab_size, eos_token=tokenizer.eos_token_id)
        self.executor = llguidance.LLExecutor()
        self.setup = time.perf_counter() - started
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tokenizer, grammar)  # compiles (no separate compiled object)
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.ll.LLMatcher(self.tokenizer, grammar)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.lltorch.allocate_token_bitmask(rows, self.vocab_size)

    def fill(self, matchers, bitmask: torch.Tensor) -> None:
        self.lltorch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher, token_id: int) -> bool:
        return matcher.consume_token(token_id)

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


def walk_step(engine, matcher, mask_row: np.ndarray, rng: random.Random) -> int:
    allowed = allowed_ids(mask_row, engine.vocab_size)
    stops = [t for t in allowed if t in engine.stop]
    token_id = stops[0] if stops else int(allowed[rng.randrange(len(allowed))])
    assert engine.accept(matcher, token_id)
    return token_id


def measure(engine, tokenizer, walks: int, steps: int, max_walk: int) -> dict[str, float | str]:
    schema = json.dumps(SCHEMA)
    compile_times = []
    for _ in range(5):
        started = time.perf_counter()
        compiled = engine.compile(schema)
        compile_times.append(time.perf_counter() - started)

    # Mask cost: 16 rows, each staggered along its own walk.
    rng = random.Random(0)
    matchers = [engine.matcher(compiled) for _ in range(16)]
    bitmask = engine.bitmask(16)
    for index, matcher in enumerate(matchers):  # row i starts i*3 tokens into its walk
        one = engine.bitmask(1)
        for _ in range(index * 3):
            engine.fill([matcher], one)
            walk_step(engine, matcher, one[0].numpy(), rng)
    fill_times = []
    for _ in range(steps):
        started = time.perf_counter()
        engine.fill(matchers, bitmask)
        fill_times.append(time.perf_counter() - started)
        for index, matcher in enumerate(matchers):
            walk_step(engine, matcher, bitmask[index].numpy(), rng)
            if engine.done(matcher):
                matchers[index] = engine.matcher(compiled)

    valid = finished = 0
    errors = []
    one = engine.bitmask(1)
    for seed in range(walks):
        rng = random.Random(seed)
        matcher = engine.matcher(compiled)
        tokens = []
        for _ in range(max_walk):
            engine.fill([matcher], one)
            token_id = walk_step(engine, matcher, one[0].numpy(), rng)
            if token_id in engine.stop:
                break
            tokens.append(token_id)
        else:
            continue
        finished += 1
        text = tokenizer.decode(tokens)
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            errors.append(f"{text[:80]!r}: {str(exc)[:80]}")
    return {
        "setup_s": engine.setup,
        "compile_ms": statistics.median(compile_times) * 1e3,
        "mask_b16_ms": statistics.median(fill_times) * 1e3,
        "mask_b16_p99_ms": sorted(fill_times)[int(0.99 * (len(fill_times) - 1))] * 1e3,
        "correct": f"{valid}/{finished} ({walks - finished} capped)",
        "errors": errors[:3],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--walks", type=int, default=40)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--max-walk", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(1)
    vocabularies = [("SmolLM2 GGUF", default_model_path())]
    if LLAMA3_TOKENIZER.exists():
        vocabularies.append(("Llama 3 tokenizer.model", LLAMA3_TOKENIZER))
    rows = []
    for label, path in vocabularies:
        tokenizer = load_tokenizer(path)
        for engine_class in (XGrammarEngine, LLGuidanceEngine):
            engine = engine_class(tokenizer, tokenizer.vocab_size)
            result = measure(engine, tokenizer, args.walks, args.steps, args.max_walk)
            rows.append((label, engine.name, result))
            for error in result["errors"]:
                print(f"  {engine.name} {label} invalid: {error}", file=sys.stderr)
    print("| vocabulary | engine | vocab setup s | schema compile ms | mask b16 ms p50 | p99 | valid/finished walks |")
    print("|---|---|---|---|---|---|---|")
    for label, name, r in rows:
        print(f"| {label} | {name} | {r['setup_s']:.2f} | {r['compile_ms']:.1f} | {r['mask_b16_ms']:.2f} | "
              f"{r['mask_b16_p99_ms']:.2f} | {r['correct']} |")


if __name__ == "__main__":
    main()
