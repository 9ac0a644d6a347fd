"""The vocabulary as bytes (``GetVocabulary``) and the decoding the gateway does with it.

The truth is tiktoken's own decode (the tokenizer service's ``Decode`` / ``DecodeStream``): the
gateway's ``TokenTable``, built from the bytes the service sends, must give the same text and the
same per-token deltas for any ids, on Meta's Llama 3 ``tokenizer.model`` and on SmolLM2's GGUF vocabulary.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_grpc_runtime.errors import InvalidArgument
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2
from llama_grpc_stubs.tokenizer.v1.tokenizer_pb2_grpc import TokenizerServiceStub
from model_files.detokenize import TokenTable
from tokenizer_service import ChatTokenizer, Tokenizer, Vocabulary
from tokenizer_service.patterns import GPT2_PATTERN
from tokenizer_service.servicer import VOCABULARY_CHUNK_BYTES, TokenizerServicer

FIXTURE_OK = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]


@pytest.fixture(params=["llama3", "smollm"])
def tokenizer(request: pytest.FixtureRequest) -> ChatTokenizer:
    return request.getfixturevalue(request.param)


def table_of(tokenizer: Tokenizer) -> TokenTable:
    return TokenTable(tokenizer.token_bytes(), tokenizer.special_tokens.values())


@pytest.fixture(scope="module")
def tables(llama3: ChatTokenizer, smollm: ChatTokenizer) -> dict[str, TokenTable]:
    return {"llama3": table_of(llama3), "smollm": table_of(smollm)}


def test_every_token_is_its_own_bytes(tokenizer: ChatTokenizer, tables: dict[str, TokenTable]) -> None:
    table = tables["llama3" if tokenizer.vocab_size > 100_000 else "smollm"]
    assert table.vocab_size == tokenizer.vocab_size
    assert not table.holes
    for text, token_id in tokenizer.special_tokens.items():
        assert table.token_bytes[token_id] == text.encode()
    ordinary = [i for i in range(tokenizer.vocab_size) if not tokenizer.is_special(i)]
    assert [table.token_bytes[i] for i in ordinary[:2000]] == [tokenizer.decode_bytes([i]) for i in ordinary[:2000]]


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURE_OK)
@given(st.data(), st.booleans())
def test_the_table_decodes_any_ids_as_tiktoken_does(tokenizer: ChatTokenizer, tables: dict[str, TokenTable],
                                                   data: st.DataObject, skip_special: bool) -> None:
    table = tables["llama3" if tokenizer.vocab_size > 100_000 else "smollm"]
    # Random ids: broken UTF-8, torn characters, special tokens, ids from the top of the vocabulary.
    ids = data.draw(st.lists(st.one_of(st.integers(0, tokenizer.vocab_size - 1),
                                       st.sampled_from(sorted(tokenizer.special_tokens.values()))), max_size=40))
    assert table.decode(ids, skip_special_tokens=skip_special) == tokenizer.decode(ids, skip_special_tokens=skip_special)
    ours, theirs = table.stream_decoder(skip_special_tokens=skip_special), tokenizer.stream_decoder(
        skip_special_tokens=skip_special)
    assert ours.push_each(ids) + [ours.flush()] == [theirs.push([i]) for i in ids] + [theirs.flush()]


def test_text_split_inside_characters_streams_whole(tokenizer: ChatTokenizer, tables: dict[str, TokenTable]) -> None:
    table = tables["llama3" if tokenizer.vocab_size > 100_000 else "smollm"]
    text = "Caf\u00e9 \U0001F999 \u6f22\u5b57 \U0001F468\u200d\U0001F469\u200d\U0001F467 done"
    ids = tokenizer.encode(text)
    deltas = table.stream_decoder().push_each(ids)
    assert "".join(deltas) == text and all("\ufffd" not in delta for delta in deltas)
    assert deltas.count("") > 0  # some characters did span several tokens and were held back


def test_an_id_no_token_has_is_refused_as_the_tokenizer_refuses_it() -> None:
    # A vocabulary with a gap: bytes 0..255, then one special token at 300 (ids 256..299 are holes).
    vocab = Vocabulary(name="gappy", pattern=GPT2_PATTERN, mergeable_ranks={bytes([b]): b for b in range(256)},
                       special_tokens={"<|end|>": 300}, bos_token_id=-1, eos_token_id=300, stop_token_ids=[300])
    tokenizer = Tokenizer(vocab)
    table = table_of(tokenizer)
    assert table.vocab_size == 301 and table.holes == frozenset(range(256, 300))
    assert table.decode([104, 105, 300]) == tokenizer.decode([104, 105, 300]) == "hi<|end|>"
    for ids in ([104, 257], [301], [-1]):
        with pytest.raises(InvalidArgument) as ours:
            table.decode(ids)
        with pytest.raises(InvalidArgument) as theirs:
            tokenizer.decode(ids)
        assert str(ours.value) == str(theirs.value) and ours.value.field.startswith("token_ids[")


def test_get_vocabulary_sends_every_tokens_bytes_in_order(llama3_server, smollm_server,  # noqa: ANN001
                                                          llama3: ChatTokenizer, smollm: ChatTokenizer) -> None:
    for (_, stub), tokenizer in ((llama3_server, llama3), (smollm_server, smollm)):
        stub: TokenizerServiceStub
        chunks = list(stub.GetVocabulary(tokenizer_pb2.GetVocabularyRequest(), timeout=30))
        assert len(chunks) > 1  # chunked: no message near a size limit
        received: list[bytes] = []
        for chunk in chunks:
            assert chunk.first_token_id == len(received)
            assert sum(map(len, chunk.token_bytes)) <= VOCABULARY_CHUNK_BYTES
            received.extend(chunk.token_bytes)
        assert received == tokenizer.token_bytes()
        info = stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest())
        assert len(received) == info.vocab_size
        table = TokenTable(received, info.special_tokens.values())
        ids = tokenizer.encode("Paris \U0001F5FC, caf\u00e9") + [tokenizer.eos_token_id]
        assert table.decode(ids) == stub.Decode(tokenizer_pb2.DecodeRequest(token_ids=ids)).text


def test_get_vocabulary_while_loading_is_unavailable() -> None:
    servicer = TokenizerServicer(max_input_chars=100, threads=1)

    async def first() -> None:
        async for _ in servicer.GetVocabulary(tokenizer_pb2.GetVocabularyRequest(), None):  # type: ignore[arg-type]
            pass

    with pytest.raises(Exception) as error:
        asyncio.run(first())
    assert getattr(error.value, "code", None) == grpc.StatusCode.UNAVAILABLE
