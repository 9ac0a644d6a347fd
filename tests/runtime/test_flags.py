"""Every tokenizer-service flag has an env twin; an explicit flag beats it; --help lists both."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests import REPO
from tokenizer_service.__main__ import parser

TWINS = {
    "--host": ("LLAMA_TOKENIZER_HOST", "127.0.0.2", "host", "127.0.0.2"),
    "--port": ("LLAMA_TOKENIZER_PORT", "6001", "port", 6001),
    "--metrics-port": ("LLAMA_TOKENIZER_METRICS_PORT", "0", "metrics_port", 0),
    "--log-level": ("LLAMA_TOKENIZER_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    "--grace-period": ("LLAMA_TOKENIZER_GRACE_PERIOD", "2.5", "grace_period", 2.5),
    "--tls-cert": ("LLAMA_TOKENIZER_TLS_CERT", "/certs/tls.crt", "tls_cert", "/certs/tls.crt"),
    "--tls-key": ("LLAMA_TOKENIZER_TLS_KEY", "/certs/tls.key", "tls_key", "/certs/tls.key"),
    "--tls-client-ca": ("LLAMA_TOKENIZER_TLS_CLIENT_CA", "/certs/ca.crt", "tls_client_ca", "/certs/ca.crt"),
    "--auth-token-file": ("LLAMA_TOKENIZER_AUTH_TOKEN_FILE", "/run/tokens", "auth_token_file", "/run/tokens"),
    "--max-message-bytes": ("LLAMA_TOKENIZER_MAX_MESSAGE_BYTES", "1024", "max_message_bytes", 1024),
    "--max-concurrent-rpcs": ("LLAMA_TOKENIZER_MAX_CONCURRENT_RPCS", "5", "max_concurrent_rpcs", 5),
    "--stall-timeout": ("LLAMA_TOKENIZER_STALL_TIMEOUT", "1.5", "stall_timeout", 1.5),
    "--tokenizer": ("LLAMA_TOKENIZER_PATH", "/models/llama3", "tokenizer", "/models/llama3"),
    "--max-input-chars": ("LLAMA_TOKENIZER_MAX_INPUT_CHARS", "1234", "max_input_chars", 1234),
    "--threads": ("LLAMA_TOKENIZER_THREADS", "3", "threads", 3),
    "--max-decode-ids": ("LLAMA_TOKENIZER_MAX_DECODE_IDS", "77", "max_decode_ids", 77),
    "--max-chat-messages": ("LLAMA_TOKENIZER_MAX_CHAT_MESSAGES", "9", "max_chat_messages", 9),
    "--chat-template-workers": ("LLAMA_TOKENIZER_CHAT_TEMPLATE_WORKERS", "3", "chat_template_workers", 3),
    "--chat-template-timeout": ("LLAMA_TOKENIZER_CHAT_TEMPLATE_TIMEOUT", "2.5", "chat_template_timeout", 2.5),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for env, *_ in TWINS.values():
        monkeypatch.delenv(env, raising=False)


def test_defaults_match_the_contract() -> None:
    args = parser().parse_args([])
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", 50051, 9091)
    assert (args.log_level, args.grace_period, args.tokenizer) == ("info", 30.0, None)
    assert (args.chat_template_workers, args.chat_template_timeout) == (2, 10.0)


@pytest.mark.parametrize("flag", TWINS)
def test_env_twin_sets_the_flag_and_the_flag_wins(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    env, raw, dest, value = TWINS[flag]
    monkeypatch.setenv(env, raw)
    assert getattr(parser().parse_args([]), dest) == value
    explicit = {"--log-level": "error", "--port": "7", "--metrics-port": "8", "--grace-period": "9.5",
                "--max-input-chars": "10", "--threads": "2", "--max-message-bytes": "11",
                "--max-concurrent-rpcs": "12", "--stall-timeout": "13.0", "--max-decode-ids": "14",
                "--max-chat-messages": "15", "--chat-template-workers": "4",
                "--chat-template-timeout": "16.0"}.get(flag, "/explicit")
    assert str(getattr(parser().parse_args([flag, explicit]), dest)) == explicit


def test_open_reflection_env_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parser().parse_args([]).open_reflection is False
    monkeypatch.setenv("LLAMA_TOKENIZER_OPEN_REFLECTION", "true")
    assert parser().parse_args([]).open_reflection is True


def test_invalid_env_value_is_an_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("LLAMA_TOKENIZER_PORT", "fifty")
    with pytest.raises(SystemExit):
        parser()
    assert "LLAMA_TOKENIZER_PORT" in capsys.readouterr().err


def test_help_lists_every_flag_and_its_env_twin() -> None:
    done = subprocess.run([sys.executable, "-m", "tokenizer_service", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True)
    text = " ".join(done.stdout.split())
    for flag, (env, *_) in TWINS.items():
        assert flag in text and f"env: {env}" in text
