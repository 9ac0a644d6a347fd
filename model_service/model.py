"""The Llama 3 Transformer (Meta's llama3 ``model.py`` architecture) with a KV cache built for serving.

Differences from the reference, all for continuous batching:
- the cache is paged: every layer holds a pool of fixed-size blocks (``setup_caches``, on a chosen
  device), and a sequence's keys/values live in the blocks its *block table* lists, so sequences
  take cache in proportion to their length and can share blocks of a common prefix;
- a forward pass takes a ``Batch``: tokens of several sequences concatenated, each sequence with its
  own block table and start position, so a prompt chunk of one sequence can run beside single
  decode tokens of others. Attention is SDPA over a sequence's blocks: a view of the cache when they
  are consecutive, else gathered into one buffer that every layer of the step reuses; compiled, decode
  steps of several sequences attend over their block tables inside the graph (``attend_tables``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import mmap
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from model_service.args import ModelArgs
from model_service.quant import INT8_MIN_ROWS, FusedLinear, _QuantLinear


def _packed_bytes(module: nn.Module) -> int:
    """Bytes of the packed (int4 / int8) linears in ``module``, itself included: what an autotuned graph
    keeps a repacked copy of (``HEAD_AUTOTUNE_MAX_BYTES``, ``AUTO_AUTOTUNE_MAX_BYTES``)."""
    return sum(b.nbytes for part in module.modules() if isinstance(part, _QuantLinear) for b in part.buffers())


def _power_of_two(n: int) -> int:
    """The smallest power of two >= n, at least 2: the sizes a CUDA-graph decode step is padded to."""
    return max(2, 1 << (n - 1).bit_length())


def _no_init(x: torch.Tensor) -> torch.Tensor:
    return x  # weights come from a checkpoint; random init of a large model would waste seconds


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 even for bf16 activations, then cast back (as the reference does).
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_frequencies(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE angle per position step of each (even, odd) pair of a head: float32 [head_dim // 2]."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
    if args.use_scaled_rope:
        # Llama 3.1 / 3.2: leave high frequencies alone, divide low ones by the factor, blend between.
        low_wavelen = args.rope_original_context / args.rope_low_freq_factor
        high_wavelen = args.rope_original_context / args.rope_high_freq_factor
        wavelen = 2 * torch.pi / freqs
        scaled = torch.where(wavelen > low_wavelen, freqs / args.rope_scaling_factor, freqs)
        smooth = (args.rope_original_context / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor)
        blend = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        freqs = torch.where(blend, (1 - smooth) * scaled / args.rope_scaling_factor + smooth * scaled, scaled)
    return freqs


def precompute_rope(args: ModelArgs, end: int, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE rotations for positions [0, end): (cos, sin) [end, head_dim // 2, 2], computed in float32 and
    kept in the activation dtype, so applying them needs no complex numbers and no float round trip."""
    angles = torch.outer(torch.arange(end, device=device, dtype=torch.float32), rope_frequencies(args, device))
    return torch.view_as_real(torch.polar(torch.ones_like(angles), angles)).to(dtype)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    # x: [n_tokens, n_heads, head_dim]; rope: [n_tokens, head_dim // 2, 2] (cos, sin)
    # Meta's layout: consecutive (even, odd) pairs of a head are one complex number, rotated by the angle.
    pairs = x.unflatten(-1, (-1, 2))  # [n_tokens, n_heads, head_dim // 2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], -1).flatten(-2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[bs, seqlen, n_kv_heads, head_dim] -> [bs, seqlen, n_kv_heads * n_rep, head_dim]."""
    bs, seqlen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, seqlen, n_kv_heads, n_rep, head_dim).reshape(
        bs, seqlen, n_kv_heads * n_rep, head_dim)


