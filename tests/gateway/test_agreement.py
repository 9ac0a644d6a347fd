"""Which tokenizer/model pairs the gateway accepts, and how a replica list becomes a gRPC target."""

from __future__ import annotations

import pytest

from gateway.agreement import check_agreement
from gateway.upstream import channel_target

LLAMA3_STOPS = [128001, 128008, 128009]


def test_same_model_agrees():
    agreement = check_agreement(128256, LLAMA3_STOPS, 128256, LLAMA3_STOPS)
    assert agreement.ok and agreement.extra_stop_token_ids == ()


def test_padded_model_vocab_is_accepted():
    # Qwen2-style: 151,665 tokenizer ids, embedding padded to 151,936 rows.
    assert check_agreement(151665, [151643, 151645], 151936, [151643, 151645]).ok


def test_smaller_model_vocab_is_refused():
    agreement = check_agreement(128256, LLAMA3_STOPS, 49152, LLAMA3_STOPS)
    assert not agreement.ok
    assert "128256" in agreement.problems[0] and "49152" in agreement.problems[0]


def test_far_larger_model_vocab_is_refused():
    # SmolLM2's tokenizer in front of a Llama 3 model: not padding, a different model.
    agreement = check_agreement(49152, [2], 128256, LLAMA3_STOPS)
    assert not agreement.ok
    assert any("vocabulary sizes differ" in p for p in agreement.problems)
    assert any("stop token ids differ" in p for p in agreement.problems)


def test_disjoint_stop_ids_are_refused():
    agreement = check_agreement(49152, [2], 49152, [0])
    assert agreement.problems == ("stop token ids differ: the tokenizer stops on [2], the model on [0]",)


def test_stop_id_outside_vocab_is_refused():
    assert not check_agreement(49152, [2, 50000], 49152, [2]).ok


def test_overlapping_stop_ids_pass_on_the_tokenizers_extras():
    agreement = check_agreement(128256, [128009, 128008], 128256, [128001, 128009])
    assert agreement.ok and agreement.extra_stop_token_ids == (128008,)


@pytest.mark.parametrize(("address", "target"), [
    ("localhost:50052", "localhost:50052"),
    ("dns:///model.default.svc:50052", "dns:///model.default.svc:50052"),
    ("127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    (" 127.0.0.1:1 , localhost:2 ", "ipv4:127.0.0.1:1,127.0.0.1:2"),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
])
def test_channel_target(address: str, target: str):
    assert channel_target(address) == target


@pytest.mark.parametrize("address", ["", "127.0.0.1:1,nonsense", "127.0.0.1:1,[::1]:2", "dns:///a:1,dns:///b:2"])
def test_bad_replica_lists(address: str):
    with pytest.raises(ValueError):
        channel_target(address)
