"""The tokenizer service: Llama 3 tiktoken and models' own byte-level BPEs, chat formats, over gRPC.

Core API (plain Python, no protobuf), used by the servicer and by other services' tests:

    tokenizer = load_tokenizer(path)          # None: the embedded default model; a ChatTokenizer
    ids = tokenizer.encode("Hello", add_bos=True)
    prompt = tokenizer.apply_chat_template([("user", "Hi")])   # ChatPrompt(token_ids, text)
    decoder = tokenizer.stream_decoder(); text = decoder.push(ids) + decoder.flush()
"""

from .chat import ChatTokenizer
from .chat_format import ChatPrompt
from .loader import load_tokenizer
from .tokenizer import StreamDecoder, Tokenizer
from .vocabulary import UnsupportedTokenizer, Vocabulary

__all__ = ["ChatPrompt", "ChatTokenizer", "StreamDecoder", "Tokenizer", "UnsupportedTokenizer", "Vocabulary",
           "load_tokenizer"]
