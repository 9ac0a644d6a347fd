"""The engine in-process on a tiny random Transformer.

The truth for greedy output is the model recomputing the whole sequence without the cache, one
sequence at a time, in a slot the engine never uses; for logprobs it is log_softmax over that
recompute's logits.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from prometheus_client import REGISTRY

from llama_grpc_runtime.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from model_service import distributed
from model_service.args import ModelArgs
from model_service.engine import Engine, FinishReason, GenerationRequest, LocalRunner
from model_service.model import Batch, Transformer
from model_service.sampling import SamplingParams

VOCAB, MAX_SEQ_LEN, SLOTS = 256, 96, 4
SPARE_SLOT = SLOTS  # the reference recompute's slot: the engine only knows slots 0..SLOTS-1
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def tiny_model() -> Transformer:
    distributed.ensure_initialized()
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
                     max_seq_len=MAX_SEQ_LEN)
    torch.manual_seed(0)
    model = Transformer(args)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.3)  # large enough that logits are far from ties
    model.setup_caches(SLOTS + 1, MAX_SEQ_LEN, torch.float32, "cpu")
    return model


def make_engine(model: Transformer, *, start: bool = True, **kwargs) -> Engine:
    options = dict(vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, max_batch_size=SLOTS, max_queue=4, prefill_chunk=8)
    engine = Engine(LocalRunner(model, "cpu"), **{**options, **kwargs})
    if start:
        engine.start()
    return engine


def recompute_logits(model: Transformer, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab]: the whole sequence at once, no incremental cache, in a slot of its own."""
    return model.forward(Batch(torch.tensor(tokens), [SPARE_SLOT], [0], [len(tokens)]), all_logits=True)


