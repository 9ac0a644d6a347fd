"""Packed int4 / int8 weights: GGUF blocks load as the very weights llama.cpp's own reader (gguf-py)
dequantises, packed linears compute what a float32 linear on the dequantised weights computes, quantised
models stay close to float32, and tensor parallelism shards packed weights like float ones.

Tolerances, and why:
- block parsing: exact (float32 ``(q - 8) * d + (m + 8 d)`` vs gguf-py's ``d * q + m``: 1 ulp at most);
- a packed linear vs float32 on the same weights: the kernels take bfloat16 activations and bfloat16
  scales, so 2% of the largest output (bfloat16 has 8 significant bits: ~0.4% per rounding); with
  exact float32 activations (``--packed-activations float32``: two bfloat16 halves, scale rounding
  added back) 0.5%, the rounding of the kernel's bfloat16 output;
- quantised vs float32 models (random weights): logits cosine >= 0.999 (int8) / 0.97 (int4: a 16-level grid per 32 random
  normal weights keeps ~98% cosine through two layers);
- tp=2 vs tp=1 of the same quantised model: row-parallel layers sum bfloat16 partial products in
  another order, so 2% of the largest logit.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama_grpc_devtools.make_checkpoint import write_checkpoint
from model_service import distributed
from model_service.build import build
from model_service.checkpoint import open_checkpoint
from model_service.model import Batch
from model_service.quant import (
    _HAS_VNNI,
    _INT8_ROWS,
    _INT8_ROWS_SLICE,
    INT8_MIN_ROWS,
    ROTATION_BLOCK,
    FusedLinear,
    GGMLBlocks,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    attach_int8_rows,
    dequantize_int4,
    fuse_linears,
    quantize_int4,
    quantize_int8,
    rotate_blocks,
)

CPU = torch.device("cpu")


def random_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 0.05


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1"])
def test_gguf_q4_blocks_are_exactly_the_int4_format(type_name):
    kind = gguf.GGMLQuantizationType[type_name]
    blocks = gguf.quants.quantize(random_weights(48, 96, seed=1), kind)  # [48, 3 blocks * bytes]
    q, scale, zero = GGMLBlocks(type_name, blocks).int4()
    assert q.shape == (48, 96) and int(q.max()) <= 15 and scale.shape == (48, 3)
    reference = torch.from_numpy(gguf.quants.dequantize(blocks, kind))
    torch.testing.assert_close(dequantize_int4(q, scale, zero), reference, rtol=1e-6, atol=1e-7)


def test_gguf_q8_0_blocks_are_int8_with_a_scale_per_32():
    kind = gguf.GGMLQuantizationType.Q8_0
    blocks = gguf.quants.quantize(random_weights(40, 64, seed=2), kind)
    q, scale = GGMLBlocks("Q8_0", blocks).int8_groups()
    weights = q.float() * scale.repeat_interleave(32, 1)
    assert torch.equal(weights, torch.from_numpy(gguf.quants.dequantize(blocks, kind)))


def test_shard_of_blocks_must_keep_blocks_whole():
    from model_service.quant import column_bytes

    assert column_bytes("Q4_1", 32, 96) == slice(20, 60)
    with pytest.raises(ValueError, match="block boundary"):
        column_bytes("Q4_1", 16, 64)


def test_int4_linear_equals_float32_linear_on_the_dequantised_weights():
    w = torch.from_numpy(random_weights(96, 128, seed=3))
    q, scale, zero = quantize_int4(w)
    linear = Int4Linear(q, scale, zero, device=CPU)
    # The kernel holds scales and zeros in bfloat16: the reference uses the same rounded values.
    reference = dequantize_int4(q, scale.bfloat16(), zero.bfloat16())
    assert relative_error(reference, w) < 0.1  # and they are close to the original weights
    x = torch.randn(5, 128)
    assert relative_error(linear(x.bfloat16()), x @ reference.T) < 0.02  # one bfloat16 call
    # float32 activations, by default: rounded to bfloat16 for that same one call.
    assert torch.equal(linear(x), linear(x.bfloat16()).float())
    assert linear(x).dtype == torch.float32 and linear(x[None]).shape == (1, 5, 96)
    # exact (--packed-activations float32): two bfloat16 halves and the scales' rounding put back,
    # near float32 itself (what is left is the kernel's bfloat16 output), and closer than one bfloat16 call.
    exact = Int4Linear(q, scale, zero, device=CPU, exact=True)
    want = x @ dequantize_int4(q, scale, zero).T
    assert relative_error(exact(x), want) < 5e-3
    assert relative_error(exact(x), want) < relative_error(linear(x), want)


def test_int8_linear_equals_float32_linear_on_the_dequantised_weights():
    w = torch.from_numpy(random_weights(96, 128, seed=4))
    q, scale = quantize_int8(w)
    linear = Int8Linear(q, scale, device=CPU)
    reference = q.float() * scale.bfloat16().float()[:, None]
    assert relative_error(reference, w) < 0.01
    x = torch.randn(5, 128)
    assert relative_error(linear(x), x @ reference.T) < 0.02


def int4_layer_with_int8_rows(w: torch.Tensor) -> tuple[Int4Linear, torch.Tensor]:
    """An int4 layer of ``w`` with int8 rows attached, and the weights its int4 kernel multiplies."""
    q, scale, zero = quantize_int4(w)
    linear = Int4Linear(q, scale, zero, device=CPU)
    attach_int8_rows(linear)
    return linear, dequantize_int4(q, scale.bfloat16(), zero.bfloat16())


def int8_layer_with_int8_rows(w: torch.Tensor) -> tuple[Int8Linear, torch.Tensor]:
    """An int8 layer of ``w`` with int8 rows attached, and the weights its own kernel multiplies."""
    q, scale = quantize_int8(w)
    linear = Int8Linear(q, scale, device=CPU)
    attach_int8_rows(linear)
    return linear, q.float() * scale.bfloat16().float()[:, None]


def test_int8_rows_of_an_int4_layer_are_its_rotated_weights_requantised_per_row_and_each_row_stands_alone():
    # --packed-activations int8: steps of several rows go to fbgemm's int8 x int8 kernel. The truth is the
    # float32 product of the int4 layer's own (dequantised) weights. Both sides are rotated first (blocks of
    # ROTATION_BLOCK columns, an orthonormal Hadamard matrix: x W^T = (x H)(W H)^T), so the error budget is
    # that of the rotated operands: the per-row re-quantisation (half a step of rowmax / 127) and 8-bit
    # activations (half a step of rowmax / 127.5).
    w = torch.from_numpy(random_weights(96, 128, seed=5))
    linear, reference = int4_layer_with_int8_rows(w)
    rotation = linear.int8_rotation
    assert rotation.shape == (ROTATION_BLOCK, ROTATION_BLOCK)
    assert torch.allclose(rotation @ rotation.T, torch.eye(ROTATION_BLOCK), atol=1e-6)
    assert torch.equal(rotation.abs(), torch.full_like(rotation, ROTATION_BLOCK ** -0.5))
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4))
    x[2] *= 1000  # one request's activations far larger than the others'
    want = x @ reference.T
    got = linear(x)
    x_rotated, w_rotated = rotate_blocks(x, rotation), rotate_blocks(reference, rotation)
    assert torch.allclose(x_rotated @ w_rotated.T, want, rtol=1e-4, atol=1e-3)  # the rotation changes nothing
    activation_steps = 1 if _HAS_VNNI else 2  # 7-bit activations without VNNI
    row_bound = (activation_steps * x_rotated.abs().amax(1, keepdim=True) / 255 * w_rotated.abs().sum(1)
                 + x_rotated.abs() @ (w_rotated.abs().amax(1, keepdim=True) / 254).expand(-1, 128).T)
    assert ((got - want).abs() <= row_bound + 1e-4 * want.abs()).all()
    assert relative_error(got, want) < 0.02
    # Each row's result is the same beside zero rows as beside the others, bit for bit: the big row does
    # not coarsen the small ones.
    padding = torch.zeros(INT8_MIN_ROWS - 1, 128)
    for i in range(6):
        assert torch.equal(linear(torch.cat([x[i:i + 1], padding]))[0], got[i])
    # Fewer rows than INT8_MIN_ROWS: the int4 kernel, as without int8 rows.
    assert torch.equal(linear(x[:INT8_MIN_ROWS - 1]), linear(x[:INT8_MIN_ROWS - 1].bfloat16()).float())
    # A width that ROTATION_BLOCK does not divide: blocks of its largest power-of-two factor (here 8); an
    # odd width: no rotation. Either way the product is the layer's.
    for width, block in ((200, 8), (99, None)):
        w_odd = torch.from_numpy(random_weights(16, width, seed=6))
        odd, _ = int8_layer_with_int8_rows(w_odd)
        assert (odd.int8_rotation is None) if block is None else odd.int8_rotation.shape == (block, block)
        x_odd = torch.randn(INT8_MIN_ROWS, width)
        assert relative_error(odd(x_odd), x_odd @ w_odd.T) < 0.03
    # An int8 layer's own weights are rotated and re-quantised the same way: the rotated weights' rounding
    # comes on top of the activations' (the same budget as the int4 layer's).
    linear8, reference8 = int8_layer_with_int8_rows(w)
    assert relative_error(linear8(x), x @ reference8.T) < 0.02


def test_int8_rows_weights_are_made_a_slice_of_rows_at_a_time_exactly_as_whole():
    # attach_int8_rows rotates and re-quantises _INT8_ROWS_SLICE output rows at a time (bounded float
    # copies); per-row quantisation makes that exact. The truth: the whole matrix done at once.
    rows = _INT8_ROWS_SLICE + 912  # the int4 kernel packs rows 16 at a time
    for layer_kind in ("int4", "int8"):
        w = torch.from_numpy(random_weights(rows, 64, seed=11))
        if layer_kind == "int4":
            linear, reference = int4_layer_with_int8_rows(w)
            reference = reference.bfloat16().float()  # read back through the kernel: its bfloat16 output
        else:
            linear, reference = int8_layer_with_int8_rows(w)
        want_q, want_scale = quantize_int8(rotate_blocks(reference, linear.int8_rotation))
        packed = torch.ops.quantized.linear_unpack(_INT8_ROWS[linear.int8_rows_key])[0]
        assert torch.equal(packed.int_repr(), want_q), layer_kind
        torch.testing.assert_close(packed.q_per_channel_scales().float(), want_scale, rtol=0, atol=0)


def test_int8_rows_rotation_keeps_an_outlier_channel_from_coarsening_its_row():
    # What the rotation is for: activations with one channel 100x the rest (as LLMs' are). With one scale
    # per row and no rotation, that channel sets the step and the others keep a few of the 255 levels;
    # rotated, it is spread over its block. The unrotated error is computed here by quantising the same
    # operands in float (the kernel's rounding, without its speed); the layer must do clearly better
    # (measured: 0.016 vs 0.046; with the rotation taken out, the layer gives 0.047).
    linear, reference = int4_layer_with_int8_rows(torch.from_numpy(random_weights(64, 256, seed=9)))
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(3))
    x[:, 17] *= 100
    want = x @ reference.T

    def per_row(t: torch.Tensor) -> torch.Tensor:
        step = t.abs().amax(-1, keepdim=True) / 127
        return (t / step).round() * step

    unrotated = relative_error(per_row(x) @ per_row(reference).T, want)
    rotated = relative_error(linear(x), want)
    assert rotated < unrotated / 2, (rotated, unrotated)


def test_int8_embedding_looks_up_the_dequantised_rows():
    w = torch.from_numpy(random_weights(50, 64, seed=5))
    q, scale = quantize_int8(w, 32)
    table = q.float() * scale.repeat_interleave(32, 1)
    embedding = Int8Embedding(q, scale, 0, device=CPU, dtype=torch.float32)
    tokens = torch.tensor([3, 49, 0, 3])
    assert torch.equal(embedding(tokens), table[tokens])


# ---- whole models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tiny weights stored like SmolLM2's file: Q4_1 linears, Q8_0 embeddings."""
    return write_checkpoint(tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", "gguf", preset="tiny", seed=7,
                            gguf_type="Q4_1")


