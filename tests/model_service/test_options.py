"""Generation options in the sampler, against independent truths: Hugging Face's logits processors
(min-p, sequence bias, min-new-tokens), OpenAI's published penalty formula written out as a loop,
llguidance's grammar on a real vocabulary checked with ``re`` / ``json``, and each request alone
against the same request in a batch of mixed options."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llama_grpc_runtime.errors import InvalidArgument
from model_service.options import (
    MAX_N,
    Constraint,
    check_n,
    check_output,
    check_stopping,
    completion_seed,
)
from model_service.sampling import (
    SamplingParams,
    SamplingRow,
    _adjusted_logits,
    _filtered_probs,
    new_generator,
    sample,
)

VOCAB = 4096


def random_logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def row(params: SamplingParams, **kwargs) -> SamplingRow:
    made = SamplingRow(params, None if params.greedy else new_generator(params.seed), **kwargs)
    if params.penalises_counts and made.counts is None:
        made.counts = torch.zeros(VOCAB)
    return made


def kept(weights: torch.Tensor, ids: torch.Tensor) -> dict[int, float]:
    total = weights.sum()
    return {int(t): float(w / total) for t, w in zip(ids, weights, strict=True) if w > 0}


@pytest.mark.parametrize("min_p,top_k,top_p,temperature", [(0.05, 0, 1.0, 1.0), (0.2, 0, 0.9, 0.7),
                                                           (0.1, 50, 0.95, 1.3), (0.5, 0, 1.0, 0.6),
                                                           (1.0, 0, 1.0, 1.0)])
def test_min_p_matches_hugging_face(min_p, top_k, top_p, temperature):
    logits = random_logits(3, seed=11) / 2
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    scores = TopPLogitsWarper(top_p)(None, scores)
    scores = MinPLogitsWarper(min_p)(None, scores)
    weights, ids = _filtered_probs(logits / temperature, torch.full((3, 1), top_k or VOCAB),
                                   torch.full((3, 1), top_p), torch.full((3, 1), min_p))
    for i in range(3):
        ours = kept(weights[i], ids[i])
        expected_ids = torch.nonzero(scores[i] > -math.inf).flatten()
        assert ours.keys() == set(expected_ids.tolist())
        expected = torch.softmax(scores[i][expected_ids], -1)
        assert max(abs(ours[int(t)] - float(q)) for t, q in zip(expected_ids, expected, strict=True)) < 1e-6


def openai_penalties(logits: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """platform.openai.com's formula, as written there:
    mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence."""
    counts = {token: generated.count(token) for token in set(generated)}
    return [mu - counts.get(j, 0) * frequency - float(counts.get(j, 0) > 0) * presence for j, mu in enumerate(logits)]


@pytest.mark.parametrize("presence,frequency", [(0.5, 0.0), (0.0, 1.2), (-1.0, 2.0), (2.0, -2.0)])
def test_presence_and_frequency_penalties_follow_openai(presence, frequency):
    logits = random_logits(1, seed=12)
    generated = [3, 3, 3, 17, 17, 4000, 9]
    r = row(SamplingParams(temperature=1.0, presence_penalty=presence, frequency_penalty=frequency, seed=0))
    for token in generated:
        r.observe(token)
    got, _ = _adjusted_logits(logits, [r])
    expected = torch.tensor(openai_penalties(logits[0].tolist(), generated, presence, frequency))
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_logit_bias_matches_hugging_face_sequence_bias():
    logits = random_logits(1, seed=13)
    bias = {5: 3.5, 77: -100.0, 4095: 100.0, 1000: -0.25}
    expected = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.tensor([[1, 2]]), logits.clone())
    got, _ = _adjusted_logits(logits, [row(SamplingParams(temperature=1.0, logit_bias=bias, seed=0))])
    assert torch.allclose(got, expected)
    # +100 all but forces a token and -100 bans it, greedy and sampled alike
    assert sample(logits, [row(SamplingParams(temperature=0.0, logit_bias={4095: 100.0}))])[0].token_id == 4095
    banned = int(logits[0].argmax())
    r = row(SamplingParams(temperature=0.0, logit_bias={banned: -100.0}))
    assert sample(logits, [r])[0].token_id != banned


def test_min_new_tokens_masks_stop_tokens_like_hugging_face():
    stops = [2, 9]
    logits = random_logits(1, seed=14)
    logits[0, 2] = 50.0  # the stop token is by far the most likely
    r = row(SamplingParams(temperature=0.0), stop_token_ids=torch.tensor(stops), min_new_tokens=3)
    processor = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=4, min_new_tokens=3, eos_token_id=stops)
    prompt = [10, 11, 12, 13]
    generated: list[int] = []
    for _ in range(4):
        ours, _ = _adjusted_logits(logits, [r])
        expected = processor(torch.tensor([prompt + generated]), logits.clone())
        assert torch.equal(torch.isneginf(ours), torch.isneginf(expected))
        token = sample(logits, [r])[0].token_id
        assert (token == 2) == (len(generated) >= 3)
        generated.append(token)
        r.observe(token)


def test_each_request_in_a_mixed_batch_draws_what_it_draws_alone():
    logits = random_logits(5, seed=15)
    mixed = [
        SamplingParams(temperature=0.9, min_p=0.1, seed=1),
        SamplingParams(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5),
        SamplingParams(temperature=1.0, top_k=40, logit_bias={7: 5.0, 8: -100.0}, seed=2),
        SamplingParams(temperature=0.7, repetition_penalty=1.3, frequency_penalty=-0.7, seed=3),
        SamplingParams(temperature=1.2, top_p=0.8, seed=4),
    ]

    def make(i: int) -> SamplingRow:
        extra = {"seen": torch.zeros(VOCAB, dtype=torch.bool)} if mixed[i].repetition_penalty != 1.0 else {}
        if i == 4:
            extra |= {"stop_token_ids": torch.tensor([1, 2]), "min_new_tokens": 5}
        return row(mixed[i], **extra)

    alone = [make(i) for i in range(5)]
    batch = [make(i) for i in range(5)]
    for _ in range(12):
        batch_tokens = [s.token_id for s in sample(logits, batch)]
        alone_tokens = [sample(logits[i:i + 1], [alone[i]])[0].token_id for i in range(5)]
        assert batch_tokens == alone_tokens
        for r, a, token in zip(batch, alone, batch_tokens, strict=True):
            r.observe(token)
            a.observe(token)


# ---- structured output ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grammars():
    from model_service.grammar import load_grammars
    from tokenizer_service.loader import load_tokenizer

    tokenizer = load_tokenizer(None)  # the embedded SmolLM2's GGUF: byte-level BPE
    return load_grammars(None, tokenizer.vocab_size, tokenizer.stop_token_ids), tokenizer


def constrained_walk(grammars_and_tokenizer, constraint: Constraint, params: SamplingParams, logits_seed: int,
                     max_tokens: int = 120) -> tuple[str, bool]:
    """Sample on random logits under the constraint; (text, ended with the stop token)."""
    grammars, tokenizer = grammars_and_tokenizer
    r = row(params, grammars=grammars, matcher=grammars.matcher(grammars.compile(constraint)))
    generator = torch.Generator().manual_seed(logits_seed)
    tokens = []
    for _ in range(max_tokens):
        logits = torch.randn(1, grammars.vocab_size, generator=generator) * 4
        token = sample(logits, [r])[0].token_id
        if token in tokenizer.stop_token_ids:
            return tokenizer.decode(tokens), True
        tokens.append(token)
        r.observe(token)
    return tokenizer.decode(tokens), False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pattern", [r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe), because [a-z ]{1,20}\.",
                                     r"[A-Z][a-z]{1,8} [A-Z][a-z]{1,8}"])
def test_regex_constraint_holds_on_random_logits(grammars, pattern, temperature):
    for seed in range(4):
        text, stopped = constrained_walk(grammars, Constraint("regex", pattern),
                                         SamplingParams(temperature=temperature, seed=seed), logits_seed=seed)
        assert stopped and re.fullmatch(pattern, text), text


def test_choice_constraint_yields_one_of_the_choices(grammars):
    choices = ("red", "green", "blue sky", "ünïcode ✓")
    got = {constrained_walk(grammars, Constraint("choice", choices), SamplingParams(temperature=1.0, seed=seed),
                            logits_seed=seed)[0] for seed in range(12)}
    assert got <= set(choices) and len(got) > 1


def test_json_schema_constraint_parses_and_validates(grammars):
    import jsonschema

    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"],
                  "additionalProperties": False}},
        "required": ["name", "kind", "owner"], "additionalProperties": False}
    finished = 0
    for seed in range(6):
        text, stopped = constrained_walk(grammars, Constraint("json_schema", json.dumps(schema)),
                                         SamplingParams(temperature=1.0, seed=seed), logits_seed=seed, max_tokens=300)
        if stopped:  # random logits may wander in a string up to maxLength, or an array, for long
            jsonschema.validate(json.loads(text), schema)
            finished += 1
    assert finished >= 3


def test_grammar_constraint(grammars):
    grammar = 'start: sum\nsum: NUM ("+" NUM)*\nNUM: /[1-9][0-9]?/'
    for seed in range(4):
        text, stopped = constrained_walk(grammars, Constraint("grammar", grammar),
                                         SamplingParams(temperature=1.0, seed=seed), logits_seed=seed)
        assert re.fullmatch(r"[1-9][0-9]?(\+[1-9][0-9]?)*", text), text
        assert stopped or len(text) > 0


@pytest.mark.parametrize("constraint,field", [
    (Constraint("regex", "[0-9]{3"), "constraint.regex"),
    (Constraint("json_schema", "{not json"), "constraint.json_schema"),
    (Constraint("json_schema", '{"type": "objectx"}'), "constraint.json_schema"),
    (Constraint("json_schema", "[1, 2]"), "constraint.json_schema"),
    (Constraint("grammar", "start: undefined_rule"), "constraint.grammar"),
    (Constraint("choice", ()), "constraint.choice.choices"),
    (Constraint("choice", ("a", "")), "constraint.choice.choices[1]"),
    (Constraint("regex", "  "), "constraint.regex"),
])
def test_bad_constraints_are_invalid_argument_with_the_engines_reason(grammars, constraint, field):
    with pytest.raises(InvalidArgument) as error:
        grammars[0].compile(constraint)
    assert error.value.field == field
    assert len(str(error.value)) > len(field) + 5


def test_compiled_grammars_are_cached(grammars):
    engine = grammars[0]
    constraint = Constraint("regex", "cached[0-9]+")
    first = engine.compile(constraint)
    hits = engine.hits
    assert engine.compile(Constraint("regex", "cached[0-9]+")) is first
    assert engine.hits == hits + 1


def test_a_constrained_row_leaves_its_neighbours_alone(grammars):
    engine, _ = grammars
    logits = torch.randn(3, engine.vocab_size, generator=torch.Generator().manual_seed(3))
    plain = [row(SamplingParams(temperature=1.0, seed=s)) for s in (1, 2)]
    alone = [sample(logits[i:i + 1], [r])[0].token_id for i, r in ((0, plain[0]), (2, plain[1]))]
    plain = [row(SamplingParams(temperature=1.0, seed=s)) for s in (1, 2)]
    constrained = row(SamplingParams(temperature=1.0, seed=3), grammars=engine,
                      matcher=engine.matcher(engine.compile(Constraint("regex", "[0-9]+"))))
    got = [s.token_id for s in sample(logits, [plain[0], constrained, plain[1]])]
    assert [got[0], got[2]] == alone


def test_the_grammar_vocabulary_is_built_once_on_first_use_by_concurrent_callers():
    """load_grammars does not load the tokenizer; the first constraint does, once, however many
    threads ask at the same time; the masks are those of an engine built eagerly."""
    import threading

    from model_service.grammar import Grammars
    from tokenizer_service.loader import load_tokenizer

    tokenizer = load_tokenizer(None)
    loads = []

    def counted_load():
        loads.append(threading.get_ident())
        return tokenizer

    lazy = Grammars(counted_load, tokenizer.vocab_size, tokenizer.stop_token_ids)
    assert not lazy.built and loads == []
    start = threading.Barrier(4)
    grammars = []

    def compile_one(i: int) -> None:
        start.wait()
        grammars.append(lazy.compile(Constraint("regex", f"[0-9]{{{i + 1}}}")))

    threads = [threading.Thread(target=compile_one, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1 and lazy.built and len(grammars) == 4
    eager = Grammars(lambda: tokenizer, tokenizer.vocab_size, tokenizer.stop_token_ids)
    eager.build()
    grammar = lazy.compile(Constraint("regex", "[0-9]{2}"))
    allowed = lazy.allowed([lazy.matcher(grammar)])
    assert torch.equal(allowed, eager.allowed([eager.matcher(grammar)]))
    digits = {tokenizer.encode(str(d))[0] for d in range(10)}  # the truth: single-digit tokens only
    assert set(allowed[0].nonzero().flatten().tolist()) >= digits
    assert not allowed[0, tokenizer.encode("a")[0]]


def test_a_grammar_vocabulary_that_cannot_be_built_fails_constraints_not_the_service():
    from llama_grpc_runtime.errors import FailedPrecondition
    from model_service.grammar import Grammars

    loads = []

    def broken_load():
        loads.append(1)
        raise ValueError("unsupported tokenizer: sentencepiece")

    lazy = Grammars(broken_load, 1000, [2])
    assert lazy.available
    for _ in range(2):
        with pytest.raises(FailedPrecondition, match="sentencepiece"):
            lazy.compile(Constraint("regex", "[0-9]+"))
    assert loads == [1] and not lazy.available and not lazy.built


def test_masks_do_not_import_torch_compile():
    """llguidance.torch runs a torch.compile decorator at import (dynamo, inductor, triton: ~200 MB
    resident); the service fills its masks without it."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from model_service.grammar import load_grammars\n"
            "from model_service.options import Constraint\n"
            "from tokenizer_service.loader import load_tokenizer\n"
            "t = load_tokenizer(None)\n"
            "g = load_grammars(None, t.vocab_size, t.stop_token_ids)\n"
            "mask = g.allowed([g.matcher(g.compile(Constraint('regex', '[0-9]+')))])\n"
            "assert mask.shape == (1, t.vocab_size) and 0 < int(mask.sum()) < t.vocab_size\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("params,field", [
    (SamplingParams(min_p=-0.01), "sampling.min_p"),
    (SamplingParams(min_p=1.5), "sampling.min_p"),
    (SamplingParams(min_p=float("nan")), "sampling.min_p"),
    (SamplingParams(presence_penalty=2.5), "sampling.presence_penalty"),
    (SamplingParams(frequency_penalty=-2.01), "sampling.frequency_penalty"),
    (SamplingParams(frequency_penalty=float("nan")), "sampling.frequency_penalty"),
    (SamplingParams(logit_bias={5: 100.5}), "sampling.logit_bias[5]"),
    (SamplingParams(logit_bias={VOCAB: 1.0}), f"sampling.logit_bias[{VOCAB}]"),
    (SamplingParams(logit_bias={-1: 1.0}), "sampling.logit_bias[-1]"),
    (SamplingParams(logit_bias={3: float("nan")}), "sampling.logit_bias[3]"),
])
def test_out_of_range_options_name_field_and_range(params, field):
    with pytest.raises(InvalidArgument) as error:
        params.validate(VOCAB)
    assert error.value.field == field
    assert re.search(r"\[|vocabulary", str(error.value))


