"""The serving KV cache: incremental decode equals full recompute, and a mixed batch (sequences at
different positions, prompt chunks beside decode tokens, any slots) equals each sequence run alone;
eager and compiled (``--compile``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_service.args import ModelArgs
from model_service.build import build
from model_service.model import (
    DECODE_GATHER_GROUP,
    Batch,
    Transformer,
    _make_plan,
    attend,
    attend_tables,
    precompute_rope,
)

VOCAB = 512
TOL = 1e-5


@pytest.fixture(scope="module", params=["eager", "compiled"])
def model(request: pytest.FixtureRequest, tiny_checkpoints: dict[str, Path]) -> Transformer:
    # Compiled: every layout below runs through the graphs a compiled model has (see test_model_compile).
    torch._dynamo.reset()  # without graphs other tests' models left
    return build(tiny_checkpoints["hf"], max_batch_size=6, max_seq_len=64, compile=request.param == "compiled").model


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def full(model: Transformer, seq: torch.Tensor, slot: int = 5) -> torch.Tensor:
    """[len(seq), vocab]: the whole sequence in one causal pass from position 0."""
    return model(Batch(seq, block_tables=[slot], start_pos=[0], lengths=[len(seq)]), all_logits=True)


def test_incremental_decode_equals_full_recompute(model):
    seq = tokens(20, seed=1)
    expected = full(model, seq)
    got = []
    # A first prompt chunk, a second chunk that attends over the cached first one, then one token at a time.
    got.append(model(Batch(seq[:6], [0], [0], [6]), all_logits=True))
    got.append(model(Batch(seq[6:11], [0], [6], [5]), all_logits=True))
    for pos in range(11, 20):
        got.append(model(Batch(seq[pos:pos + 1], [0], [pos], [1])))
    assert (torch.cat(got) - expected).abs().max().item() <= TOL


def test_last_token_logits_are_the_last_row_of_all_logits(model):
    seq = tokens(9, seed=2)
    last = model(Batch(seq, [1], [0], [9]))
    assert last.shape == (1, VOCAB)
    assert (last[0] - full(model, seq)[-1]).abs().max().item() <= TOL


def prefill(model: Transformer, seq: torch.Tensor, slot: int) -> None:
    model(Batch(seq, [slot], [0], [len(seq)]))


@pytest.mark.parametrize("slots", [[0, 2, 3, 1], [3, 0, 4, 1]], ids=["decode-slots-adjacent", "decode-slots-scattered"])
def test_mixed_batch_equals_each_sequence_alone(model, slots):
    # Four sequences: two decoding at different positions, one continuing its prompt, one new prompt.
    histories = [tokens(7, 10), tokens(3, 11), tokens(0, 12), tokens(12, 13)]
    new = [tokens(1, 20), tokens(4, 21), tokens(5, 22), tokens(1, 23)]
    order = [0, 1, 3, 2]  # decode rows interleaved with chunk rows, new prompt last
    for i in order:
        if len(histories[i]):
            prefill(model, histories[i], slots[i])
    mixed = model(Batch(torch.cat([new[i] for i in order]), [slots[i] for i in order],
                        [len(histories[i]) for i in order], [len(new[i]) for i in order]), all_logits=True)
    rows = torch.split(mixed, [len(new[i]) for i in order])
    for i, got in zip(order, rows, strict=True):
        alone = full(model, torch.cat([histories[i], new[i]]))[len(histories[i]):]
        assert (got - alone).abs().max().item() <= TOL, f"sequence {i}"
    # Last-token mode returns one row per sequence, in batch order.
    last = model(Batch(torch.cat([new[i] for i in order]), [slots[i] for i in order],
                       [len(histories[i]) for i in order], [len(new[i]) for i in order]))
    assert last.shape == (4, VOCAB)
    assert (last - torch.stack([r[-1] for r in rows])).abs().max().item() <= TOL


def test_scattered_and_shared_block_tables_equal_full_recompute(model):
    # Block tables as a busy pool leaves them: blocks in no order (every read is a gather), one block
    # shared by two sequences (a cached prefix), gathers of different sizes in one step (decode rows and
    # a prompt chunk), over several steps that reuse the gather workspace.
    assert model.block_size == 16 and model.num_blocks == 24  # 6 slots x 64 positions; slot 5 is full()'s
    free = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()  # blocks 0-19 in no order
    seqs = [tokens(20, 40), tokens(35, 41), tokens(9, 42)]
    seqs.append(torch.cat([seqs[0][:16], tokens(5, 43)]))  # shares sequence 0's first block
    tables = [free[0:3], free[3:7], free[7:9], [free[0], free[9], free[10]]]
    for i in range(3):
        prefill_blocks = model(Batch(seqs[i], [tables[i]], [0], [len(seqs[i])]))
        assert torch.isfinite(prefill_blocks).all()
    model(Batch(seqs[3][16:], [tables[3]], [16], [5]))  # only the unshared part: a chunk over a gather
    chunk = tokens(10, 44)  # sequence 2 goes on with a prompt chunk beside three decoding sequences
    new = [tokens(1, 50), tokens(1, 51), chunk, tokens(1, 52)]
    for step in range(3):
        starts = [len(s) for s in seqs]
        out = model(Batch(torch.cat(new), tables, starts, [len(t) for t in new]))
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, new, strict=True)]
        for i, seq in enumerate(seqs):
            assert (out[i] - full(model, seq)[-1]).abs().max().item() <= TOL, f"step {step}, sequence {i}"
        new = [tokens(1, 60 + 4 * step + i) for i in range(4)]


def test_more_decode_sequences_than_a_gather_group_equal_full_recompute(model):
    # Six decoding sequences (two gather groups: DECODE_GATHER_GROUP is 4) of different lengths, each in
    # blocks in no order, the groups' tables of different widths.
    assert DECODE_GATHER_GROUP < 6
    free = torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
    lengths = [30, 5, 17, 40, 12, 33]  # the longest sequences in the second group, the shortest in the first
    seqs = [tokens(n, 70 + i) for i, n in enumerate(lengths)]
    tables, used = [], 0
    for n in lengths:
        blocks = -(-(n + 3) // model.block_size)  # room for three more tokens
        tables.append(free[used: used + blocks])
        used += blocks
    assert used <= 20
    for seq, table in zip(seqs, tables, strict=True):
        model(Batch(seq, [table], [0], [len(seq)]))
    for step in range(3):
        new = [tokens(1, 80 + 6 * step + i) for i in range(6)]
        out = model(Batch(torch.cat(new), tables, [len(s) for s in seqs], [1] * 6))
        seqs = [torch.cat([s, t]) for s, t in zip(seqs, new, strict=True)]
        for i, seq in enumerate(seqs):
            assert (out[i] - full(model, seq)[-1]).abs().max().item() <= TOL, f"step {step}, sequence {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_block_tables_equals_the_ops(dtype):
    # attend_tables (decode attention a compiled graph runs inside it) against attend (the op's), on a
    # cache full of other sequences' values: GQA, blocks in no order, one block shared, tables of
    # different widths padded with block 0, lengths ending inside a block and on its last position.
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, kv_heads, heads, head_dim = 12, 4, 2, 6, 8
    cache_k, cache_v = (torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
                        for _ in range(2))
    tables = [[7, 2, 9], [4], [2, 11, 0, 5], [1, 6]]
    positions = [9, 3, 15, 4]  # each sequence's new token; it attends to positions [0, position]
    batch = Batch(torch.zeros(4, dtype=torch.long), tables, positions, [1] * 4)
    plan = _make_plan(batch, block_size, num_blocks, max_seq_len=64, device=torch.device("cpu"))
    plan.workspace = torch.empty(2 * plan.gather_blocks * block_size * kv_heads * head_dim, dtype=dtype)
    xq = torch.randn(4, heads, head_dim, generator=gen).to(dtype)
    expected = attend(xq, cache_k, cache_v, plan)
    got = attend_tables(xq, cache_k, cache_v, plan.decode_blocks, plan.decode_lengths)
    tol = 1e-2 if dtype == torch.bfloat16 else TOL  # bfloat16: both round their float32 sums to 8 bits
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # and by hand, for the first sequence: softmax(q k^T / sqrt(d)) v over its 10 positions
    keys = cache_k[tables[0]].reshape(-1, kv_heads, head_dim)[:10].float()
    values = cache_v[tables[0]].reshape(-1, kv_heads, head_dim)[:10].float()
    for head in range(heads):
        kv = head // (heads // kv_heads)
        weights = torch.softmax(keys[:, kv] @ xq[0, head].float() / head_dim ** 0.5, 0)
        torch.testing.assert_close(got[0].view(heads, head_dim)[head].float(), weights @ values[:, kv],
                                   **({"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}))


def test_a_sequence_moved_by_block_copies_decodes_as_before(model):
    # A prompt in blocks out of order (a prefix hit, then a block from elsewhere); the scheduler moves it
    # into one run (blocks 12-14) with copies the forward makes before it writes this step's token.
    seq = tokens(40, 90)
    old, run = [3, 9, 6], [12, 13, 14]
    model(Batch(seq, [old], [0], [len(seq)]))
    before = [(layer.attention.cache.k[old].clone(), layer.attention.cache.v[old].clone()) for layer in model.layers]
    for step in range(3):
        new = tokens(1, 91 + step)
        copies = list(zip(old, run, strict=True)) if step == 0 else []
        out = model(Batch(new, [run], [len(seq)], [1], block_copies=copies))
        seq = torch.cat([seq, new])
        assert (out[0] - full(model, seq)[-1]).abs().max().item() <= TOL, f"step {step}"
    for layer, (k, v) in zip(model.layers, before, strict=True):  # the blocks it left are as they were
        assert torch.equal(layer.attention.cache.k[old], k) and torch.equal(layer.attention.cache.v[old], v)
    with pytest.raises(ValueError, match="outside the cache"):
        model(Batch(tokens(1, 0), [run], [len(seq)], [1], block_copies=[(3, model.num_blocks)]))


def test_stale_cache_contents_of_a_reused_slot_are_not_attended(model):
    prefill(model, tokens(30, 30), slot=2)  # a long earlier occupant
    seq = tokens(5, 31)
    prefill(model, seq[:4], slot=2)  # the slot is reused by a shorter sequence
    # Decode beside a sequence at position 30, so the gathered cache prefix covers the stale positions.
    prefill(model, tokens(30, 32), slot=3)
    out = model(Batch(torch.cat([seq[4:], tokens(1, 33)]), [2, 3], [4, 30], [1, 1]))
    assert (out[0] - full(model, seq)[-1]).abs().max().item() <= TOL


def test_batch_is_validated(model):
    with pytest.raises(ValueError, match="sum to 3"):
        model(Batch(tokens(2, 0), [0], [0], [3]))
    with pytest.raises(ValueError, match="do not fit"):
        model(Batch(tokens(2, 0), [0], [63], [2]))
    with pytest.raises(ValueError, match="one block table"):
        model(Batch(tokens(2, 0), [0, 1], [0], [2]))


def test_forward_before_setup_caches_is_an_error():
    from model_service import distributed

    distributed.ensure_initialized()
    model = Transformer(ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16))
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(Batch(tokens(2, 0) % 64, [0], [0], [2]))


def test_scaled_rope_matches_metas_published_rule():
    # Meta's apply_scaling, written out per frequency: high frequencies kept, low ones / factor, blend between.
    import math

    args = ModelArgs(dim=128 * 4, n_heads=4, use_scaled_rope=True, rope_scaling_factor=32.0)
    base = 1.0 / (args.rope_theta ** (torch.arange(0, 128, 2).double() / 128))
    expected = []
    for freq in base.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            expected.append(freq)
        elif wavelen > 8192 / 1:
            expected.append(freq / 32)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            expected.append((1 - smooth) * freq / 32 + smooth * freq)
    cos, sin = precompute_rope(args, 2)[1].unbind(-1)  # position 1: angle == frequency
    freqs = torch.atan2(sin, cos)
    assert torch.allclose(freqs.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)
    assert len({round(f / e, 3) for f, e in zip(base.tolist(), expected, strict=True)}) > 3  # all three regimes
