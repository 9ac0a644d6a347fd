"""Structured output: a constraint compiled by llguidance into a per-step token mask.

Why llguidance (``make bench-grammar``, numbers in the README): on our byte-level BPE vocabularies
every random walk through a realistic JSON Schema decoded to JSON that ``jsonschema`` accepts, where
xgrammar's let raw control characters into strings (json.loads refused 5 of 40 walks); a cold
schema compile takes ~0.7 ms against xgrammar's 7-16 ms; it builds its tokenizer straight from the
tiktoken ``Encoding`` our loaders make, and installs without torch/triton/transformers. Its mask
costs ~1-2 ms per step for 16 constrained rows on an idle CPU (xgrammar's precomputed masks:
~0.1 ms), paid only by steps that have constrained rows.

Where it runs: the model service samples, so it builds the grammar engine's vocabulary from the
model files it loads, with the tokenizer service's own loaders (``tokenizer_service.loader``: Llama 3
``tokenizer.model``, GGUF, Hugging Face ``tokenizer.json``); no second tokenizer parser, and nothing
vocabulary-sized travels with each request. A checkpoint with no tokenizer files beside it serves
without structured output (GetModelInfo's capabilities list no constraint kinds).

Memory (``make bench-memory``): the vocabulary (the tokenizer and llguidance's token tables, ~60 MB and
~1 s for SmolLM2's 49k tokens) is built on the first request that asks for structured output, not at
start, so a service that never gets one never pays for it. Masks are filled through llguidance's numpy
helpers: importing ``llguidance.torch`` runs a ``torch.compile`` decorator, which imports dynamo,
inductor, sympy and triton (~200 MB resident, ~1.5 s) for a kernel we do not use.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from threading import Lock

import llguidance
import llguidance.numpy
import llguidance.tiktoken
import structlog
import torch

from llama_grpc_runtime.errors import FailedPrecondition, InvalidArgument

from .options import Constraint

log = structlog.get_logger()

ENGINE = f"llguidance {version('llguidance')}"
# Compact JSON: free whitespace lets a model pad forever inside a structure that never completes.
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """Compiles constraints for one vocabulary (cached) and fills token masks for a batch of rows.

    The vocabulary is built on first use (``build``; thread-safe, the first caller pays), not here."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, stop_token_ids: list[int],
                 cache_size: int = 256) -> None:
        """``load_tokenizer``: returns a ``tokenizer_service.tokenizer.Tokenizer`` (its tiktoken
        ``Encoding``), called once, by ``build``; ``vocab_size``: the model's (its logits' width, which may
        exceed the tokenizer's)."""
        self.vocab_size = vocab_size
        self._load_tokenizer = load_tokenizer
        self._stop_token_ids = list(stop_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._build_error: str | None = None
        self._build_lock = Lock()
        self.executor = llguidance.LLExecutor()
        self._cache: OrderedDict[Constraint, str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = Lock()
        self.hits = 0

    @property
    def built(self) -> bool:
        return self._tokenizer is not None

    @property
    def available(self) -> bool:
        """False once a build has failed (GetModelInfo then stops advertising structured output)."""
        return self._build_error is None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        return self._tokenizer if self._tokenizer is not None else self.build()

    def build(self) -> llguidance.LLTokenizer:
        """The grammar engine's vocabulary, built by the first caller (the others wait for it). A build
        that fails fails every constrained request after it the same way (FailedPrecondition), once logged."""
        with self._build_lock:
            if self._tokenizer is None:
                if self._build_error is None:
                    try:
                        encoding = self._load_tokenizer().encoding()  # type: ignore[attr-defined]
                        self._tokenizer = llguidance.tiktoken.lltokenizer_from_encoding(
                            encoding, n_vocab=self.vocab_size, eos_token=self._stop_token_ids)
                        log.info("grammar engine ready", engine=ENGINE, vocab_size=self.vocab_size)
                    except Exception as exc:  # noqa: BLE001 -- serving without structured output beats not serving
                        self._build_error = str(exc)[:500]
                        log.warning("cannot build the grammar engine's vocabulary: structured output disabled",
                                    error=self._build_error)
                if self._tokenizer is None:
                    raise FailedPrecondition(f"constraint: this model service cannot enforce structured output "
                                             f"(building the grammar engine's vocabulary failed: {self._build_error})")
            return self._tokenizer

    def compile(self, constraint: Constraint) -> str:
        """The llguidance grammar for ``constraint``; InvalidArgument with the engine's explanation."""
        with self._lock:
            if constraint in self._cache:
                self._cache.move_to_end(constraint)
                self.hits += 1
                return self._cache[constraint]
        constraint.check()
        grammar = self._grammar(constraint)
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidArgument(constraint.field, error.strip()[:1000])
        with self._lock:
            self._cache[constraint] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    @staticmethod
    def _grammar(constraint: Constraint) -> str:
        kind, value = constraint.kind, constraint.value
        try:
            if kind == "json_schema":
                schema = json.loads(value)  # type: ignore[arg-type]
                if not isinstance(schema, dict | bool):
                    raise InvalidArgument(constraint.field, "must be a JSON object (a JSON Schema)")
                return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            if kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(value)  # type: ignore[arg-type]
            if kind == "grammar":
                return llguidance.grammar_from("grammar", value)  # type: ignore[arg-type]
            return llguidance.grammar_from("choice", list(value))
        except ValueError as exc:  # not JSON, or a grammar the GBNF converter cannot read
            if isinstance(exc, InvalidArgument):
                raise
            raise InvalidArgument(constraint.field, str(exc)[:1000]) from None

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def allowed(self, matchers: list[llguidance.LLMatcher]) -> torch.Tensor:
        """[len(matchers), vocab_size] bool: the tokens each matcher allows next (filled in parallel)."""
        bitmask = llguidance.numpy.allocate_token_bitmask(len(matchers), self.vocab_size)  # [m, words] int32
        llguidance.numpy.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        bitmask = torch.from_numpy(bitmask)
        bits = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask[:, :, None] >> bits) & 1).bool().reshape(len(matchers), -1)  # [m, words * 32]
        return allowed[:, :self.vocab_size]


def load_grammars(checkpoint: str | None, vocab_size: int, stop_token_ids: list[int]) -> Grammars | None:
    """The grammar engine over the vocabulary of ``checkpoint``'s own tokenizer files (None: the
    embedded model), built on the first constrained request; None when there are none (structured
    output then refused)."""
    path = Path(checkpoint) if checkpoint else None
    if path is not None and path.is_dir() and not any(
            (path / name).is_file() for name in ("tokenizer.model", "tokenizer.json", "original/tokenizer.model")):
        log.warning("no tokenizer files beside the checkpoint: structured output disabled", checkpoint=str(path))
        return None

    def load() -> object:
        from tokenizer_service.loader import load_tokenizer  # the tokenizer service's loaders

        return load_tokenizer(path)

    return Grammars(load, vocab_size, stop_token_ids)
