"""Channels to the tokenizer and model services, and the errors a caller sees when one is down.

Every upstream call carries the caller's request id (``x-request-id``) and what is left of the
caller's deadline. An upstream that cannot be reached becomes UNAVAILABLE naming it and its address;
any other upstream status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...) passes on.

Channels reconnect by themselves with a short backoff, so a restarted upstream is served again
within a couple of seconds without restarting the gateway. The model channel balances calls
round-robin over every address it is given (a comma-separated list, or all the addresses a
``dns:///`` name resolves to) and, with client-side health checking, skips replicas that report
NOT_SERVING (loading or draining).

Generated tokens are decoded in the gateway (``LocalDecoder``, from the vocabulary the tokenizer sends
once: ``GetVocabulary``); with ``--detokenize tokenizer``, or a tokenizer service without
``GetVocabulary``, through its ``DecodeStream`` (one id a message: ``DecodeStream`` below).

``UpstreamSecurity`` makes the channels TLS (``--upstream-tls-ca``), mutual TLS (``--upstream-tls-cert``
and ``--upstream-tls-key``: the gateway's client certificate) and adds the gateway's bearer token
(``--upstream-auth-token-file``, its first line, re-read when the file changes) to every call.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from llama_grpc_runtime.auth import TokenFile, bearer
from llama_grpc_runtime.context import outgoing_metadata
from llama_grpc_runtime.errors import Unavailable
from llama_grpc_runtime.flags import MAX_MESSAGE_BYTES
from llama_grpc_runtime.health import is_serving_async
from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.model.v1 import model_pb2
from llama_grpc_stubs.tokenizer.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from model_files.detokenize import StreamDecoder, TokenTable
from model_service.options import Constraint

from .interfaces import Candidate, Deadline, ModelChunk, ModelInfo, TokenizerInfo
from .replicas import Admission, Replica, ReplicaSet
from .request import ChatMessage, CompletionRequest
from .routing import DEFAULT_ROUTING

log = structlog.get_logger()

SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    # Client-side health checking: a replica that says NOT_SERVING gets no calls.
    "healthCheckConfig": {"serviceName": ""},
})
CHANNEL_OPTIONS = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # The defaults back off up to 120 s: an upstream restarted after a minute would then stay
    # unreachable for another minute or two. Upstreams are close by; retry often.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # dns:/// targets are re-resolved when a connection drops; let that happen every few seconds.
    ("grpc.dns_min_time_between_resolutions_ms", 5000),
    ("grpc.keepalive_time_ms", 30_000),
)


def channel_target(address: str) -> str:
    """A gRPC target for one address, a comma-separated list of replicas, or a ``scheme:`` target.

    ``host:port`` stays as it is (resolved by DNS); ``a:p1,b:p2`` becomes ``ipv4:a:p1,b:p2``
    (``ipv6:[..]:p`` when the hosts are IPv6) after resolving host names once, since gRPC's
    address-list schemes take literal IPs only; ``dns:///name:port`` and other schemes pass
    through, and DNS names are re-resolved as replicas come and go.
    """
    address = address.strip()
    parts = [part.strip() for part in address.split(",") if part.strip()]
    if not parts:
        raise ValueError("empty address")
    if len(parts) == 1:
        return parts[0]
    resolved = [_resolve(part) for part in parts]
    families = {family for family, _ in resolved}
    if len(families) > 1:
        raise ValueError(f"{address!r} mixes IPv4 and IPv6 addresses; use one family")
    return f"{families.pop()}:{','.join(hostport for _, hostport in resolved)}"


def _resolve(hostport: str) -> tuple[str, str]:
    if "://" in hostport or hostport.startswith(("ipv4:", "ipv6:", "unix:", "dns:")):
        raise ValueError(f"{hostport!r}: a list of replicas takes host:port entries only")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{hostport!r} is not host:port")
    host = host.strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        v4 = [info for info in infos if info[0] == socket.AF_INET]
        ip = ipaddress.ip_address((v4 or infos)[0][4][0])
    if ip.version == 6:
        return "ipv6", f"[{ip}]:{port}"
    return "ipv4", f"{ip}:{port}"


# What grpc's asyncio client reports when one of a call's operations fails in its own transport (a
# message written to a stream whose peer has just gone away): INTERNAL with this fixed text (grpc's
# ``_AioCall.set_internal_error``), not a status the upstream sent. Seen when a tokenizer is killed while
# the gateway writes to its DecodeStream (tests/fault, under load).
TRANSPORT_FAILURE = "Internal error from Core"


def upstream_lost(error: grpc.aio.AioRpcError) -> bool:
    """The call failed because its upstream could not be reached or went away (not a refusal it sent)."""
    code = error.code()
    return code == grpc.StatusCode.UNAVAILABLE or (code == grpc.StatusCode.INTERNAL
                                                   and error.details() == TRANSPORT_FAILURE)


@dataclass(frozen=True)
class UpstreamSecurity:
    """How the gateway authenticates to its upstreams and checks them (all optional)."""

    tls_ca: str | None = None  # CA that signed the upstreams' certificates; TLS when set
    tls_cert: str | None = None  # the gateway's client certificate (mTLS), with tls_key
    tls_key: str | None = None
    token_file: TokenFile | None = None

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--upstream-tls-cert and --upstream-tls-key go together")
        if self.tls_cert and not self.tls_ca:
            raise ValueError("--upstream-tls-cert needs --upstream-tls-ca (the CA of the upstreams' certificates)")

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls_ca:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.tls_ca).read_bytes(),
            private_key=Path(self.tls_key).read_bytes() if self.tls_key else None,
            certificate_chain=Path(self.tls_cert).read_bytes() if self.tls_cert else None)


class Upstream:
    """One upstream service: its channel, its name in error messages, its health."""

    def __init__(self, name: str, address: str, security: UpstreamSecurity | None = None) -> None:
        self.name = name
        self.address = address
        self.security = security or UpstreamSecurity()
        credentials = self.security.credentials()
        target = channel_target(address)
        self.channel = (grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) if credentials
                        else grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Request id (and what else the caller's context carries), plus the gateway's token."""
        metadata = tuple(outgoing_metadata())
        if self.security.token_file is not None:
            metadata += (bearer(self.security.token_file.first()),)
        return metadata

    def unavailable(self, error: grpc.aio.AioRpcError) -> Exception:
        """UNAVAILABLE naming this upstream; other statuses pass through unchanged."""
        if upstream_lost(error):
            details = (error.details() or "").strip()
            return Unavailable(f"{self.name} unavailable at {self.address}" + (f": {details[:200]}" if details else ""))
        return error

    async def healthy(self, timeout: float = 1.0) -> bool:
        return await is_serving_async(self.channel, timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()


def _candidates(top_logprobs: Sequence[common_pb2.TopLogprobs]) -> list[list[Candidate]]:
    return [[Candidate(c.token_id, c.logprob, c.text) for c in position.candidates] for position in top_logprobs]


# Where generated tokens become text: "local" in the gateway, from the vocabulary the tokenizer sends
# once (GetVocabulary); "tokenizer" through its DecodeStream, one message each way a token.
DETOKENIZE_MODES = ("local", "tokenizer")
VOCABULARY_TIMEOUT_S = 30.0


class TokenizerClient(Upstream):
    def __init__(self, address: str, security: UpstreamSecurity | None = None, *, max_decode_fanout: int = 8,
                 detokenize: str = "local") -> None:
        super().__init__("tokenizer service", address, security)
        if detokenize not in DETOKENIZE_MODES:
            raise ValueError(f"detokenize must be one of {DETOKENIZE_MODES}, not {detokenize!r}")
        self.max_decode_fanout = max(1, max_decode_fanout)
        self.detokenize = detokenize
        self.stub = tokenizer_pb2_grpc.TokenizerServiceStub(self.channel)
        self._token_text: dict[int, str] = {}  # one token's text, for top-logprob candidates
        self._info = b""  # the last GetTokenizerInfo reply: another one means another vocabulary
        # Every id's bytes, fetched with each new GetTokenizerInfo reply; None: decode through the tokenizer.
        self.table: TokenTable | None = None

    async def _call(self, method: Any, request: Any, deadline: Deadline) -> Any:
        try:
            return await method(request, timeout=deadline.remaining(), metadata=self.metadata())
        except grpc.aio.AioRpcError as error:
            raise self.unavailable(error) from None

    async def encode(self, text: str, add_bos: bool, deadline: Deadline) -> list[int]:
        request = tokenizer_pb2.EncodeRequest(text=text, add_bos=add_bos)
        reply = await self._call(self.stub.Encode, request, deadline)
        return list(reply.token_ids)

    async def apply_chat_template(self, messages: Sequence[ChatMessage], deadline: Deadline) -> list[int]:
        request = tokenizer_pb2.ApplyChatTemplateRequest(
            messages=[common_pb2.Message(role=m.role, content=m.content) for m in messages],
            add_generation_prompt=True,
        )
        return list((await self._call(self.stub.ApplyChatTemplate, request, deadline)).token_ids)

    async def decode(self, token_ids: Sequence[int], deadline: Deadline) -> str:
        if self.table is not None:
            return self.table.decode(token_ids)
        request = tokenizer_pb2.DecodeRequest(token_ids=token_ids)
        return (await self._call(self.stub.Decode, request, deadline)).text

    async def token_texts(self, token_ids: Sequence[int], deadline: Deadline) -> dict[int, str]:
        """Each id's own text (cached: the vocabulary is fixed while the tokenizer is up)."""
        if self.table is not None:
            return {token_id: self.table.decode((token_id,)) for token_id in token_ids}
        cache = self._token_text
        missing = [token_id for token_id in dict.fromkeys(token_ids) if token_id not in cache]
        fanout = asyncio.Semaphore(self.max_decode_fanout)  # one request never floods the tokenizer

        async def one(token_id: int) -> str:
            async with fanout:
                return await self.decode([token_id], deadline)

        texts = dict(zip(missing, await asyncio.gather(*(one(token_id) for token_id in missing)), strict=True))
        cache.update(texts)
        return {token_id: texts[token_id] if token_id in texts else cache[token_id] for token_id in token_ids}

    def decode_stream(self, deadline: Deadline) -> DecodeStream | LocalDecoder:
        if self.table is not None:
            return LocalDecoder(self.table)
        return DecodeStream(self, deadline)

    async def info(self) -> TokenizerInfo:
        reply = await self._call(self.stub.GetTokenizerInfo, tokenizer_pb2.GetTokenizerInfoRequest(), Deadline(5.0))
        message = reply.SerializeToString(deterministic=True)
        if message != self._info:  # a restarted tokenizer, maybe with another vocabulary
            self._token_text, self.table = {}, None
            if self.detokenize == "local":
                self.table = await self._vocabulary(reply)
            self._info = message  # only now: a vocabulary that failed to arrive is asked for again next time
        return TokenizerInfo(name=reply.name, vocab_size=reply.vocab_size, stop_token_ids=tuple(reply.stop_token_ids),
                             add_bos_token=reply.add_bos_token, message=message)

    async def _vocabulary(self, info: tokenizer_pb2.GetTokenizerInfoResponse) -> TokenTable | None:
        """Every id's bytes (GetVocabulary); None from a tokenizer service without that call."""
        token_bytes: list[bytes] = []
        try:
            call = self.stub.GetVocabulary(tokenizer_pb2.GetVocabularyRequest(), timeout=VOCABULARY_TIMEOUT_S,
                                           metadata=self.metadata())
            async for chunk in call:
                if chunk.first_token_id != len(token_bytes):
                    raise Unavailable(f"{self.name} at {self.address} sent its vocabulary out of order (a chunk "
                                      f"from id {chunk.first_token_id} after {len(token_bytes)} ids)")
                token_bytes.extend(chunk.token_bytes)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("the tokenizer service has no GetVocabulary: generated tokens are decoded by its "
                            "DecodeStream", tokenizer=self.address)
                return None
            raise self.unavailable(error) from None
        if len(token_bytes) != info.vocab_size:
            raise Unavailable(f"{self.name} at {self.address} sent {len(token_bytes)} tokens' bytes for a "
                              f"vocabulary of {info.vocab_size}")
        try:
            table = TokenTable(token_bytes, info.special_tokens.values())
        except ValueError as error:
            raise Unavailable(f"{self.name} at {self.address} sent a vocabulary that does not fit its info: "
                              f"{error}") from None
        log.info("vocabulary received: generated tokens are decoded in the gateway", tokens=table.vocab_size,
                 bytes=sum(map(len, token_bytes)))
        return table


class LocalDecoder:
    """Generated ids decoded in the gateway, from the tokenizer service's vocabulary: the same text,
    token by token, as its DecodeStream (``model_files.detokenize``), without two messages a token."""

    def __init__(self, table: TokenTable) -> None:
        self._stream: StreamDecoder = table.stream_decoder(skip_special_tokens=True)

    async def texts(self, token_ids: Sequence[int]) -> list[str]:
        return self._stream.push_each(token_ids)

    async def finish(self) -> str:
        return self._stream.flush()

    def cancel(self) -> None:
        """Nothing to release: no call is open."""


class DecodeStream:
    """One ``DecodeStream`` call: generated ids in, each id's text delta (whole UTF-8) out.

    Ids go one per message so every token gets its own delta (stop sequences are cut at token
    boundaries); a chunk's messages are written back to back and their replies read after.
    """

    def __init__(self, client: TokenizerClient, deadline: Deadline) -> None:
        self.client = client
        self.call = client.stub.DecodeStream(timeout=deadline.remaining(), metadata=client.metadata())
        self._first = True

    async def texts(self, token_ids: Sequence[int]) -> list[str]:
        try:
            for token_id in token_ids:
                await self.call.write(tokenizer_pb2.DecodeStreamRequest(
                    token_ids=[token_id], skip_special_tokens=self._first))
                self._first = False
            texts = []
            for _ in token_ids:
                reply = await self.call.read()
                if reply is grpc.aio.EOF:
                    raise Unavailable(f"{self.client.name} at {self.client.address} ended DecodeStream early")
                texts.append(reply.text)
            return texts
        except grpc.aio.AioRpcError as error:
            raise self.client.unavailable(error) from None
        except asyncio.InvalidStateError:  # a write after the call ended (the tokenizer went away)
            raise self.client.unavailable(await self._ended()) from None

    async def finish(self) -> str:
        """No more ids: the text the decoder still held (bytes of an unfinished character)."""
        try:
            await self.call.done_writing()
            tail = []
            while (reply := await self.call.read()) is not grpc.aio.EOF:
                tail.append(reply.text)
            return "".join(tail)
        except grpc.aio.AioRpcError as error:
            raise self.client.unavailable(error) from None
        except asyncio.InvalidStateError:
            raise self.client.unavailable(await self._ended()) from None

    async def _ended(self) -> grpc.aio.AioRpcError:
        """The status the call ended with, as the error a read would have raised."""
        return grpc.aio.AioRpcError(await self.call.code(), grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    await self.call.details())

    def cancel(self) -> None:
        self.call.cancel()


class ModelClient:
    """The model service: every replica (``replicas.py``), admission before tokenising, routing per call."""

    name = "model service"

    def __init__(self, address: str, security: UpstreamSecurity | None = None, *, routing: str = DEFAULT_ROUTING,
                 health_interval: float = 1.0, resolve_interval: float = 5.0) -> None:
        self.address = address
        self.security = security or UpstreamSecurity()
        self.replicas = ReplicaSet(address, self._channel, self.metadata, routing=routing,
                                   health_interval=health_interval, resolve_interval=resolve_interval)

    def _channel(self, address: str, name: str | None = None) -> grpc.aio.Channel:
        """A channel to one replica; ``name``: the DNS name it was found under, which its certificate
        names (dialled by IP, TLS checks the certificate against that name)."""
        credentials = self.security.credentials()
        if not credentials:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        options = CHANNEL_OPTIONS + ((("grpc.ssl_target_name_override", name),) if name else ())
        return grpc.aio.secure_channel(address, credentials, options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        metadata = tuple(outgoing_metadata())
        if self.security.token_file is not None:
            metadata += (bearer(self.security.token_file.first()),)
        return metadata

    def unavailable(self, error: grpc.aio.AioRpcError, address: str | None = None) -> Exception:
        """UNAVAILABLE naming the replica; other statuses pass through unchanged."""
        if upstream_lost(error):
            details = (error.details() or "").strip()
            return Unavailable(f"{self.name} unavailable at {address or self.address}"
                               + (f": {details[:200]}" if details else ""))
        return error

    async def healthy(self) -> bool:
        """One monitoring round over the replicas: True while at least one serves."""
        return await self.replicas.refresh()

    async def admit(self, n: int) -> Admission:
        return await self.replicas.admit(n)

    async def info(self) -> ModelInfo:
        try:
            reply = await self.replicas.info()
        except grpc.aio.AioRpcError as error:
            raise self.unavailable(error) from None
        return ModelInfo(model_name=reply.model_name, vocab_size=reply.vocab_size, max_seq_len=reply.max_seq_len,
                         stop_token_ids=tuple(reply.stop_token_ids), message=reply.SerializeToString())

    def generate(self, request_id: str, prompt_token_ids: list[int], request: CompletionRequest,
                 extra_stop_token_ids: Sequence[int], deadline: Deadline, admission: Admission) -> ModelStream:
        sampling, stopping, output = request.sampling, request.stopping, request.output
        message = model_pb2.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=common_pb2.SamplingParams(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                repetition_penalty=sampling.repetition_penalty, seed=sampling.seed, min_p=sampling.min_p,
                presence_penalty=sampling.presence_penalty, frequency_penalty=sampling.frequency_penalty,
                logit_bias=sampling.logit_bias),
            # truncate_prompt_tokens is not sent: prompt_token_ids are already the kept tail.
            stopping=common_pb2.StoppingCriteria(
                max_new_tokens=stopping.max_new_tokens,
                stop_token_ids=list(dict.fromkeys([*stopping.stop_token_ids, *extra_stop_token_ids])),
                strict_context_limit=stopping.strict_context_limit,
                min_new_tokens=stopping.min_new_tokens,
                time_limit_ms=stopping.time_limit_ms),
            output=common_pb2.OutputOptions(logprobs=output.logprobs, top_logprobs=output.top_logprobs,
                                            echo=output.echo),
            n=request.n,
            constraint=_constraint(request.constraint),
        )
        return ModelStream(self, message, admission, deadline)

    async def close(self) -> None:
        await self.replicas.close()


def _constraint(constraint: Constraint | None) -> common_pb2.Constraint | None:
    if constraint is None:
        return None
    if constraint.kind == "choice":
        return common_pb2.Constraint(choice=common_pb2.Constraint.Choice(choices=constraint.value))
    return common_pb2.Constraint(**{constraint.kind: constraint.value})


class ModelStream:
    """The model's Generate stream as plain chunks; ``cancel()`` frees the model's cache at once.

    The call goes to the replica the routing policy picks. A replica that fails the call before its
    first message (UNAVAILABLE: it went away; RESOURCE_EXHAUSTED: full of other gateways' calls) is
    skipped and the next one tried, so a replica going down costs no request that it had not started.
    The admission's sequences are given back when the last completion ends, or the call does.
    """

    RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def __init__(self, client: ModelClient, message: model_pb2.GenerateRequest, admission: Admission,
                 deadline: Deadline) -> None:
        self.client = client
        self.message = message
        self.admission = admission
        self.deadline = deadline
        self.tried: list[Replica] = []
        self.cancelled = False
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.replica: Replica | None = None
        self._start()

    def _start(self) -> bool:
        replica = self.client.replicas.route(self.admission, self.message.prompt_token_ids, self.tried)
        if replica is None:
            return False
        self.replica = replica
        self.tried.append(replica)
        self.call = replica.stub.Generate(self.message, timeout=self.deadline.remaining(),
                                          metadata=self.client.metadata())
        return True

    async def __aiter__(self) -> AsyncIterator[ModelChunk]:
        if self.call is None:  # no replica at all (a DNS name that resolves to none)
            self.admission.release(held=False)
            raise Unavailable(f"{self.client.name} unavailable at {self.client.address}: no replica is known")
        finished = 0
        received = False
        while True:
            try:
                async for reply in self.call:
                    received = True
                    if reply.HasField("load"):
                        self.replica.observe(reply.load)
                    if reply.finish_reason:
                        finished += 1
                        if finished >= max(self.message.n, 1):  # the model's sequences are free
                            self.admission.release()
                    yield ModelChunk(
                        token_ids=list(reply.token_ids),
                        logprobs=list(reply.logprobs),
                        top_logprobs=_candidates(reply.top_logprobs),
                        finish_reason=common_pb2.FinishReason.Name(reply.finish_reason) if reply.finish_reason else "",
                        generated_tokens=reply.usage.generated_tokens,
                        cached_prompt_tokens=reply.usage.cached_prompt_tokens,
                        prompt_logprobs=list(reply.prompt_logprobs),
                        prompt_top_logprobs=_candidates(reply.prompt_top_logprobs),
                        index=reply.index,
                    )
                return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    self.client.replicas.mark_down(self.replica)
                elif error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.replica.observe_full(self.admission.n)
                if received or self.cancelled or error.code() not in self.RETRY_CODES or not self._start():
                    self.admission.release(held=False)
                    raise self.client.unavailable(error, self.replica.address) from None
                log.info("model replica failed the call before it started; trying another",
                         replica=self.tried[-2].address, code=error.code().name, next_replica=self.replica.address)

    async def wait_closed(self) -> None:
        """After the last message: let the call end with its own status (a cancel now would make
        a finished generation look cancelled to the model service)."""
        if self.call is not None:
            await self.call.code()
        self.admission.release()

    def cancel(self) -> None:
        self.cancelled = True
        if self.call is not None:
            self.call.cancel()
        self.admission.release()
