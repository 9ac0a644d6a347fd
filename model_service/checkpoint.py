"""Read checkpoints in Meta, Hugging Face and GGUF formats, detected from the path.

Every reader presents the weights under Meta's names and layout (the layout ``model.py`` uses) and
reads a range of rows or columns of a full tensor on demand, so a rank materialises only its own
shard, one tensor at a time: peak memory stays near one copy of the (local) weights.
"""

from __future__ import annotations

import json
import mmap
import pickle
import re
import warnings
from dataclasses import replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from model_files.gguf_metadata import read_gguf_metadata
from model_files.llama3 import llama3_token_facts_for_vocab
from model_files.token_facts import gguf_token_facts, hf_token_facts
from model_service.args import ModelArgs
from model_service.quant import GGMLBlocks, column_bytes

# Split dimension of each weight in Meta's tensor-parallel layout (also the model's fairscale layers):
# 0 for ColumnParallelLinear / VocabParallelEmbedding, 1 for RowParallelLinear, None = replicated.
_PARALLEL_DIM = {"tok_embeddings": 0, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0,
                 "wo": 1, "w2": 1}


def parallel_dim(name: str) -> int | None:
    """``layers.3.attention.wq.weight`` -> 0; norms -> None."""
    return _PARALLEL_DIM.get(name.split(".")[-2])


def detect_format(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        if path.name in ("params.json", "config.json"):
            return detect_format(path.parent)
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic); pass a checkpoint directory or a .gguf file")
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "huggingface"
    if len(list(path.glob("*.gguf"))) == 1:
        return "gguf"
    raise FileNotFoundError(
        f"{path} holds no checkpoint: expected params.json + consolidated.NN.pth (Meta), "
        "config.json + *.safetensors (Hugging Face), or one .gguf file")


def open_checkpoint(path: str | Path) -> CheckpointReader:
    path = Path(path).expanduser()
    fmt = detect_format(path)
    if path.is_file() and fmt != "gguf":
        path = path.parent
    return {"meta": MetaReader, "huggingface": HFReader, "gguf": GGUFReader}[fmt](path)


class CheckpointReader:
    format: str
    path: Path
    name: str
    args: ModelArgs
    stop_token_ids: list[int]
    bos_token_id: int | None
    # Tensors that carry no weights of ours (e.g. precomputed RoPE tables); skipped, not reported.
    ignored = re.compile(r"(^|\.)(rope\.freqs|rope_freqs\.weight|rotary_emb\.inv_freq)$")

    def names(self) -> list[str]:
        """Meta names of every tensor in the checkpoint."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Full (unsharded) shape of a tensor, or None when the checkpoint lacks it."""
        raise NotImplementedError

    def read(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, end) of the full tensor; the whole tensor when dim is None."""
        raise NotImplementedError

    def source_name(self, name: str) -> str:
        """The tensor's name in the checkpoint's own format, for error messages."""
        return name

    def ggml_type(self, name: str) -> str | None:
        """The GGUF storage type of a tensor ("Q4_1", "F32", ...); None for float checkpoints."""
        return None

    def read_blocks(self, name: str, dim: int | None, start: int, end: int) -> GGMLBlocks:
        """Rows or columns [start, end) as the file stores them (quantised blocks), without dequantising."""
        raise NotImplementedError(f"{self.format} checkpoints hold no quantised blocks")

    def drop_pages(self) -> None:
        """Let go of the pages of a memory-mapped file read so far (they stay in the page cache; a read
        maps them again), so loading does not hold the whole file resident beside its copies."""

    def read_full(self, name: str) -> torch.Tensor:
        """The whole tensor, merged across shard files (for conversion, not for serving)."""
        dim = parallel_dim(name)
        return self.read(name, dim, 0, 0 if dim is None else self.shape(name)[dim])


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` file through ``weights_only`` unpickling: tensors and plain containers only, so a
    crafted pickle cannot run code; anything else is refused naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} holds objects other than tensors; refusing to unpickle it (weights_only): "
                         f"{first_line[:300]}") from None


def weight_file_in(directory: Path, name: str, source: Path) -> Path:
    """``directory / name`` for a file name read from ``source`` (an index), refused when the name
    leads outside ``directory`` (absolute, ``..``, a drive). Symlinks inside are followed, as the
    Hugging Face cache's snapshot directories need."""
    if not isinstance(name, str):
        raise ValueError(f"{source} names weight file {name!r}, which is not a file name")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (not name or "\x00" in name or posix.is_absolute() or windows.drive or windows.root
            or ".." in posix.parts or ".." in windows.parts):
        raise ValueError(f"{source} names weight file {name[:200]!r}, which is outside {directory}; refusing it")
    return directory / name


def _narrow(tensor: torch.Tensor, dim: int | None, start: int, end: int) -> torch.Tensor:
    return tensor if dim is None else tensor.narrow(dim, start, end - start)


# ---- Meta: params.json + consolidated.NN.pth, one file per model-parallel rank --------------------

