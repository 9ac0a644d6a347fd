"""``python -m tokenizer_service --tokenizer PATH``: the tokenizer gRPC server."""

from __future__ import annotations

import asyncio
import os
import sys

import structlog

from llama_grpc_runtime.flags import ServerArgumentParser, ServerConfig, from_flags, server_parser
from llama_grpc_runtime.logs import configure_logging
from llama_grpc_runtime.server import GrpcServer
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc

from .servicer import TokenizerServicer

log = structlog.get_logger()


def parser() -> ServerArgumentParser:
    flags = server_parser(service="tokenizer", port=50051, metrics_port=9091,
                          description="Llama 3 / GGUF / Hugging Face tokenizer and chat formats over gRPC.")
    flags.add_flag("--tokenizer", env="LLAMA_TOKENIZER_PATH", default=None,
                   help="a Llama 3 tokenizer.model, a Meta or Hugging Face checkpoint directory, or a .gguf "
                        "file (default: the embedded SmolLM2-135M-Instruct model)")
    flags.add_flag("--max-input-chars", type=int, default=4_000_000,
                   help="longest Encode text (and total chat message roles and content) accepted, in characters")
    flags.add_flag("--max-decode-ids", type=int, default=1_000_000,
                   help="most token ids one Decode call (or one DecodeStream, in total) may carry")
    flags.add_flag("--max-chat-messages", type=int, default=4096,
                   help="most messages one ApplyChatTemplate call may carry")
    flags.add_flag("--threads", type=int, default=min(4, len(os.sched_getaffinity(0))),
                   help="worker threads for large requests; each holds its own tiktoken copy "
                        "(~36 MB for Llama 3)")
    flags.add_flag("--chat-template-workers", type=int, default=2,
                   help="processes that render a model's own Jinja chat template (started only for such a "
                        "model), so a hostile template never runs in the server's process")
    flags.add_flag("--chat-template-timeout", type=float, default=10.0,
                   help="seconds one ApplyChatTemplate may render in a worker before the worker is killed and "
                        "replaced (INVALID_ARGUMENT); the template's own budget, 2 s a rendering, usually ends "
                        "a hostile template first")
    return flags


async def serve(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure_logging("tokenizer", args.log_level)
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if args.chat_template_workers < 1:
        raise SystemExit("--chat-template-workers must be at least 1")
    if not args.chat_template_timeout > 0:
        raise SystemExit("--chat-template-timeout must be more than 0")
    servicer = TokenizerServicer(max_input_chars=args.max_input_chars, threads=args.threads,
                                 max_decode_ids=args.max_decode_ids, max_chat_messages=args.max_chat_messages,
                                 template_workers=args.chat_template_workers,
                                 template_timeout=args.chat_template_timeout)
    server = GrpcServer("tokenizer", from_flags(ServerConfig, args))
    server.add(tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server, servicer,
               tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name)

    async def startup() -> None:
        tokenizer = await servicer.load(args.tokenizer)
        log.info("tokenizer loaded", name=tokenizer.name, vocab_size=tokenizer.vocab_size,
                 chat_format=tokenizer.chat_format)

    try:
        return await server.run(startup=startup)
    finally:
        servicer.close()


def main() -> None:
    sys.exit(asyncio.run(serve()))


if __name__ == "__main__":
    main()
