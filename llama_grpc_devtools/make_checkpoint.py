"""Write a random-initialised (or converted) Llama checkpoint in Meta, Hugging Face or GGUF format.

    python -m llama_grpc_devtools.make_checkpoint --preset tiny --format hf OUT
    python -m llama_grpc_devtools.make_checkpoint --preset 1b --format meta --shards 2 --dtype bfloat16 OUT
    python -m llama_grpc_devtools.make_checkpoint --from SOME_CHECKPOINT --format meta OUT   # convert

Random weights are a pure function of (preset, seed, tensor name): every format written with the same
seed holds the same weights, so formats can be checked against each other and against transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import zlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model_files.llama3 import llama3_token_facts_for_vocab
from model_service.args import LLAMA3_ROPE_SCALING, ModelArgs, llama3_rope_divisors
from model_service.checkpoint import hf_permute, meta_to_hf_name, open_checkpoint, parallel_dim

PRESETS: dict[str, ModelArgs] = {
    # Tests: GQA and Llama 3.1 scaled RoPE on, every size divisible by 2 for tp=2.
    "tiny": ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
                      rope_theta=500000.0, use_scaled_rope=True, max_seq_len=131072),
    # SmolLM2-135M's shape.
    "135m": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, multiple_of=256,
                      norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_word_embeddings=True),
    # Llama 3.2 1B / 3B, Llama 3 / 3.1 8B.
    "1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                    ffn_dim_multiplier=1.5, use_scaled_rope=True, rope_scaling_factor=32.0, max_seq_len=131072,
                    tie_word_embeddings=True),
    "3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=128256, multiple_of=256,
                    ffn_dim_multiplier=1.0, use_scaled_rope=True, rope_scaling_factor=32.0, max_seq_len=131072,
                    tie_word_embeddings=True),
    "8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                    ffn_dim_multiplier=1.3, max_seq_len=8192),
    "8b-3.1": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
                        ffn_dim_multiplier=1.3, use_scaled_rope=True, max_seq_len=131072),
}

FORMATS = ("meta", "hf", "gguf")


def special_token_ids(args: ModelArgs) -> tuple[int | None, list[int]]:
    """(bos, stops) in Meta's Llama 3 layout: its special tokens after the BPE ranks."""
    facts = llama3_token_facts_for_vocab(args.vocab_size)
    return (facts.bos_token_id, list(facts.stop_token_ids)) if facts else (None, [])


def tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Meta names and full shapes of every weight, in Meta's file order."""
    hd, dim, hidden = args.head_dim, args.dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (args.n_heads * hd, dim),
                   p + "attention.wk.weight": (args.kv_heads * hd, dim),
                   p + "attention.wv.weight": (args.kv_heads * hd, dim),
                   p + "attention.wo.weight": (dim, args.n_heads * hd),
                   p + "feed_forward.w1.weight": (hidden, dim), p + "feed_forward.w2.weight": (dim, hidden),
                   p + "feed_forward.w3.weight": (hidden, dim),
                   p + "attention_norm.weight": (dim,), p + "ffn_norm.weight": (dim,)}
    shapes["norm.weight"] = (dim,)
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, dim)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 weights, a pure function of (name, seed); scaled so activations and logits stay O(1),
    which makes greedy choices well separated (parity tests compare argmaxes)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:  # norm gains: around 1, not exactly 1, so a mis-wired norm shows
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    std = 1.0 if name == "tok_embeddings.weight" else 1.0 / math.sqrt(shape[1])
    return torch.randn(shape, generator=gen) * std


TensorFn = Callable[[str], torch.Tensor]  # Meta name -> full float tensor in Meta's layout


