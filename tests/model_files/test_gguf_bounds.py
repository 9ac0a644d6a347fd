"""The GGUF metadata reader on hostile files: every count is checked against the file's size before
anything is allocated, nesting is bounded, and each refusal says what and where. A well-formed file
written here reads the same as through the gguf package's own reader."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import pytest

from model_files.gguf_metadata import MAX_NESTING, GGUFError, read_gguf_metadata

UINT32, INT32, FLOAT32, STRING, ARRAY = 4, 5, 6, 8, 9


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def key_value(key: str, value_type: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", value_type) + payload


def gguf_file(path: Path, *pairs: bytes, kv_count: int | None = None) -> Path:
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(pairs) if kv_count is None else kv_count)
    path.write_bytes(header + b"".join(pairs))
    return path


def array(item_type: int, count: int, items: bytes = b"") -> bytes:
    return struct.pack("<IQ", item_type, count) + items


def test_a_well_formed_file_reads_as_the_gguf_package_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_uint32("llama.context_length", 4096)
    writer.add_float32("llama.rope.freq_base", 500000.0)
    writer.add_string("tokenizer.chat_template", "{{ messages }} \u00e9\U0001F600")
    writer.add_array("tokenizer.ggml.tokens", ["a", "bc", "", "\u00e9"])
    writer.add_array("tokenizer.ggml.token_type", [1, 3, 1, 1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    ours = read_gguf_metadata(path)
    theirs = gguf.GGUFReader(str(path)).fields
    assert ours["general.architecture"] == "llama"
    assert ours["llama.context_length"] == int(theirs["llama.context_length"].parts[-1][0]) == 4096
    assert ours["llama.rope.freq_base"] == float(theirs["llama.rope.freq_base"].parts[-1][0])
    assert ours["tokenizer.chat_template"] == "{{ messages }} \u00e9\U0001F600"
    tokens = theirs["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.tokens"] == [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert ours["tokenizer.ggml.token_type"] == [1, 3, 1, 1]


HOSTILE = {
    "scalar array larger than the file": (key_value("a", ARRAY, array(UINT32, 1 << 60)), "an array at offset"),
    "string array larger than the file": (key_value("a", ARRAY, array(STRING, 1 << 40)), "claims 1099511627776 items"),
    "string longer than the file": (key_value("a", STRING, struct.pack("<Q", 1 << 62)), "a string at offset"),
    "key longer than the file": (struct.pack("<Q", 1 << 50), "a string at offset"),
    "array of arrays larger than the file": (key_value("a", ARRAY, array(ARRAY, 1 << 50)), "of at least 12 byte(s)"),
    "nested too deep": (key_value("a", ARRAY, array(ARRAY, 1, array(ARRAY, 1, array(ARRAY, 1, array(
        ARRAY, 1, array(ARRAY, 1, array(UINT32, 0))))))), f"nested more than {MAX_NESTING} deep"),
    "unknown item type": (key_value("a", ARRAY, array(77, 1)), "unknown GGUF value type 77"),
    "unknown value type": (key_value("a", 99, b""), "unknown GGUF value type 99"),
}


@pytest.mark.timeout(60)  # without the checks some of these loop 2^40 times or allocate exabytes
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_metadata_is_refused_without_a_memory_bomb(tmp_path: Path, case: str) -> None:
    pair, message = HOSTILE[case]
    path = gguf_file(tmp_path / "hostile.gguf", pair, b"\0" * 1000)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as caught:
            read_gguf_metadata(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert peak < 1 << 20  # nothing was built from the bogus counts


def test_a_key_value_count_beyond_the_file_is_refused(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "many.gguf", key_value("a", UINT32, struct.pack("<I", 1)), kv_count=1 << 62)
    with pytest.raises(GGUFError, match="the key/value count at offset 24 claims"):
        read_gguf_metadata(path)


def test_nesting_up_to_the_limit_is_read(tmp_path: Path) -> None:
    nested = array(INT32, 2, struct.pack("<ii", -1, 7))
    for _ in range(MAX_NESTING - 1):
        nested = array(ARRAY, 1, nested)
    path = gguf_file(tmp_path / "nested.gguf", key_value("a", ARRAY, nested))
    value = read_gguf_metadata(path)["a"]
    for _ in range(MAX_NESTING - 1):
        (value,) = value
    assert value == [-1, 7]


def test_count_only_arrays_are_bounded_too(tmp_path: Path) -> None:
    path = gguf_file(tmp_path / "count.gguf", key_value("tokenizer.ggml.tokens", ARRAY, array(STRING, 1 << 40)))
    with pytest.raises(GGUFError, match="claims 1099511627776 items"):
        read_gguf_metadata(path, count_only=frozenset({"tokenizer.ggml.tokens"}))
    ok = gguf_file(tmp_path / "ok.gguf", key_value("tokenizer.ggml.tokens", ARRAY, array(STRING, 2, string("a") + string("bc"))))
    assert read_gguf_metadata(ok, count_only=frozenset({"tokenizer.ggml.tokens"}))["tokenizer.ggml.tokens"] == range(2)