def logits_of(path: Path, quantize: str | None, **options: str) -> dict[str, torch.Tensor]:
    """A prompt's logits and a mixed decode + prompt batch, on whatever group this process is in."""
    model = build(path, max_batch_size=3, max_seq_len=64, quantize=quantize, **options).model
    prompt = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(5))
    out = {"prompt": model(Batch(prompt, [0], [0], [11]), all_logits=True)}
    out["mixed"] = model(Batch(torch.cat([torch.tensor([3]), prompt[:6]]), [0, 2], [11, 0], [1, 6]), all_logits=True)
    return out


def test_gguf_q4_file_is_served_as_stored(q4_gguf):
    info = build(q4_gguf, max_batch_size=1, max_seq_len=16).info
    # 2 layers x 7 linears in int4 from their own blocks; the tied embedding exact, the output per row.
    assert info.quantization == ("embedding int8 (Q8_0 as stored) x1; int4 (Q4_1 as stored) x14; "
                                 "int8 (from Q8_0, per row) x1")
    assert build(q4_gguf, max_batch_size=1, max_seq_len=16, quantize="none").info.quantization == "none"


@pytest.mark.parametrize(("activations", "max_error"), [("bfloat16", 0.03), ("float32", 0.01), ("int8", 0.05)])
def test_native_q4_model_equals_the_float32_model_of_the_same_weights(q4_gguf, activations, max_error):
    # quantize="none" dequantises the file to float32: the same weights, computed in float32.
    native = logits_of(q4_gguf, None, packed_activations=activations)
    dequantised = logits_of(q4_gguf, "none")
    for key in native:
        assert relative_error(native[key], dequantised[key]) < max_error, key
        assert F.cosine_similarity(native[key], dequantised[key]).min() > 0.999, key
    assert build(q4_gguf, max_batch_size=1, max_seq_len=16, packed_activations=activations
                 ).info.packed_activations == activations


