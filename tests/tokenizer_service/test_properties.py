"""Round trips and streaming decode, as properties over arbitrary text and arbitrary splits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tokenizer_service import ChatTokenizer
from tokenizer_service.patterns import GPT2_PATTERN
from tokenizer_service.vocab_files import vocab_from_gguf

FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
# Bytes the SmolLM2 vocab has no token for are dropped (as Hugging Face drops them), so its round
# trip holds for text without them.
SMOLLM_DROPPED = {"\x04", "\x06", "\x13", "\x14", "\x16", "\x1d"}


def _smollm_encodable(text: str) -> bool:
    return not any(char in SMOLLM_DROPPED or 0x40000 <= ord(char) <= 0xBFFFF for char in text)


@pytest.fixture(params=["llama3", "smollm"])
def tokenizer(request: pytest.FixtureRequest) -> ChatTokenizer:
    return request.getfixturevalue(request.param)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.text(max_size=400))
def test_decode_encode_round_trip(tokenizer: ChatTokenizer, text: str) -> None:
    assume(tokenizer.chat_format != "jinja" or _smollm_encodable(text))
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=4, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.integers(25_001, 60_000), st.sampled_from([" ", "\n", "\t", " \n", "\u3000"]), st.text(max_size=20))
def test_round_trip_of_long_whitespace_runs(llama3: ChatTokenizer, length: int, unit: str, around: str) -> None:
    text = around + (unit * length)[:length] + around
    assert llama3.decode(llama3.encode(text)) == text


@settings(max_examples=3, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.text(min_size=1, max_size=50), st.integers(400_001, 450_000))
def test_round_trip_over_400k_characters(llama3: ChatTokenizer, unit: str, length: int) -> None:
    text = (unit * (length // len(unit) + 1))[:length]
    assert llama3.decode(llama3.encode(text)) == text


def _stream(tokenizer: ChatTokenizer, ids: list[int], cuts: list[int], skip_special: bool = False) -> list[str]:
    """Push ``ids`` in slices cut at ``cuts``; every delta, then the final flush."""
    decoder = tokenizer.stream_decoder(skip_special_tokens=skip_special)
    bounds = [0, *sorted(c % (len(ids) + 1) for c in cuts), len(ids)]
    deltas = [decoder.push(ids[start:end]) for start, end in zip(bounds, bounds[1:], strict=False)]
    return [*deltas, decoder.flush()]


def _assert_whole_utf8(deltas: list[str]) -> None:
    for delta in deltas:
        delta.encode("utf-8")  # a lone surrogate or a torn character cannot encode
        assert "\ufffd" not in delta


# Multi-byte characters that the vocabularies split over several tokens.
MULTIBYTE = st.text(alphabet=st.sampled_from(list("😀👍🏽🇫🇷👨‍👩‍👧漢字龘𠀀한글é ab\n")), min_size=1, max_size=40)


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(MULTIBYTE, st.lists(st.integers(0, 200), max_size=8))
def test_stream_deltas_are_whole_utf8_and_add_up_to_decode(tokenizer: ChatTokenizer, text: str, cuts: list[int]) -> None:
    ids = tokenizer.encode(text)
    deltas = _stream(tokenizer, ids, cuts)
    _assert_whole_utf8(deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text


def test_emoji_is_held_back_until_complete(llama3: ChatTokenizer, smollm: ChatTokenizer) -> None:
    for tokenizer in (llama3, smollm):
        ids = tokenizer.encode("🦙")
        assert len(ids) > 1  # the llama emoji takes several byte-level tokens in both vocabularies
        decoder = tokenizer.stream_decoder()
        assert [decoder.push([token_id]) for token_id in ids] == [""] * (len(ids) - 1) + ["🦙"]


@settings(max_examples=80, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.data(), st.lists(st.integers(0, 200), max_size=8), st.booleans())
def test_stream_of_arbitrary_ids_adds_up_to_decode(tokenizer: ChatTokenizer, data: st.DataObject,
                                                   cuts: list[int], skip_special: bool) -> None:
    # Random ids include broken UTF-8 and special tokens: deltas still add up to Decode.
    ids = data.draw(st.lists(st.integers(0, tokenizer.vocab_size - 1), max_size=30))
    deltas = _stream(tokenizer, ids, cuts, skip_special)
    for delta in deltas:
        delta.encode("utf-8")
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special)


@pytest.fixture(scope="module")
def gpt2_pattern(smollm_path: Path) -> ChatTokenizer:
    """SmolLM2's vocabulary under GPT-2's pre-tokenizer: the third pattern word-gap splits serve."""
    return ChatTokenizer(dataclasses.replace(vocab_from_gguf(smollm_path), pattern=GPT2_PATTERN))


WORDY = st.lists(st.sampled_from(list("ab Z é漢Ω  \t\n\r12'.,-_!") + ["'s", "'ll", "<|eot_id|>", "<|im_end|>"]),
                 max_size=40).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.one_of(WORDY, st.text(max_size=80)), st.integers(1, 12), st.booleans(), st.booleans())
def test_word_gap_splits_do_not_change_ids(llama3: ChatTokenizer, smollm: ChatTokenizer, gpt2_pattern: ChatTokenizer,
                                           text: str, split_chars: int, allow_special: bool, bos: bool) -> None:
    for tokenizer in (llama3, smollm, gpt2_pattern) if _smollm_encodable(text) else (llama3,):
        plan = tokenizer.encode_plan(text, add_bos=bos, allow_special=allow_special, split_chars=split_chars)
        ids = [part for piece in plan for part in ([piece] if isinstance(piece, int) else tokenizer.encode_ordinary(piece))]
        assert ids == tokenizer.encode(text, add_bos=bos, allow_special=allow_special)


def test_word_gap_splits_happen(llama3: ChatTokenizer) -> None:
    text = "Some words, then more words.\n" * 100
    plan = llama3.encode_plan(text, split_chars=100)
    assert len(plan) > 20 and "".join(plan) == text
    assert all(part.startswith(" ") for part in plan[1:])
