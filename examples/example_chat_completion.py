"""Meta's ``example_chat_completion.py``, through the gateway instead of an in-process ``Llama``.

The same four dialogs and defaults (temperature 0.6, top_p 0.9, no length limit: chat models stop
by themselves), sent together as the reference sends one batch, printed the same way:

    python examples/example_chat_completion.py [--address localhost:50050] [--temperature 0.6]
        [--top-p 0.9] [--max-gen-len N] [--seed S]
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc

DIALOGS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
    [
        {"role": "user", "content": "I am going to Paris, what should I see?"},
        {
            "role": "assistant",
            "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
        },
        {"role": "user", "content": "What is so great about #1?"},
    ],
    [
        {"role": "system", "content": "Always answer with Haiku"},
        {"role": "user", "content": "I am going to Paris, what should I see?"},
    ],
    [
        {"role": "system", "content": "Always answer with emojis"},
        {"role": "user", "content": "How to go from Beijing to NY?"},
    ],
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=os.environ.get("LLAMA_GATEWAY_ADDRESS", "localhost:50050"))
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--max-gen-len", type=int, default=0, help="0: until the model stops (or its context ends)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        # All dialogs at once, as the reference's batch: the model service batches them continuously.
        futures = [
            stub.Generate.future(gateway_pb2.GenerateRequest(
                messages=[common_pb2.Message(**message) for message in dialog],
                sampling=common_pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
                stopping=common_pb2.StoppingCriteria(max_new_tokens=args.max_gen_len),
            ))
            for dialog in DIALOGS
        ]
        try:
            results = [future.result() for future in futures]
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1

    for dialog, result in zip(DIALOGS, results, strict=True):
        for message in dialog:
            print(f"{message['role'].capitalize()}: {message['content']}\n")
        print(f"> Assistant: {result.text}")
        print("\n==================================\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