def test_packed_activations_are_checked_and_reported(q4_gguf, tiny_checkpoints):
    with pytest.raises(ValueError, match="unknown packed_activations 'int4'; use one of bfloat16, float32, int8"):
        build(q4_gguf, max_batch_size=1, max_seq_len=16, packed_activations="int4")
    with pytest.raises(ValueError, match="packed_activations .int8. runs on x86 CPUs only"):
        build(q4_gguf, max_batch_size=1, max_seq_len=16, packed_activations="int8", device="cuda")
    # Nothing packed: nothing to report; a bfloat16 model's kernels take bfloat16 whatever was asked.
    assert build(tiny_checkpoints["hf"], max_batch_size=1, max_seq_len=16).info.packed_activations == ""
    assert build(q4_gguf, max_batch_size=1, max_seq_len=16, dtype="bfloat16",
                 packed_activations="float32").info.packed_activations == "bfloat16"


@pytest.mark.parametrize(("mode", "min_cosine"), [("int8", 0.999), ("int4", 0.97)])
@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_quantized_checkpoint_stays_close_to_float32(tiny_checkpoints, fmt, mode, min_cosine):
    info = build(tiny_checkpoints[fmt], max_batch_size=1, max_seq_len=16, quantize=mode).info
    assert f"{mode} (from float, per" in info.quantization and "embedding int8" in info.quantization
    quantized, reference = logits_of(tiny_checkpoints[fmt], mode), logits_of(tiny_checkpoints[fmt], None)
    for key in quantized:
        assert F.cosine_similarity(quantized[key], reference[key]).min() > min_cosine, key


