"""Checkpoint loading: format detection, what each format declares, sharded safetensors, conversion,
the checkpoint tool's CLI, errors a person can act on, and peak memory while loading."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama_grpc_devtools.make_checkpoint import write_checkpoint
from model_service.args import ModelArgs
from model_service.build import build, parameter_count
from model_service.checkpoint import detect_format
from model_service.model import Batch

PROMPT = torch.arange(1, 13)


def prompt_logits(path: Path, **kwargs) -> torch.Tensor:
    model = build(path, max_batch_size=1, max_seq_len=32, **kwargs).model
    return model(Batch(PROMPT, [0], [0], [len(PROMPT)]), all_logits=True)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- detection and what each format declares ------------------------------------------------------

def test_format_is_detected_from_the_path(tiny_checkpoints):
    assert detect_format(tiny_checkpoints["meta"]) == "meta"
    assert detect_format(tiny_checkpoints["hf"]) == "huggingface"
    assert detect_format(tiny_checkpoints["hf"] / "config.json") == "huggingface"
    assert detect_format(tiny_checkpoints["gguf"]) == "gguf"
    assert detect_format(tiny_checkpoints["gguf"].parent) == "gguf"  # a directory with one .gguf file


@pytest.mark.parametrize("fmt", ["meta", "meta2", "hf", "gguf"])
def test_info_is_what_the_checkpoint_declares(fmt, tiny_checkpoints):
    loaded = build(tiny_checkpoints[fmt], max_batch_size=2, max_seq_len=100)
    info, args = loaded.info, loaded.args
    assert info.format == {"meta2": "meta", "hf": "huggingface"}.get(fmt, fmt)
    # Tiny vocab 512 follows Llama 3's layout: 256 special tokens after the BPE ranks.
    assert info.bos_token_id == 256 and info.stop_token_ids == [257, 264, 265]
    assert info.vocab_size == 512 and info.max_seq_len == 100 and info.tp_size == 1
    assert (info.dtype, info.device) == ("float32", "cpu")
    assert args.use_scaled_rope and args.rope_scaling_factor == 8.0 and args.kv_heads == 2
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert info.parameter_count == n_params == parameter_count(args)
    cache = loaded.model.layers[0].attention.cache
    # 2 sequences of 100 tokens: 7 blocks of 16 each, and the spare block no table names (model.KVCache)
    assert cache.k.shape == (2 * 7 + 1, 16, 2, 16)
    assert info.kv_cache_tokens == 2 * 7 * 16 and info.kv_block_size == 16


def test_serving_length_is_capped_by_the_checkpoint_context(tmp_path):
    path = write_checkpoint(tmp_path / "hf", "hf", args=ModelArgs(
        dim=32, n_layers=1, n_heads=2, vocab_size=64, multiple_of=16, max_seq_len=48))
    assert build(path, max_batch_size=1, max_seq_len=1000).info.max_seq_len == 48
    assert build(path, max_batch_size=1, max_seq_len=None).info.max_seq_len == 48


def test_hf_stop_tokens_come_from_generation_config(tiny_checkpoints, tmp_path):
    path = copy(tiny_checkpoints["hf"], tmp_path / "hf")
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 5]}))
    info = build(path, max_batch_size=1, max_seq_len=8).info
    assert (info.bos_token_id, info.stop_token_ids) == (1, [2, 5])
    (path / "generation_config.json").unlink()  # falls back to config.json's eos_token_id
    config = json.loads((path / "config.json").read_text())
    config["eos_token_id"] = 9
    (path / "config.json").write_text(json.dumps(config))
    assert build(path, max_batch_size=1, max_seq_len=8).info.stop_token_ids == [9]


def test_sharded_safetensors_with_index_load_the_same(tiny_checkpoints, tmp_path):
    sharded = write_checkpoint(tmp_path / "sharded", "hf", preset="tiny", seed=7, dtype=torch.float32,
                               max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(prompt_logits(sharded), prompt_logits(tiny_checkpoints["hf"]))


def test_tied_embeddings_load_without_an_output_tensor(tmp_path):
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=512, multiple_of=16, tie_word_embeddings=True)
    for fmt in ("hf", "meta", "gguf"):
        loaded = build(write_checkpoint(tmp_path / fmt, fmt, args=args, seed=1), max_batch_size=1, max_seq_len=8)
        model = loaded.model
        assert loaded.args.tie_word_embeddings
        assert model.output.weight is model.tok_embeddings.weight, fmt


def test_bf16_checkpoint_converted_between_formats_keeps_its_logits(tiny_checkpoints, tmp_path):
    hf = write_checkpoint(tmp_path / "hf", "hf", preset="tiny", seed=3, dtype=torch.bfloat16)
    meta = write_checkpoint(tmp_path / "meta", "meta", source=hf, dtype=torch.bfloat16, shards=2)
    gguf = write_checkpoint(tmp_path / "g.gguf", "gguf", source=meta)
    back = write_checkpoint(tmp_path / "hf2", "hf", source=gguf, dtype=torch.bfloat16)
    expected = prompt_logits(hf)
    for path in (meta, gguf, back):
        assert torch.equal(prompt_logits(path), expected), path
    assert build(back, max_batch_size=1, max_seq_len=8).info.stop_token_ids == [257, 264, 265]


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llama_grpc_devtools.make_checkpoint", "--preset", "tiny", "--format",
                          "meta", "--shards", "2", str(tmp_path / "ckpt")], capture_output=True, text=True, check=True)
    path = Path(out.stdout.strip())
    assert sorted(p.name for p in path.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    assert build(path, max_batch_size=1, max_seq_len=8).info.format == "meta"


# ---- errors a person can act on -------------------------------------------------------------------

def test_missing_checkpoint_and_missing_weight_files(tmp_path, tiny_checkpoints):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build(tmp_path / "nope", max_batch_size=1, max_seq_len=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="params.json.*config.json.*gguf"):
        build(tmp_path / "empty", max_batch_size=1, max_seq_len=8)
    meta = copy(tiny_checkpoints["meta"], tmp_path / "meta")
    (meta / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match=r"no consolidated\.NN\.pth"):
        build(meta, max_batch_size=1, max_seq_len=8)
    hf = copy(tiny_checkpoints["hf"], tmp_path / "hf")
    (hf / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        build(hf, max_batch_size=1, max_seq_len=8)


def test_index_naming_a_missing_shard(tmp_path):
    sharded = write_checkpoint(tmp_path / "sharded", "hf", preset="tiny", max_shard_bytes=100_000)
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        build(sharded, max_batch_size=1, max_seq_len=8)


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes))


def test_shape_mismatch_names_the_tensor(tiny_checkpoints, tmp_path):
    path = copy(tiny_checkpoints["hf"], tmp_path / "hf")
    edit_config(path, intermediate_size=256)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight has shape .*256"):
        build(path, max_batch_size=1, max_seq_len=8)


def test_vocab_mismatch(tiny_checkpoints, tmp_path):
    path = copy(tiny_checkpoints["hf"], tmp_path / "hf")
    edit_config(path, vocab_size=1024)
    with pytest.raises(ValueError, match=r"vocab size mismatch: tensor model\.embed_tokens\.weight"):
        build(path, max_batch_size=1, max_seq_len=8)
    with pytest.raises(ValueError, match="tokenizer has 128256 tokens but the model .* only 512"):
        build(tiny_checkpoints["hf"], max_batch_size=1, max_seq_len=8, tokenizer_vocab_size=128256)


def test_tensors_of_another_architecture_are_reported(tiny_checkpoints, tmp_path):
    path = copy(tiny_checkpoints["hf"], tmp_path / "hf")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(weights, path / "model.safetensors")
    with pytest.raises(ValueError, match=r"does not have.*q_proj\.bias"):
        build(path, max_batch_size=1, max_seq_len=8)


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="model_type='qwen2'"):
        ModelArgs.from_hf_config({"model_type": "qwen2"})
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        ModelArgs.from_hf_config({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 8,
                                  "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="architecture is 'gemma'"):
        ModelArgs.from_gguf({"general.architecture": "gemma"}, None, True)


def test_float16_on_cpu_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="not supported on CPU; use float32 or bfloat16"):
        build(tiny_checkpoints["hf"], dtype="float16", max_batch_size=1, max_seq_len=8)


# ---- memory ---------------------------------------------------------------------------------------

_MEASURE = """
import sys, torch
from model_service.build import build
from model_service.model import Batch
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
before = status("VmRSS")
model = build(sys.argv[1], max_batch_size=1, max_seq_len=8).model
model(Batch(torch.tensor([1, 2]), [0], [0], [2]))  # touch every weight (mmap'd ones page in only now)
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("fmt", ["hf", "meta", "gguf"])
def test_loading_peaks_near_one_copy_of_the_weights(fmt, tmp_path):
    # ~130 MB of float32 weights; reading them all and then copying them into the model would peak
    # near 2x, converting through a second dtype near 3x.
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256)
    path = write_checkpoint(tmp_path / fmt, fmt, args=args, dtype=torch.float32)
    weight_kb = parameter_count(args) * 4 / 1024
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True)
    growth_kb = int(out.stdout.split()[-1])
    assert 0.5 * weight_kb < growth_kb < 1.3 * weight_kb, f"peak grew {growth_kb / weight_kb:.2f}x the weights"


