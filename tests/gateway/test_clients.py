"""The clients a user runs: the Python CLI, Meta's examples, the Node.js client, and the stack launcher."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests import REPO

from .conftest import Stack

PARIS_ANSWER = "The capital of France is Paris."
# The structured-output call the Node and Go examples make (tests/gateway/test_go_client.py too).
CITY_SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                "country": {"enum": ["France", "Italy", "Spain"]}},
               "required": ["city", "country"], "additionalProperties": False}


def run(*command: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_cli_chat_streams_and_reports_usage(stack: Stack):
    result = run(sys.executable, "-m", "gateway.client", "chat", "What is the capital of France?",
                 "--temperature", "0", "--address", stack.gateway.address)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PARIS_ANSWER
    assert "[stop_token: 37 prompt + 7 generated tokens, first token" in result.stderr
    assert "request id " in result.stderr


def test_cli_complete_json_lines(stack: Stack):
    result = run(sys.executable, "-m", "gateway.client", "complete", "1, 2, 3, 4,", "--temperature", "0",
                 "--max-new-tokens", "30", "--stop", "\\n", "--stop", " 8,", "--json", "--unary",
                 "--address", stack.gateway.address)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    response, summary = lines
    assert response["text"] == " 5, 6, 7,"
    assert response["finishReason"] == "FINISH_REASON_STOP_SEQUENCE" and response["stopSequence"] == " 8,"
    assert summary["usage"] == response["usage"] and summary["timing"]["totalSeconds"] > 0


def test_cli_reports_errors_without_traceback(stack: Stack):
    result = run(sys.executable, "-m", "gateway.client", "chat", "Hi", "--top-p", "2", "--address",
                 stack.gateway.address)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: INVALID_ARGUMENT: sampling.top_p: must lie in (0, 1], got 2.0"


def test_meta_examples_through_the_gateway(stack: Stack):
    chat = run(sys.executable, "examples/example_chat_completion.py", "--address", stack.gateway.address,
               "--max-gen-len", "6", "--seed", "1")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("> Assistant: ") == 4 and chat.stdout.count("=" * 34) == 4
    for text in ("User: what is the recipe of mayonnaise?", "User: What is so great about #1?",
                 "System: Always answer with Haiku", "System: Always answer with emojis"):
        assert text in chat.stdout
    text = run(sys.executable, "examples/example_text_completion.py", "--address", stack.gateway.address,
               "--max-gen-len", "6", "--seed", "1")
    assert text.returncode == 0, text.stderr
    assert text.stdout.count("\n> ") == 4
    assert text.stdout.startswith("I believe the meaning of life is\n> ")
    assert "cheese =>\n> " in text.stdout


@pytest.mark.skipif(shutil.which("node") is None or not (REPO / "node_modules" / "@grpc" / "grpc-js").exists(),
                    reason="needs node and `make node`")
def test_node_client_streams_an_answer(stack: Stack):
    result = run("node", "examples/node/chat.js", "--address", stack.gateway.address, "--temperature", "0",
                 "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == PARIS_ANSWER
    assert "FINISH_REASON_STOP_TOKEN: 37 prompt + 7 generated tokens" in result.stderr


@pytest.mark.skipif(shutil.which("node") is None or not (REPO / "node_modules" / "@grpc" / "grpc-js").exists(),
                    reason="needs node and `make node`")
def test_node_client_structured_output(stack: Stack):
    import jsonschema

    result = run("node", "examples/node/chat.js", "--address", stack.gateway.address, "--temperature", "0",
                 "--max-new-tokens", "60", "--json-schema", json.dumps(CITY_SCHEMA), "Where is the Louvre?")
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), CITY_SCHEMA)
    assert "FINISH_REASON_STOP_TOKEN" in result.stderr


def _three_free_ports() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + 2 > 65535:
            continue
        try:
            sockets = []
            for port in (base, base + 1, base + 2):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError("no three consecutive free ports")


def _stack(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llama_grpc_devtools.stack", "--base-port", str(_three_free_ports()),
                             "--metrics-base-port", "0", *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_banner(process: subprocess.Popen, timeout: float = 300) -> tuple[str, list[str], list[str]]:
    """(gateway address, log lines before the banner, the banner's lines) once the stack serves."""
    lines = []
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if "llama-grpc is serving" in line:
            banner = [next(process.stdout) for _ in range(7)]
            return banner[0].split()[1], lines, banner
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError("the stack did not serve:\n" + "".join(lines[-30:]) + process.stderr.read())


def _interrupt(process: subprocess.Popen) -> str:
    """Ctrl-C the stack; return its stderr."""
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    return stderr


def test_stack_serves_and_stops_cleanly_on_ctrl_c():
    process = _stack()
    try:
        address, lines, banner = _wait_for_banner(process)
        assert run(sys.executable, "-m", "gateway.client", "chat", "What is the capital of France?",
                   "--temperature", "0", "--address", address).stdout.strip() == PARIS_ANSWER
        assert any("chat \"What is the capital of France?\"" in line for line in banner)
        stderr = _interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert "stack: stopped (tokenizer 0, model 0, gateway 0)" in stderr
    # The services' logs come through, one compact line each, prefixed by the service.
    assert any(line.lstrip().startswith("model | info    serving") for line in lines), lines[-20:]


def test_stack_on_a_meta_llama3_directory(tmp_path):
    """--checkpoint points all three at a Meta-format directory: Llama 3 tokenizer, chat format, stops."""
    from llama_grpc_devtools.make_checkpoint import write_checkpoint
    from llama_grpc_runtime.assets import llama3_tokenizer_path
    from model_service.args import ModelArgs

    # Random weights, real Llama 3 vocabulary (128,256 ids) and tokenizer.model beside them.
    tiny = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    checkpoint = write_checkpoint(tmp_path / "Meta-Llama-3-tiny", "meta", args=tiny)
    shutil.copy(llama3_tokenizer_path(), checkpoint / "tokenizer.model")
    process = _stack("--checkpoint", str(checkpoint))
    try:
        address, _, _ = _wait_for_banner(process)
        with grpc.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            info = stub.GetInfo(gateway_pb2.GetInfoRequest(), timeout=30)
            assert (info.model.checkpoint_format, info.tokenizer.chat_format) == ("meta", "llama3")
            assert list(info.model.stop_token_ids) == [128001, 128008, 128009]
            dialog = [common_pb2.Message(role="system", content="This is a test sentence."),
                      common_pb2.Message(role="user", content="This is a response.")]
            # Meta's golden ids for this dialog (the reference's test_tokenizer.py).
            assert list(stub.Tokenize(gateway_pb2.TokenizeRequest(messages=dialog), timeout=30).token_ids) == [
                128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
            # A text prompt starts with <|begin_of_text|>, as the reference's text_completion.
            assert info.tokenizer.add_bos_token
            assert list(stub.Tokenize(gateway_pb2.TokenizeRequest(text="Hello world"), timeout=30).token_ids) == [
                128000, 9906, 1917]
            reply = stub.Generate(gateway_pb2.GenerateRequest(
                messages=dialog, sampling=common_pb2.SamplingParams(temperature=0),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=8)), timeout=60)
            assert reply.usage.prompt_tokens == 26 and 1 <= reply.usage.generated_tokens <= 8
        stderr = _interrupt(process)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr


def test_stack_stops_everything_when_one_service_dies(tmp_path):
    process = _stack("--checkpoint", str(tmp_path / "missing.gguf"))
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 1
    assert "service exited with code" in stderr and "stopping the others" in stderr
    assert "stack: stopped (" in stderr
