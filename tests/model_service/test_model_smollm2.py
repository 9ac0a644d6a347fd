"""The real embedded model, SmolLM2-135M-Instruct (Q4_1 GGUF), answers like HF transformers and
llama.cpp do on the same file. Token ids come from the file's own tokenizer through transformers."""

from __future__ import annotations

import pytest
import torch

from llama_grpc_runtime.assets import default_model_path
from model_service.build import build
from model_service.model import Batch

transformers = pytest.importorskip("transformers")

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    path = default_model_path()  # fetched once into the cache (CI caches it)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


# quantize None: the file's own Q4_1 / Q8_0 blocks in packed int4 / int8 linears (what `make run` serves);
# "none": dequantised to float; "int8": re-quantised per row from the dequantised weights.
@pytest.mark.parametrize(("dtype", "quantize"), [("float32", None), ("bfloat16", None), ("float32", "none"),
                                                 ("bfloat16", "none"), ("float32", "int8")])
def test_smollm2_greedy_answer(tokenizer, dtype, quantize):
    loaded = build(None, dtype=dtype, max_batch_size=1, max_seq_len=128, quantize=quantize)
    info, model = loaded.info, loaded.model
    assert ("int4 (Q4_1 as stored) x210" in info.quantization) == (quantize is None)
    assert (info.format, info.vocab_size, info.bos_token_id, info.stop_token_ids) == ("gguf", 49152, 1, [2])
    args = loaded.args  # the facts about this file
    assert (args.n_layers, args.dim, args.n_heads, args.kv_heads, args.ffn_hidden_dim) == (30, 576, 9, 3, 1536)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0

    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    generated: list[int] = []
    logits = model(Batch(torch.tensor(prompt), [0], [0], [len(prompt)]))
    while len(generated) < 12:
        generated.append(int(logits[0].argmax()))
        if generated[-1] in info.stop_token_ids:
            break
        logits = model(Batch(torch.tensor(generated[-1:]), [0], [len(prompt) + len(generated) - 1], [1]))
    text = tokenizer.decode(generated, skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris."), text
    assert generated[-1] in info.stop_token_ids  # and then it stops, with the stop token the file declares
