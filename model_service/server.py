"""``llama.model.v1.ModelService`` over grpc.aio: a thin adapter in front of the engine.

Each method turns protobuf into plain Python objects, makes one call into the engine and turns the
result back into protobuf (TGI's ``server.py`` shape). Loading the weights and the warm-up step run
in a thread while health says NOT_SERVING; the engine steps in its own thread; under ``--tp N`` the
other ranks are child processes that follow rank 0 (``tp_worker.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

import grpc
import structlog
import torch

from llama_grpc_runtime.context import REQUEST_ID_HEADER, current_request_id
from llama_grpc_runtime.errors import InvalidArgument, Unavailable
from llama_grpc_runtime.flags import ServerConfig, from_flags, server_parser
from llama_grpc_runtime.logs import configure_logging
from llama_grpc_runtime.server import GrpcServer
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc

from .build import DTYPES, compile_blocker, malloc_trim
from .distributed import use_cpu_threads
from .engine import (
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    GenerationStream,
    Load,
    LocalRunner,
    TokenAlternatives,
)
from .grammar import ENGINE as GRAMMAR_ENGINE
from .grammar import load_grammars
from .model import COMPILE_MODES
from .options import (
    CONSTRAINT_KINDS,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_N,
    MAX_TOP_LOGPROBS,
    SAMPLING_OPTIONS,
    STOPPING_OPTIONS,
    check_n,
    completion_seed,
    constraint_from_message,
)
from .quant import PACKED_ACTIVATIONS, QUANTIZE_MODES
from .sampling import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingParams
from .tp_worker import LoadOptions, TensorParallelRunner

log = structlog.get_logger()

# A service with nothing running gives its freed heap back to the OS this long after its last request
# (glibc keeps it: ~80 MB after a burst of 64 streams); a busy one keeps and reuses it.
IDLE_TRIM_S = 1.0

SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
FINISH_REASONS = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_TOKEN: common_pb2.FINISH_REASON_STOP_TOKEN,
    FinishReason.CONTEXT_LIMIT: common_pb2.FINISH_REASON_CONTEXT_LIMIT,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TIME_LIMIT: common_pb2.FINISH_REASON_TIME_LIMIT,
}


@dataclass(frozen=True)
class ModelServiceConfig:
    """The model service's flags, typed (built once, in ``main``)."""

    server: ServerConfig
    checkpoint: str | None
    tp: int
    device: str
    dtype: str
    quantize: str | None
    max_batch_size: int
    max_seq_len: int  # 0: the model's context
    max_queue: int
    prefill_chunk: int
    seed: int
    max_new_tokens_limit: int  # 0: the context is the only limit
    step_timeout: float
    max_step_failures: int
    kv_cache_tokens: int  # 0: sized from the memory budget
    kv_block_size: int
    no_prefix_cache: bool
    compile: bool
    compile_mode: str
    packed_activations: str
    threads: int  # 0: the cores this process may use

    @property
    def prefix_cache(self) -> bool:
        return not self.no_prefix_cache

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelServiceConfig:
        return from_flags(cls, args, server=from_flags(ServerConfig, args))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = server_parser(service="model", port=50052, metrics_port=9092,
                           description="Llama 3 generation with continuous batching, over gRPC.")
    cuda = torch.cuda.is_available()
    parser.add_flag("--checkpoint", default=None,
                    help="Meta directory, Hugging Face directory or GGUF file (default: the embedded SmolLM2)")
    parser.add_flag("--tp", type=int, default=1, help="tensor-parallel ranks (processes) this command starts")
    parser.add_flag("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"], help="where to run")
    parser.add_flag("--dtype", default=None, choices=sorted(DTYPES),
                    help="weights and cache dtype (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_flag("--quantize", default=None, choices=list(QUANTIZE_MODES),
                    help="weight-only quantisation: int4 (group-wise, 32) or int8 (per channel) packed linears "
                         "and int8 embeddings; none: the checkpoint's weights in --dtype (default: a GGUF file "
                         "in its own quantisation where a kernel holds it, Q4_0/Q4_1 int4 and Q8_0 int8; "
                         "Meta / Hugging Face checkpoints as they are)")
    parser.add_flag("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="run the model's layers as one torch.compile'd graph (default: on for a CPU model on one "
                         "rank where a C++ compiler is found). Compiled at start-up: ~3 min on 2 CPU cores the first "
                         "time, cached under $LLAMA_GRPC_CACHE/inductor so a restart takes ~45 s. SmolLM2 on 2 "
                         "cores: decode ~20%% faster at batch 1, ~10%% at 16; ~260 MB more resident memory")
    parser.add_flag("--compile-mode", choices=COMPILE_MODES, default="auto",
                    help="with --compile: 'auto' (default) is 'max-autotune' on a CPU with AMX for packed layers "
                         "of up to 256 MiB (model.AUTO_AUTOTUNE_MAX_BYTES), else 'default'. "
                         "'max-autotune' times inductor's C++ GEMM templates against the ATen "
                         "kernels for the packed int4 matmuls and builds in the faster (the weights frozen into the "
                         "graphs). On a CPU with AMX, SmolLM2 on 2 cores: 16 decoding rows ~45%% faster a step, 64 "
                         "rows ~50%%, prompt chunks ~4x; the first start compiles ~4 min on 2 cores, a restart ~75 s (the "
                         "frozen graphs cached under a fingerprint of the weights); the process holds ~200 MB more. "
                         "'reduce-overhead' (CUDA): decode steps replay CUDA graphs, their rows and block tables "
                         "padded to powers of two (unmeasured)")
    parser.add_flag("--threads", type=int, default=0,
                    help="CPU threads for the model's kernels, split between tensor-parallel ranks (0: "
                         "OMP_NUM_THREADS if set, else the cores this process may use: its CPU affinity, capped "
                         "by a cgroup CPU limit). On a machine "
                         "whose cores other busy processes share, give it the cores it can count on: a kernel "
                         "thread that loses its core stalls every step (measured 60x slower decode)")
    parser.add_flag("--packed-activations", default="bfloat16", choices=list(PACKED_ACTIVATIONS),
                    help="what the int4/int8 kernels of a float32 model multiply: bfloat16 (activations rounded to "
                         "bfloat16, one call; llama.cpp rounds them to 8 bits), float32 (two bfloat16 halves "
                         "and the scales' rounding: the dequantised float32 linear to ~0.5%%, 1.3-2.3x slower) or "
                         "int8 (x86 CPU: steps of 5+ tokens multiply 8-bit activations, each row on its own "
                         "scale, by weights re-quantised to int8 per row, both rotated by Hadamard blocks first, "
                         "in fbgemm's kernel: "
                         "faster batched decode and prompts, the file's exact weights only in smaller steps, "
                         "one more copy of the weights in memory)")
    parser.add_flag("--max-batch-size", type=int, default=16, help="sequences decoded together (the running batch)")
    parser.add_flag("--max-seq-len", type=int, default=2048,
                    help="tokens per sequence (prompt + output), capped at the model's context; 0: the model's context")
    parser.add_flag("--max-queue", type=int, default=64,
                    help="requests that may wait for the batch; beyond it RESOURCE_EXHAUSTED")
    parser.add_flag("--kv-cache-tokens", type=int, default=0,
                    help="capacity of the paged KV cache in tokens, shared by all sequences (0: what the memory "
                         "budget allows: 256 MiB on cpu, half the free memory on cuda)")
    parser.add_flag("--kv-block-size", type=int, default=16, help="tokens per KV-cache block")
    parser.add_flag("--no-prefix-cache", action="store_true",
                    help="do not reuse cached blocks of earlier prompts and outputs, nor share the prompt of "
                         "an identical request running at the same time")
    parser.add_flag("--prefill-chunk", type=int, default=256,
                    help="prompt tokens per engine step: bounds how long a long prompt delays running streams")
    parser.add_flag("--seed", type=int, default=1, help="seed for anything random at load time")
    parser.add_flag("--max-new-tokens-limit", type=int, default=0,
                    help="largest max_new_tokens a request may ask for (above: INVALID_ARGUMENT); an unset "
                         "max_new_tokens means this many; 0: no limit but the context")
    parser.add_flag("--step-timeout", type=float, default=120.0,
                    help="seconds one engine step may take before the service declares itself wedged (a stopped "
                         "tensor-parallel rank, a hung device): health goes NOT_SERVING and it exits 1 (0: never)")
    parser.add_flag("--max-step-failures", type=int, default=3,
                    help="engine steps in a row in which every forward fails before the service declares its "
                         "model or device unusable: health goes NOT_SERVING and it exits 1")
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    for flag in ("tp", "max_batch_size", "prefill_chunk", "kv_block_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_queue < 0 or args.max_seq_len < 0 or args.max_new_tokens_limit < 0 or args.step_timeout < 0:
        parser.error("--max-queue, --max-seq-len, --max-new-tokens-limit and --step-timeout must be >= 0")
    if args.kv_cache_tokens < 0:
        parser.error("--kv-cache-tokens must be >= 0 (0: sized from the memory budget)")
    if args.max_step_failures < 1:
        parser.error("--max-step-failures must be >= 1")
    if args.threads < 0:
        parser.error("--threads must be >= 0 (0: OMP_NUM_THREADS, else the cores this process may use)")
    blocker = compile_blocker(args.device, args.tp)
    if args.compile is None:  # where it is measured to pay: CPU, one rank
        args.compile = args.device == "cpu" and blocker is None
    elif args.compile and blocker:
        parser.error(f"--compile: {blocker}")
    if args.compile_mode in ("max-autotune", "reduce-overhead") and not args.compile:
        parser.error(f"--compile-mode {args.compile_mode} needs the compiled model (--compile)"
                     + (f", which is off here: {blocker}" if blocker else ""))
    if args.compile_mode == "reduce-overhead" and args.device != "cuda":
        parser.error(f"--compile-mode reduce-overhead records CUDA graphs: it needs --device cuda, not {args.device}")
    return args


def request_from_proto(request: model_pb2.GenerateRequest, timeout: float | None) -> GenerationRequest:
    sampling, stopping, output = request.sampling, request.stopping, request.output
    return GenerationRequest(
        prompt_token_ids=list(request.prompt_token_ids),
        sampling=SamplingParams(
            temperature=sampling.temperature if sampling.HasField("temperature") else DEFAULT_TEMPERATURE,
            top_p=sampling.top_p if sampling.HasField("top_p") else DEFAULT_TOP_P,
            top_k=sampling.top_k,
            repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else 1.0,
            seed=sampling.seed if sampling.HasField("seed") else None,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            logit_bias=dict(sampling.logit_bias),
        ),
        max_new_tokens=stopping.max_new_tokens,
        min_new_tokens=stopping.min_new_tokens,
        time_limit_ms=stopping.time_limit_ms,
        truncate_prompt_tokens=stopping.truncate_prompt_tokens,
        constraint=constraint_from_message(request.constraint),
        stop_token_ids=tuple(stopping.stop_token_ids),
        strict_context_limit=stopping.strict_context_limit,
        logprobs=output.logprobs,
        top_logprobs=output.top_logprobs,
        echo=output.echo,
        request_id=current_request_id() or request.request_id,
        timeout=timeout,
    )


def limit_new_tokens(request: GenerationRequest, limit: int, max_seq_len: int) -> GenerationRequest:
    """``--max-new-tokens-limit``: refuse more; give an unset max_new_tokens the limit (with
    strict_context_limit, no more than the context leaves, as an unset value would)."""
    if not limit:
        return request
    if request.max_new_tokens > limit:
        raise InvalidArgument("stopping.max_new_tokens", f"{request.max_new_tokens} is more than this server's "
                              f"limit of {limit} (--max-new-tokens-limit)")
    if request.max_new_tokens:
        return request
    room = max_seq_len - len(request.prompt)
    return replace(request, max_new_tokens=max(min(limit, room) if request.strict_context_limit else limit, 1))


def _top_logprobs(alternatives: list[TokenAlternatives]) -> list[common_pb2.TopLogprobs]:
    return [common_pb2.TopLogprobs(candidates=[common_pb2.TokenLogprob(token_id=token_id, logprob=logprob)
                                               for token_id, logprob in position])
            for position in alternatives]


def load_to_proto(load: Load) -> model_pb2.Load:
    return model_pb2.Load(running_sequences=load.running_sequences, queued_requests=load.queued_requests,
                          kv_blocks_used=load.kv_blocks_used, kv_blocks_total=load.kv_blocks_total)


def response_from_chunk(chunk: GenerationChunk, index: int = 0) -> model_pb2.GenerateResponse:
    response = model_pb2.GenerateResponse(
        index=index,
        token_ids=chunk.token_ids,
        logprobs=chunk.logprobs,
        top_logprobs=_top_logprobs(chunk.top_logprobs),
        prompt_logprobs=chunk.prompt_logprobs,
        prompt_top_logprobs=_top_logprobs(chunk.prompt_top_logprobs),
    )
    if chunk.finish_reason is not None:
        response.finish_reason = FINISH_REASONS[chunk.finish_reason]
        response.usage.prompt_tokens = chunk.prompt_tokens
        response.usage.generated_tokens = chunk.generated_tokens
        response.usage.cached_prompt_tokens = chunk.cached_prompt_tokens
    return response


def with_load(response: model_pb2.GenerateResponse, chunk: GenerationChunk, engine: Engine) -> model_pb2.GenerateResponse:
    """The last message of a generation also tells the replica's load (for a router)."""
    if chunk.finish_reason is not None:
        response.load.CopyFrom(load_to_proto(engine.load()))
    return response


def _in_daemon_thread(fn: Callable[[], Any]) -> asyncio.Future:
    """Run ``fn`` in a daemon thread: unlike asyncio.to_thread, a load stuck forever (a rank that
    never joins) cannot keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name="load", daemon=True).start()
    return future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting coroutine was cancelled (shutdown during load)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, config: ModelServiceConfig, server: GrpcServer) -> None:
        self.config = config
        self.server = server
        self.engine: Engine | None = None
        self.info: Any = None
        self.runner: TensorParallelRunner | LocalRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._requests = 0  # Generate calls so far (the idle trimmer's sign of activity)
        self._trimmer: asyncio.Task | None = None

    # ---- RPCs --------------------------------------------------------------------------------

    async def Generate(self, request: model_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[model_pb2.GenerateResponse]:
        engine = self._ready()
        self._requests += 1
        if request.request_id and not any(key == REQUEST_ID_HEADER for key, _ in context.invocation_metadata() or ()):
            structlog.contextvars.bind_contextvars(request_id=request.request_id)
        check_n(request.n)
        generation = limit_new_tokens(request_from_proto(request, context.time_remaining()),
                                      self.config.max_new_tokens_limit, engine.max_seq_len)
        if generation.constraint is not None and engine.grammars is not None and not engine.grammars.built:
            # The first constrained request builds the grammar engine's vocabulary (~1 s), off the event loop.
            await asyncio.to_thread(engine.grammars.build)
        if request.n <= 1:
            stream = engine.submit(generation)
            try:
                async for chunk in stream:
                    yield with_load(response_from_chunk(chunk), chunk, engine)
            finally:  # finished, failed, or the caller went away (cancel, deadline, disconnect)
                stream.cancel()
            return
        async for response in self._generate_n(engine, generation, request.n):
            yield response

    @staticmethod
    async def _generate_n(engine: Engine, request: GenerationRequest,
                          n: int) -> AsyncIterator[model_pb2.GenerateResponse]:
        """n completions as n sequences of the batch, interleaved as their chunks come; completion i
        seeded with completion_seed(seed, i). Any failure or a cancelled call ends all of them.

        They are submitted as a group: completion 0 computes the prompt and the others fork from it
        in the step that completes it (sharing its KV-cache blocks instead of computing them again).
        """
        streams: list[GenerationStream] = []
        readers: list[asyncio.Future] = []
        queue: asyncio.Queue[tuple[int, GenerationChunk | BaseException | None]] = asyncio.Queue()

        async def read(index: int, stream: GenerationStream) -> None:
            try:
                async for chunk in stream:
                    await queue.put((index, chunk))
            except BaseException as exc:  # noqa: BLE001 -- handed to the reader below
                await queue.put((index, exc))
            else:
                await queue.put((index, None))

        try:
            streams += engine.submit_group([
                replace(request, sampling=replace(request.sampling, seed=completion_seed(request.sampling.seed, i)))
                for i in range(n)])
            readers += [asyncio.ensure_future(read(index, stream)) for index, stream in enumerate(streams)]
            running = n
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield with_load(response_from_chunk(item, index), item, engine)
        finally:
            for stream in streams:
                stream.cancel()
            for reader in readers:
                reader.cancel()

    async def GetModelInfo(self, request: model_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> model_pb2.GetModelInfoResponse:
        engine, info = self._ready(), self.info
        structured = engine.grammars is not None and engine.grammars.available
        return model_pb2.GetModelInfoResponse(
            model_name=info.name,
            family="llama",
            vocab_size=info.vocab_size,
            max_seq_len=engine.max_seq_len,
            tensor_parallel_size=info.tp_size,
            dtype=str(info.dtype).removeprefix("torch."),
            device=str(info.device),
            max_batch_size=engine.max_batch_size,
            max_queue=engine.max_queue,
            stop_token_ids=list(info.stop_token_ids),
            checkpoint_format=info.format,
            parameter_count=info.parameter_count,
            quantization=info.quantization,
            compile=info.compile,
            packed_activations=info.packed_activations,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            capabilities=common_pb2.GenerationCapabilities(
                sampling_options=SAMPLING_OPTIONS,
                stopping_options=STOPPING_OPTIONS,
                constraint_kinds=CONSTRAINT_KINDS if structured else (),
                max_n=MAX_N,
                max_top_logprobs=MAX_TOP_LOGPROBS,
                max_logit_bias_entries=MAX_LOGIT_BIAS_ENTRIES,
                max_logit_bias=MAX_LOGIT_BIAS,
                grammar_engine=GRAMMAR_ENGINE if structured else "",
            ),
            kv_cache_tokens=engine.kv_cache_tokens,
            kv_block_size=engine.block_size,
            prefix_cache=engine.prefix_cache,
        )

    async def GetLoad(self, request: model_pb2.GetLoadRequest,
                      context: grpc.aio.ServicerContext) -> model_pb2.GetLoadResponse:
        return model_pb2.GetLoadResponse(load=load_to_proto(self._ready().load()))

    def _ready(self) -> Engine:
        if self.engine is None:
            raise Unavailable("the model is still loading; retry when health says SERVING")
        return self.engine

    # ---- lifecycle ---------------------------------------------------------------------------

    async def startup(self) -> None:
        self._loop = asyncio.get_running_loop()
        # Load and warm up in a thread that then exits, and run every later step on the engine's one
        # thread: OpenMP keeps a team of kernel threads per thread that ever ran a parallel region,
        # and once it manages more threads than there are cores its idle threads stop spinning
        # (libgomp's throttled spin), so every kernel call pays a wake-up. Measured on 2 cores: a
        # forward loop went from 118 to 69 tok/s after a second thread had run forwards.
        engine = await _in_daemon_thread(self._load)
        engine.start()
        self.engine = engine
        self._trimmer = asyncio.ensure_future(self._trim_when_idle(engine))

    async def _trim_when_idle(self, engine: Engine) -> None:
        """malloc_trim once the engine has been idle for IDLE_TRIM_S after requests (off the event loop)."""
        seen = self._requests
        while True:
            await asyncio.sleep(IDLE_TRIM_S)
            if self._requests != seen and engine.num_live == 0:
                seen = self._requests
                await asyncio.to_thread(malloc_trim)

    def _load(self) -> Engine:
        config = self.config
        options = LoadOptions(checkpoint=config.checkpoint, device=config.device, dtype=config.dtype,
                              max_batch_size=config.max_batch_size, max_seq_len=config.max_seq_len or None,
                              seed=config.seed, quantize=config.quantize, kv_cache_tokens=config.kv_cache_tokens,
                              kv_block_size=config.kv_block_size, compile=config.compile,
                              packed_activations=config.packed_activations, compile_mode=config.compile_mode,
                              threads=config.threads)
        log.info("loading model", checkpoint=config.checkpoint or "embedded default", tp=config.tp,
                 device=config.device, dtype=config.dtype, quantize=config.quantize or "default")
        if config.compile:
            log.info("the model's layers compile after loading (~3 min on 2 CPU cores the first time; later "
                     "starts load inductor's cache, $LLAMA_GRPC_CACHE/inductor)")
        if config.tp > 1:
            self.runner = TensorParallelRunner(config.tp, options, on_rank_death=self.fatal)
            loaded = self.runner.start()
        else:
            use_cpu_threads(config.device, config.threads)
            loaded = options.build()
            self.runner = LocalRunner(loaded.model, loaded.info.device)
        info = self.info = loaded.info
        engine = Engine(self.runner, vocab_size=info.vocab_size, max_seq_len=info.max_seq_len,
                        max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                        prefill_chunk=config.prefill_chunk, stop_token_ids=tuple(info.stop_token_ids),
                        num_blocks=info.kv_num_blocks, block_size=info.kv_block_size,
                        prefix_cache=config.prefix_cache, on_fatal=self._on_engine_failure,
                        grammars=load_grammars(config.checkpoint, info.vocab_size, list(info.stop_token_ids)),
                        step_timeout=config.step_timeout or None, max_step_failures=config.max_step_failures)
        engine.warm_up()
        log.info("model ready", model=info.name, format=info.format, vocab_size=info.vocab_size,
                 max_seq_len=info.max_seq_len, max_batch_size=config.max_batch_size, tp=config.tp,
                 kv_cache_tokens=engine.kv_cache_tokens, kv_block_size=engine.block_size,
                 kv_cache_mib=round(engine.kv_cache_tokens * self.runner_bytes_per_token(loaded) / 2**20, 1),
                 prefix_cache=engine.prefix_cache,
                 parameters=info.parameter_count, dtype=str(info.dtype), device=str(info.device),
                 quantization=info.quantization, packed_activations=info.packed_activations, compile=info.compile,
                 threads=torch.get_num_threads())
        return engine

    @staticmethod
    def runner_bytes_per_token(loaded: Any) -> int:
        return loaded.model.kv_bytes_per_token(loaded.model.layers[0].attention.cache.k.dtype)

    def fatal(self, error: BaseException) -> None:
        """Something the service cannot survive (a rank died): fail everything, exit non-zero."""
        if self.engine is not None:
            self.engine.fail(error)  # calls _on_engine_failure
        else:
            self._on_engine_failure(error)

    def _on_engine_failure(self, error: BaseException) -> None:
        log.error("model service failing", error=str(error))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._begin_failure_shutdown)

    def _begin_failure_shutdown(self) -> None:
        asyncio.ensure_future(self.server.set_serving(False))
        self.server.shutdown(exit_code=1)

    async def drain(self) -> None:
        """SIGTERM: refuse new work; running streams get the grace period to finish."""
        if self._trimmer is not None:
            self._trimmer.cancel()
        if self.engine is not None:
            self.engine.close()
            log.info("draining generations", in_flight=self.engine.num_live)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        elif isinstance(self.runner, TensorParallelRunner):
            self.runner.abort()


async def serve(config: ModelServiceConfig) -> tuple[int, ModelServicer]:
    server = GrpcServer("model", config.server)  # grpc.aio binds to the running loop: create it inside
    servicer = ModelServicer(config, server)
    server.add(model_pb2_grpc.add_ModelServiceServicer_to_server, servicer, SERVICE_NAME)
    return await server.run(startup=servicer.startup, drain=servicer.drain), servicer


def main(argv: list[str] | None = None) -> None:
    config = ModelServiceConfig.from_args(parse_args(argv))
    configure_logging("model", config.server.log_level)
    exit_code, servicer = asyncio.run(serve(config))
    servicer.close()
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave without interpreter teardown: a failed rank can leave a thread blocked in a collective
    # forever, and distributed/multiprocessing exit hooks could wait on it.
    os._exit(exit_code)