@pytest.mark.parametrize("check,kwargs,field", [
    (check_stopping, {"min_new_tokens": -1}, "stopping.min_new_tokens"),
    (check_stopping, {"min_new_tokens": 10, "max_new_tokens": 5}, "stopping.min_new_tokens"),
    (check_stopping, {"time_limit_ms": -5}, "stopping.time_limit_ms"),
    (check_stopping, {"truncate_prompt_tokens": -1}, "stopping.truncate_prompt_tokens"),
    (check_output, {"top_logprobs": 21}, "output.top_logprobs"),
    (check_n, {"n": MAX_N + 1}, "n"),
    (check_n, {"n": -1}, "n"),
])
def test_out_of_range_stopping_output_and_n(check, kwargs, field):
    with pytest.raises(InvalidArgument) as error:
        check(**kwargs)
    assert error.value.field == field


def test_defaults_and_edges_are_accepted():
    for params in (SamplingParams(min_p=0.0), SamplingParams(min_p=1.0), SamplingParams(presence_penalty=-2.0),
                   SamplingParams(frequency_penalty=2.0), SamplingParams(logit_bias={0: -100.0, VOCAB - 1: 100.0})):
        params.validate(VOCAB)
    check_stopping(max_new_tokens=0, min_new_tokens=50)  # unset max_new_tokens: bounded by the context
    check_n(0), check_n(MAX_N)


def test_completion_seeds_are_fixed_and_distinct():
    seeds = [completion_seed(42, i) for i in range(MAX_N)]
    assert seeds[0] == 42 and len(set(seeds)) == MAX_N
    assert seeds == [completion_seed(42, i) for i in range(MAX_N)]
    assert all(0 <= s < 2**64 for s in seeds)
    assert completion_seed(None, 3) is None