@pytest.mark.parametrize(("fmt", "quantize"), [("hf", "int4"), ("meta2", "int8"), ("gguf", "int4"), ("q4", None)])
def test_quantising_a_slice_of_rows_at_a_time_gives_the_whole_tensors_result(tiny_checkpoints, q4_gguf,
                                                                              monkeypatch, fmt, quantize):
    """Loading quantises float weights a few rows at a time (less memory at the peak); the packed
    buffers equal those of whole-tensor quantisation bit for bit (q/k rows of a Hugging Face
    checkpoint are un-permuted per slice; a 2-file Meta checkpoint's slices cross its files)."""
    import model_service.build as build_module

    path = q4_gguf if fmt == "q4" else tiny_checkpoints[fmt]

    def buffers(chunk_elements: int) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(build_module, "_QUANTIZE_CHUNK_ELEMENTS", chunk_elements)
        model = build(path, max_batch_size=1, max_seq_len=16, quantize=quantize).model
        return dict(model.named_parameters()) | {name: b for name, b in model.named_buffers() if ".cache." not in name}

    sliced, whole = buffers(1), buffers(1 << 40)  # one head's rows per slice vs the whole tensor
    assert sliced.keys() == whole.keys() and any("packed" in name or "int8" in name for name in whole)
    for name, value in whole.items():
        assert torch.equal(sliced[name], value), name