class MetaReader(CheckpointReader):
    format = "meta"

    def __init__(self, path: Path):
        self.path, self.name = path, path.name
        files = sorted(path.glob("consolidated.*.pth"))
        if not files:
            raise FileNotFoundError(f"{path} has params.json but no consolidated.NN.pth weight files")
        # mmap: tensors stay in the page cache until a shard is cut from them, so N files cost no RAM.
        self.shards = [_load_tensors(f) for f in files]
        args = ModelArgs.from_params_json(path / "params.json")
        if args.vocab_size <= 0:  # Meta's params.json may say -1: the tokenizer decides
            args = replace(args, vocab_size=self.shape("tok_embeddings.weight")[0])
        if "output.weight" not in self.shards[0]:
            args = replace(args, tie_word_embeddings=True)
        self.args = args
        # Meta's Llama 3 tokenizer appends its special tokens after the BPE ranks.
        facts = llama3_token_facts_for_vocab(args.vocab_size)
        self.bos_token_id = facts.bos_token_id if facts else None
        self.stop_token_ids = list(facts.stop_token_ids) if facts else []

    def names(self) -> list[str]:
        return list(self.shards[0])

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.shards[0]:
            return None
        dim = parallel_dim(name)
        shape = list(self.shards[0][name].shape)
        if dim is not None:
            shape[dim] = sum(shard[name].shape[dim] for shard in self.shards)
        return tuple(shape)

    def read(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        if dim is None or len(self.shards) == 1:
            return _narrow(self.shards[0][name], dim, start, end)
        # Re-shard: take the overlap of [start, end) with each file's piece, so N files -> M ranks
        # copies only what this rank keeps.
        pieces, offset = [], 0
        for shard in self.shards:
            size = shard[name].shape[dim]
            lo, hi = max(start, offset), min(end, offset + size)
            if lo < hi:
                pieces.append(shard[name].narrow(dim, lo - offset, hi - lo))
            offset += size
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


# ---- Hugging Face: config.json + *.safetensors ----------------------------------------------------

_HF_LAYER = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
             "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
             "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}


def _rename(name: str, top: dict[str, str], layer_pattern: str, layer: dict[str, str], template: str) -> str:
    """One tensor name in another format's words: a top-level name by ``top``, a per-layer name
    (``layer_pattern`` captures the layer index and the part ``layer`` maps) into ``template``;
    anything else unchanged (the loader then reports it as unexpected)."""
    if name in top:
        return top[name]
    match = re.fullmatch(layer_pattern, name)
    if match and match.group(2) in layer:
        return template.format(match.group(1), layer[match.group(2)])
    return name


_META_TOP_TO_HF = {meta: hf for hf, meta in _HF_TOP.items()}
_META_LAYER_TO_HF = {meta: hf for hf, meta in _HF_LAYER.items()}


def hf_to_meta_name(hf_name: str) -> str:
    return _rename(hf_name, _HF_TOP, r"model\.layers\.(\d+)\.(.+)\.weight", _HF_LAYER, "layers.{}.{}.weight")


def meta_to_hf_name(name: str) -> str:
    return _rename(name, _META_TOP_TO_HF, r"layers\.(\d+)\.(.+)\.weight", _META_LAYER_TO_HF,
                   "model.layers.{}.{}.weight")


def hf_unpermute(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """HF q/k rows -> Meta's: HF reorders each head's rows so rotate_half RoPE sees (first half, second
    half) where Meta's complex RoPE pairs adjacent rows. Works on any whole-head slice of rows."""
    n_heads = w.shape[0] // head_dim
    return w.view(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_permute(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Meta q/k rows -> HF's (what transformers' convert_llama_weights_to_hf does)."""
    n_heads = w.shape[0] // head_dim
    return w.view(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class HFReader(CheckpointReader):
    format = "huggingface"

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        config = json.loads((path / "config.json").read_text())
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()), key=str)
            for name in files:
                weight_file_in(path, name, index)
            missing = [f for f in files if not (path / f).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists {len(missing)} missing file(s), e.g. {path / missing[0]}")
        else:
            files = sorted(f.name for f in path.glob("*.safetensors"))
            if not files:
                hint = " (found PyTorch .bin weights: convert them to safetensors)" if list(
                    path.glob("*.bin")) else ""
                raise FileNotFoundError(f"{path} has config.json but no *.safetensors weights{hint}")
        self.handles = {f: safe_open(str(path / f), framework="pt") for f in files}
        self.where: dict[str, tuple[str, str]] = {}  # meta name -> (file, hf name)
        for f, handle in self.handles.items():
            for hf_name in handle.keys():
                self.where[hf_to_meta_name(hf_name)] = (f, hf_name)
        args = ModelArgs.from_hf_config(config)
        if "output.weight" not in self.where:
            args = replace(args, tie_word_embeddings=True)
        self.args = args
        self.name = config.get("_name_or_path") or path.name
        facts = hf_token_facts(path)
        self.stop_token_ids = list(facts.stop_token_ids)
        self.bos_token_id = facts.bos_token_id

    def names(self) -> list[str]:
        return list(self.where)

    def source_name(self, name: str) -> str:
        return self.where[name][1] if name in self.where else meta_to_hf_name(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.where:
            return None
        f, hf_name = self.where[name]
        return tuple(self.handles[f].get_slice(hf_name).get_shape())

    def read(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        f, hf_name = self.where[name]
        view = self.handles[f].get_slice(hf_name)  # reads only the requested range from disk
        tensor = view[:] if dim is None else view[start:end] if dim == 0 else view[:, start:end]
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            tensor = hf_unpermute(tensor, self.args.head_dim)  # rank shards cut at head boundaries
        return tensor


# ---- GGUF (llama.cpp), Llama architecture ---------------------------------------------------------

_GGUF_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
               "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
               "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_GGUF_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
             "output.weight": "output.weight"}
# Tens of thousands of strings each, of which the model needs only the count.
_GGUF_COUNT_ONLY = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                              "tokenizer.ggml.scores"})


def gguf_to_meta_name(gguf_name: str) -> str:
    return _rename(gguf_name, _GGUF_TOP, r"blk\.(\d+)\.(\w+)\.weight", _GGUF_LAYER, "layers.{}.{}.weight")


class GGUFReader(CheckpointReader):
    format = "gguf"

    def __init__(self, path: Path):
        import gguf

        if path.is_dir():
            (path,) = path.glob("*.gguf")
        self.path = path
        metadata = read_gguf_metadata(path, count_only=_GGUF_COUNT_ONLY)
        self.metadata = metadata
        try:
            self.reader = gguf.GGUFReader(path)  # memory-maps the file; used for the tensors only
        except (IndexError, ValueError, KeyError, OverflowError) as exc:  # what it raises on a bad tensor table
            raise ValueError(f"{path}: the tensor table is not valid GGUF ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from None
        # The parsed fields hold one numpy array per vocabulary string (~150 MB for a 128K vocab);
        # the metadata came from read_gguf_metadata.
        self.reader.fields.clear()
        self.tensors = {gguf_to_meta_name(t.name): t for t in self.reader.tensors}
        rope_freqs = self.tensors.get("rope_freqs.weight")
        factors = None if rope_freqs is None else self._dequantize(rope_freqs).reshape(-1).tolist()
        self.args = ModelArgs.from_gguf(metadata, factors, has_output_weight="output.weight" in self.tensors)
        self.name = str(metadata.get("general.name") or path.stem)
        facts = gguf_token_facts(metadata)
        self.stop_token_ids = list(facts.stop_token_ids)
        self.bos_token_id = facts.bos_token_id

    @staticmethod
    def _dequantize(tensor: Any, rows: slice = slice(None)) -> torch.Tensor:
        """float32 [rows, cols] (or [cols] for a vector) of a GGUF tensor, optionally only some rows."""
        import gguf

        data = tensor.data[rows]  # memory-mapped: [rows, cols] values, or [rows, bytes] of quantised blocks
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            with warnings.catch_warnings():  # read-only mmap: fine, weights are never written
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(data)
        if data.ndim == 1:
            return torch.from_numpy(gguf.quants.dequantize(data, tensor.tensor_type))
        # In row blocks: dequantize's temporaries are several times its output, so a whole embedding
        # at once would spike memory by a few copies of the largest tensor.
        out = torch.empty((data.shape[0], int(tensor.shape[0])), dtype=torch.float32)
        for first in range(0, data.shape[0], 4096):
            block = gguf.quants.dequantize(data[first: first + 4096], tensor.tensor_type)
            out[first: first + 4096] = torch.from_numpy(block)
        return out

    def names(self) -> list[str]:
        return list(self.tensors)

    def drop_pages(self) -> None:
        mapping = getattr(self.reader.data, "_mmap", None)  # np.memmap's mmap.mmap (read-only, shared)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def source_name(self, name: str) -> str:
        return self.tensors[name].name if name in self.tensors else name

    def ggml_type(self, name: str) -> str | None:
        return self.tensors[name].tensor_type.name

    def read_blocks(self, name: str, dim: int | None, start: int, end: int) -> GGMLBlocks:
        tensor = self.tensors[name]
        type_name = tensor.tensor_type.name
        data = tensor.data  # memory-mapped uint8 [rows, bytes of blocks]
        if dim == 0:
            data = data[start:end]
        elif dim == 1:
            data = data[:, column_bytes(type_name, start, end)]
        return GGMLBlocks(type_name, data)

    def shape(self, name: str) -> tuple[int, ...] | None:
        tensor = self.tensors.get(name)
        return None if tensor is None else tuple(int(d) for d in reversed(tensor.shape))

    def read(self, name: str, dim: int | None, start: int, end: int) -> torch.Tensor:
        # llama.cpp's converter already put q/k rows in Meta's interleaved-pair order (it applies
        # the inverse of HF's permutation), which is the order model.py's complex RoPE expects.
        # Quantised blocks run along rows: a row range dequantises alone, columns need whole rows.
        if dim == 0:
            return self._dequantize(self.tensors[name], slice(start, end))
        return _narrow(self._dequantize(self.tensors[name]), dim, start, end)