_MEASURE_PACKED = """
import sys
from model_service.build import build
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
before = status("VmRSS")
model = build(sys.argv[1], max_batch_size=1, max_seq_len=8).model
packed = sum(b.nbytes for n, b in model.named_buffers() if ".cache." not in n) + sum(p.nbytes for p in model.parameters())
maps = open("/proc/self/maps").read()
print(sys.argv[1] in maps, status("VmHWM") - before, packed // 1024)
"""


def test_loading_a_quantised_gguf_peaks_near_its_packed_weights(tmp_path):
    """Served as stored (Q4_1 int4, Q8_0 embedding, the output requantised per row in slices): loading
    holds the packed copies, not the file's pages beside them nor float copies of whole tensors
    (measured: peak growth 3.3x the packed weights; 7x when the output layer was dequantised whole and
    the mapping kept every page read), and unmaps the file."""
    args = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32768, multiple_of=256)
    path = write_checkpoint(tmp_path / "q4.gguf", "gguf", args=args, dtype=torch.float32, gguf_type="Q4_1")
    out = subprocess.run([sys.executable, "-c", _MEASURE_PACKED, str(path)], capture_output=True, text=True,
                         check=True)
    mapped, growth_kb, packed_kb = out.stdout.split()[-3:]
    assert mapped == "False"
    assert int(growth_kb) < 4 * int(packed_kb), f"peak grew {int(growth_kb) / int(packed_kb):.2f}x the packed weights"