class KVCache(nn.Module):
    """One layer's share of the paged cache: ``num_blocks`` blocks of ``block_size`` positions, and one
    block past them that no block table may name, where the padding rows of a CUDA-graph decode step
    write their keys and values (``Transformer._run_decode_graph``); on CPU its pages are never touched."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        self.register_buffer("k", _zeros(shape, dtype, torch.device(device)), persistent=False)
        self.register_buffer("v", _zeros(shape, dtype, torch.device(device)), persistent=False)


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros, not empty: positions past a sequence's end are masked, but NaN garbage would still poison
    the weighted sum (0 * NaN = NaN). On CPU from an anonymous mapping, whose pages the kernel hands
    out zeroed on first write: the cache takes memory as sequences fill it, not all at start-up."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    return torch.frombuffer(mmap.mmap(-1, count * dtype.itemsize), dtype=dtype, count=count).view(shape)


@dataclass
class Batch:
    """New tokens of several sequences for one forward pass, and where each sequence's cache lives.

    A block table lists a sequence's cache blocks in order (block i holds positions
    [i * block_size, (i + 1) * block_size)) and must cover every position up to its last new token.
    An int instead of a table names a *slot*: the slot-th run of ``max_seq_len / block_size``
    consecutive blocks (the slot cache as a special case; for tools and tests that drive the model
    directly, with a pool of at least ``max_batch_size`` slots).
    """

    tokens: torch.Tensor  # [n_tokens] int64, every sequence's new tokens concatenated in order
    block_tables: list[list[int]] | list[int]  # per sequence: its blocks, or a slot number
    start_pos: list[int]  # cache position of each sequence's first new token
    lengths: list[int]  # new tokens per sequence; sum(lengths) == n_tokens
    # (from, to): blocks whose keys and values are copied, in every layer, before the step writes
    # anything (a sequence the scheduler moved into one run of blocks).
    block_copies: list[tuple[int, int]] = field(default_factory=list)


@dataclass
class _Plan:
    """Index tensors derived once per forward from a Batch and shared by every layer."""

    positions: torch.Tensor  # [n_tokens] position of every token in its sequence
    cache_rows: torch.Tensor  # [n_tokens] row of every token's K/V in the flattened pool
    last_rows: torch.Tensor  # [n_seqs] index of each sequence's last token
    # Single-token (decode) sequences, attended in one SDPA call over their gathered blocks.
    decode_only: bool  # every sequence decodes one token (then decode_rows is None: all of them)
    decode_rows: torch.Tensor | None  # [n_decode] token indices
    decode_blocks: torch.Tensor | slice | None  # [n_decode, n_blocks] tables, or a slice: one sequence, consecutive
    decode_len: int  # longest cache prefix among them
    decode_mask: torch.Tensor | None  # [n_decode, 1, 1, decode_len] bool, True = may attend (None: one sequence)
    # Where gathered blocks go (keys, then values): a flat buffer that every gather of the step reuses
    # in turn, at least ``2 * gather_blocks`` blocks long (None: the step gathers nothing).
    workspace: torch.Tensor | None
    gather_blocks: int  # the most blocks one gather of this step reads
    # Multi-token (prompt) chunks, one SDPA call each: (first token, length, blocks, end, mask).
    chunks: list[tuple[int, int, torch.Tensor | slice, int, torch.Tensor | None]]
    decode_lengths: torch.Tensor | None = None  # [n_decode] positions each decode sequence attends to
    # A decode-only step's block tables (the blocks each sequence uses) and its new tokens' positions, as
    # lists: what a CUDA-graph decode step pads to its recorded shape (``Transformer._run_decode_graph``).
    decode_tables: list[list[int]] = field(default_factory=list)
    decode_pos: list[int] = field(default_factory=list)


def _blocks_index(table: list[int], device: torch.device) -> torch.Tensor | slice:
    """A view (slice) when the blocks are consecutive, else an index for a gather."""
    if table == list(range(table[0], table[0] + len(table))):
        return slice(table[0], table[0] + len(table))
    return torch.tensor(table, dtype=torch.long).to(device, non_blocking=True)


def _make_plan(batch: Batch, block_size: int, num_blocks: int, max_seq_len: int, device: torch.device) -> _Plan:
    n_seqs = len(batch.lengths)
    if not (len(batch.block_tables) == len(batch.start_pos) == n_seqs) or n_seqs == 0:
        raise ValueError("Batch needs one block table, start_pos and length per sequence, and at least one sequence")
    if sum(batch.lengths) != batch.tokens.numel():
        raise ValueError(f"Batch lengths sum to {sum(batch.lengths)} but it has {batch.tokens.numel()} tokens")
    per_slot = -(-max_seq_len // block_size)
    tables = [list(range(t * per_slot, (t + 1) * per_slot)) if isinstance(t, int) else t for t in batch.block_tables]
    for table, start, length in zip(tables, batch.start_pos, batch.lengths, strict=True):
        end = start + length
        if length < 1 or start < 0 or end > max_seq_len or end > len(table) * block_size:
            raise ValueError(f"positions [{start}, {end}) do not fit a context of {max_seq_len} positions "
                             f"and a table of {len(table)} blocks of {block_size}")
        if any(not 0 <= block < num_blocks for block in table):
            raise ValueError(f"a block table names blocks outside the pool of {num_blocks}")
    last_rows, positions, cache_rows = [], [], []
    decode_rows, decode_tables, decode_pos, chunks = [], [], [], []
    first = 0
    for table, start, length in zip(tables, batch.start_pos, batch.lengths, strict=True):
        last_rows.append(first + length - 1)
        positions.extend(range(start, start + length))
        cache_rows.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + length))
        end = start + length
        used = table[: -(-end // block_size)]
        if length == 1:
            decode_rows.append(first)
            decode_tables.append(used)
            decode_pos.append(start)
        else:
            mask = None
            if start > 0:  # query i (at start + i) sees keys [0, start + i]
                keys = torch.arange(end, device=device)
                queries = torch.arange(start, end, device=device)
                mask = keys[None, :] <= queries[:, None]  # [length, end]
            chunks.append((first, length, _blocks_index(used, device), end, mask))
        first += length

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    decode_only = not chunks
    gather_blocks = max((blocks.numel() for _, _, blocks, _, _ in chunks if isinstance(blocks, torch.Tensor)),
                        default=0)
    plan = _Plan(tensor(positions), tensor(cache_rows), tensor(last_rows), decode_only, None, None, 0, None, None,
                 gather_blocks, chunks)
    if decode_only:
        plan.decode_tables, plan.decode_pos = decode_tables, decode_pos
    if decode_rows:
        plan.decode_rows = None if decode_only else tensor(decode_rows)
        plan.decode_len = max(decode_pos) + 1
        if len(decode_tables) == 1:
            plan.decode_blocks = _blocks_index(decode_tables[0], device)
        else:
            width = max(len(table) for table in decode_tables)
            # Short tables are padded with block 0: its positions lie past the sequence's end, masked.
            plan.decode_blocks = tensor([table + [0] * (width - len(table)) for table in decode_tables])
        if isinstance(plan.decode_blocks, torch.Tensor):  # [n_blocks], or by sequence DECODE_GATHER_GROUP at a time
            group = plan.decode_blocks if plan.decode_blocks.dim() == 1 else plan.decode_blocks[:DECODE_GATHER_GROUP]
            plan.gather_blocks = max(plan.gather_blocks, group.numel())
        if len(decode_pos) > 1:  # one sequence attends to all decode_len keys: no mask
            plan.decode_lengths = tensor([pos + 1 for pos in decode_pos])
            keys = torch.arange(plan.decode_len, device=device)
            plan.decode_mask = (keys[None, :] < plan.decode_lengths[:, None])[:, None, None, :]
    return plan


# Decode sequences whose blocks are gathered together, then attended (one SDPA call a group). All at once,
# a batch's gathered blocks outgrow the CPU's cache before SDPA reads them back: `make bench-paging`, batch 16,
# paged / slot cache at context 512: 0.88-0.90x all at once, 0.93 / 0.97-0.99 / 0.96x in groups of 2 / 4 / 8;
# at context 1536: 0.72x all at once, 1.07x in groups of 4 (faster than the slot cache's strided reads).
DECODE_GATHER_GROUP = 4


def _read_blocks(cache_k: torch.Tensor, cache_v: torch.Tensor, blocks: torch.Tensor | slice,
                 workspace: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``blocks`` ([n, block_size, kv_heads, head_dim] each): views of the cache for a
    slice, else gathered into the step's workspace. Gathering into memory every layer reuses, not into a
    fresh tensor per layer: at batch 16 the fresh tensors' page faults cost more than the copy itself
    (``make bench-paging``: paged decode 0.41-0.87x the slot cache's, now ~1x)."""
    if isinstance(blocks, slice):
        return cache_k[blocks], cache_v[blocks]
    assert workspace is not None, "the step's plan has no workspace for its gathers"
    index = blocks.reshape(-1)
    size = index.numel() * math.prod(cache_k.shape[1:])
    keys = workspace[:size].view(index.numel(), *cache_k.shape[1:])
    values = workspace[size: 2 * size].view(index.numel(), *cache_k.shape[1:])
    torch.index_select(cache_k, 0, index, out=keys)
    torch.index_select(cache_v, 0, index, out=values)
    return keys, values


