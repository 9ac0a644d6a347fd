"""Flags become typed, frozen configs at the entry point, and no flag is dropped on the way."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.__main__ import GatewayConfig
from gateway.__main__ import parse_args as gateway_args
from gateway.request import Limits
from llama_grpc_runtime.flags import ServerConfig, from_flags
from model_service.server import ModelServiceConfig
from model_service.server import parse_args as model_args
from tokenizer_service.__main__ import parser as tokenizer_parser


def names(cls: type) -> set[str]:
    return {field.name for field in dataclasses.fields(cls)}


def test_the_server_config_takes_every_common_flag_with_the_flags_defaults() -> None:
    args = tokenizer_parser().parse_args(["--port", "7", "--grace-period", "2.5", "--open-reflection"])
    config = from_flags(ServerConfig, args)
    assert (config.port, config.grace_period, config.open_reflection) == (7, 2.5, True)
    # A config made without flags listens as the flags' defaults do (but on no fixed port).
    defaults = from_flags(ServerConfig, tokenizer_parser().parse_args([]))
    assert dataclasses.replace(defaults, port=0, metrics_port=0) == ServerConfig()


def test_the_model_config_carries_every_model_flag() -> None:
    args = model_args(["--max-batch-size", "3", "--tls-cert", "c", "--tls-key", "k", "--seed", "9"])
    config = ModelServiceConfig.from_args(args)
    assert vars(args).keys() == (names(ModelServiceConfig) - {"server"}) | names(ServerConfig)
    assert (config.max_batch_size, config.seed, config.server.tls_cert) == (3, 9, "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 2  # type: ignore[misc]


def test_the_gateway_config_carries_every_gateway_flag() -> None:
    args = gateway_args(["--max-messages", "5", "--model-address", "a:1,b:2", "--upstream-tls-ca", "ca.pem"])
    config = GatewayConfig.from_args(args)
    upstream_flags = {"upstream_tls_ca", "upstream_tls_cert", "upstream_tls_key", "upstream_auth_token_file"}
    served = names(GatewayConfig) - {"server", "limits", "security"}
    from_model = {"vocab_size", "max_seq_len"}  # learnt from the model service, not flags
    assert vars(args).keys() == served | names(ServerConfig) | (names(Limits) - from_model) | upstream_flags
    assert (config.limits.max_messages, config.model_address, config.security.tls_ca) == (5, "a:1,b:2", "ca.pem")
