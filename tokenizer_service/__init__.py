"""The tokenizer service: Llama 3 tiktoken and models' own byte-level BPEs, chat formats, over gRPC.

Core API (plain Python, no protobuf), used by the servicer and by other services' tests:

    tokenizer = load_tokenizer(path)          # None: the embedded default model
    ids = tokenizer.encode("Hello", add_bos=True)
    prompt = tokenizer.apply_chat_template([("user", "Hi")])   # ChatPrompt(token_ids, text)
    decoder = tokenizer.stream_decoder(); text = decoder.push(ids) + decoder.flush()
"""

from .byte_level import UnsupportedTokenizer, Vocabulary
from .loader import load_tokenizer
from .tokenizer import ChatPrompt, StreamDecoder, Tokenizer

__all__ = ["ChatPrompt", "StreamDecoder", "Tokenizer", "UnsupportedTokenizer", "Vocabulary", "load_tokenizer"]