def write_cache(xk: torch.Tensor, xv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                rows: torch.Tensor) -> None:
    """Store a step's new keys and values (``xk``, ``xv``: [n_tokens, kv_heads, head_dim]) at their
    ``rows`` of one layer's cache (``cache_k``, ``cache_v``: [num_blocks, block_size, kv_heads, head_dim])."""
    cache_k.view(-1, *xk.shape[1:]).index_copy_(0, rows, xk)
    cache_v.view(-1, *xv.shape[1:]).index_copy_(0, rows, xv)


def attend(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """One layer's attention in a step, its new keys and values already in the cache: every sequence's
    queries (``xq``: [n_tokens, heads, head_dim]) over its blocks as ``plan`` lays them out
    -> [n_tokens, heads * head_dim]."""
    n_tokens, heads, head_dim = xq.shape
    kv_heads = cache_k.shape[2]

    if plan.decode_only:  # every token decodes: attention's output is the whole result, no scatter
        return _attend_decode(xq, cache_k, cache_v, plan).view(n_tokens, -1)
    out = torch.empty_like(xq)  # [n_tokens, heads, head_dim]
    if plan.decode_rows is not None:
        out[plan.decode_rows] = _attend_decode(xq[plan.decode_rows], cache_k, cache_v, plan)
    for first, length, blocks, end, mask in plan.chunks:
        chunk_k, chunk_v = _read_blocks(cache_k, cache_v, blocks, plan.workspace)
        chunk_k = chunk_k.view(1, -1, kv_heads, head_dim)[:, :end]  # [1, end, kv_heads, head_dim]
        chunk_v = chunk_v.view(1, -1, kv_heads, head_dim)[:, :end]
        keys = repeat_kv(chunk_k, heads // kv_heads).transpose(1, 2)  # [1, heads, end, head_dim]
        values = repeat_kv(chunk_v, heads // kv_heads).transpose(1, 2)
        q = xq[first: first + length].transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
        out[first: first + length] = attn[0].transpose(0, 1)
    return out.view(n_tokens, -1)


def _attend_decode(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, plan: _Plan) -> torch.Tensor:
    # xq: [n_decode, heads, head_dim], one token per sequence -> [n_decode, heads, head_dim]
    n_decode, heads, head_dim = xq.shape
    kv_heads = cache_k.shape[2]
    # GQA without repeat_kv's copy: the query heads that share a KV head become that head's "query
    # positions", so each cached K/V is read once (decode is memory-bound).
    q = xq.reshape(n_decode, kv_heads, heads // kv_heads, head_dim)
    # Gathered blocks are attended DECODE_GATHER_GROUP sequences at a time, so what one gather writes
    # is still in the CPU's cache when SDPA reads it (a view for one sequence in consecutive blocks).
    by_sequence = isinstance(plan.decode_blocks, torch.Tensor) and plan.decode_blocks.dim() == 2
    step = DECODE_GATHER_GROUP if by_sequence else n_decode  # else one sequence: its view or its blocks
    groups = []
    for first in range(0, n_decode, step):
        group = slice(first, first + step)
        blocks = plan.decode_blocks[group] if by_sequence else plan.decode_blocks
        keys, values = _read_blocks(cache_k, cache_v, blocks, plan.workspace)
        n = min(step, n_decode - first)
        keys = keys.view(n, -1, kv_heads, head_dim)[:, : plan.decode_len]  # [n, decode_len, kv_heads, head_dim]
        values = values.view(n, -1, kv_heads, head_dim)[:, : plan.decode_len]
        groups.append(F.scaled_dot_product_attention(q[group], keys.transpose(1, 2), values.transpose(1, 2),
                                                     attn_mask=None if plan.decode_mask is None else plan.decode_mask[group]))
    attn = groups[0] if len(groups) == 1 else torch.cat(groups)
    return attn.reshape(n_decode, heads, head_dim)


# What ``Transformer.compile`` can do (``--compile-mode``). "max-autotune": inductor's own C++ GEMM
# templates are timed against the ATen kernels for every packed int4 matmul of a graph and the faster one is
# built in; they need the packed weights as constants (inductor's freezing) and a static hidden width. On a
# CPU with AMX its int4 template multiplies 16+ rows on AMX tiles: SmolLM2 (2 threads) 16 decoding rows
# 38.5 -> 20.7 ms a step, 64 rows 122.5 -> 58.8, a 256-token prompt chunk 346 -> 76 ms; 4 rows 12.2 -> 13.3
# (scratch A/B, README). Only graphs of many rows are frozen (prompts, batched decode): at one row the ATen
# kernel is as fast, and each frozen graph keeps its own repacked copy of the weights. The frozen graphs are
# cached under a fingerprint of the weights (``Transformer._autotuning``). "auto" (the service's default,
# ``Transformer.auto_compile_mode``): "max-autotune" where it was measured to pay, a CPU with AMX running
# packed layers of up to AUTO_AUTOTUNE_MAX_BYTES, else "default". "reduce-overhead" (CUDA; never auto's choice,
# unmeasured: no GPU here): every decode-only step runs as a CUDA graph, one replay instead of a dozen-odd
# kernel launches a layer (inductor's CUDA graph trees, ``Transformer._run_decode_graph``); prompt and mixed
# steps run as in "default". On a CPU inductor skips the graphs and it computes what "default" does.
COMPILE_MODES = ("auto", "default", "max-autotune", "reduce-overhead")
# "auto" autotunes packed layers up to this size: each of the two frozen layer graphs keeps a repacked copy
# (SmolLM2's 64 MB of packed layers: +183 MB resident, 853 -> 1,036 MB after loading), so a 1B model's
# ~0.7 GB would cost ~1.5 GB; larger models only under an explicit "max-autotune".
AUTO_AUTOTUNE_MAX_BYTES = 256 * 2**20
# torch.compile's options for an autotuned graph; the timing tables stay off stderr (the service logs JSON lines).
AUTOTUNE_OPTIONS = {"max_autotune": True, "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
# Inductor's config while autotuned graphs are built (``Transformer._autotuning``).
_FROZEN_INDUCTOR = {"freezing": True}
# A packed output layer up to this size is autotuned in the default mode too (``Transformer._head``). Each
# of its two frozen graphs keeps the template's repacked copy of the matrix: SmolLM2's 28 MB int8 head
# +68 MB resident for both (the one-row graph +27 MB, the many-row one +42 MB); a larger head only
# under "max-autotune".
HEAD_AUTOTUNE_MAX_BYTES = 64 * 2**20
# torch.compile's options for the decode graph of "reduce-overhead": CUDA graphs, one recorded per shape
# (its padded rows x block-table width: a few dozen, more than the default limit's warning expects).
DECODE_GRAPH_OPTIONS = {"triton.cudagraphs": True, "triton.cudagraph_dynamic_shape_warn_limit": None}
# The rows the tables graph is first run with under "max-autotune": the autotuner times the candidates at
# the size a graph is first built for, and a decode step of many rows is what the templates are for.
AUTOTUNE_DECODE_ROWS = 16


# Decode steps of 2+ sequences, every one at or below this context, attend inside the compiled graph
# (``attend_tables``) instead of through the op. SmolLM2, 2 CPU threads, 16 sequences (one process,
# interleaved): context ~100 -15% a step, ~260 -4%, ~530 +6% (the op's flash attention over gathered
# blocks wins on long contexts).
TABLES_MAX_CONTEXT = 384


def attend_tables(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, tables: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """Decode attention of n sequences, one token each (``xq``: [n, heads, head_dim]), over the blocks
    their ``tables`` list ([n, width], padded with any block), the first ``lengths`` [n] positions each
    -> [n, heads * head_dim]. Written as reductions for a compiled graph: the compiler fuses the block
    lookups into them, so nothing is gathered and no op is called per layer. Scores and weights in
    float32 whatever the cache holds, as SDPA keeps them."""
    n, heads, head_dim = xq.shape
    block_size, kv_heads = cache_k.shape[1], cache_k.shape[2]
    span = tables.shape[1] * block_size
    q = xq.view(n, kv_heads, heads // kv_heads, 1, head_dim).float()  # GQA: a KV head's query heads together
    keys = cache_k[tables].view(n, span, kv_heads, head_dim).permute(0, 2, 1, 3)[:, :, None]  # [n, kvh, 1, T, d]
    values = cache_v[tables].view(n, span, kv_heads, head_dim).permute(0, 2, 1, 3)[:, :, None]
    scores = (q * keys.float()).sum(-1) * head_dim ** -0.5  # [n, kv_heads, group, T]
    past = torch.arange(span, device=xq.device) >= lengths[:, None, None, None]
    weights = scores.masked_fill(past, float("-inf")).softmax(-1)
    return (weights[..., None] * values.float()).sum(-2).to(xq.dtype).reshape(n, heads * head_dim)


# The plan of the forward pass running on each thread, for the attention op below (a compiled graph's
# arguments are tensors; the plan's layout of blocks, masks and chunks stays out of it).
_STEP = threading.local()


@torch.library.custom_op("llama_grpc::paged_attention", mutates_args=())
def paged_attention(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """``attend`` with the plan of this thread's running forward: what a compiled step calls (opaque to
    the compiler, so every step's batch layout goes through one graph)."""
    return attend(xq, cache_k, cache_v, _STEP.plan)


@paged_attention.register_fake
def _(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    return xq.new_empty(xq.shape[0], xq.shape[1] * xq.shape[2])


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = args.kv_heads // world_size
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True,
                                    init_method=_no_init)
        # wq, wk, wv as one layer (quant.fuse_linears; build() fuses after loading): one matmul, not three.
        self.wqkv: nn.Module | None = None
        self.cache: KVCache | None = None

    def project(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values of x, queries and keys rotated: [n_tokens, heads, head_dim] each."""
        # x: [n_tokens, dim]; rope: [n_tokens, head_dim // 2, 2]
        n_tokens, heads, kv_heads = x.shape[0], self.n_local_heads, self.n_local_kv_heads
        if self.wqkv is not None:
            qkv = self.wqkv(x).view(n_tokens, heads + 2 * kv_heads, self.head_dim)
            qk, xv = qkv[:, : heads + kv_heads], qkv[:, heads + kv_heads:]
        else:
            qk = torch.cat([self.wq(x).view(n_tokens, heads, self.head_dim),
                            self.wk(x).view(n_tokens, kv_heads, self.head_dim)], 1)
            xv = self.wv(x).view(n_tokens, kv_heads, self.head_dim)
        qk = apply_rotary_emb(qk, rope)  # queries and keys in one rotation
        return qk[:, :heads], qk[:, heads:], xv

    def attend(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """Write the new keys/values to the cache and attend over it: [n_tokens, heads * head_dim]."""
        assert self.cache is not None, "call setup_caches() before forward()"
        write_cache(xk, xv, self.cache.k, self.cache.v, plan.cache_rows)
        return attend(xq, self.cache.k, self.cache.v, plan)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: _Plan) -> torch.Tensor:
        return self.wo(self.attend(*self.project(x, rope), plan))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w13: nn.Module | None = None  # w1 and w3 as one layer (gate and up), once build() fuses them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w13 is not None:
            gate, up = self.w13(x).chunk(2, -1)
        else:
            gate, up = self.w1(x), self.w3(x)
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    # The block in three parts: the dense ones around attention over the cache (``Transformer._layers``).
    def attention_input(self, x: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.attention.project(self.attention_norm(x), rope)

    def attention_output(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        h = x + self.attention.wo(attn)
        return h + self.feed_forward(self.ffn_norm(h))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: _Plan) -> torch.Tensor:
        return self.attention_output(x, self.attention.attend(*self.attention_input(x, rope), plan))


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.vocab_size = params.vocab_size
        self.n_layers = params.n_layers
        self.tok_embeddings = VocabParallelEmbedding(params.vocab_size, params.dim, init_method=_no_init)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        # gather_output: every rank gets the full logits, so any rank can sample.
        self.output = ColumnParallelLinear(params.dim, params.vocab_size, bias=False, init_method=_no_init)
        if params.tie_word_embeddings:
            # Both are split along the vocabulary the same way, so each rank's shards coincide too.
            self.output.weight = self.tok_embeddings.weight
        self.max_seq_len = 0
        self.num_blocks = 0
        self.block_size = 0
        self.register_buffer("rope", None, persistent=False)
        self.compiled: str | None = None  # what compile() compiled (GetModelInfo.compile), None: eager
        self._workspace: torch.Tensor | None = None  # the buffer behind _Plan.workspace, grown on demand
        self._compiled_layers = None  # compile(): every layer of a step as one compiled graph
        self._compiled_head = None  # compile(): the final norm and the output layer, a graph of their own
        self._compiled_decode = None  # compile("reduce-overhead"): decode steps' layers as CUDA graphs
        self._head_autotuned = False  # compile(): that graph built by max-autotune (frozen)
        self._compile_mode = "default"  # compile()'s mode (COMPILE_MODES)
        self._fingerprint: str | None = None  # _weights_fingerprint(), once computed

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype,
                     device: torch.device | str, *, num_blocks: int | None = None, block_size: int = 16) -> None:
        """Allocate the paged KV cache of every layer, and the RoPE table for ``max_seq_len`` positions.

        ``num_blocks`` blocks of ``block_size`` tokens (default: enough for ``max_batch_size`` slots
        of ``max_seq_len`` tokens each).
        """
        if max_batch_size < 1 or max_seq_len < 1 or block_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}, max_seq_len={max_seq_len} and "
                             f"block_size={block_size} must be positive")
        if num_blocks is None:
            num_blocks = max_batch_size * -(-max_seq_len // block_size)
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        self.max_seq_len, self.num_blocks, self.block_size = max_seq_len, num_blocks, block_size
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(num_blocks, block_size, attn.n_local_kv_heads, attn.head_dim, dtype, device)
        self.rope = precompute_rope(self.params, max_seq_len, dtype, device)
        self._workspace = None

    def compile(self, mode: str = "default") -> str:
        """``torch.compile`` the whole stack of layers as one graph: norms, projections, RoPE, residuals
        and MLPs fused and run from generated code, the packed matmuls as they are, and attention over
        the paged cache as one opaque op (``paged_attention``) reading the step's plan. The token count
        is dynamic, so one graph serves every step of two or more tokens (prompt chunks, batched decode,
        mixed) and one any other single-token step; batch-1 decode over consecutive blocks has its own
        (``_layers``' view), and so do decode steps of several sequences on short contexts (attention
        over their block tables in the graph). The final norm and the output layer are compiled apart
        (``_head``). ``warm_up_compiled`` compiles them all. Returns what runs compiled (``GetModelInfo.compile``).

        Why the whole stack: at batch 1 a step's ~80 small eager operations a layer cost about as much as
        its matmuls (SmolLM2, 2 CPU threads, context 32: 8.3 -> 6.3 ms a token compiled); compiling each
        layer's parts apart saved only 3-4%, the 60 compiled calls' own overhead eating the fusion's gain.

        ``mode`` "max-autotune" (``COMPILE_MODES``): GEMM templates timed against the ATen kernels; "auto":
        ``auto_compile_mode``'s choice."""
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
        mode = self.auto_compile_mode() if mode == "auto" else mode
        if fs_init.get_model_parallel_world_size() > 1:
            raise ValueError("--compile needs one rank: tensor parallelism's collectives run eager")
        # On one rank fairscale's float layers are plain linears behind autograd Functions that dynamo
        # cannot trace (mark_dirty): the same weights as F.linear (a tied output layer: the embeddings' tensor).
        for module in (self, *(part for layer in self.layers for part in (layer.attention, layer.feed_forward))):
            for name, child in module.named_children():
                if isinstance(child, (ColumnParallelLinear, RowParallelLinear)) and child.bias is None:
                    setattr(module, name, FusedLinear(child.weight))
        # Without inductor's size asserts: the generated wrapper checks the sizes and strides of every
        # buffer it passes (~700 checks a SmolLM2 step, ~0.35 us each), its own assumptions, fixed once
        # compiled. Batch-1 greedy decode 4-8% faster a step (two processes interleaved, 24 rounds each way).
        options: dict[str, object] = {"size_asserts": False}
        if mode == "max-autotune":
            options |= AUTOTUNE_OPTIONS
        self._compile_mode = mode
        self._compiled_layers = torch.compile(self._layers, dynamic=True, fullgraph=True, options=options)
        if mode == "reduce-overhead":
            for cache in (layer.attention.cache for layer in self.layers if layer.attention.cache is not None):
                for buffer in (cache.k, cache.v):  # written in place by every replay, never reallocated
                    torch._dynamo.mark_static_address(buffer)
            self._compiled_decode = torch.compile(self._decode_layers, dynamic=True, fullgraph=True,
                                                  options=options | DECODE_GRAPH_OPTIONS)
        # A small packed output layer on a CPU is autotuned in every mode: one matmul, seconds to build.
        small_packed_head = self.device.type == "cpu" and 0 < _packed_bytes(self.output) <= HEAD_AUTOTUNE_MAX_BYTES
        self._head_autotuned = mode == "max-autotune" or small_packed_head
        self._compiled_head = torch.compile(self._head, dynamic=True, fullgraph=True,
                                            options=options | (AUTOTUNE_OPTIONS if self._head_autotuned else {}))
        self.compiled = ("all layers as one graph (attention over the paged cache an opaque op; batch-1 decode "
                         "over a view of it, batched decode on short contexts over block tables), dynamic token "
                         "count; the final norm and output layer a graph of their own"
                         + (" (autotuned: GEMM templates timed against ATen)" if self._head_autotuned else "")
                         + ("; max-autotune: GEMM templates timed against ATen, weights frozen"
                            if mode == "max-autotune" else "")
                         + ("; reduce-overhead: decode steps as CUDA graphs (rows and block tables padded to "
                            "powers of two)" if mode == "reduce-overhead" else ""))
        return self.compiled

    def auto_compile_mode(self) -> str:
        """The mode "auto" compiles in: "max-autotune" on a CPU with AMX tiles whose layers are packed (int4
        / int8) and hold at most AUTO_AUTOTUNE_MAX_BYTES, where its templates were measured (SmolLM2, 2
        threads: 16 decoding rows 32.4 -> 15.7 ms a step, 64 rows 105.6 -> 33.9, a 256-token prompt chunk
        382 -> 79 ms, one row 9.2 -> 7.1; README); "default" elsewhere (AVX2 / AVX-512 without AMX, float
        layers, a GPU: not measured to pay)."""
        amx = self.device.type == "cpu" and torch.cpu._is_amx_tile_supported()
        return "max-autotune" if amx and 0 < _packed_bytes(self.layers) <= AUTO_AUTOTUNE_MAX_BYTES else "default"

    @torch.inference_mode()
    def warm_up_compiled(self) -> None:
        """Compile every graph a step can need, before serving: a prompt (several tokens), one sequence
        decoding over consecutive blocks (the view graph) and over blocks out of order (one token through
        the op), two sequences decoding (the tables graph); with int8 rows (``--packed-activations int8``)
        the prompt and tables graphs again on either side of ``INT8_MIN_ROWS``; the head's, for one row
        and for many. Under "reduce-overhead" a prompt and one decode step: the decode graph serves every
        decode step. They write the first blocks of the pool, which hold nothing yet."""
        if self._compiled_layers is None or self.rope is None:
            return
        prompt, size = 8, self.block_size
        in_order = list(range(-(-(prompt + 1) // size)))
        if max(len(in_order), 2) > self.num_blocks or max(prompt, size) + 1 > self.max_seq_len:
            return  # a toy pool: its steps compile when they first run
        tokens = torch.zeros(prompt, dtype=torch.long)
        # "max-autotune": inductor's freezing (the weights as constants, which its GEMM templates need)
        # is read when a graph is built, so it is on while these build the graphs of many rows, and off
        # for the one-row graphs and after: a graph built later (a shape never seen here) runs the ATen
        # kernels, as the default mode does.
        if self._head_autotuned:  # its graphs first: one row (batch-1 decode, prompts), and many
            with self._autotuning(True):
                for rows in (1, AUTOTUNE_DECODE_ROWS):
                    self._run_head(self.tok_embeddings(torch.zeros(rows, dtype=torch.long, device=self.device)))
        frozen = self._compile_mode == "max-autotune"
        graphs = self._compiled_decode is not None  # "reduce-overhead": every decode step takes the decode graph
        with self._autotuning(frozen):
            self(Batch(tokens, [in_order], [0], [prompt]))
            if frozen:  # max-autotune times the templates at many rows; several rows all write block 1
                rows = AUTOTUNE_DECODE_ROWS
                self(Batch(torch.zeros(rows, dtype=torch.long), [[1, 0]] * rows, [size] * rows, [1] * rows))
            # Two sequences decoding; under "reduce-overhead" three, so the decode graph is first traced at 4
            # rows (padded) and 2 blocks: sizes apart, which the compiler gives a symbol each (equal sizes
            # would share one, and the next step would compile again).
            n = 3 if graphs else 2
            self(Batch(tokens[:n], [in_order] + [[1, 0]] * (n - 1), [prompt] + [size] * (n - 1), [1] * n))
            self._warm_up_int8_rows(tokens, in_order, prompt)
        if graphs:
            return  # the one-row steps below take the decode graph too
        # One row: the ATen kernels in every mode (SmolLM2, 2 CPU threads with AMX: 8.4 ms a batch-1 step
        # on them, 8.2 frozen on the template, which would add ~45 MB and ~1 min of compiling a graph).
        self(Batch(tokens[:1], [in_order], [prompt], [1]))
        self(Batch(tokens[:1], [[1, 0]], [size], [1]))  # position ``size`` lies in the second block, 0

    @contextlib.contextmanager
    def _autotuning(self, on: bool) -> Iterator[None]:
        """Inductor's config for building autotuned graphs: freezing on, and the compile caches keyed on
        these weights. A frozen graph holds the weights as constants, but torch 2.13's caches key it on
        their shapes only: a restart on other weights of the same shapes got the first weights' graphs
        back (tested), so the weights' fingerprint goes into every cache key (``cache_key_tag``)."""
        if not on:
            yield
            return
        with torch._inductor.config.patch(_FROZEN_INDUCTOR), \
                torch.compiler.config.patch(cache_key_tag=f"frozen-weights-{self._weights_fingerprint()}"):
            yield

    def _weights_fingerprint(self) -> str:
        """A digest of every weight a frozen graph can hold (not the KV cache): SmolLM2 0.17 s, once."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            caches = {id(buffer) for module in self.modules() if isinstance(module, KVCache)
                      for buffer in module.buffers()}
            for name, tensor in (*self.named_parameters(), *self.named_buffers()):
                if id(tensor) not in caches:
                    digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
                    digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _warm_up_int8_rows(self, tokens: torch.Tensor, in_order: list[int], prompt: int) -> None:
        if any(getattr(module, "int8_rows_key", None) is not None for module in self.modules()):
            # --packed-activations int8: steps of INT8_MIN_ROWS+ rows take other graphs than smaller ones.
            self(Batch(tokens[:2], [in_order], [0], [2]))  # a short prompt
            many = INT8_MIN_ROWS
            self(Batch(tokens[:many], [in_order] * many, [prompt] * many, [1] * many))  # several decoding

    def _layers(self, h: torch.Tensor, rope: torch.Tensor, cache_rows: torch.Tensor,
                view: tuple[int, int] | None = None, tables: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Every layer of a step: what compiles. Attention goes through the op (the plan set by ``forward``),
        or inside the graph: for batch-1 decode over consecutive blocks over a ``view`` of the cache,
        ``(first_row + 2, length)``, ~0.45 ms a SmolLM2 token (7%) less than the op (both ints arrive 2
        higher than they could be at least, so neither is ever 0 or 1, values the compiler would
        specialise a graph on); for decode steps of several sequences over their block ``tables`` and
        ``lengths`` (``attend_tables``)."""
        for layer in self.layers:
            xq, xk, xv = layer.attention_input(h, rope)
            cache = layer.attention.cache
            write_cache(xk, xv, cache.k, cache.v, cache_rows)
            if tables is not None:
                attn = attend_tables(xq, cache.k, cache.v, tables, lengths)
            elif view is None:
                attn = paged_attention(xq, cache.k, cache.v)
            else:
                kv_heads, head_dim = cache.k.shape[2:]
                keys = cache.k.view(-1, kv_heads, head_dim).narrow(0, view[0] - 2, view[1]).transpose(0, 1)
                values = cache.v.view(-1, kv_heads, head_dim).narrow(0, view[0] - 2, view[1]).transpose(0, 1)
                q = xq.view(kv_heads, -1, head_dim)  # GQA: a KV head's query heads as its query positions
                attn = F.scaled_dot_product_attention(q[None], keys[None], values[None]).reshape(1, -1)
            h = layer.attention_output(h, attn)
        return h

    def _decode_layers(self, h: torch.Tensor, rope: torch.Tensor, cache_rows: torch.Tensor, tables: torch.Tensor,
                       lengths: torch.Tensor) -> torch.Tensor:
        """A decode step's layers, attending over block tables: what "reduce-overhead" records as CUDA graphs."""
        return self._layers(h, rope, cache_rows, None, tables, lengths)

    def _run_decode_graph(self, h: torch.Tensor, rope: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """A decode-only step through the decode graph ("reduce-overhead"). A CUDA graph replays the shapes
        it was recorded with, so the step is padded to one of a few: its rows to a power of two (at least
        2, a size the compiler does not specialise on), its block tables' width likewise, with block 0
        (past every sequence's length: masked). Padding rows are zeros, attend to one position and write
        their keys and values into the cache's spare block (``KVCache``), which no table names; their
        outputs are dropped. Inductor records a graph the second time a shape runs: at most
        log2(batch) x log2(blocks a sequence) graphs, sharing one memory pool."""
        n, rows = h.shape[0], _power_of_two(h.shape[0])
        width, pad = _power_of_two(max(len(table) for table in plan.decode_tables)), rows - n
        tables = [table + [0] * (width - len(table)) for table in plan.decode_tables] + [[0] * width] * pad
        device = h.device
        tables_t = torch.tensor(tables, dtype=torch.long).to(device, non_blocking=True)
        lengths = torch.tensor([pos + 1 for pos in plan.decode_pos] + [1] * pad, dtype=torch.long).to(
            device, non_blocking=True)
        cache_rows = F.pad(plan.cache_rows, (0, pad), value=self.num_blocks * self.block_size)
        h, rope = F.pad(h, (0, 0, 0, pad)), F.pad(rope, (0, 0, 0, 0, 0, pad))
        for x, dims in ((h, (1,)), (rope, (1, 2))):  # the model's widths: constants, not symbols
            for dim in dims:
                torch._dynamo.mark_static(x, dim)
        torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are no longer read
        return self._compiled_decode(h, rope, cache_rows, tables_t, lengths)[:n]

    def _run_compiled(self, h: torch.Tensor, rope: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """The compiled layers on ``h``: batch-1 decode over consecutive blocks through the view graph,
        decode steps of several sequences up to TABLES_MAX_CONTEXT through the tables graph, any other
        step through the op graphs, with ``plan`` where the attention op reads it."""
        if self._compile_mode == "max-autotune":  # the templates need a static inner dimension
            torch._dynamo.mark_static(h, 1)
        if isinstance(plan.decode_blocks, slice) and plan.decode_only and plan.decode_len >= 2:
            first_row = plan.decode_blocks.start * self.block_size
            return self._compiled_layers(h, rope, plan.cache_rows, (first_row + 2, plan.decode_len))
        if plan.decode_only and plan.decode_lengths is not None and plan.decode_len <= TABLES_MAX_CONTEXT:
            tables = plan.decode_blocks
            assert isinstance(tables, torch.Tensor)
            if tables.shape[1] == 1:  # a width of 1 would be a graph of its own: one more (masked) block
                tables = F.pad(tables, (0, 1))
            for x in (h, rope, plan.cache_rows, tables, plan.decode_lengths):
                torch._dynamo.maybe_mark_dynamic(x, 0)
            torch._dynamo.maybe_mark_dynamic(tables, 1)
            return self._compiled_layers(h, rope, plan.cache_rows, None, tables, plan.decode_lengths)
        if h.shape[0] > 1:  # one graph for every count of two or more tokens, not a static one for the first
            for x in (h, rope, plan.cache_rows):
                torch._dynamo.maybe_mark_dynamic(x, 0)
        _STEP.plan = plan
        try:
            return self._compiled_layers(h, rope, plan.cache_rows)
        finally:
            _STEP.plan = None

    def _copy_blocks(self, copies: list[tuple[int, int]], device: torch.device) -> None:
        if not all(0 <= block < self.num_blocks for pair in copies for block in pair):
            raise ValueError(f"block copies {copies} name blocks outside the cache's {self.num_blocks}")
        source, target = (torch.tensor(blocks, dtype=torch.long, device=device) for blocks in zip(*copies, strict=True))
        for layer in self.layers:
            cache = layer.attention.cache
            for buffer in (cache.k, cache.v):
                buffer.index_copy_(0, target, buffer.index_select(0, source))

    def _gather_workspace(self, n_blocks: int) -> torch.Tensor:
        """A flat buffer with room for ``n_blocks`` gathered blocks of keys and as many of values (one
        gather's worth: each gather of a step reuses it in turn). Kept between steps and grown, never
        shrunk: at most DECODE_GATHER_GROUP sequences' padded context for one layer, or one prompt's."""
        cache = self.layers[0].attention.cache
        need = 2 * n_blocks * math.prod(cache.k.shape[1:])
        if self._workspace is None or self._workspace.numel() < need:
            self._workspace = None  # let the old one go first
            self._workspace = torch.empty(need, dtype=cache.k.dtype, device=cache.k.device)
        return self._workspace

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Cache bytes one token takes on this rank (keys and values of every layer)."""
        attn = self.layers[0].attention
        return 2 * self.n_layers * attn.n_local_kv_heads * attn.head_dim * dtype.itemsize

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # norms stay float; embeddings and linears may be packed

    @torch.inference_mode()
    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """float32 logits: [n_seqs, vocab] for each sequence's last new token, or [n_tokens, vocab]."""
        if self.rope is None:
            raise RuntimeError("call setup_caches() before forward()")
        device = self.rope.device
        plan = _make_plan(batch, self.block_size, self.num_blocks, self.max_seq_len, device)
        if batch.block_copies:
            self._copy_blocks(batch.block_copies, device)
        if plan.gather_blocks:
            plan.workspace = self._gather_workspace(plan.gather_blocks)
        tokens = batch.tokens.to(device, non_blocking=True)
        h = self.tok_embeddings(tokens)  # [n_tokens, dim]
        rope = self.rope[plan.positions]  # [n_tokens, head_dim // 2, 2]
        if self._compiled_layers is None:
            for layer in self.layers:
                h = layer(h, rope, plan)
        elif self._compiled_decode is not None and plan.decode_only:
            h = self._run_decode_graph(h, rope, plan)
        else:
            h = self._run_compiled(h, rope, plan)
        if not all_logits:
            h = h[plan.last_rows]  # only the rows we need logits for: the output layer is the largest
        return self._head(h) if self._compiled_head is None else self._run_head(h)

    def _run_head(self, h: torch.Tensor) -> torch.Tensor:
        if self._head_autotuned:  # the templates need a static inner dimension
            torch._dynamo.mark_static(h, 1)
        if h.shape[0] > 1:  # one graph for every count of two or more rows
            torch._dynamo.maybe_mark_dynamic(h, 0)
        return self._compiled_head(h)

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """float32 logits of hidden states ``h`` [n, dim]: the final norm and the output layer. Compiled
        apart from the layers (``compile``), since a prompt chunk's rows but its last need none: the norm
        fuses, and a packed output layer on a CPU gets inductor's GEMM template where it is faster, in
        every compile mode up to ``HEAD_AUTOTUNE_MAX_BYTES`` (max-autotune on this graph only, frozen:
        ``warm_up_compiled``). SmolLM2's output layer (its tied Q8_0 embeddings as per-row int8), 2 CPU threads with AMX:
        ATen's int8 kernel multiplies row by row, 16 rows 7.7 ms, 64 rows 31.9; the template 1.6 and 3.3
        (1 row: 1.07 -> 0.82 ms; scratch microbenchmark, README)."""
        return self.output(self.norm(h)).float()