def test_unknown_quantize_mode_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        build(tiny_checkpoints["meta"], max_batch_size=1, max_seq_len=16, quantize="int3")


# ---- tensor parallelism: shards of packed weights -----------------------------------------------

# (checkpoint, --quantize, --packed-activations); with int8 rows a row-parallel layer's ranks each scale
# their own slice of a row's activations, so tp=2 differs from tp=1 by about int8's own error.
CASES = [("gguf-q4", None, "bfloat16"), ("meta", "int4", "bfloat16"), ("meta2", "int8", "bfloat16"),
         ("gguf-q4", None, "int8")]


def _rank_logits(rank: int, cases: list[tuple[Path, str | None, str]]) -> list[dict[str, torch.Tensor]]:
    return [logits_of(path, quantize, packed_activations=activations) for path, quantize, activations in cases]


@pytest.fixture(scope="module")
def tp2_quantized(tiny_checkpoints, q4_gguf) -> tuple[list, list]:
    paths = dict(tiny_checkpoints, **{"gguf-q4": q4_gguf})
    cases = [(paths[name], quantize, activations) for name, quantize, activations in CASES]
    return cases, distributed.launch(2, _rank_logits, cases, timeout_s=300)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{n}-{q}-{a}" for n, q, a in CASES])
def test_tp2_of_packed_weights_equals_tp1(tp2_quantized, case):
    cases, results = tp2_quantized
    path, quantize, activations = cases[case]
    expected = logits_of(path, quantize, packed_activations=activations)
    for rank, per_rank in enumerate(results):
        for key, value in per_rank[case].items():
            error = relative_error(value, expected[key])
            assert error < (0.05 if activations == "int8" else 0.02), f"rank {rank} {key}: {error}"


# ---- the real file ------------------------------------------------------------------------------

