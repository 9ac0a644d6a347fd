"""The Llama 3 Transformer (Meta's llama3 ``model.py`` architecture) with a KV cache built for serving.

Differences from the reference, all for continuous batching:
- the cache is a module with one slot per sequence, allocated by ``setup_caches`` on a chosen device;
- a forward pass takes a ``Batch``: tokens of several sequences concatenated, each sequence with its
  own cache slot and start position, so a prompt chunk of one sequence can run beside single decode
  tokens of others.
"""

from __future__ import annotations

from dataclasses import dataclass

import fairscale.nn.model_parallel.initialize as fs_init
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn

from model_service.args import ModelArgs


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


def precompute_freqs_cis(args: ModelArgs, end: int, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE rotations for positions [0, end): complex64 [end, head_dim // 2]."""
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
    t = torch.arange(end, device=device, dtype=torch.float32)
    angles = torch.outer(t, freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x: [n_tokens, n_heads, head_dim]; freqs_cis: [n_tokens, head_dim // 2]
    # Meta's layout: consecutive (even, odd) pairs of a head are one complex number.
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_cis[:, None, :]).flatten(2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[bs, seqlen, n_kv_heads, head_dim] -> [bs, seqlen, n_kv_heads * n_rep, head_dim]."""
    bs, seqlen, n_kv_heads, head_dim = x.shape
    if n_rep == 1:
        return x
    return x[:, :, :, None, :].expand(bs, seqlen, n_kv_heads, n_rep, head_dim).reshape(
        bs, seqlen, n_kv_heads * n_rep, head_dim)


class KVCache(nn.Module):
    def __init__(self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (max_batch_size, max_seq_len, n_kv_heads, head_dim)
        # Zeros, not empty: positions past a sequence's end are masked, but NaN garbage would still
        # poison the weighted sum (0 * NaN = NaN).
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)


@dataclass
class Batch:
    """New tokens of several sequences for one forward pass."""

    tokens: torch.Tensor  # [n_tokens] int64, every sequence's new tokens concatenated in order
    slots: list[int]  # cache slot of each sequence
    start_pos: list[int]  # cache position of each sequence's first new token
    lengths: list[int]  # new tokens per sequence; sum(lengths) == n_tokens


@dataclass
class _Plan:
    """Index tensors derived once per forward from a Batch and shared by every layer."""

    positions: torch.Tensor  # [n_tokens] cache position of every token
    token_slots: torch.Tensor  # [n_tokens] cache slot of every token
    last_rows: torch.Tensor  # [n_seqs] index of each sequence's last token
    # Single-token (decode) sequences, attended in one SDPA call over their slots' cache prefixes.
    decode_rows: torch.Tensor | None  # [n_decode] token indices
    decode_slots: torch.Tensor | slice | None  # [n_decode] slots, or a slice when they are consecutive
    decode_len: int  # longest cache prefix among them
    decode_mask: torch.Tensor | None  # [n_decode, 1, 1, decode_len] bool, True = may attend
    # Multi-token (prompt) chunks, one SDPA call each: (first token, length, slot, start_pos, mask).
    chunks: list[tuple[int, int, int, int, torch.Tensor | None]]


def _make_plan(batch: Batch, max_seq_len: int, device: torch.device) -> _Plan:
    n_seqs = len(batch.lengths)
    if not (len(batch.slots) == len(batch.start_pos) == n_seqs) or n_seqs == 0:
        raise ValueError("Batch needs one slot, start_pos and length per sequence, and at least one sequence")
    if sum(batch.lengths) != batch.tokens.numel():
        raise ValueError(f"Batch lengths sum to {sum(batch.lengths)} but it has {batch.tokens.numel()} tokens")
    for slot, start, length in zip(batch.slots, batch.start_pos, batch.lengths, strict=True):
        if length < 1 or start < 0 or start + length > max_seq_len:
            raise ValueError(f"sequence in slot {slot}: positions [{start}, {start + length}) "
                             f"do not fit the cache of {max_seq_len} positions")
    last_rows, positions, token_slots = [], [], []
    decode_rows, decode_slots, decode_pos, chunks = [], [], [], []
    first = 0
    for slot, start, length in zip(batch.slots, batch.start_pos, batch.lengths, strict=True):
        last_rows.append(first + length - 1)
        positions.extend(range(start, start + length))
        token_slots.extend([slot] * length)
        if length == 1:
            decode_rows.append(first)
            decode_slots.append(slot)
            decode_pos.append(start)
        else:
            mask = None
            if start > 0:  # query i (at start + i) sees keys [0, start + i]
                keys = torch.arange(start + length, device=device)
                queries = torch.arange(start, start + length, device=device)
                mask = keys[None, :] <= queries[:, None]  # [length, start + length]
            chunks.append((first, length, slot, start, mask))
        first += length

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)

    plan = _Plan(tensor(positions), tensor(token_slots), tensor(last_rows),
                 None, None, 0, None, chunks)
    if decode_rows:
        plan.decode_rows = tensor(decode_rows)
        plan.decode_len = max(decode_pos) + 1
        consecutive = decode_slots == list(range(decode_slots[0], decode_slots[0] + len(decode_slots)))
        # Consecutive slots are a view of the cache; others need a gather (a copy).
        plan.decode_slots = slice(decode_slots[0], decode_slots[-1] + 1) if consecutive else tensor(decode_slots)
        keys = torch.arange(plan.decode_len, device=device)
        plan.decode_mask = (keys[None, :] <= tensor(decode_pos)[:, None])[:, None, None, :]
    return plan


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        world_size = fs_init.get_model_parallel_world_size()
        self.n_local_heads = args.n_heads // world_size
        self.n_local_kv_heads = args.kv_heads // world_size
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = args.head_dim
        self.wq = ColumnParallelLinear(args.dim, args.n_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wk = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wv = ColumnParallelLinear(args.dim, args.kv_heads * self.head_dim, bias=False, gather_output=False,
                                       init_method=_no_init)
        self.wo = RowParallelLinear(args.n_heads * self.head_dim, args.dim, bias=False, input_is_parallel=True,
                                    init_method=_no_init)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, plan: _Plan) -> torch.Tensor:
        # x: [n_tokens, dim]; freqs_cis: [n_tokens, head_dim // 2]
        n_tokens = x.shape[0]
        xq = self.wq(x).view(n_tokens, self.n_local_heads, self.head_dim)
        xk = self.wk(x).view(n_tokens, self.n_local_kv_heads, self.head_dim)
        xv = self.wv(x).view(n_tokens, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)

        assert self.cache is not None, "call setup_caches() before forward()"
        cache_k, cache_v = self.cache.k, self.cache.v  # [slots, max_seq_len, n_local_kv_heads, head_dim]
        cache_k[plan.token_slots, plan.positions] = xk
        cache_v[plan.token_slots, plan.positions] = xv

        out = torch.empty_like(xq)  # [n_tokens, n_local_heads, head_dim]
        if plan.decode_rows is not None:
            keys = cache_k[plan.decode_slots, : plan.decode_len]  # [n_decode, decode_len, kv_heads, head_dim]
            values = cache_v[plan.decode_slots, : plan.decode_len]
            n_decode = plan.decode_rows.numel()
            # GQA without repeat_kv's copy: the n_rep query heads that share a KV head become that
            # head's "query positions", so each cached K/V is read once (decode is memory-bound).
            q = xq[plan.decode_rows].view(n_decode, self.n_local_kv_heads, self.n_rep, self.head_dim)
            attn = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                                  attn_mask=plan.decode_mask)
            out[plan.decode_rows] = attn.reshape(n_decode, self.n_local_heads, self.head_dim)
        for first, length, slot, start, mask in plan.chunks:
            end = start + length
            keys = repeat_kv(cache_k[slot: slot + 1, :end], self.n_rep).transpose(1, 2)  # [1, heads, end, hd]
            values = repeat_kv(cache_v[slot: slot + 1, :end], self.n_rep).transpose(1, 2)
            q = xq[first: first + length].transpose(0, 1).unsqueeze(0)  # [1, heads, length, head_dim]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None)
            out[first: first + length] = attn[0].transpose(0, 1)
        return self.wo(out.view(n_tokens, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)
        self.w2 = RowParallelLinear(hidden_dim, dim, bias=False, input_is_parallel=True, init_method=_no_init)
        self.w3 = ColumnParallelLinear(dim, hidden_dim, bias=False, gather_output=False, init_method=_no_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, plan: _Plan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, plan)
        return h + self.feed_forward(self.ffn_norm(h))


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
        self.max_batch_size = 0
        self.max_seq_len = 0
        self.register_buffer("freqs_cis", None, persistent=False)

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype: torch.dtype,
                     device: torch.device | str) -> None:
        """Allocate a KV cache of max_batch_size slots x max_seq_len positions per layer, and the RoPE table."""
        if max_batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"max_batch_size={max_batch_size} and max_seq_len={max_seq_len} must be positive")
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(max_batch_size, max_seq_len, attn.n_local_kv_heads, attn.head_dim, dtype, device)
        self.freqs_cis = precompute_freqs_cis(self.params, max_seq_len, device)

    @torch.inference_mode()
    def copy_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Keys/values of positions [0, length) from one cache slot to another (n completions of a
        prompt fork from the slot that computed it)."""
        for layer in self.layers:
            cache = layer.attention.cache
            cache.k[dst_slot, :length] = cache.k[src_slot, :length]
            cache.v[dst_slot, :length] = cache.v[src_slot, :length]

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device  # norms stay float; embeddings and linears may be packed

    @torch.inference_mode()
    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """float32 logits: [n_seqs, vocab] for each sequence's last new token, or [n_tokens, vocab]."""
        if self.freqs_cis is None:
            raise RuntimeError("call setup_caches() before forward()")
        device = self.freqs_cis.device
        plan = _make_plan(batch, self.max_seq_len, device)
        tokens = batch.tokens.to(device, non_blocking=True)
        h = self.tok_embeddings(tokens)  # [n_tokens, dim]
        freqs_cis = self.freqs_cis[plan.positions]  # [n_tokens, head_dim // 2]
        for layer in self.layers:
            h = layer(h, freqs_cis, plan)
        if not all_logits:
            h = h[plan.last_rows]  # only the rows we need logits for: the output layer is the largest
        return self.output(self.norm(h)).float()
