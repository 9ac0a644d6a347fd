"""The Go client example: generated from protos/, built offline against Debian's Go packages, run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest

from tests import REPO

from .conftest import Stack
from .test_clients import CITY_SCHEMA

GOCODE = Path("/usr/share/gocode/src")
NEEDED = ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc")
pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in NEEDED)
    or not (GOCODE / "google.golang.org/grpc").is_dir()
    or not (GOCODE / "github.com/golang/protobuf/proto/registry.go").exists(),  # the 1.5 package
    reason="needs Debian's golang-go, protobuf-compiler, protoc-gen-go, protoc-gen-go-grpc, "
           "golang-google-grpc-dev, golang-github-golang-protobuf-1-5-dev (see examples/go/README.md)")


def test_go_client_streams_an_answer(stack: Stack, tmp_path: Path):
    gopath = tmp_path / "gopath"
    source = gopath / "src/github.com/llama-grpc/llama-grpc"
    built = {REPO / "examples/go/gen", REPO / "examples/go/chat"}  # a local generate/build, if any
    shutil.copytree(REPO / "examples/go", source,
                    ignore=lambda folder, names: [n for n in names if Path(folder, n) in built])
    protos = source / "protos"
    shutil.copytree(REPO / "protos/llama", protos / "llama")
    script = (source / "generate.sh").read_text().replace("../../protos", str(protos))
    (source / "generate.sh").write_text(script)
    subprocess.run(["bash", "generate.sh"], cwd=source, check=True, capture_output=True, timeout=60)
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": f"{gopath}:/usr/share/gocode", "GOFLAGS": ""}
    build = subprocess.run(["go", "build", "-o", "chat", "./cmd/chat"], cwd=source, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    result = subprocess.run([str(source / "chat"), "-address", stack.gateway.address, "-temperature", "0",
                             "What is the capital of France?"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "FINISH_REASON_STOP_TOKEN: 37 prompt + 7 generated tokens" in result.stderr
    structured = subprocess.run([str(source / "chat"), "-address", stack.gateway.address, "-temperature", "0",
                                 "-max-new-tokens", "60", "-json-schema", json.dumps(CITY_SCHEMA),
                                 "Where is the Louvre?"], capture_output=True, text=True, timeout=120)
    assert structured.returncode == 0, structured.stderr
    jsonschema.validate(json.loads(structured.stdout), CITY_SCHEMA)
    assert "FINISH_REASON_STOP_TOKEN" in structured.stderr