def test_smollm2_tensor_types_and_a_packed_layer_against_its_float_weights():
    from llama_grpc_runtime.assets import default_model_path

    path = default_model_path()
    reader = open_checkpoint(path)
    types = {name: reader.ggml_type(name) for name in reader.names()}
    assert types["tok_embeddings.weight"] == "Q8_0" and "output.weight" not in types  # tied
    assert {types[f"layers.{i}.{m}.weight"] for i in range(30) for m in (
        "attention.wq", "attention.wk", "attention.wv", "attention.wo",
        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")} == {"Q4_1"}
    name = "layers.7.feed_forward.w2.weight"
    q, scale, zero = reader.read_blocks(name, None, 0, 0).int4()
    linear = Int4Linear(q, scale, zero, device=CPU)
    x = torch.randn(3, 1536)
    assert relative_error(linear(x), x @ reader.read(name, None, 0, 0).T) < 0.02


def _three_layers(kind: str, rows: tuple[int, ...], device: torch.device) -> list[torch.nn.Module]:
    layers = []
    for i, n in enumerate(rows):
        w = torch.from_numpy(random_weights(n, 256, seed=10 + i))
        if kind == "int4":
            layers.append(Int4Linear(*quantize_int4(w), device=device))
        elif kind == "int8":
            layers.append(Int8Linear(*quantize_int8(w), device=device))
        else:
            layer = torch.nn.Linear(256, n, bias=False, device=device)
            layer.weight.data.copy_(w)
            layers.append(layer)
    return layers


@pytest.mark.parametrize("kind", ["int4", "int8", "float"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_projection_computes_each_layer_side_by_side(kind, dtype):
    # Q / K / V shapes (GQA: K and V narrower); the fused layer multiplies by the same weights at once.
    layers = _three_layers(kind, (192, 64, 64), CPU)
    if kind == "float":
        layers = [layer.to(dtype) for layer in layers]  # a float model's weights are in its dtype
    fused = fuse_linears(layers)
    assert fused is not None and fused.out_features == 320
    x = torch.randn(5, 256, dtype=dtype)
    with torch.inference_mode():
        want = torch.cat([layer(x) for layer in layers], -1)
        got = fused(x)
    # Packed layers: the same kernel on the same rows, so equal up to the kernel's bfloat16 output.
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_layers_that_cannot_be_fused_stay_separate():
    # CPU int4 packs rows in tiles of 64 only when their count is a multiple of 64.
    assert fuse_linears(_three_layers("int4", (64, 32, 32), CPU)) is None
    mixed = _three_layers("int4", (64,), CPU) + _three_layers("int8", (64,), CPU)
    assert fuse_linears(mixed) is None
    assert isinstance(fuse_linears(_three_layers("float", (64, 32), CPU)), FusedLinear)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_int4_projection_uses_the_cuda_kernel_and_equals_separate_layers():
    cuda = torch.device("cuda")
    layers = _three_layers("int4", (192, 64, 64), cuda)
    fused = fuse_linears(layers)
    assert fused is not None and fused.packed.device.type == "cuda"  # _weight_int4pack_mm's layout
    x = torch.randn(5, 256, device=cuda, dtype=torch.bfloat16)
    want = torch.cat([layer(x) for layer in layers], -1)
    torch.testing.assert_close(fused(x).float(), want.float(), rtol=0, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_and_int8_linears_equal_float32():
    cuda = torch.device("cuda")
    w = torch.from_numpy(random_weights(256, 512, seed=6))
    q, scale, zero = quantize_int4(w)
    x = torch.randn(4, 512)
    int4 = Int4Linear(q, scale, zero, device=cuda)
    assert relative_error(int4(x.to(cuda)).cpu(), x @ dequantize_int4(q, scale.bfloat16(), zero.bfloat16()).T) < 0.02
    q8, scale8 = quantize_int8(w)
    int8 = Int8Linear(q8, scale8, device=cuda)
    assert relative_error(int8(x.to(cuda)).cpu(), x @ (q8.float() * scale8.bfloat16().float()[:, None]).T) < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_serves_gguf_q4_blocks_like_the_cpu(q4_gguf):
    # bfloat16 on both: CUDA's int4 kernel and the CPU's take bfloat16 activations the same way.
    prompt = torch.randint(0, 512, (11,), generator=torch.Generator().manual_seed(5))
    logits = {}
    for device in ("cpu", "cuda"):
        loaded = build(q4_gguf, device=device, dtype="bfloat16", max_batch_size=1, max_seq_len=32)
        assert "int4 (Q4_1 as stored) x14" in loaded.info.quantization
        logits[device] = loaded.model(Batch(prompt, [0], [0], [11]), all_logits=True).cpu()
    assert relative_error(logits["cuda"], logits["cpu"]) < 0.05
