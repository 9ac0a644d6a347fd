"""Weight-only quantised linears and embeddings, and the GGUF blocks that load into them as they are.

Kernels are PyTorch's own (the ones gpt-fast and torchao's CPU/CUDA int4 and int8 layouts call):
- int4, group-wise asymmetric: ``w = (q - 8) * scale + zero`` per group of ``GROUP_SIZE`` input columns,
  ``_weight_int4pack_mm_for_cpu`` on CPU and ``_weight_int4pack_mm`` on CUDA. GGUF Q4_0 (``w = d (q - 8)``)
  and Q4_1 (``w = d q + m``, so ``zero = m + 8 d``) blocks are 32 columns wide: each block is one group.
- int8, per output channel: ``w = q * scale``, ``_weight_int8pack_mm`` on CPU. GGUF Q8_0 has a scale per
  32 columns, which this kernel cannot hold: Q8_0 linears are re-quantised per row (the nearest format;
  the error is at most half a step of the row's scale). Q8_0 *embeddings* are exact (a lookup
  dequantises only the rows it gathers, with their own block scales).
- The CPU kernels are fast with bfloat16 activations only (float32 and float16 take a reference path
  ~50x slower), so the matmul runs in bfloat16 (``compute_dtype``) and its output is cast back to the
  model's dtype; scales and zeros are stored in that dtype too (fp16 GGUF scales lose 3 mantissa bits).
  What a float32 model feeds them is ``PACKED_ACTIVATIONS``' choice (``--packed-activations``):
  "bfloat16" (default) rounds the activations to bfloat16 for one call, as llama.cpp rounds them to
  8 bits (Q8_1) for its own 4-bit dot products; "float32" splits them into two bfloat16 halves and adds
  the scales' rounding back in a second call, which computes the dequantised float32 linear to ~0.5%
  and costs 1.3-2.3x the time (see ``_QuantLinear.forward``). Beside llama.cpp on SmolLM2's Q4_1 file
  both agree on ~97% of next tokens given the same context. A bfloat16 model takes the single call.
  "int8" keeps the bfloat16 call for steps of under ``INT8_MIN_ROWS`` tokens and gives larger ones
  (batched decode, prompt chunks) to fbgemm's int8 x int8 kernel (VNNI where the CPU has it): activations
  and weights rotated by a Hadamard block (``ROTATION_BLOCK`` columns: outlier channels spread out), then
  activations quantised to 8 bits per row and weights re-quantised per row, ~1.8x faster than the int4
  kernel at 16 rows and ~3.6x at 256 (``make bench-kernels``), at the cost of the file's exact weights in
  those steps (next-token agreement with llama.cpp 0.953, the bfloat16 path 0.971) and a second copy of them.

torchao was the first choice, but its CPU int4 tensor is built by quantising a float weight (no way in
for the file's own scales and zeros without a float copy) and its int8 weight-only CPU path dequantises
per call; the kernels below are the same ones it dispatches to, so a small module serves instead.

Tensor parallelism keeps fairscale's semantics: a ``column`` layer holds a slice of output rows (with
``gather_output`` the full output is all-gathered), a ``row`` layer a slice of input columns whose
partial outputs are all-reduced; shards are cut from the checkpoint before packing.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_world_size,
    model_parallel_is_initialized,
)
from fairscale.nn.model_parallel.mappings import (
    gather_from_model_parallel_region,
    reduce_from_model_parallel_region,
)
from torch import nn

GROUP_SIZE = 32  # int4 group width; also the block width of GGUF's Q4_0 / Q4_1 / Q8_0
QUANTIZE_MODES = ("none", "int8", "int4")
# What the packed kernels of a float32 model multiply: activations rounded to bfloat16 (one call), or
# float32 ones as two bfloat16 halves plus the scales' rounding (the dequantised float32 linear).
# "int8": steps of INT8_MIN_ROWS+ tokens multiply rotated 8-bit activations by rotated per-row int8 weights (fbgemm).
PACKED_ACTIVATIONS = ("bfloat16", "float32", "int8")
# Bytes per 32-column block (fp16 scale [, fp16 min], then the quants), from ggml-common.h.
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _tp_size() -> int:
    return get_model_parallel_world_size() if model_parallel_is_initialized() else 1  # standalone use: 1 rank


def compute_dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16  # the fast path of the CPU kernels, and what the CUDA int4 kernel requires


# ---- quantising float weights (Meta / Hugging Face checkpoints, GGUF types without a kernel) ----------

def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max per group: (q uint8 [N, K] in 0..15, scale [N, K/g], zero [N, K/g]) float32."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size {group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    return q, scale, lo + 8 * scale


def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row (group_size None) or per group: (q int8 [N, K], scale [N] or [N, K/g]) float32."""
    n, k = w.shape
    groups = w.float().reshape(n, 1 if group_size is None else k // group_size, -1)
    scale = (groups.abs().amax(-1) / 127).clamp(min=1e-10)
    q = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
    return q, scale.squeeze(1) if group_size is None else scale


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] of what an Int4Linear built from (q, scale, zero) multiplies by (the reference)."""
    group = q.shape[1] // scale.shape[1]
    return (q.float() - 8) * scale.float().repeat_interleave(group, 1) + zero.float().repeat_interleave(group, 1)


# ---- GGUF blocks ---------------------------------------------------------------------------------

@dataclass
class GGMLBlocks:
    """Rows of a GGUF tensor as stored: ``data`` uint8 [rows, blocks * bytes per block]."""

    type_name: str  # ggml type, e.g. "Q4_1"
    data: np.ndarray

    def _split(self, head_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        blocks = np.ascontiguousarray(self.data).reshape(self.data.shape[0], -1, _BLOCK_BYTES[self.type_name])
        return blocks[..., :head_bytes], blocks[..., head_bytes:]

    def int4(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q4_0 / Q4_1 -> (q uint8 [N, K], scale [N, K/32], zero [N, K/32]) float32, the same weights."""
        head, quants = self._split(2 if self.type_name == "Q4_0" else 4)
        halves = head.view(np.float16).astype(np.float32)  # [rows, blocks, 1 or 2]: d [, m]
        d = torch.from_numpy(halves[..., 0].copy())
        # ggml order: element j of a block is the low nibble of byte j, element j + 16 its high nibble.
        q = torch.from_numpy(np.concatenate([quants & 0x0F, quants >> 4], axis=-1))
        zero = torch.zeros_like(d) if self.type_name == "Q4_0" else torch.from_numpy(halves[..., 1].copy()) + 8 * d
        return q.reshape(q.shape[0], -1), d, zero

    def int8_groups(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Q8_0 -> (q int8 [N, K], scale [N, K/32]) float32, the same weights."""
        head, quants = self._split(2)
        d = torch.from_numpy(head.view(np.float16)[..., 0].astype(np.float32))
        q = torch.from_numpy(quants.view(np.int8).copy())
        return q.reshape(q.shape[0], -1), d

    @staticmethod
    def has_int4(type_name: str) -> bool:
        return type_name in ("Q4_0", "Q4_1")


def column_bytes(type_name: str, start: int, end: int) -> slice:
    """Byte range of columns [start, end) inside a row of blocks (a row-parallel shard)."""
    if start % GROUP_SIZE or end % GROUP_SIZE:
        raise ValueError(f"a {type_name} shard must start and end on a {GROUP_SIZE}-column block boundary, "
                         f"got columns [{start}, {end}); pick a tensor-parallel size that keeps shards whole")
    size = _BLOCK_BYTES[type_name]
    return slice(start // GROUP_SIZE * size, end // GROUP_SIZE * size)


def can_load_blocks(type_name: str) -> bool:
    return type_name in _BLOCK_BYTES


# ---- modules ------------------------------------------------------------------------------------

# ---- int8 x int8 for steps of several rows (PACKED_ACTIVATIONS "int8") ---------------------------

_INT8_ROWS: dict[int, object] = {}  # key -> fbgemm's prepacked weight (an op's argument cannot be one)
_int8_rows_keys = itertools.count()
_HAS_VNNI = getattr(torch.cpu, "_is_vnni_supported", lambda: False)()  # unknown: the safe 7 bits
# Steps of fewer rows keep the layer's own kernel: the int4 kernel works in tiles of 4 rows and up to one
# tile beats fbgemm (SmolLM2 step's projections, ``make bench-kernels``: 2 rows 3.2 vs 4.9 ms, 4 rows 3.9
# vs 5.0; 16 rows 11.8 vs 6.8). In a compiled graph the test is a guard on the row
# count: graphs of fewer rows and of more are compiled apart (``Transformer.warm_up_compiled``).
INT8_MIN_ROWS = 5
# int8 rows rotate activations and weights by a Hadamard block of this many columns (or the largest power of
# two that divides a layer's width, if smaller). LLM activations have a few channels far larger than the rest;
# one scale per row then leaves the others few of the 255 steps. Rotated, each output of a block mixes all its
# channels with equal weight, so an outlier is spread over the block and the row's scale shrinks (QuaRot's
# idea, without folding the rotations into the model). SmolLM2 beside llama.cpp, next-token agreement over 380
# positions, simulated in float: per-row 8 bits 0.900; rotated in blocks of 16 / 32 / 64: 0.945 / 0.958 /
# 0.950; a full random rotation 0.958; the bfloat16 path 0.971. KL from the bfloat16 path's distribution over
# 624 positions: 0.057 per-row, 0.0082 in blocks of 32, 0.0067 in blocks of 64. 32, not 64: a rotation is one
# more small matmul in the step (16 rows of 1536: ~21 us in blocks of 32, ~32 in blocks of 64, measured
# compiled). The attention's output projection is not rotated (``attach_int8_rows(rotate=False)``): its
# input has no outlier channels to spread (without it: 0.953, KL 0.0086) and it saves 30 matmuls a step.
ROTATION_BLOCK = 32
_INT8_ROWS_SLICE = 4096  # output rows attach_int8_rows rotates and re-quantises at a time


def hadamard(size: int) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of a power-of-two ``size`` (symmetric: its own inverse)."""
    h = torch.ones(1, 1)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / size ** 0.5


def rotate_blocks(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """``x`` [..., K] with every ``rotation.shape[0]`` consecutive columns multiplied by ``rotation``."""
    block = rotation.shape[0]
    return (x.reshape(*x.shape[:-1], -1, block) @ rotation).reshape(x.shape)


def int8_rows(x: torch.Tensor, pin: torch.Tensor, rotation: torch.Tensor | None, key: int,
              out_features: int) -> torch.Tensor:
    """float32 ``x`` [M, K] times the layer ``key``'s int8 weight (transposed) -> float32 [M, out_features],
    each row's activations quantised to 8 bits on their own scale.

    Both sides are first rotated by ``rotation`` where the layer has one (an orthonormal Hadamard block
    applied to every ``ROTATION_BLOCK`` columns; the weights were rotated when they were made): ``x W^T = (x H)(W H)^T``,
    and in the rotated basis one large channel is spread over its block, so it no longer sets the step
    of a whole row (see ``attach_int8_rows``). fbgemm's dynamic linear picks one asymmetric range for
    its whole input; here every row is divided by its largest magnitude and one more row, ``pin`` [1, K]
    holding -1 and +1, pins that range to [-1, 1], so a row's result does not depend on the other rows of
    the step (one request's activations never coarsen another's). The rotation and the scaling are plain
    tensor code (in a compiled graph, compiled with the kernels around them); the matmul is an opaque op."""
    if rotation is not None:
        x = rotate_blocks(x, rotation)
    peak = x.abs().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.ops.llama_grpc.int8_rows_linear(torch.cat([x / peak, pin]), key, out_features)[:-1] * peak


# Declared through torch.library.Library rather than @custom_op: one call costs ~5 us instead of ~15, and
# a step makes ~120 of them.
_LIBRARY = torch.library.Library("llama_grpc", "FRAGMENT")
_LIBRARY.define("int8_rows_linear(Tensor pinned, int key, int out_features) -> Tensor")


def _int8_rows_linear(pinned: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    # Without VNNI, fbgemm sums u8 x s8 products in pairs into int16, which 8-bit activations can
    # overflow: there they are quantised to 7 bits (reduce_range).
    return torch.ops.quantized.linear_dynamic(pinned, _INT8_ROWS[key], not _HAS_VNNI)


_LIBRARY.impl("int8_rows_linear", _int8_rows_linear, "CPU")


@torch.library.register_fake("llama_grpc::int8_rows_linear", lib=_LIBRARY)
def _(pinned: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return pinned.new_empty(pinned.shape[0], out_features)


def attach_int8_rows(layer: _QuantLinear, rotate: bool = True) -> None:
    """Give a CPU packed layer the int8 weights ``int8_rows`` multiplies in steps of several rows: its
    weights (an Int8Linear's own; an Int4Linear's read back through its kernel, in bfloat16), with
    ``rotate`` rotated in blocks of ``ROTATION_BLOCK`` columns, re-quantised per row. Rows are rotated
    and quantised ``_INT8_ROWS_SLICE`` at a time, so the float copies stay small (a Llama 3 8B output
    layer would need 4 GB of them at once)."""
    block = min(ROTATION_BLOCK, layer.in_features & -layer.in_features)  # a power of two that divides the width
    rotation = hadamard(block) if rotate and block > 1 else None
    if isinstance(layer, Int8Linear):
        def weights(rows: slice) -> torch.Tensor:
            return layer.weight_int8[rows].float() * layer.scales[rows].float()[:, None]
    else:
        # The weights' transpose as the kernel gives it (bfloat16: 2 bytes a weight), a slice of columns at a time.
        eye = torch.eye(layer.in_features, dtype=layer.compute_dtype)
        transposed = torch.empty(layer.in_features, layer.out_features, dtype=layer.compute_dtype)
        for start in range(0, layer.in_features, 512):
            transposed[start:start + 512] = layer._mm(eye[start:start + 512])
        del eye

        def weights(rows: slice) -> torch.Tensor:
            return transposed[:, rows].t().float().contiguous()  # as any [rows, in] matrix: same rotation sums
    q = torch.empty(layer.out_features, layer.in_features, dtype=torch.int8)
    scale = torch.empty(layer.out_features)
    for start in range(0, layer.out_features, _INT8_ROWS_SLICE):
        rows = slice(start, start + _INT8_ROWS_SLICE)
        w = weights(rows)
        q[rows], scale[rows] = quantize_int8(w if rotation is None else rotate_blocks(w, rotation))
    with warnings.catch_warnings():  # torch deprecates quantized tensors (pytorch#184982); fbgemm's ops remain
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(),
                                                          torch.zeros(q.shape[0], dtype=torch.int64), 0)
        packed = torch.ops.quantized.linear_prepack(weight, None)
    pin = torch.zeros(1, layer.in_features)
    pin[0, 0], pin[0, -1] = -1.0, 1.0
    layer.register_buffer("int8_pin", pin, persistent=False)  # the row that pins fbgemm's range (int8_rows)
    layer.register_buffer("int8_rotation", rotation, persistent=False)
    key = next(_int8_rows_keys)
    _INT8_ROWS[key] = packed
    weakref.finalize(layer, _INT8_ROWS.pop, key, None)
    layer.int8_rows_key = key


class _QuantLinear(nn.Module):
    """Shared forward: fairscale's parallel-region calls around a packed matmul."""

    def __init__(self, in_features: int, out_features: int, parallel: str | None, gather_output: bool,
                 compute_dtype: torch.dtype, exact: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features  # this rank's sizes
        self.parallel, self.gather_output, self.compute_dtype = parallel, gather_output, compute_dtype
        self.exact = exact  # float32 activations as two bfloat16 halves (PACKED_ACTIVATIONS "float32")
        self.int8_rows_key: int | None = None  # steps of INT8_MIN_ROWS+ rows through int8_rows ("int8")
        # copy_to_model_parallel_region (a column layer's input) is the identity outside autograd.
        self._reduce = parallel == "row" and _tp_size() > 1
        self._gather = parallel == "column" and gather_output and _tp_size() > 1

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _low_scales(self, hi: torch.Tensor) -> torch.Tensor | None:
        """The part of x @ W.T that bfloat16 scales drop (None where the scales are exact enough)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in_features] -> [..., out_features] in x's dtype
        x2 = x.reshape(-1, x.shape[-1])
        if x.dtype == torch.float32 and self.exact:
            # A bfloat16 activation keeps 8 significant bits; x = hi + lo (both bfloat16, ~16 bits
            # together) in one call of twice the rows, then the scales' rounding in a second call.
            hi = x2.to(self.compute_dtype)
            lo = (x2 - hi).to(self.compute_dtype)
            both = self._mm(torch.cat([hi, lo]))
            y = both[: x2.shape[0]].float() + both[x2.shape[0]:]
            low = self._low_scales(hi)
            if low is not None:
                y += low
        elif self.int8_rows_key is not None and x2.shape[0] >= INT8_MIN_ROWS:
            y = int8_rows(x2.float(), self.int8_pin, self.int8_rotation, self.int8_rows_key,
                          self.out_features).to(x.dtype)
        else:
            y = self._mm(x2.to(self.compute_dtype)).to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        if self._reduce:
            y = reduce_from_model_parallel_region(y)
        elif self._gather:
            y = gather_from_model_parallel_region(y)
        return y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parallel={self.parallel}"


class Int4Linear(_QuantLinear):
    """Group-wise int4 weight-only linear: ``y = x @ ((q - 8) * scale + zero).T`` per 32-column group."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, *, device: torch.device,
                 parallel: str | None = None, gather_output: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, exact: bool = False):
        n, k = q.shape
        super().__init__(k, n, parallel, gather_output, compute_dtype, exact)
        self.group_size = k // scale.shape[1]
        q = q.to(device)
        if device.type == "cuda":
            self.inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
            packed = torch.ops.aten._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).contiguous(),
                                                                self.inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
        self.register_buffer("packed", packed, persistent=False)
        # [K/g, N, 2]: (scale, zero) per group and output row, as both kernels take them; the kernels
        # take them in bfloat16, so with ``exact`` the rounding left over is kept too.
        full = torch.stack([scale.t(), zero.t()], -1).float()
        self.register_buffer("scales_zeros", full.to(device=device, dtype=compute_dtype).contiguous(),
                             persistent=False)
        if exact:
            self.register_buffer("scales_zeros_low", (full - self.scales_zeros.float().cpu()).to(
                device=device, dtype=compute_dtype).contiguous(), persistent=False)

    def _mm(self, x: torch.Tensor, scales_zeros: torch.Tensor | None = None) -> torch.Tensor:
        scales_zeros = self.scales_zeros if scales_zeros is None else scales_zeros
        if self.packed.device.type == "cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self.packed, self.group_size, scales_zeros)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, scales_zeros)

    def _low_scales(self, hi: torch.Tensor) -> torch.Tensor:
        return self._mm(hi, self.scales_zeros_low)  # only called with exact, which registers it


class Int8Linear(_QuantLinear):
    """Per-channel int8 weight-only linear: ``y = (x @ q.T) * scale``."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, *, device: torch.device, parallel: str | None = None,
                 gather_output: bool = False, compute_dtype: torch.dtype = torch.bfloat16, exact: bool = False):
        n, k = q.shape
        super().__init__(k, n, parallel, gather_output, compute_dtype, exact)
        self.register_buffer("weight_int8", q.to(device).contiguous(), persistent=False)
        self.register_buffer("scales", scale.to(device=device, dtype=compute_dtype), persistent=False)

    def _mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_int8.device.type == "cpu":
            return torch.ops.aten._weight_int8pack_mm(x, self.weight_int8, self.scales)
        return F.linear(x, self.weight_int8.to(x.dtype)) * self.scales  # CUDA: gpt-fast's form


class Int8Embedding(nn.Module):
    """Vocab-parallel embedding over int8 rows with one scale per 32 columns; a lookup dequantises only
    the rows it gathers (fairscale's VocabParallelEmbedding semantics: this rank holds a vocab range)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, vocab_start: int, *, device: torch.device,
                 dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight_int8", q.to(device).contiguous(), persistent=False)
        self.register_buffer("scales", scale.to(device=device, dtype=torch.float32).contiguous(), persistent=False)
        self.vocab_start, self.vocab_end = vocab_start, vocab_start + q.shape[0]
        self.group_size = q.shape[1] // scale.shape[1]
        self.dtype = dtype
        self._reduce = _tp_size() > 1

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [n] -> [n, dim]
        if self._reduce:
            outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
            tokens = (tokens - self.vocab_start).masked_fill(outside, 0)
        rows = self.weight_int8[tokens].float().view(tokens.numel(), -1, self.group_size)
        out = (rows * self.scales[tokens][..., None]).view(*tokens.shape, -1).to(self.dtype)
        if self._reduce:
            out = reduce_from_model_parallel_region(out.masked_fill(outside[..., None], 0))
        return out


# ---- fused projections (QKV, gate/up) ---------------------------------------------------------------

class FusedLinear(nn.Module):
    """Float column-parallel layers side by side: ``y = x @ cat(weights).T`` (a column layer's input
    needs no collective outside autograd, and fused layers never gather their output); also any one
    parallel layer on a single rank (``Transformer.compile``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def fuse_linears(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` in one matmul (the same weights,
    packed or float), or None when the layers cannot be fused (different kinds, gathered outputs)."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        return None
    first = layers[0]
    if isinstance(first, _QuantLinear):
        if any(layer.parallel not in (None, "column") or layer._gather for layer in layers):
            return None
        if isinstance(first, Int4Linear) and len({layer.group_size for layer in layers}) != 1:
            return None
        fused = copy_quant_linear(first)
        fused.out_features = sum(layer.out_features for layer in layers)
        if isinstance(first, Int4Linear):
            # Both packed layouts keep rows in tiles (CUDA: 8 rows; CPU: 64 when the row count is a
            # multiple of 64, else another order), so concatenating whole tiles concatenates rows.
            tile = 8 if first.packed.device.type == "cuda" else 64
            if any(layer.out_features % tile for layer in layers):
                return None
        for name, _ in first.named_buffers(recurse=False):
            parts = [getattr(layer, name) for layer in layers]
            # Output rows are dim 0 of packed / int8 weights and of int8 scales, dim 1 of int4 scales_zeros.
            dim = 1 if name.startswith("scales_zeros") else 0
            fused.register_buffer(name, torch.cat(parts, dim).contiguous(), persistent=False)
        return fused
    weights = [getattr(layer, "weight", None) for layer in layers]
    if any(w is None or w.dim() != 2 or getattr(layer, "bias", None) is not None
           or getattr(layer, "gather_output", False) for w, layer in zip(weights, layers, strict=True)):
        return None
    return FusedLinear(torch.cat([w.detach() for w in weights]))


def copy_quant_linear(layer: _QuantLinear) -> _QuantLinear:
    """A bufferless copy of a packed layer's settings (buffers are registered by the caller)."""
    fused = layer.__class__.__new__(layer.__class__)
    nn.Module.__init__(fused)
    for key, value in vars(layer).items():
        if not key.startswith("_") or key in ("_reduce", "_gather"):
            setattr(fused, key, value)
    fused.int8_rows_key = None  # int8 weights belong to the layer they were made from
    return fused
