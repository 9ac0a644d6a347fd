"""Meta's ``example_text_completion.py``, through the gateway instead of an in-process ``Llama``.

The same four prompts and defaults (temperature 0.6, top_p 0.9, 64 new tokens), sent together as the
reference sends one batch, printed the same way:

    python examples/example_text_completion.py [--address localhost:50050] [--temperature 0.6]
        [--top-p 0.9] [--max-gen-len 64] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc

PROMPTS: list[str] = [
    # For these prompts, the expected answer is the natural continuation of the prompt
    "I believe the meaning of life is",
    "Simply put, the theory of relativity states that ",
    """A brief message congratulating the team on the launch:

        Hi everyone,

        I just """,
    # Few shot prompt (providing a few examples before asking model to complete more);
    """Translate English to French:

        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("LLAMA_GATEWAY_ADDRESS", "localhost:50050"))
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-gen-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        futures = [
            stub.Generate.future(gateway_pb2.GenerateRequest(
                prompt=prompt,
                sampling=common_pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=args.max_gen_len),
            ))
            for prompt in PROMPTS
        ]
        try:
            results = [future.result() for future in futures]
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1

    for prompt, result in zip(PROMPTS, results, strict=True):
        print(prompt)
        print(f"> {result.text}")
        print("\n==================================\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