def reference_greedy(model: Transformer, prompt: list[int], n: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    tokens = list(prompt)
    for _ in range(n):
        token = int(recompute_logits(model, tokens)[-1].argmax())
        if token in stop_ids:
            break
        tokens.append(token)
    return tokens[len(prompt):]


async def collect(engine: Engine, request: GenerationRequest):
    tokens, chunks = [], []
    async for chunk in engine.submit(request):
        tokens += chunk.token_ids
        chunks.append(chunk)
    return tokens, chunks


def gauge(name: str) -> float:
    return REGISTRY.get_sample_value(name)


def prompt(length: int, offset: int = 3) -> list[int]:
    return [(offset + 7 * i) % VOCAB for i in range(length)]


def test_concurrent_greedy_equals_each_alone(model):
    engine = make_engine(model)
    requests = [GenerationRequest(prompt(n, offset=n), GREEDY, max_new_tokens=m)
                for n, m in [(1, 12), (5, 3), (19, 20), (8, 1), (30, 9), (2, 25)]]  # 6 requests > 4 slots

    async def run():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    for request, (tokens, chunks) in zip(requests, results, strict=True):
        assert tokens == reference_greedy(model, request.prompt_token_ids, request.max_new_tokens)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert (chunks[-1].prompt_tokens, chunks[-1].generated_tokens) == (len(request.prompt_token_ids),
                                                                            request.max_new_tokens)
    assert gauge("llama_model_running_sequences") == 0 and gauge("llama_model_queued_requests") == 0


def test_late_arrival_finishes_while_the_long_one_runs(model):
    engine = make_engine(model)
    order = []

    async def run():
        async def long():
            async for chunk in engine.submit(GenerationRequest(prompt(4), GREEDY, max_new_tokens=80)):
                if chunk.token_ids and not started.is_set():
                    started.set()
            order.append("long")

        async def short():
            await started.wait()  # the long one is decoding
            await collect(engine, GenerationRequest(prompt(6, offset=9), GREEDY, max_new_tokens=3))
            order.append("short")

        started = asyncio.Event()
        await asyncio.gather(long(), short())

    try:
        asyncio.run(run())
    finally:
        engine.stop()
    assert order == ["short", "long"]


def test_stop_tokens_model_and_callers(model):
    request = GenerationRequest(prompt(6), GREEDY, max_new_tokens=10)
    greedy = reference_greedy(model, request.prompt_token_ids, 10)
    engine = make_engine(model, stop_token_ids=(greedy[0],))
    try:
        tokens, chunks = asyncio.run(collect(engine, request))
        assert tokens == [] and chunks[-1].finish_reason is FinishReason.STOP_TOKEN
        assert chunks[-1].generated_tokens == 0
    finally:
        engine.stop()
    engine = make_engine(model)
    try:
        stop = greedy[3]
        callers = GenerationRequest(prompt(6), GREEDY, max_new_tokens=10, stop_token_ids=(stop,))
        tokens, chunks = asyncio.run(collect(engine, callers))
        assert tokens == greedy[:greedy.index(stop)] and chunks[-1].finish_reason is FinishReason.STOP_TOKEN
    finally:
        engine.stop()


def test_context_limit_and_length(model):
    engine = make_engine(model)
    near_end = prompt(MAX_SEQ_LEN - 5)
    try:
        tokens, chunks = asyncio.run(collect(engine, GenerationRequest(near_end, GREEDY)))
        assert len(tokens) == 5 and chunks[-1].finish_reason is FinishReason.CONTEXT_LIMIT
        tokens, chunks = asyncio.run(collect(engine, GenerationRequest(near_end, GREEDY, max_new_tokens=50)))
        assert len(tokens) == 5 and chunks[-1].finish_reason is FinishReason.CONTEXT_LIMIT
        tokens, chunks = asyncio.run(collect(engine, GenerationRequest(near_end, GREEDY, max_new_tokens=5)))
        assert len(tokens) == 5 and chunks[-1].finish_reason is FinishReason.LENGTH
        assert tokens == reference_greedy(model, near_end, 5)
    finally:
        engine.stop()


def test_same_seed_same_tokens_alone_or_in_a_busy_batch(model):
    sampled = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    request = GenerationRequest(prompt(7), sampled, max_new_tokens=20)
    engine = make_engine(model)

    async def busy():
        others = [GenerationRequest(prompt(n, offset=n), SamplingParams(temperature=0.8, seed=n), max_new_tokens=25)
                  for n in (3, 11, 17)]
        results = await asyncio.gather(*(collect(engine, r) for r in [*others[:2], request, others[2]]))
        return results[2][0]

    try:
        alone = asyncio.run(collect(engine, request))[0]
        in_batch = asyncio.run(busy())
        other_seed = asyncio.run(collect(engine, GenerationRequest(prompt(7), SamplingParams(temperature=1.0,
                                                                   top_p=0.95, seed=43), max_new_tokens=20)))[0]
    finally:
        engine.stop()
    assert alone == in_batch
    assert alone != other_seed


def test_logprobs_and_echo_match_a_full_recompute(model):
    engine = make_engine(model, prefill_chunk=5)  # the 13-token prompt arrives in three chunks
    tokens_in = prompt(13)
    request = GenerationRequest(tokens_in, GREEDY, max_new_tokens=4, logprobs=True, top_logprobs=3, echo=True)
    try:
        tokens, chunks = asyncio.run(collect(engine, request))
    finally:
        engine.stop()
    reference = torch.log_softmax(recompute_logits(model, tokens_in + tokens), dim=-1)  # [n, vocab]
    full = tokens_in + tokens
    expected_prompt = [0.0] + [reference[i - 1, full[i]].item() for i in range(1, len(tokens_in))]
    expected_output = [reference[i - 1, full[i]].item() for i in range(len(tokens_in), len(full))]
    first = chunks[0]
    assert first.prompt_logprobs == pytest.approx(expected_prompt, abs=1e-4)
    assert len(first.prompt_top_logprobs) == len(tokens_in) and first.prompt_top_logprobs[0] == []
    assert [t for t, _ in first.prompt_top_logprobs[5]] == reference[4].topk(3).indices.tolist()
    logprobs = [lp for chunk in chunks for lp in chunk.logprobs]
    assert logprobs == pytest.approx(expected_output, abs=1e-4)
    top = [alts for chunk in chunks for alts in chunk.top_logprobs]
    assert [[t for t, _ in alts] for alts in top] == [reference[i - 1].topk(3).indices.tolist()
                                                       for i in range(len(tokens_in), len(full))]
    assert all(not chunk.prompt_logprobs for chunk in chunks[1:])


def test_a_slow_reader_gets_merged_chunks(model):
    engine = make_engine(model)

    async def run():
        stream = engine.submit(GenerationRequest(prompt(4), GREEDY, max_new_tokens=6))
        while engine.num_live:  # do not read until the generation is over
            await asyncio.sleep(0.01)
        return [chunk async for chunk in stream]

    try:
        chunks = asyncio.run(run())
    finally:
        engine.stop()
    assert len(chunks) == 1
    assert chunks[0].token_ids == reference_greedy(model, prompt(4), 6)
    assert chunks[0].finish_reason is FinishReason.LENGTH


def test_cancel_and_deadline_free_the_slot(model):
    engine = make_engine(model)

    async def cancel_after_first_token():
        stream = engine.submit(GenerationRequest(prompt(4), GREEDY))  # would run to the context limit
        await stream.__anext__()
        stream.cancel()
        rest = [chunk async for chunk in stream]
        return rest

    async def deadline():
        stream = engine.submit(GenerationRequest(prompt(4), GREEDY, timeout=0.0))
        return [chunk async for chunk in stream]

    try:
        rest = asyncio.run(cancel_after_first_token())
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        assert engine.num_live == 0 and gauge("llama_model_running_sequences") == 0
        assert gauge("llama_model_kv_slots_used") == 0
        with pytest.raises(DeadlineExceeded):
            asyncio.run(deadline())
        assert engine.num_live == 0 and gauge("llama_model_running_sequences") == 0
    finally:
        engine.stop()


def test_queue_overflow_is_resource_exhausted(model):
    engine = make_engine(model, start=False, max_queue=2)  # not stepping: every request stays queued

    async def run():
        streams = [engine.submit(GenerationRequest(prompt(3), GREEDY)) for _ in range(SLOTS + 2)]
        assert gauge("llama_model_queued_requests") == SLOTS + 2
        with pytest.raises(ResourceExhausted):
            engine.submit(GenerationRequest(prompt(3), GREEDY))
        return streams

    asyncio.run(run())
    engine.close()

    async def closed():
        with pytest.raises(Unavailable):
            engine.submit(GenerationRequest(prompt(3), GREEDY))

    asyncio.run(closed())


@pytest.mark.parametrize("request_,field", [
    (GenerationRequest([]), "prompt_token_ids"),
    (GenerationRequest([1, VOCAB]), "prompt_token_ids"),
    (GenerationRequest([-1]), "prompt_token_ids"),
    (GenerationRequest(prompt(MAX_SEQ_LEN)), "prompt_token_ids"),
    (GenerationRequest([1], SamplingParams(temperature=-1.0)), "sampling.temperature"),
    (GenerationRequest([1], SamplingParams(top_p=0.0)), "sampling.top_p"),
    (GenerationRequest([1], SamplingParams(top_k=-3)), "sampling.top_k"),
    (GenerationRequest([1], max_new_tokens=-1), "stopping.max_new_tokens"),
    (GenerationRequest(prompt(90), max_new_tokens=7, strict_context_limit=True), "stopping.max_new_tokens"),
    (GenerationRequest([1], stop_token_ids=(VOCAB + 5,)), "stopping.stop_token_ids"),
    (GenerationRequest([1], top_logprobs=-1), "output.top_logprobs"),
    (GenerationRequest([1], top_logprobs=21), "output.top_logprobs"),
])
def test_invalid_requests_name_the_field(request_, field):
    with pytest.raises(InvalidArgument) as error:
        request_.validate(VOCAB, MAX_SEQ_LEN)
    assert error.value.field == field


def test_too_long_prompt_message_gives_both_numbers():
    with pytest.raises(InvalidArgument, match=f"{MAX_SEQ_LEN + 4} tokens.*{MAX_SEQ_LEN}"):
        GenerationRequest(prompt(MAX_SEQ_LEN + 4)).validate(VOCAB, MAX_SEQ_LEN)
    GenerationRequest(prompt(90), max_new_tokens=6, strict_context_limit=True).validate(VOCAB, MAX_SEQ_LEN)


def test_a_cancelled_or_expired_sequence_leaves_at_the_next_step(model):
    engine = make_engine(model, start=False)  # the test drives the steps itself

    async def run():
        cancelled = engine.submit(GenerationRequest(prompt(4), GREEDY))
        expiring = engine.submit(GenerationRequest(prompt(5), GREEDY, timeout=3600.0))
        staying = engine.submit(GenerationRequest(prompt(6), GREEDY))
        for _ in range(3):
            engine._step()
        assert engine.scheduler.num_running == 3 and gauge("llama_model_kv_slots_used") == 3
        cancelled.cancel()
        expiring._req.deadline = 0.0  # passed
        engine._step()  # one step
        assert [seq.prompt_len for seq in engine.scheduler.sequences()] == [6]
        assert gauge("llama_model_running_sequences") == 1 and gauge("llama_model_kv_slots_used") == 1
        await asyncio.sleep(0)  # let the step's deliveries land
        assert [c async for c in cancelled][-1].finish_reason is FinishReason.CANCELLED
        with pytest.raises(DeadlineExceeded):
            [c async for c in expiring]
        staying.cancel()
        engine._step()
        assert engine.num_live == 0 and gauge("llama_model_running_sequences") == 0

    asyncio.run(run())


# ---- the paged cache and the prefix cache -------------------------------------------------------
# Blocks of 4 tokens, so prompts span many blocks; the engine is given a pool smaller than the
# model's, and the reference recompute runs in the model's last slot, outside the engine's blocks.

BLOCK = 4
PAGED_SLOTS = 5  # the model's pool: 5 slots of MAX_SEQ_LEN; the engine uses at most the first 4


@pytest.fixture(scope="module")
def paged_model(model) -> Transformer:
    paged = Transformer(model.params)
    paged.load_state_dict(model.state_dict())
    paged.setup_caches(PAGED_SLOTS, MAX_SEQ_LEN, torch.float32, "cpu", block_size=BLOCK)
    return paged


def make_paged_engine(paged_model: Transformer, num_blocks: int, **kwargs) -> Engine:
    return make_engine(paged_model, num_blocks=num_blocks, block_size=BLOCK, **kwargs)


def paged_reference(paged_model: Transformer, prompt_ids: list[int], n: int) -> list[int]:
    tokens = list(prompt_ids)
    for _ in range(n):
        logits = paged_model.forward(Batch(torch.tensor(tokens), [PAGED_SLOTS - 1], [0], [len(tokens)]))
        tokens.append(int(logits[-1].argmax()))
    return tokens[len(prompt_ids):]


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


SHARED = prompt(22, offset=5)  # 5 full blocks of 4 and 2 more tokens
FAMILY = [
    SHARED,  # the first: nothing to hit
    SHARED,  # the same prompt: 5 blocks hit (the last token is always recomputed)
    SHARED[:18],  # a hit ending mid-block: 4 blocks hit, tokens 16 and 17 recomputed
    SHARED[:13] + prompt(9, offset=77),  # diverges inside block 3: 3 blocks hit
    SHARED[:8] + [200, 201, 202, 203, 204],  # diverges at a block boundary: 2 blocks hit
    prompt(15, offset=150),  # unrelated
]
EXPECTED_HITS = [0, 20, 16, 12, 8, 0]


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_prefix_cache_never_changes_greedy_tokens(paged_model, prefix_cache):
    engine = make_paged_engine(paged_model, num_blocks=40, prefix_cache=prefix_cache)
    hits_before = counter("llama_model_prefix_cache_hit_tokens_total")
    moves, forward = [], engine.runner.forward

    def recording(work, all_logits):
        moves.extend(item.block_copies for item in work if item.block_copies)
        return forward(work, all_logits)

    engine.runner.forward = recording
    try:
        results = [asyncio.run(collect(engine, GenerationRequest(p, GREEDY, max_new_tokens=6))) for p in FAMILY]
    finally:
        engine.stop()
    # A hit puts a request's own blocks after cached ones elsewhere: decoding alone, it is moved into
    # one run of blocks (scheduler._into_one_run), and its tokens stay the reference's.
    assert bool(moves) is prefix_cache
    for family_prompt, (tokens, _) in zip(FAMILY, results, strict=True):
        assert tokens == paged_reference(paged_model, family_prompt, 6)
    hits = [chunks[-1].cached_prompt_tokens for _, chunks in results]
    assert hits == (EXPECTED_HITS if prefix_cache else [0] * len(FAMILY))
    assert counter("llama_model_prefix_cache_hit_tokens_total") - hits_before == sum(hits)


def test_concurrent_family_shares_blocks_and_keeps_its_tokens(paged_model):
    engine = make_paged_engine(paged_model, num_blocks=40)

    async def run():
        first = await collect(engine, GenerationRequest(SHARED, GREEDY, max_new_tokens=5))
        rest = await asyncio.gather(*(collect(engine, GenerationRequest(p, GREEDY, max_new_tokens=7))
                                      for p in FAMILY[1:]))
        return [first, *rest]

    try:
        results = asyncio.run(run())
    finally:
        engine.stop()
    for family_prompt, (tokens, _) in zip(FAMILY, results, strict=True):
        assert tokens == paged_reference(paged_model, family_prompt, len(tokens))
    assert [chunks[-1].cached_prompt_tokens for _, chunks in results][1:] == EXPECTED_HITS[1:]


def test_next_turn_of_a_conversation_reuses_the_previous_prompt_and_answer(paged_model):
    engine = make_paged_engine(paged_model, num_blocks=40)
    try:
        first_prompt = prompt(10, offset=31)
        answer, _ = asyncio.run(collect(engine, GenerationRequest(first_prompt, GREEDY, max_new_tokens=9)))
        history = first_prompt + answer + prompt(5, offset=60)  # 24 tokens
        tokens, chunks = asyncio.run(collect(engine, GenerationRequest(history, GREEDY, max_new_tokens=4)))
    finally:
        engine.stop()
    # 18 of the 19 known tokens were computed (the last answer token never was): 4 full blocks.
    assert chunks[-1].cached_prompt_tokens == 16
    assert tokens == paged_reference(paged_model, history, 4)


def test_a_full_pool_preempts_and_resumes_with_identical_output(paged_model):
    # 12 blocks = 48 tokens for 4 running sequences that grow to 30-40 tokens each: preemption.
    engine = make_paged_engine(paged_model, num_blocks=12, max_queue=8)
    requests = [GenerationRequest(prompt(n, offset=n), GREEDY, max_new_tokens=m)
                for n, m in [(9, 25), (14, 20), (5, 30), (20, 12), (3, 28), (11, 22)]]
    sampled = GenerationRequest(prompt(7, offset=90), SamplingParams(temperature=1.0, seed=7), max_new_tokens=25)
    preemptions = counter("llama_model_preemptions_total")

    async def run():
        return await asyncio.gather(*(collect(engine, r) for r in [*requests, sampled]))

    try:
        results = asyncio.run(run())
        alone = asyncio.run(collect(engine, sampled))[0]  # no pressure now
    finally:
        engine.stop()
    assert counter("llama_model_preemptions_total") > preemptions
    for request, (tokens, chunks) in zip(requests, results[:-1], strict=True):
        assert tokens == paged_reference(paged_model, request.prompt_token_ids, request.max_new_tokens)
        assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert results[-1][0] == alone  # a seeded sample survives preemption too
    assert gauge("llama_model_kv_blocks_used") == 0 and gauge("llama_model_kv_blocks_total") == 12


def test_echo_after_a_prefix_hit_still_gets_every_prompt_logprob(paged_model):
    engine = make_paged_engine(paged_model, num_blocks=40)
    echo = GenerationRequest(SHARED, GREEDY, max_new_tokens=2, logprobs=True, echo=True)
    try:
        asyncio.run(collect(engine, GenerationRequest(SHARED, GREEDY, max_new_tokens=2)))  # fills the cache
        tokens, chunks = asyncio.run(collect(engine, echo))
    finally:
        engine.stop()
    reference = torch.log_softmax(paged_model.forward(Batch(torch.tensor(SHARED), [PAGED_SLOTS - 1], [0],
                                                            [len(SHARED)]), all_logits=True), dim=-1)
    expected = [0.0] + [reference[i - 1, SHARED[i]].item() for i in range(1, len(SHARED))]
    assert chunks[0].prompt_logprobs == pytest.approx(expected, abs=1e-4)
    assert chunks[-1].cached_prompt_tokens == 0


def test_a_request_that_can_never_fit_the_cache_is_refused_with_both_numbers(paged_model):
    engine = make_paged_engine(paged_model, num_blocks=10, start=False)  # 40 tokens
    with pytest.raises(InvalidArgument, match="45 tokens.*40") as error:
        engine.validate(GenerationRequest(prompt(45)))
    assert error.value.field == "prompt_token_ids"
    with pytest.raises(InvalidArgument, match="30.*12.*42.*40") as error:
        engine.validate(GenerationRequest(prompt(30), max_new_tokens=12))
    assert error.value.field == "stopping.max_new_tokens"
    engine.validate(GenerationRequest(prompt(30), max_new_tokens=10))  # fits: waits for blocks if it must


def test_a_group_forks_from_the_first_and_seeded_groups_are_reproducible(paged_model):
    """n completions: siblings share the first's prompt blocks, greedy and seeded; a seeded group gives
    the same tokens every time, with the prefix cache on or off (a seeded request never reuses other
    requests' blocks, only its own group's)."""
    seeded = [GenerationRequest(SHARED, SamplingParams(temperature=1.0, seed=seed), max_new_tokens=12)
              for seed in (1, 2, 3)]
    greedy_group = [GenerationRequest(SHARED, GREEDY, max_new_tokens=6) for _ in range(3)]

    async def run(engine, group):
        streams = engine.submit_group(group)

        async def read(stream):
            tokens, last = [], None
            async for chunk in stream:
                tokens += chunk.token_ids
                last = chunk
            return tokens, last.cached_prompt_tokens

        return await asyncio.gather(*(read(stream) for stream in streams))

    cached, uncached = make_paged_engine(paged_model, num_blocks=40), make_paged_engine(
        paged_model, num_blocks=40, prefix_cache=False)
    try:
        first, second = asyncio.run(run(cached, seeded)), asyncio.run(run(cached, seeded))
        without = asyncio.run(run(uncached, seeded))
        greedy_cached = asyncio.run(run(uncached, greedy_group))
    finally:
        cached.stop()
        uncached.stop()
    assert [t for t, _ in first] == [t for t, _ in second] == [t for t, _ in without]
    assert len({tuple(t) for t, _ in first}) > 1
    assert [hits for _, hits in first + second] == [0, 20, 20] * 2
    expected = paged_reference(paged_model, SHARED, 6)
    # Forks share the first's blocks even without the prefix cache.
    assert greedy_cached == [(expected, 0), (expected, 20), (expected, 20)]
