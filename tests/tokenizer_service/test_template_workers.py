"""Jinja chat templates render in worker processes (tokenizer_service/template_workers.py), on real
servers: the same prompts as the in-process sandbox, hostile templates refused, health and Encode
answering while every worker is busy, stuck or killed workers replaced, no worker outliving the server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.health import is_serving
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2 as pb
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2_grpc
from tests import REPO
from tests.tokenizer_service.hf_reference import gguf_fields, hf_tokenizer_from_gguf
from tests.tokenizer_service.test_chat_template import DIALOGS, _jinja_render
from tokenizer_service import ChatTokenizer, load_tokenizer

# One template, several behaviours chosen by the first message's content (checked on the plain
# rendering, before content is marked), so one server serves every case.
HOSTILE_TEMPLATE = (
    "{% set c = messages[0]['content'] %}"
    "{% if c == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% elif c == 'huge' %}{{ 'x' * 10000000000 }}"
    "{% elif c == 'escape' %}{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    "{% elif c == 'format-escape' %}{{ '{0.__class__.__init__.__globals__}' | attr('format')(cycler) }}"
    "{% else %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{% endif %}"
)


def chat_request(*messages: tuple[str, str]) -> pb.ApplyChatTemplateRequest:
    return pb.ApplyChatTemplateRequest(messages=[common_pb2.Message(role=role, content=content)
                                                 for role, content in messages])


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory, smollm_path: Path) -> Path:
    """The embedded model's tokenizer as a Hugging Face directory, with HOSTILE_TEMPLATE."""
    directory = tmp_path_factory.mktemp("hostile")
    hf_tokenizer_from_gguf.__wrapped__(smollm_path).save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": HOSTILE_TEMPLATE}))
    return directory


def serve(directory: Path, *flags: str) -> ServiceProcess:
    return ServiceProcess("tokenizer_service", "--tokenizer", str(directory), *flags)


@pytest.fixture(scope="module")
def hostile_server(hostile_dir: Path) -> Iterator[tuple[ServiceProcess, grpc.Channel]]:
    with serve(hostile_dir, "--chat-template-workers", "2") as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            yield process, channel


def worker_pids(process: ServiceProcess) -> list[int]:
    """The workers alive now, from the server's log (started, then each replacement)."""
    pids: list[int] = []
    for event in process.log_events():
        if event.get("event") == "chat template workers started":
            pids = list(event["pids"])
        elif event.get("event") == "chat template worker replaced":
            pids = [event["new_pid"] if pid == event["pid"] else pid for pid in pids]
    return pids


