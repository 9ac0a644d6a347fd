"""SmolLM2's GGUF tokenizer run by tiktoken == Hugging Face ``tokenizers`` on the same vocab/merges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Regex, pre_tokenizers, processors

from tests.tokenizer_service.hf_reference import gguf_fields, hf_llama3_split_regex, hf_tokenizer_from_gguf
from tokenizer_service import ChatTokenizer, UnsupportedTokenizer, load_tokenizer
from tokenizer_service.vocab_files import vocab_from_gguf

CORPUS = [
    # prose
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they've said I'd go.",
    "Mr. O'Neil's   well-known   \"quotes\" -- and em—dashes… (parentheses) [brackets] {braces}!?",
    "THE END. the end. The End.   Trailing spaces   \n",
    # code
    'def fib(n: int) -> int:\n    """Doc."""\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n',
    "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i * 31337); }\r\n\t\t// tabs\r\n",
    "<html><body class='x'>&amp; &#x1F600;</body></html>\n$ ls -la | grep '^d' > /dev/null 2>&1",
    "x=1234567890; y = 3.14159e-10; z = 0xDEADBEEF; 1,000,000.00 12:30:45 2024-01-01",
    # Unicode
    "日本語のテキストと中文文本，한국어 텍스트。",
    "Emoji: 😀👍🏽👨‍👩‍👧‍👦🇫🇷 and ZWJ sequences; ñ, é (e\u0301), Å, ß, ﬁ, Ω, ∑, ∫, ≠",
    "العربية עברית हिन्दी ไทย Ελληνικά Русский текст",
    "\u200b\u200c\u200d\ufeff zero-width \u00a0no-break\u2009thin\u3000ideographic",
    "Supplementary planes: \U00010348 \U0001F9E0 \U00020000 \U0002A6D6 \U000E0001",
    # code points whose UTF-8 lead byte has no token (0xf1, 0xf2), and the ones beside them that do
    "\U00040000\U0007FFFF\U00080000\U000BFFFF|\U000C0000\U000F0000\U0010FFFF",
    # control bytes: every C0 control, DEL, C1 controls
    "".join(chr(c) for c in range(32)) + "\x7f" + "".join(chr(c) for c in range(0x80, 0xA0)),
    "a\x04b\x06c\x13d\x14e\x16f\x1dg \x04\x04 \x1d1\x062",
    # whitespace, short and long
    " \t\n\r\x0b\x0c \n\n\n    \t\t",
    " " * 3000 + "x" + "\n" * 2000 + "y" + "\t " * 1500,
    " " * 30_000 + "after thirty thousand spaces",
    "word " * 2000,
    "a" * 30_000,
    "",
]

# Bytes with no token of their own in SmolLM2's vocab (measured; the issue lists the same 21).
MISSING_BYTES = {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1} | set(range(0xF1, 0x100)) - {0xF3, 0xF4}


@pytest.fixture(scope="module")
def hf(smollm_path: Path):
    return hf_tokenizer_from_gguf(smollm_path)


def test_vocabulary_facts(smollm: ChatTokenizer, smollm_path: Path) -> None:
    vocab = vocab_from_gguf(smollm_path)
    assert smollm.vocab_size == 49152
    assert (smollm.bos_token_id, smollm.eos_token_id, smollm.stop_token_ids) == (1, 2, [2])
    assert smollm.special_tokens["<|im_start|>"] == 1 and smollm.special_tokens["<|im_end|>"] == 2
    assert len(smollm.special_tokens) == 17  # the control tokens 0..16
    assert {b for b in range(256) if bytes([b]) not in vocab.mergeable_ranks} == MISSING_BYTES
    assert smollm.chat_format == "jinja"


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_hugging_face(smollm: ChatTokenizer, hf, text: str) -> None:
    expected = hf.encode(text, add_special_tokens=False).ids
    assert smollm.encode(text) == expected
    assert smollm.decode(expected) == hf.decode(expected, skip_special_tokens=False)


def test_special_token_text_matches_hugging_face_only_when_allowed(smollm: ChatTokenizer, hf) -> None:
    text = "<|im_start|>user\nhi<|im_end|>\n<repo_name>x<file_sep>"
    assert smollm.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids
    plain = smollm.encode(text)
    assert not any(smollm.is_special(token_id) for token_id in plain)
    assert smollm.decode(plain) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_ids_match_hugging_face_on_arbitrary_text(smollm: ChatTokenizer, hf, text: str) -> None:
    assert smollm.encode(text) == hf.encode(text, add_special_tokens=False).ids


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 49151), max_size=40), st.booleans())
def test_decode_matches_hugging_face(smollm: ChatTokenizer, hf, ids: list[int], skip_special: bool) -> None:
    assert smollm.decode(ids, skip_special_tokens=skip_special) == hf.decode(ids, skip_special_tokens=skip_special)


# Hugging Face directories: the pre-tokenizer shapes byte-level BPEs use, each saved as tokenizer.json.
PRE_TOKENIZERS = {
    "digits+bytelevel": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "bytelevel": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "split+bytelevel": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Split(hf_llama3_split_regex(), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
}


def _hf_dir(tmp_path: Path, hf, smollm_path: Path, pre_tokenizer) -> Path:
    hf.pre_tokenizer = pre_tokenizer
    hf.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
              "chat_template": gguf_fields(smollm_path)["chat_template"]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return tmp_path


@pytest.mark.parametrize("shape", PRE_TOKENIZERS)
def test_hugging_face_directory(tmp_path: Path, smollm_path: Path, smollm: ChatTokenizer, shape: str) -> None:
    hf = hf_tokenizer_from_gguf.__wrapped__(smollm_path)  # a private copy: its pre-tokenizer changes
    directory = _hf_dir(tmp_path, hf, smollm_path, PRE_TOKENIZERS[shape]())
    tokenizer = load_tokenizer(directory)
    assert (tokenizer.vocab_size, tokenizer.bos_token_id, tokenizer.eos_token_id) == (49152, 1, 2)
    assert tokenizer.stop_token_ids == [0, 2]
    assert not tokenizer.add_bos_token  # no add_bos_token and no post-processor: HF adds nothing either
    for text in CORPUS:
        assert tokenizer.encode(text) == hf.encode(text, add_special_tokens=False).ids, text[:40]
    messages = [("user", "What is 2+2?"), ("assistant", "4"), ("user", "And 3+3?")]
    assert tokenizer.apply_chat_template(messages) == smollm.apply_chat_template(messages)


@pytest.mark.parametrize("config_flag", [None, True, False])
def test_bos_follows_the_hugging_face_post_processor(tmp_path: Path, smollm_path: Path, config_flag) -> None:
    hf = hf_tokenizer_from_gguf.__wrapped__(smollm_path)
    hf.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    directory = _hf_dir(tmp_path, hf, smollm_path, PRE_TOKENIZERS["digits+bytelevel"]())
    if config_flag is not None:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": config_flag}))
    tokenizer = load_tokenizer(directory)
    hf_adds = hf.encode("Hello world").ids[0] == 1
    assert hf_adds and tokenizer.add_bos_token == (config_flag is not False)
    if tokenizer.add_bos_token:
        assert tokenizer.encode("Hello world", add_bos=True) == hf.encode("Hello world").ids


def test_unsupported_pre_tokenizer_is_refused(tmp_path: Path, smollm_path: Path) -> None:
    hf = hf_tokenizer_from_gguf.__wrapped__(smollm_path)
    _hf_dir(tmp_path, hf, smollm_path, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s+"), behavior="removed"), pre_tokenizers.ByteLevel(use_regex=False)]))
    with pytest.raises(UnsupportedTokenizer, match="pre-tokenizer"):
        load_tokenizer(tmp_path)


def test_unknown_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.gguf")
    with pytest.raises(UnsupportedTokenizer, match="neither"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("not base64 ranks\n")
    with pytest.raises(UnsupportedTokenizer, match="tiktoken"):
        load_tokenizer(tmp_path)