def meta_ffn_params(args: ModelArgs) -> ModelArgs:
    """params.json has no hidden size, only Meta's rule (multiple_of, ffn_dim_multiplier): find values of
    those that reproduce an explicit one (HF and GGUF configs state it)."""
    hidden = args.ffn_hidden_dim
    if replace(args, hidden_dim=None).ffn_hidden_dim == hidden:
        return replace(args, hidden_dim=None)
    base = int(2 * (4 * args.dim) / 3)
    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        for multiplier in (None, hidden / base, hidden / base + 1e-9):
            candidate = replace(args, hidden_dim=None, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if candidate.ffn_hidden_dim == hidden:
                return candidate
    raise ValueError(f"Meta's params.json cannot express hidden size {hidden} for dim {args.dim}")


def write_meta(out: Path, args: ModelArgs, get: TensorFn, shards: int, dtype: torch.dtype) -> None:
    args = meta_ffn_params(args)
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": args.use_scaled_rope, "max_seq_len": args.max_seq_len}
    if args.use_scaled_rope and args.rope_scaling_factor != LLAMA3_ROPE_SCALING["factor"]:
        params["rope_scaling_factor"] = args.rope_scaling_factor
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    names = list(tensor_shapes(args))
    for rank in range(shards):
        state = {}
        for name in tqdm(names, desc=f"consolidated.{rank:02d}.pth", disable=not sys.stderr.isatty(), delay=1.0):
            tensor, dim = get(name), parallel_dim(name)
            if dim is not None:
                tensor = tensor.chunk(shards, dim=dim)[rank]
            state[name] = tensor.to(dtype).clone()  # clone: a chunk view would save the whole tensor
        torch.save(state, out / f"consolidated.{rank:02d}.pth")
        del state


def write_hf(out: Path, args: ModelArgs, get: TensorFn, dtype: torch.dtype, max_shard_bytes: int,
             bos: int | None, stops: list[int]) -> None:
    from safetensors.torch import save_file

    rope = None
    if args.use_scaled_rope:
        rope = {"rope_type": "llama3", "factor": args.rope_scaling_factor, "low_freq_factor": args.rope_low_freq_factor,
                "high_freq_factor": args.rope_high_freq_factor,
                "original_max_position_embeddings": args.rope_original_context}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
              "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "rope_scaling": rope, "max_position_embeddings": args.max_seq_len,
              "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": "silu", "attention_bias": False,
              "mlp_bias": False, "bos_token_id": bos, "eos_token_id": stops or None,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": stops}) + "\n")
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    names = list(tensor_shapes(args))
    weight_map: dict[str, int] = {}
    for name in tqdm(names, desc="safetensors", disable=not sys.stderr.isatty(), delay=1.0):
        tensor = get(name).to(dtype)
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            tensor = hf_permute(tensor, args.head_dim)
        nbytes = tensor.numel() * tensor.element_size()
        if files[-1] and size + nbytes > max_shard_bytes:
            _flush(out, files, len(files) - 1, save_file)
            files.append({})
            size = 0
        files[-1][meta_to_hf_name(name)] = tensor.contiguous()
        weight_map[meta_to_hf_name(name)] = len(files) - 1
        size += nbytes
    total = len(files)
    if total == 1:
        save_file(files[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    _flush(out, files, total - 1, save_file)
    for i in range(total):  # shards were written before the count was known: rename to i-of-total
        (out / f"model-{i + 1:05d}.safetensors").rename(out / f"model-{i + 1:05d}-of-{total:05d}.safetensors")
    index = {"metadata": {}, "weight_map": {n: f"model-{i + 1:05d}-of-{total:05d}.safetensors"
                                            for n, i in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _flush(out: Path, files: list[dict[str, torch.Tensor]], i: int, save_file: Callable) -> None:
    save_file(files[i], str(out / f"model-{i + 1:05d}.safetensors"), metadata={"format": "pt"})
    files[i] = {}  # free the written tensors


_GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
               "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
               "feed_forward.w3": "ffn_up", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


def _gguf_name(name: str) -> str:
    top = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "output.weight": "output.weight"}
    if name in top:
        return top[name]
    _, layer, rest = name.split(".", 2)
    return f"blk.{layer}.{_GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def _add_gguf_metadata(writer: Any, args: ModelArgs, name: str, bos: int | None, stops: list[int],
                       gguf_type: str) -> None:
    """llama.cpp's keys for a Llama-architecture model and its special tokens."""
    import gguf

    writer.add_name(name)
    writer.add_block_count(args.n_layers)
    writer.add_context_length(args.max_seq_len)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if gguf_type == "F32" else gguf.LlamaFileType[f"MOSTLY_{gguf_type}"])
    if bos is not None:
        writer.add_bos_token_id(bos)
    if stops:
        writer.add_eos_token_id(stops[0])
        if len(stops) == 3:  # Llama 3: <|end_of_text|>, <|eom_id|>, <|eot_id|>
            writer.add_eom_token_id(stops[1])
            writer.add_eot_token_id(stops[2])


def write_gguf(path: Path, args: ModelArgs, get: TensorFn, name: str, bos: int | None, stops: list[int],
               gguf_type: str = "F32") -> None:
    """GGUF, q/k in Meta's row order (what llama.cpp's converter produces), streamed. ``gguf_type``
    "F32", or a type gguf-py can quantise (Q4_0, Q4_1, Q8_0) for the linears; with a Q4 type the
    embeddings and output are Q8_0, as in SmolLM2's Q4_1 file. Norms and RoPE factors stay F32."""
    import gguf
    import numpy as np

    def storage(gguf_name: str) -> gguf.GGMLQuantizationType:
        if gguf_type == "F32" or not gguf_name.endswith(".weight") or "norm" in gguf_name or "rope" in gguf_name:
            return gguf.GGMLQuantizationType.F32
        if gguf_name in ("token_embd.weight", "output.weight") and gguf_type.startswith("Q4"):
            return gguf.GGMLQuantizationType.Q8_0
        return gguf.GGMLQuantizationType[gguf_type]

    def encode(gguf_name: str, values: np.ndarray) -> np.ndarray:
        kind = storage(gguf_name)
        return values if kind == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(values, kind)

    writer = gguf.GGUFWriter(path, "llama")
    _add_gguf_metadata(writer, args, name, bos, stops, gguf_type)
    tensors: list[tuple[str, Callable[[], np.ndarray]]] = []
    if args.use_scaled_rope:  # llama.cpp keeps Llama 3.1 scaling as per-frequency divisors
        divisors = np.array(llama3_rope_divisors(args), dtype=np.float32)
        tensors.append(("rope_freqs.weight", lambda: divisors))
    for meta_name in tensor_shapes(args):
        gguf_name = _gguf_name(meta_name)
        tensors.append((gguf_name, lambda n=meta_name, g=gguf_name: encode(g, get(n).float().numpy())))
    shapes = {"rope_freqs.weight": (args.head_dim // 2,)} | {
        _gguf_name(n): s for n, s in tensor_shapes(args).items()}
    for gguf_name, _ in tensors:
        shape, kind = shapes[gguf_name], storage(gguf_name)
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:
            block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
            byte_shape = (*shape[:-1], shape[-1] // block * block_bytes)
            writer.add_tensor_info(gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, make in tqdm(tensors, desc=path.name, disable=not sys.stderr.isatty(), delay=1.0):
        writer.write_tensor_data(make())
    writer.close()


def write_checkpoint(out: str | Path, fmt: str, *, args: ModelArgs | None = None, preset: str | None = None,
                     source: str | Path | None = None, seed: int = 0, shards: int = 1,
                     dtype: torch.dtype = torch.float32, max_shard_bytes: int = 2 << 30,
                     gguf_type: str = "F32") -> Path:
    """Write random weights (``args`` or ``preset``) or convert ``source`` to ``fmt``; return the path
    to pass to ``build()`` (the directory, or the .gguf file)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    out = Path(out)
    if source is not None:
        reader = open_checkpoint(source)
        args, name = reader.args, reader.name
        bos, stops = reader.bos_token_id, reader.stop_token_ids

        def get(n: str) -> torch.Tensor:
            return reader.read_full(n).float()
    else:
        args = args or PRESETS[preset or "tiny"]
        name = f"random-{preset or 'custom'}-seed{seed}"
        bos, stops = special_token_ids(args)
        shapes = tensor_shapes(args)

        def get(n: str) -> torch.Tensor:
            return random_tensor(n, shapes[n], seed)
    if fmt == "gguf":
        path = out if out.suffix == ".gguf" else out / f"{name}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path, args, get, name, bos, stops, gguf_type)
        return path
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "meta":
        write_meta(out, args, get, shards, dtype)
    else:
        write_hf(out, args, get, dtype, max_shard_bytes, bos, stops)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory (or .gguf file for --format gguf)")
    parser.add_argument("--format", choices=FORMATS, required=True)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="random weights of this shape")
    group.add_argument("--from", dest="source", help="convert this checkpoint instead of random weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1, help="Meta format: number of consolidated.NN.pth files")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                        help="stored dtype for meta/hf (gguf is always F32)")
    parser.add_argument("--gguf-type", choices=("F32", "Q4_0", "Q4_1", "Q8_0"), default="F32",
                        help="GGUF storage of the linears (a Q4 type stores embeddings and output as Q8_0)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="HF format: safetensors file size limit")
    ns = parser.parse_args(argv)
    path = write_checkpoint(ns.out, ns.format, preset=None if ns.source else ns.preset, source=ns.source,
                            seed=ns.seed, shards=ns.shards, dtype=getattr(torch, ns.dtype),
                            max_shard_bytes=int(ns.max_shard_gb * (1 << 30)), gguf_type=ns.gguf_type)
    print(path)


if __name__ == "__main__":
    main()
