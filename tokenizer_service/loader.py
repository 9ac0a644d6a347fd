"""``load_tokenizer(path)``: find out what ``path`` is and build the tokenizer it describes."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from llama_grpc_runtime.assets import default_model_path

from .chat import ChatTokenizer
from .vocab_files import vocab_from_gguf, vocab_from_hf_dir, vocab_from_tiktoken_model
from .vocabulary import UnsupportedTokenizer


def load_tokenizer(path: str | Path | None = None) -> ChatTokenizer:
    """Accepts, detected from what it finds:

    - None: the embedded default model (SmolLM2-135M-Instruct GGUF);
    - a Llama 3 ``tokenizer.model`` file (tiktoken ranks) -> Meta's tokenizer and ChatFormat;
    - a Meta checkpoint directory (holds ``tokenizer.model``);
    - a Hugging Face directory (``tokenizer.json`` + ``tokenizer_config.json``);
    - a ``.gguf`` file (its embedded tokenizer and chat template).

    Raises FileNotFoundError or UnsupportedTokenizer (a ValueError) saying what it found.
    """
    resolved = Path(path).expanduser().resolve() if path is not None else default_model_path()
    stat = resolved.stat() if resolved.exists() else None
    if stat is None:
        raise FileNotFoundError(f"tokenizer path {resolved} does not exist")
    return _load(resolved, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _load(path: Path, mtime_ns: int) -> ChatTokenizer:
    """Tokenizers are immutable: one per file version per process (tests and stacks load them often)."""
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return ChatTokenizer(vocab_from_tiktoken_model(path / "tokenizer.model"))
        if (path / "tokenizer.json").is_file():
            return ChatTokenizer(vocab_from_hf_dir(path))
        if (path / "original" / "tokenizer.model").is_file():  # HF download of a Meta model
            return ChatTokenizer(vocab_from_tiktoken_model(path / "original" / "tokenizer.model"))
        raise UnsupportedTokenizer(f"{path} holds neither tokenizer.model (Meta) nor tokenizer.json (Hugging Face)")
    if path.name == "tokenizer.json":
        return ChatTokenizer(vocab_from_hf_dir(path.parent))
    with open(path, "rb") as file:  # opened once: a named pipe works too
        magic = file.read(4)
        if magic != b"GGUF":
            return ChatTokenizer(vocab_from_tiktoken_model(path, magic + file.read()))
    return ChatTokenizer(vocab_from_gguf(path))
