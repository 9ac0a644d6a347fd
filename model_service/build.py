"""One entry point from a checkpoint path to a ready model: ``build()`` (the reference's ``Llama.build``).

It owns process-group set-up, seeding, format detection, sharding / re-sharding, the shape and vocab
checks and cache allocation, and behaves the same when called on every rank of an N-rank group.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from fairscale.nn.model_parallel.layers import ColumnParallelLinear
from torch import nn
from tqdm import tqdm

from model_service import distributed
from model_service.args import ModelArgs
from model_service.checkpoint import CheckpointReader, open_checkpoint, parallel_dim
from model_service.model import Transformer
from model_service.quant import (
    GROUP_SIZE,
    PACKED_ACTIVATIONS,
    QUANTIZE_MODES,
    GGMLBlocks,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    _QuantLinear,
    attach_int8_rows,
    compute_dtype_for,
    fuse_linears,
    quantize_int4,
    quantize_int8,
)

# The dtypes a model is served in, by the name flags and GetModelInfo use; parse_dtype also takes
# the usual short names.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    format: str  # "meta" | "huggingface" | "gguf"
    path: Path
    stop_token_ids: list[int]  # as the checkpoint declares them
    bos_token_id: int | None
    vocab_size: int
    max_seq_len: int  # the serving limit actually allocated: min(requested, checkpoint context)
    parameter_count: int  # whole model, not this rank's shard
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str
    tp_size: int
    quantization: str = "none"  # what runs, e.g. "int4 (Q4_1 as stored) x210; int8 (from Q8_0, per row) x1"
    compile: str = "off"  # what runs torch.compile'd (Transformer.compile), or "off"
    packed_activations: str = ""  # what packed kernels multiply (PACKED_ACTIVATIONS), "" without packed layers
    kv_num_blocks: int = 0  # the paged KV cache: this many blocks of kv_block_size tokens
    kv_block_size: int = 0

    @property
    def kv_cache_tokens(self) -> int:
        return self.kv_num_blocks * self.kv_block_size


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    info: CheckpointInfo


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def check_runtime(args: ModelArgs, tp: int, dtype: torch.dtype, device: torch.device) -> None:
    """Fail early, with a message a person can act on, for combinations the model cannot run."""
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{dtype} is not supported on CPU; use float32 or bfloat16")
    if device.type == "cuda" and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{dtype} is not supported on CUDA; use bfloat16, float16 or float32")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "vocab_size": args.vocab_size,
             "ffn hidden size": args.ffn_hidden_dim}
    bad = {name: size for name, size in sizes.items() if size % tp}
    if bad:
        detail = ", ".join(f"{name}={size}" for name, size in bad.items())
        raise ValueError(f"tensor-parallel size {tp} must divide {detail}; pick a tp that divides all of them")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # fairscale allocates its weights with the legacy torch.Tensor(...), which follows the default
    # dtype: allocating them in the serving dtype keeps construction from doubling peak memory.
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, nn.Parameter(value, requires_grad=False))


# GGUF types that the int4 kernel holds exactly, and the nearest kernel for the other quantised types.
_GGUF_INT4_NEAREST = ("Q2_K", "Q3_K", "Q4_K", "IQ4_NL", "IQ4_XS")
_GGUF_FLOAT = ("F32", "F16", "BF16", "F64")


def weight_mode(reader: CheckpointReader, name: str, quantize: str | None) -> str:
    """"float", "int4" or "int8" for one weight: ``quantize`` None serves a GGUF file in its own
    quantisation where a kernel holds it (Q4_0/Q4_1 int4, Q8_0 int8), other checkpoints as they are."""
    if not name.endswith("weight") or name.endswith("norm.weight") or quantize == "none":
        return "float"
    if quantize is not None:
        return quantize
    ggml_type = reader.ggml_type(name)
    if ggml_type is None or ggml_type in _GGUF_FLOAT:
        return "float"
    return "int4" if GGMLBlocks.has_int4(ggml_type) or ggml_type in _GGUF_INT4_NEAREST else "int8"


# Float rows read and quantised at a time: the quantisers work row by row (per row or per group of a
# row), so slices give the same result as the whole tensor without its float copy and temporaries
# (~3 float copies of SmolLM2's 49152 x 576 output layer, +300 MB at the peak of loading).
_QUANTIZE_CHUNK_ELEMENTS = 1 << 22


def _quantize_rows(reader: CheckpointReader, name: str, dim: int | None, start: int, end: int,
                   quantize: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """``quantize`` of this rank's shard of ``name``, read and quantised a slice of rows at a time."""
    if dim is None:  # replicated: the whole tensor's rows
        dim, start, end = 0, 0, reader.shape(name)[0]
    if dim != 0:  # a column shard: rows dequantise whole, so read it at once
        return quantize(reader.read(name, dim, start, end))
    # Whole heads per slice: a Hugging Face reader un-permutes q/k rows head by head.
    head_dim = reader.args.head_dim
    step = max(1, _QUANTIZE_CHUNK_ELEMENTS // reader.shape(name)[1] // head_dim) * head_dim
    parts = []
    for first in range(start, end, step):
        parts.append(quantize(reader.read(name, 0, first, min(first + step, end))))
        malloc_trim()  # the slice's temporaries, before the next slice's land beside them
    return tuple(torch.cat(pieces) for pieces in zip(*parts, strict=True)) if len(parts) > 1 else parts[0]


def _quantized_module(reader: CheckpointReader, name: str, mode: str, dim: int | None, start: int, end: int, *,
                      device: torch.device, dtype: torch.dtype, parallel: str,
                      gather_output: bool, exact: bool) -> tuple[torch.nn.Module, str]:
    """This rank's shard of ``name`` as a packed module, and a label saying how it was made."""
    ggml_type = reader.ggml_type(name)
    compute = compute_dtype_for(device)
    if parallel == "embedding":  # int8 rows, a scale per 32 columns: Q8_0 exactly, anything else nearest
        if ggml_type == "Q8_0":
            q, scale = reader.read_blocks(name, dim, start, end).int8_groups()
            label = "embedding int8 (Q8_0 as stored)"
        else:
            q, scale = _quantize_rows(reader, name, dim, start, end, lambda w: quantize_int8(w, GROUP_SIZE))
            label = f"embedding int8 (from {ggml_type or 'float'}, per 32)"
        return Int8Embedding(q, scale, start, device=device, dtype=dtype), label
    if mode == "int4":
        if ggml_type is not None and GGMLBlocks.has_int4(ggml_type):
            q, scale, zero = reader.read_blocks(name, dim, start, end).int4()
            label = f"int4 ({ggml_type} as stored)"
        else:
            q, scale, zero = _quantize_rows(reader, name, dim, start, end, quantize_int4)
            label = f"int4 (from {ggml_type or 'float'}, per 32)"
        return Int4Linear(q, scale, zero, device=device, parallel=parallel, gather_output=gather_output,
                          compute_dtype=compute, exact=exact), label
    q, scale = _quantize_rows(reader, name, dim, start, end, quantize_int8)
    return (Int8Linear(q, scale, device=device, parallel=parallel, gather_output=gather_output, compute_dtype=compute,
                       exact=exact), f"int8 (from {ggml_type or 'float'}, per row)")


def load_weights(model: Transformer, reader: CheckpointReader, *, rank: int, tp: int, dtype: torch.dtype,
                 device: torch.device, quantize: str | None = "none", packed_activations: str = "bfloat16") -> str:
    """Replace every parameter by this rank's shard of the checkpoint tensor, one tensor at a time; a
    quantised weight replaces its whole layer by a packed one, whose kernels multiply activations as
    ``packed_activations`` says (``quant.PACKED_ACTIVATIONS``). Returns what runs (``quantization``)."""
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {quantize!r}; use one of {', '.join(QUANTIZE_MODES)}")
    if packed_activations not in PACKED_ACTIVATIONS:
        raise ValueError(f"unknown packed_activations {packed_activations!r}; use one of "
                         f"{', '.join(PACKED_ACTIVATIONS)}")
    params = dict(model.named_parameters())  # tied output.weight appears once, as tok_embeddings.weight
    expected = set(params) | ({"output.weight"} if model.params.tie_word_embeddings else set())
    unexpected = [reader.source_name(n) for n in reader.names()
                  if n not in expected and not reader.ignored.search(n)]
    if unexpected:
        raise ValueError(f"{reader.path}: {len(unexpected)} tensor(s) that a Llama model does not have, "
                         f"e.g. {unexpected[:3]}")
    labels: list[str] = []
    file_views: list[str] = []  # float weights served straight from the mapped file (no copy)
    with tqdm(total=len(params), desc=f"loading {reader.path.name}", unit="tensor", delay=1.0,
              disable=rank != 0 or not sys.stderr.isatty()) as bar:
        for name, param in params.items():
            dim = parallel_dim(name)
            full = list(param.shape)
            if dim is not None:
                full[dim] *= tp
            found = reader.shape(name)
            if found is None:
                raise ValueError(f"{reader.path}: checkpoint has no tensor {reader.source_name(name)}")
            if tuple(found) != tuple(full):
                what = "vocab size mismatch: " if name.endswith(("tok_embeddings.weight", "output.weight")) else ""
                raise ValueError(f"{what}tensor {reader.source_name(name)} has shape {tuple(found)} in the "
                                 f"checkpoint but the model's config needs {tuple(full)}")
            start = 0 if dim is None else rank * param.shape[dim]
            end = 0 if dim is None else start + param.shape[dim]
            mode = weight_mode(reader, name, quantize)
            if mode == "float":
                shard = reader.read(name, dim, start, end)
                value = shard.to(device=device, dtype=dtype).contiguous()
                if value.data_ptr() == shard.data_ptr():
                    file_views.append(name)
                _set_parameter(model, name, value)
                labels.append("float")
            else:
                sources = [("tok_embeddings.weight", "embedding")]
                if name == "tok_embeddings.weight" and model.params.tie_word_embeddings:
                    sources.append(("output.weight", "column"))  # tied: the output layer packs the same rows
                elif name != "tok_embeddings.weight":
                    sources = [(name, "column" if dim == 0 else "row")]
                for target, parallel in sources:
                    module, label = _quantized_module(
                        reader, name, mode, dim, start, end, device=device, dtype=dtype, parallel=parallel,
                        gather_output=target == "output.weight", exact=packed_activations == "float32")
                    parent, _, leaf = target.removesuffix(".weight").rpartition(".")
                    setattr(model.get_submodule(parent) if parent else model, leaf, module)
                    labels.append(label)
            bar.update(1)
            malloc_trim()  # each tensor's temporaries: freed heap left in place would add up (~+300 MB peak)
            reader.drop_pages()  # and the file's pages it read (a GGUF: ~the whole file by the end)
    if any(label != "float" for label in labels):
        # Packed weights are copies: once the float ones (norms) are copies too, the file's mapping and
        # every page of it that was read go away (~the whole file for a GGUF).
        for name in file_views:
            _set_parameter(model, name, model.get_parameter(name).clone())
    if model.params.tie_word_embeddings and isinstance(model.output, ColumnParallelLinear):
        model.output.weight = model.tok_embeddings.weight
    return describe(labels)


def fuse_projections(model: Transformer) -> None:
    """Each layer's wq/wk/wv as one matmul and w1/w3 (gate, up) as another: the same weights, fewer
    calls (decode at small batches is per-call overhead). The separate layers are dropped. Float layers
    on CPU stay separate: they are views of the mapped checkpoint, which a fused copy would double."""
    fuse_float = model.device.type != "cpu"
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        if not fuse_float and isinstance(attention.wq, ColumnParallelLinear):
            continue
        wqkv = fuse_linears([attention.wq, attention.wk, attention.wv])
        if wqkv is not None:
            attention.wqkv, attention.wq, attention.wk, attention.wv = wqkv, None, None, None
        w13 = fuse_linears([ffn.w1, ffn.w3])
        if w13 is not None:
            ffn.w13, ffn.w1, ffn.w3 = w13, None, None


def describe(labels: list[str]) -> str:
    """``quantization`` in words: "none" when every weight is float, else each kind of layer with its count."""
    counts = {label: labels.count(label) for label in dict.fromkeys(labels) if label != "float"}
    return "; ".join(f"{label} x{n}" for label, n in counts.items()) or "none"


def build(checkpoint: str | Path | None = None, *, device: str | torch.device = "cpu",
          dtype: torch.dtype | str = torch.float32, max_batch_size: int, max_seq_len: int | None,
          seed: int = 1, tokenizer_vocab_size: int | None = None, quantize: str | None = None,
          kv_cache_tokens: int | None = None, kv_block_size: int = 16, compile: bool = False,
          packed_activations: str = "bfloat16", compile_mode: str = "default") -> LoadedModel:
    """Load a checkpoint (Meta dir, HF dir, or GGUF file; None = the embedded default model) as this
    rank's shard, allocate the paged KV cache and return it ready for ``model.forward``.

    Sequences may have up to ``max_seq_len`` tokens (None = the checkpoint's context). The cache holds
    ``kv_cache_tokens`` tokens in blocks of ``kv_block_size`` (None: ``max_batch_size`` sequences of
    ``max_seq_len`` tokens; 0: what the memory budget allows, see ``default_cache_tokens``).

    ``tokenizer_vocab_size``, when given, is checked against the model's vocabulary. ``quantize``: "none",
    "int8", "int4" (weight-only, every linear and the embeddings), or None: a GGUF file in its own
    quantisation where a kernel holds it, other checkpoints in ``dtype``. ``compile``: the layers run as one
    ``torch.compile``'d graph (``Transformer.compile``; compiled here, ~1 min on 2 CPU cores, cached on disk,
    see ``use_compile_cache``, so a restart does not compile again). ``packed_activations``: what the
    packed kernels of a float32 model multiply (``quant.PACKED_ACTIVATIONS``). ``compile_mode``: see
    ``model.COMPILE_MODES``.
    """
    started = time.monotonic()
    dtype, device = parse_dtype(dtype), torch.device(device)
    if packed_activations == "int8" and (device.type != "cpu"
                                         or torch.backends.quantized.engine not in ("x86", "fbgemm")):
        raise ValueError("packed_activations 'int8' runs on x86 CPUs only (fbgemm's int8 kernel); the model is on "
                         f"{device.type}, quantized engine {torch.backends.quantized.engine!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    distributed.ensure_initialized()
    rank, tp = distributed.tp_rank(), distributed.tp_size()
    torch.manual_seed(seed)  # the same on every rank, so ranks sample identically

    if checkpoint is None:
        from llama_grpc_runtime.assets import default_model_path

        checkpoint = default_model_path()
    reader = open_checkpoint(checkpoint)
    args = reader.args
    check_runtime(args, tp, dtype, device)
    if tokenizer_vocab_size is not None and tokenizer_vocab_size > args.vocab_size:
        raise ValueError(f"vocab size mismatch: the tokenizer has {tokenizer_vocab_size} tokens but the model "
                         f"{reader.path} only {args.vocab_size}; they do not belong together")
    serving_len = args.max_seq_len if max_seq_len is None else min(max_seq_len, args.max_seq_len)

    with _default_dtype(dtype):
        model = Transformer(args)
    quantization = load_weights(model, reader, rank=rank, tp=tp, dtype=dtype, device=device, quantize=quantize,
                                packed_activations=packed_activations)
    source = {"name": reader.name, "format": reader.format, "path": reader.path,
              "stop_token_ids": reader.stop_token_ids, "bos_token_id": reader.bos_token_id}
    del reader  # unmaps the checkpoint (once no weight is a view of it) before fusing copies the packed weights
    gc.collect()
    fuse_projections(model)
    if packed_activations == "int8" and quantization != "none":
        unrotated = {id(block.attention.wo) for block in model.layers}  # no outliers to spread (quant.py)
        for layer in model.modules():
            if isinstance(layer, _QuantLinear):
                attach_int8_rows(layer, rotate=id(layer) not in unrotated)
    model.eval()
    if kv_block_size < 1:
        raise ValueError(f"kv_block_size must be >= 1, got {kv_block_size}")
    if kv_cache_tokens is None:  # one slot of whole blocks per sequence
        kv_cache_tokens = max_batch_size * -(-serving_len // kv_block_size) * kv_block_size
    elif kv_cache_tokens == 0:
        kv_cache_tokens = default_cache_tokens(model.kv_bytes_per_token(dtype), device, serving_len)
    num_blocks = _agree_across_ranks(-(-kv_cache_tokens // kv_block_size), device, tp)
    model.setup_caches(max_batch_size, serving_len, dtype, device, num_blocks=num_blocks, block_size=kv_block_size)
    compiled = "off"
    if compile:
        use_compile_cache()
        compiled = model.compile(compile_mode)
        model.warm_up_compiled()

    info = CheckpointInfo(
        **source, vocab_size=args.vocab_size, max_seq_len=serving_len,
        parameter_count=parameter_count(args), dtype=str(dtype).removeprefix("torch."), device=str(device),
        tp_size=tp, quantization=quantization, compile=compiled, kv_num_blocks=num_blocks,
        kv_block_size=kv_block_size,
        # A float32 model's choice; other dtypes reach the kernels as bfloat16 whatever was asked.
        packed_activations="" if quantization == "none" else "int8" if packed_activations == "int8" else
        "float32" if packed_activations == "float32" and dtype == torch.float32 else "bfloat16")
    _release_freed_memory()
    if rank == 0 and time.monotonic() - started > 1.0 and sys.stderr.isatty():
        print(f"loaded {info.name} ({info.parameter_count / 1e6:.0f}M parameters, {info.dtype}, tp={tp}) "
              f"in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return LoadedModel(model, args, info)


def compile_blocker(device: str, tp: int) -> str | None:
    """Why ``--compile`` cannot run with these settings, or None when it can."""
    if tp > 1:
        return "tensor parallelism's collectives run eager (use --tp 1)"
    compiler = os.environ.get("CXX") or "g++"  # what inductor builds its CPU kernels with
    if device == "cpu" and not shutil.which(compiler):
        return f"inductor builds CPU kernels with a C++ compiler and {compiler!r} is not on PATH"
    return None


def use_compile_cache() -> Path | None:
    """Inductor's caches (compiled graphs, kernels) in the user's cache directory rather than /tmp, so a
    restart (or a reboot) loads the compiled step instead of compiling it again; an explicit
    ``TORCHINDUCTOR_CACHE_DIR`` wins, and a read-only cache directory (a baked image) leaves inductor's
    own default. Returns the directory in use (None: inductor's default)."""
    from llama_grpc_runtime.assets import cache_dir

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        wanted = cache_dir() / "inductor"
        try:
            wanted.mkdir(parents=True, exist_ok=True)
        except OSError:
            return None
        if not os.access(wanted, os.W_OK):
            return None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(wanted)
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def malloc_trim() -> None:
    """Give freed heap back to the OS: glibc keeps freed pages (dequantised tensors, block copies)
    resident until trimmed. A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _release_freed_memory() -> None:
    """The loader's temporaries, once the model is built: ~230 MB for SmolLM2 without the per-tensor
    trims of ``load_weights``."""
    gc.collect()
    malloc_trim()


CPU_CACHE_BUDGET_BYTES = 256 << 20  # several services share a CPU machine's memory
CUDA_CACHE_SHARE = 0.5  # of the device memory still free once the weights are loaded


def default_cache_tokens(bytes_per_token: int, device: torch.device, max_seq_len: int) -> int:
    """KV-cache capacity from a memory budget: a modest fixed budget on CPU, a share of the free
    memory on CUDA; never less than one sequence of ``max_seq_len`` tokens."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * CUDA_CACHE_SHARE)
    else:
        budget = CPU_CACHE_BUDGET_BYTES
    return max(budget // bytes_per_token, max_seq_len)


def _agree_across_ranks(num_blocks: int, device: torch.device, tp: int) -> int:
    """Every tensor-parallel rank must have the same number of blocks (the smallest any can afford)."""
    if tp == 1:
        return num_blocks
    import torch.distributed as dist

    value = torch.tensor([num_blocks], dtype=torch.long, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return int(value.item())


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole (unsharded) model; a tied output projection counts once."""
    hd, kv = args.head_dim, args.kv_heads
    attention = args.dim * hd * (2 * args.n_heads + 2 * kv)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    per_layer = attention + ffn + 2 * args.dim
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    return args.n_layers * per_layer + embeddings + args.dim