# ---- hostile files -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors",
                                  "..\\x.safetensors", "C:\\x.safetensors", "\\\\server\\share\\x.safetensors"])
def test_index_naming_a_file_outside_the_checkpoint_is_refused(tmp_path, name):
    sharded = write_checkpoint(tmp_path / "ckpt" / "sharded", "hf", preset="tiny", max_shard_bytes=100_000)
    # The file exists where the name points: only the name's escape can be the reason for refusing it.
    shutil.copy(next(sharded.glob("model-*.safetensors")), tmp_path / "ckpt" / "outside.safetensors")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = name
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json names weight file .* outside"):
        build(sharded, max_batch_size=1, max_seq_len=8)


def test_symlinked_weight_files_load_as_in_the_hugging_face_cache(tiny_checkpoints, tmp_path):
    """The hub cache's snapshot holds symlinks into ../../blobs: followed, not refused."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    shutil.copytree(tiny_checkpoints["hf"], blobs)
    snapshot.mkdir(parents=True)
    for file in blobs.iterdir():
        (snapshot / file.name).symlink_to(Path("../..") / "blobs" / file.name)
    assert torch.equal(prompt_logits(snapshot), prompt_logits(tiny_checkpoints["hf"]))


class _RunsCode:
    """Unpickling this calls os.system: what a malicious .pth file does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_without_running_it(tiny_checkpoints, tmp_path):
    meta = copy(tiny_checkpoints["meta"], tmp_path / "meta")
    marker = tmp_path / "pwned"
    weights = torch.load(meta / "consolidated.00.pth", weights_only=True)
    torch.save({**weights, "payload": _RunsCode(marker)}, meta / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth holds objects other than tensors; refusing"):
        build(meta, max_batch_size=1, max_seq_len=8)
    assert not marker.exists()
    # The same file through plain pickle semantics would have run the payload: the test's file is real.
    torch.load(meta / "consolidated.00.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("tensor_table", ["count beyond the file", "dimensions beyond the file"])
def test_a_gguf_tensor_table_that_does_not_fit_is_a_clear_error(tmp_path, tensor_table):
    """Metadata that reads fine, then a tensor table claiming more than the file holds."""
    import struct

    def string(text: str) -> bytes:
        return struct.pack("<Q", len(text)) + text.encode()

    metadata = string("general.architecture") + struct.pack("<I", 8) + string("llama")
    count, table = (1 << 40, b"") if tensor_table == "count beyond the file" else (
        1, string("token_embd.weight") + struct.pack("<I", 1 << 31))
    path = tmp_path / "hostile.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, count, 1) + metadata + table + b"\0" * 64)
    with pytest.raises(ValueError, match=r"hostile\.gguf: the tensor table is not valid GGUF"):
        build(path, max_batch_size=1, max_seq_len=8)
