"""One entry point from a checkpoint path to a ready model: ``build()`` (the reference's ``Llama.build``).

It owns process-group set-up, seeding, format detection, sharding / re-sharding, the shape and vocab
checks and cache allocation, and behaves the same when called on every rank of an N-rank group.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from model_service import distributed
from model_service.args import ModelArgs
from model_service.checkpoint import CheckpointReader, open_checkpoint, parallel_dim
from model_service.model import Transformer

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


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


@dataclass
class LoadedModel:
    model: Transformer
    args: ModelArgs
    info: CheckpointInfo


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[dtype]


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


def load_weights(model: Transformer, reader: CheckpointReader, *, rank: int, tp: int, dtype: torch.dtype,
                 device: torch.device) -> None:
    """Replace every parameter by this rank's shard of the checkpoint tensor, one tensor at a time."""
    params = dict(model.named_parameters())  # tied output.weight appears once, as tok_embeddings.weight
    expected = set(params) | ({"output.weight"} if model.params.tie_word_embeddings else set())
    unexpected = [reader.source_name(n) for n in reader.names()
                  if n not in expected and not reader.ignored.search(n)]
    if unexpected:
        raise ValueError(f"{reader.path}: {len(unexpected)} tensor(s) that a Llama model does not have, "
                         f"e.g. {unexpected[:3]}")
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
            shard = reader.read(name, dim, start, end)
            _set_parameter(model, name, shard.to(device=device, dtype=dtype).contiguous())
            bar.update(1)
    if model.params.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight


def build(checkpoint: str | Path | None = None, *, device: str | torch.device = "cpu",
          dtype: torch.dtype | str = torch.float32, max_batch_size: int, max_seq_len: int | None,
          seed: int = 1, tokenizer_vocab_size: int | None = None) -> LoadedModel:
    """Load a checkpoint (Meta dir, HF dir, or GGUF file; None = the embedded default model) as this
    rank's shard, allocate KV caches for ``max_batch_size`` sequences of up to ``max_seq_len`` tokens
    (None = the checkpoint's context) and return it ready for ``model.forward``.

    ``tokenizer_vocab_size``, when given, is checked against the model's vocabulary.
    """
    started = time.monotonic()
    dtype, device = parse_dtype(dtype), torch.device(device)
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
    load_weights(model, reader, rank=rank, tp=tp, dtype=dtype, device=device)
    model.eval()
    model.setup_caches(max_batch_size, serving_len, dtype, device)

    info = CheckpointInfo(
        name=reader.name, format=reader.format, path=reader.path, stop_token_ids=reader.stop_token_ids,
        bos_token_id=reader.bos_token_id, vocab_size=args.vocab_size, max_seq_len=serving_len,
        parameter_count=parameter_count(args), dtype=str(dtype).removeprefix("torch."), device=str(device),
        tp_size=tp)
    if rank == 0 and time.monotonic() - started > 1.0 and sys.stderr.isatty():
        print(f"loaded {info.name} ({info.parameter_count / 1e6:.0f}M parameters, {info.dtype}, tp={tp}) "
              f"in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return LoadedModel(model, args, info)


def parameter_count(args: ModelArgs) -> int:
    """Parameters of the whole (unsharded) model; a tied output projection counts once."""
    hd, kv = args.head_dim, args.kv_heads
    attention = args.dim * hd * (2 * args.n_heads + 2 * kv)
    ffn = 3 * args.dim * args.ffn_hidden_dim
    per_layer = attention + ffn + 2 * args.dim
    embeddings = args.vocab_size * args.dim * (1 if args.tie_word_embeddings else 2)
    return args.n_layers * per_layer + embeddings + args.dim
