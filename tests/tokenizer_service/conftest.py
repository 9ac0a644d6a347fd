from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.assets import default_model_path, llama3_tokenizer_path
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2_grpc
from tokenizer_service import ChatTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def llama3_path() -> Path:
    return llama3_tokenizer_path()


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def llama3(llama3_path: Path) -> ChatTokenizer:
    return load_tokenizer(llama3_path)


@pytest.fixture(scope="session")
def smollm() -> ChatTokenizer:
    return load_tokenizer(None)


def _serve(*args: str) -> Iterator[tuple[ServiceProcess, tokenizer_pb2_grpc.TokenizerServiceStub]]:
    with ServiceProcess("tokenizer_service", *args) as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            yield process, tokenizer_pb2_grpc.TokenizerServiceStub(channel)


@pytest.fixture(scope="session")
def llama3_server(llama3_path: Path) -> Iterator[tuple[ServiceProcess, tokenizer_pb2_grpc.TokenizerServiceStub]]:
    """A real server on Meta's tokenizer.model, with a small input limit to exercise it."""
    yield from _serve("--tokenizer", str(llama3_path), "--max-input-chars", "500000", "--log-level", "debug")


@pytest.fixture(scope="session")
def smollm_server() -> Iterator[tuple[ServiceProcess, tokenizer_pb2_grpc.TokenizerServiceStub]]:
    """A real server on the embedded default model (no --tokenizer)."""
    yield from _serve("--log-level", "debug")
