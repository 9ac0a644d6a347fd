"""The real embedded model through the service: SmolLM2-135M-Instruct answers the reference question.

Prompt ids and the decoded answer come from Hugging Face's tokenizer reading the same GGUF file.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llama_grpc_devtools.process import ServiceProcess
from llama_grpc_runtime.assets import default_model_path
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc
from tests.model_service.test_server import generate, greedy, request

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    path = default_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.slow
def test_smollm2_answers_paris_alone_and_in_a_batch(hf_tokenizer):
    prompt = hf_tokenizer.encode(QUESTION, add_special_tokens=False)
    others = [hf_tokenizer.encode(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
              for q in ("Name three colours.", "Count from one to ten.", "What is 2 + 2?")]
    with ServiceProcess("model_service", "--max-seq-len", "256", "--max-batch-size", "4") as proc:
        proc.wait_healthy(timeout=300)
        tokens, responses = asyncio.run(generate(proc.address, request(prompt, **greedy(32))))

        async def batch():
            return await asyncio.gather(*(generate(proc.address, request(p, **greedy(32)))
                                          for p in [others[0], prompt, *others[1:]]))

        in_batch = asyncio.run(batch())[1][0]
        with grpc.insecure_channel(proc.address) as channel:
            info = model_pb2_grpc.ModelServiceStub(channel).GetModelInfo(model_pb2.GetModelInfoRequest())
    # `make run`'s default: the file's own Q4_1 blocks in int4 linears, its Q8_0 embedding in int8.
    assert "int4 (Q4_1 as stored) x210" in info.quantization and "embedding int8 (Q8_0 as stored)" in info.quantization
    assert info.packed_activations == "bfloat16"  # --packed-activations' default
    assert hf_tokenizer.decode(tokens).startswith("The capital of France is Paris.")
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_STOP_TOKEN  # <|im_end|>, not returned
    assert 2 not in tokens
    assert in_batch == tokens
