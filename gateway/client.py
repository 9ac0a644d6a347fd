"""``python -m gateway.client``: talk to the gateway from a terminal.

    python -m gateway.client chat "What is the capital of France?" --temperature 0
    python -m gateway.client chat --system "Always answer with Haiku" "I am going to Paris, what should I see?"
    python -m gateway.client chat                       # interactive: one turn per line, history kept
    python -m gateway.client complete "I believe the meaning of life is" --max-new-tokens 64 --stop "\\n"
    python -m gateway.client complete "1, 2, 3," --json  # JSON lines: each response, then a summary

Text streams to stdout as it is generated; the finish reason, token counts and timing go to stderr
at the end (or, with ``--json``, as the last JSON line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", default=os.environ.get("LLAMA_GATEWAY_ADDRESS", "localhost:50050"),
                        help="gateway host:port [env: LLAMA_GATEWAY_ADDRESS] (default: %(default)s)")
    common.add_argument("--tls-ca", default=os.environ.get("LLAMA_CLIENT_TLS_CA"),
                        help="CA (PEM) of the gateway's certificate: call over TLS [env: LLAMA_CLIENT_TLS_CA]")
    common.add_argument("--token-file", default=os.environ.get("LLAMA_CLIENT_TOKEN_FILE"),
                        help="file whose first line is the bearer token to send [env: LLAMA_CLIENT_TOKEN_FILE]")
    sampling = common.add_argument_group("sampling")
    sampling.add_argument("--temperature", type=float, help="0: greedy (default: the server's, 0.6)")
    sampling.add_argument("--top-p", type=float, help="nucleus mass in (0, 1] (default: 0.9)")
    sampling.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens (0: off)")
    sampling.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeats")
    sampling.add_argument("--seed", type=int, help="same seed + same request -> same answer")
    stopping = common.add_argument_group("stopping")
    stopping.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    stopping.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop sequence (repeatable; escapes like \\n are understood)")
    stopping.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                          help="extra stop token id (repeatable)")
    output = common.add_argument_group("output")
    output.add_argument("--logprobs", action="store_true", help="log-probability of each token")
    output.add_argument("--top-logprobs", type=int, default=0, metavar="N", help="N alternatives per token")
    output.add_argument("--echo", action="store_true", help="also return the prompt")
    output.add_argument("--json", action="store_true", help="JSON lines: every response, then a summary")
    output.add_argument("--unary", action="store_true", help="call Generate (one response) instead of GenerateStream")
    output.add_argument("--timeout", type=float, help="deadline in seconds")
    output.add_argument("--request-id", help="x-request-id to send (default: the gateway makes one)")

    parser = argparse.ArgumentParser(prog="python -m gateway.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", parents=[common], help="chat completion (the model's chat format)")
    chat.add_argument("message", nargs="?", help="the user message (omit for an interactive session)")
    chat.add_argument("--system", help="system prompt")
    complete = commands.add_parser("complete", parents=[common],
                                   help="text completion (BOS first where the model adds one, as Llama 3 does)")
    complete.add_argument("prompt", help="text to continue")
    return parser.parse_args(argv)


def unescape(text: str) -> str:
    return text.encode("utf-8").decode("unicode_escape").encode("latin-1").decode("utf-8")


def build_request(args: argparse.Namespace, messages: list[common_pb2.Message] | None) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                           repetition_penalty=args.repetition_penalty, seed=args.seed),
        stopping=common_pb2.StoppingCriteria(max_new_tokens=args.max_new_tokens,
                                             stop_sequences=[unescape(s) for s in args.stop],
                                             stop_token_ids=args.stop_token_id),
        output=common_pb2.OutputOptions(logprobs=args.logprobs, top_logprobs=args.top_logprobs, echo=args.echo),
    )
    if messages is None:
        request.prompt = args.prompt
    else:
        request.messages.extend(messages)
    return request


def call(stub: gateway_pb2_grpc.GatewayServiceStub, request: gateway_pb2.GenerateRequest,
         args: argparse.Namespace) -> Iterator[gateway_pb2.GenerateStreamResponse | gateway_pb2.GenerateResponse]:
    metadata = (("x-request-id", args.request_id),) if args.request_id else ()
    if args.token_file:
        metadata += (("authorization", f"Bearer {Path(args.token_file).read_text().split()[0]}"),)
    if args.unary:
        response, rpc = stub.Generate.with_call(request, timeout=args.timeout, metadata=metadata)
        args.server_request_id = dict(rpc.initial_metadata()).get("x-request-id", "")
        yield response
        return
    stream_request = gateway_pb2.GenerateStreamRequest.FromString(request.SerializeToString())
    responses = stub.GenerateStream(stream_request, timeout=args.timeout, metadata=metadata)
    args.server_request_id = dict(responses.initial_metadata()).get("x-request-id", "")
    yield from responses


def run_one(stub: gateway_pb2_grpc.GatewayServiceStub, request: gateway_pb2.GenerateRequest,
            args: argparse.Namespace) -> str:
    """Send one request, print as it streams; return the generated text."""
    args.server_request_id = ""
    started = time.perf_counter()
    first_token_at = None
    text, last = [], None
    for response in call(stub, request, args):
        if first_token_at is None and response.token_ids:
            first_token_at = time.perf_counter()
        if args.json:
            print(json.dumps(MessageToDict(response), ensure_ascii=False), flush=True)
        else:
            if response.prompt_text:
                sys.stdout.write(f"\x1b[2m{response.prompt_text}\x1b[0m" if sys.stdout.isatty() else response.prompt_text)
            sys.stdout.write(response.text)
            sys.stdout.flush()
        text.append(response.text)
        last = response
    total = time.perf_counter() - started
    generated = last.usage.generated_tokens if last else 0
    decode_time = total - (first_token_at - started) if first_token_at else 0.0
    if args.unary:  # one response: no first-token time, the rate is over the whole call
        first_token_at = None
        rate = generated / total if generated else None
    else:  # after the first token: the steady generation rate
        rate = (generated - 1) / decode_time if generated > 1 and decode_time > 0 else None
    timing = {
        "firstTokenSeconds": round(first_token_at - started, 4) if first_token_at else None,
        "totalSeconds": round(total, 4),
        "tokensPerSecond": round(rate, 2) if rate else None,
    }
    finish = common_pb2.FinishReason.Name(last.finish_reason) if last else "none"
    if args.json:
        print(json.dumps({"requestId": args.server_request_id, "finishReason": finish,
                          "usage": MessageToDict(last.usage) if last else {}, "timing": timing}), flush=True)
    else:
        stop = f" {last.stop_sequence!r}" if last and last.stop_sequence else ""
        rate = f", {timing['tokensPerSecond']} tokens/s" if timing["tokensPerSecond"] else ""
        first = f", first token {timing['firstTokenSeconds']} s" if timing["firstTokenSeconds"] else ""
        print(flush=True)  # end the answer's line on stdout
        print(f"[{finish.removeprefix('FINISH_REASON_').lower()}{stop}: {last.usage.prompt_tokens if last else 0} "
              f"prompt + {generated} generated tokens{first}, total {timing['totalSeconds']} s{rate}; "
              f"request id {args.server_request_id}]", file=sys.stderr, flush=True)
    return "".join(text)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS trusting --tls-ca; --token-file's first line goes with every call."""
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(args.tls_ca).read_bytes())
    return grpc.secure_channel(args.address, credentials)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open_channel(args) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            if args.command == "complete":
                run_one(stub, build_request(args, None), args)
                return 0
            history = [common_pb2.Message(role="system", content=args.system)] if args.system else []
            if args.message is not None:
                run_one(stub, build_request(args, [*history, common_pb2.Message(role="user", content=args.message)]), args)
                return 0
            return interactive(stub, args, history)
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


def interactive(stub: gateway_pb2_grpc.GatewayServiceStub, args: argparse.Namespace,
                history: list[common_pb2.Message]) -> int:
    print("chat with the model: one message a line; Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        history.append(common_pb2.Message(role="user", content=line))
        answer = run_one(stub, build_request(args, history), args)
        history.append(common_pb2.Message(role="assistant", content=answer))


if __name__ == "__main__":
    sys.exit(main())
