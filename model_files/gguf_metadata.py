"""Read the key/value metadata of a GGUF file (architecture, tokenizer, chat template), not its tensors.

The one metadata reader: the tokenizer service builds its vocabulary from it, the model service its
``ModelArgs`` and stop tokens (the tensors it reads with the ``gguf`` package).

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", a uint32
version (2 or 3), uint64 tensor and key/value counts, then the key/value pairs, little-endian. The
metadata sits at the start of the file, so reading it costs milliseconds whatever the model's size;
the ``gguf`` package's reader maps every tensor too, which takes seconds.

A model file may be hostile, so every count is checked against the bytes left in the file before
anything is allocated or looped over (an array of 2^60 items in a 1 KB file is an error, not a
memory bomb), and arrays nest at most ``MAX_NESTING`` levels deep.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

# GGUF value type -> struct format of a scalar of that type.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
MAX_NESTING = 4  # arrays of arrays: real files use none; a deeper one is refused
# The fewest bytes an item of each non-scalar type takes: a string its length, an array its header.
_MIN_BYTES = {_STRING: 8, _ARRAY: 12}
_MIN_KEY_VALUE_BYTES = 8 + 4 + 1  # key length, value type, the smallest value


class GGUFError(ValueError):
    pass


class _Cursor:
    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return value

    def need(self, count: int, item_bytes: int, what: str) -> None:
        """``count`` items of at least ``item_bytes`` bytes must fit in what is left of the file."""
        left = len(self.data) - self.offset
        if count * item_bytes > left:
            raise GGUFError(f"{what} at offset {self.offset} claims {count} items of at least {item_bytes} "
                            f"byte(s), but only {left} bytes remain in the file")

    def array_header(self, depth: int) -> tuple[int, int, int]:
        """(item type, count, bytes per item or the least an item takes), checked against the file."""
        if depth >= MAX_NESTING:
            raise GGUFError(f"arrays nested more than {MAX_NESTING} deep at offset {self.offset}")
        item_type, count = self.unpack("I"), self.unpack("Q")
        if item_type in _SCALARS:
            size = struct.calcsize(_SCALARS[item_type])
        elif item_type in _MIN_BYTES:
            size = _MIN_BYTES[item_type]
        else:
            raise GGUFError(f"unknown GGUF value type {item_type} in an array at offset {self.offset}")
        self.need(count, size, "an array")
        return item_type, count, size

    def string(self) -> str:
        length = self.unpack("Q")
        self.need(length, 1, "a string")
        raw = self.data[self.offset:self.offset + length]
        self.offset += length
        # Vocab strings are UTF-8; a tokenizer with raw byte tokens would store them escaped.
        return raw.decode("utf-8", errors="surrogateescape")

    def skip_array(self, depth: int = 0) -> int:
        """Step over an array without decoding its items; return its length."""
        item_type, count, size = self.array_header(depth)
        if item_type in _SCALARS:
            self.offset += count * size
        elif item_type == _STRING:
            for _ in range(count):
                length = self.unpack("Q")  # (not `offset += unpack()`: unpack moves the offset first)
                self.need(length, 1, "a string")
                self.offset += length
        else:
            for _ in range(count):
                self.skip_array(depth + 1)
        return count

    def value(self, value_type: int, depth: int = 0) -> Any:
        if value_type in _SCALARS:
            return self.unpack(_SCALARS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY:
            item_type, count, size = self.array_header(depth)
            if item_type in _SCALARS:
                values = list(struct.unpack_from(f"<{count}{_SCALARS[item_type]}", self.data, self.offset))
                self.offset += count * size
                return values
            return [self.value(item_type, depth + 1) for _ in range(count)]
        raise GGUFError(f"unknown GGUF value type {value_type} at offset {self.offset}")


def read_gguf_metadata(path: str | Path, count_only: frozenset[str] = frozenset()) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (``tokenizer.ggml.tokens``, ``general.architecture``, ...).

    Arrays named in ``count_only`` are not decoded: their value is ``range(length)`` (the model
    service needs the vocabulary's size, not its 128K strings)."""
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data)
        try:
            if data[:4] != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (magic {bytes(data[:4])!r})")
            cursor.offset = 4
            version = cursor.unpack("I")
            if version not in (2, 3):
                raise GGUFError(f"{path}: GGUF version {version} is not supported (2 or 3)")
            cursor.unpack("Q")  # tensor count: the tensors are not read here
            kv_count = cursor.unpack("Q")
            cursor.need(kv_count, _MIN_KEY_VALUE_BYTES, "the key/value count")
            metadata: dict[str, Any] = {}
            for _ in range(kv_count):
                key = cursor.string()
                value_type = cursor.unpack("I")
                if key in count_only and value_type == _ARRAY:
                    metadata[key] = range(cursor.skip_array())
                else:
                    metadata[key] = cursor.value(value_type)
            return metadata
        except struct.error as exc:
            raise GGUFError(f"{path}: truncated GGUF metadata ({exc})") from exc
        except GGUFError as exc:
            if str(exc).startswith(str(path)):
                raise
            raise GGUFError(f"{path}: {exc}") from None