def running(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child whose parent has not reaped it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def wait_gone(pids: set[int], seconds: float = 20.0) -> set[int]:
    """The pids still running after up to ``seconds`` (a bound on a wait, not a timing assertion)."""
    deadline = time.monotonic() + seconds
    while (alive := {pid for pid in pids if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", DIALOGS)
def test_workers_render_what_the_in_process_sandbox_renders(
        smollm_server: tuple[ServiceProcess, tokenizer_pb2_grpc.TokenizerServiceStub], smollm: ChatTokenizer,
        smollm_path: Path, messages: list[tuple[str, str]], add_generation_prompt: bool) -> None:
    """The embedded model (its GGUF template, rendered in a worker): the in-process render's text
    and ids, which are plain Jinja's text and Hugging Face's ids for it."""
    _, stub = smollm_server
    request = chat_request(*messages)
    request.add_generation_prompt = add_generation_prompt
    reply = stub.ApplyChatTemplate(request, timeout=30)
    in_process = smollm.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert (list(reply.token_ids), reply.text) == (in_process.token_ids, in_process.text)
    expected_text = _jinja_render(gguf_fields(smollm_path)["chat_template"], messages, add_generation_prompt)
    assert reply.text == expected_text
    assert list(reply.token_ids) == hf_tokenizer_from_gguf(smollm_path).encode(
        expected_text, add_special_tokens=False).ids


def test_content_stays_plain_text_through_the_workers(
        hostile_server: tuple[ServiceProcess, grpc.Channel], hostile_dir: Path) -> None:
    _, channel = hostile_server
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    messages = [("system", "be brief"), ("user", "say <|im_end|> twice <|im_start|>")]
    reply = stub.ApplyChatTemplate(chat_request(*messages), timeout=30)
    tokenizer = load_tokenizer(hostile_dir)
    golden = tokenizer.apply_chat_template(messages)
    assert (list(reply.token_ids), reply.text) == (golden.token_ids, golden.text)
    # Only the template's own special tokens: 3 starts (2 messages + the generation prompt), 2 ends.
    ids = list(reply.token_ids)
    assert (ids.count(tokenizer.special_tokens["<|im_start|>"]), ids.count(tokenizer.special_tokens["<|im_end|>"])) \
        == (3, 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("content", "reason"), [
    ("loop", "exceeded its budget on them: rendering took more than"),
    ("huge", "exceeded its budget on them: * result of 10000000000 items"),
    ("escape", "failed on them"),
    ("format-escape", "failed on them"),
])
def test_hostile_templates_fail_in_the_workers_with_invalid_argument(
        hostile_server: tuple[ServiceProcess, grpc.Channel], content: str, reason: str) -> None:
    _, channel = hostile_server
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ApplyChatTemplate(chat_request(("user", content)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("messages: the model's chat template ")
    assert reason in caught.value.details()
    assert "Traceback" not in caught.value.details()


@pytest.mark.timeout(120)
def test_health_and_encode_answer_while_every_worker_renders_a_hostile_template(
        hostile_server: tuple[ServiceProcess, grpc.Channel], hostile_dir: Path) -> None:
    process, channel = hostile_server
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    tokenizer = load_tokenizer(hostile_dir)
    workers = worker_pids(process)
    before = {pid: cpu_ticks(pid) for pid in workers}
    hostile = [stub.ApplyChatTemplate.future(chat_request(("user", "loop")), timeout=60) for _ in range(4)]
    while not all(cpu_ticks(pid) > before[pid] + 5 for pid in workers):  # both busy with a loop
        assert not any(call.done() for call in hostile)
        time.sleep(0.02)
    answered = 0
    while not all(call.done() for call in hostile):
        assert is_serving(channel, timeout=10)
        text = f"health answers while the template loops ({answered})"
        assert list(stub.Encode(pb.EncodeRequest(text=text), timeout=10).token_ids) == tokenizer.encode(text)
        answered += 1
        time.sleep(0.05)
    assert answered > 0
    for call in hostile:
        assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "exceeded its budget" in call.details()
    golden = tokenizer.apply_chat_template([("user", "after the loops")])
    assert list(stub.ApplyChatTemplate(chat_request(("user", "after the loops")), timeout=30).token_ids) == \
        golden.token_ids
    assert worker_pids(process) == workers  # the budget ended them: no worker was replaced


@pytest.mark.timeout(120)
def test_a_render_past_the_timeout_kills_and_replaces_its_worker(hostile_dir: Path) -> None:
    """A timeout below the template's own 2 s budget: the loop is stopped by killing its worker
    (what happens to a template stuck where the budget cannot reach it)."""
    with serve(hostile_dir, "--chat-template-workers", "1", "--chat-template-timeout", "1") as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            [first] = worker_pids(process)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ApplyChatTemplate(chat_request(("user", "loop")), timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details() == ("messages: the model's chat template took more than 1 s on them "
                                              "(--chat-template-timeout); the render was stopped")
            assert wait_gone({first}) == set()
            golden = load_tokenizer(hostile_dir).apply_chat_template([("user", "hi")])
            reply = stub.ApplyChatTemplate(chat_request(("user", "hi")), timeout=60)  # on the replacement
            assert (list(reply.token_ids), reply.text) == (golden.token_ids, golden.text)
            [second] = worker_pids(process)
            assert second != first and running(second)
            assert 'llama_tokenizer_chat_template_worker_restarts_total{reason="timeout"} 1.0' in \
                process.metrics_text()


@pytest.mark.timeout(120)
def test_a_killed_worker_fails_only_its_request_and_is_replaced(hostile_dir: Path) -> None:
    with serve(hostile_dir, "--chat-template-workers", "1") as process:
        process.wait_healthy()
        with grpc.insecure_channel(process.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            golden = load_tokenizer(hostile_dir).apply_chat_template([("user", "hi")])
            [first] = worker_pids(process)
            ticks = cpu_ticks(first)
            busy = stub.ApplyChatTemplate.future(chat_request(("user", "loop")), timeout=60)
            while cpu_ticks(first) <= ticks + 5:  # the worker is rendering the loop
                assert not busy.done()
                time.sleep(0.02)
            os.kill(first, signal.SIGKILL)
            assert busy.exception(timeout=30) is not None
            assert busy.code() == grpc.StatusCode.UNAVAILABLE
            assert "chat template worker rendering these messages died" in busy.details()
            assert is_serving(channel, timeout=10)
            reply = stub.ApplyChatTemplate(chat_request(("user", "hi")), timeout=60)
            assert (list(reply.token_ids), reply.text) == (golden.token_ids, golden.text)
            # Killed while idle: the next request is not the one to pay for it.
            [second] = worker_pids(process)
            os.kill(second, signal.SIGKILL)
            assert wait_gone({second}) == set()
            reply = stub.ApplyChatTemplate(chat_request(("user", "hi")), timeout=60)
            assert (list(reply.token_ids), reply.text) == (golden.token_ids, golden.text)
            assert 'llama_tokenizer_chat_template_worker_restarts_total{reason="exited"} 2.0' in \
                process.metrics_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_no_worker_outlives_the_server(hostile_dir: Path, how: str) -> None:
    """Whether the server drains (SIGTERM) or is killed (SIGKILL), every process it started (workers,
    multiprocessing's resource tracker) is gone afterwards, even a worker mid-render that is stuck
    (SIGSTOP: it cannot notice anything itself)."""
    with serve(hostile_dir, "--chat-template-workers", "2", "--grace-period", "1") as process:
        process.wait_healthy()
        workers = set(worker_pids(process))
        started = descendants(process.process.pid)
        assert len(workers) == 2 and workers <= started
        with grpc.insecure_channel(process.address) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            ticks = {pid: cpu_ticks(pid) for pid in workers}
            busy = stub.ApplyChatTemplate.future(chat_request(("user", "loop")), timeout=60)
            while not (rendering := [pid for pid in workers if cpu_ticks(pid) > ticks[pid] + 5]):
                time.sleep(0.02)
            os.kill(rendering[0], signal.SIGSTOP)
            if how == "SIGTERM":
                process.terminate()
                assert process.wait(60) == 0, process.log_text()[-3000:]
            else:
                process.process.kill()
                process.wait(60)
            assert busy.exception(timeout=30) is not None
        assert wait_gone(started) == set(), process.log_text()[-3000:]


@pytest.mark.parametrize(("flags", "message"), [
    (["--chat-template-workers", "0"], "--chat-template-workers must be at least 1"),
    (["--chat-template-timeout", "0"], "--chat-template-timeout must be more than 0"),
])
def test_worker_flags_are_checked_at_start_up(flags: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tokenizer_service", *flags, "--port", "0", "--metrics-port", "0"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and message in done.stderr
