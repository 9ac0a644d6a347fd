"""``--routing prefix`` across two real model replicas: a family of prompts sharing a long system
prompt stays on the replica that cached it (and hits its cache), unrelated prompts spread over both,
and a replica that goes down costs no request."""

from __future__ import annotations

import random

import grpc
import pytest

from llama_grpc_stubs.common.v1 import common_pb2
from llama_grpc_stubs.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from llama_grpc_stubs.model.v1 import model_pb2, model_pb2_grpc

from .conftest import GREEDY, metric, start_gateway, start_model, start_tokenizer

WORDS = ("river mountain lantern copper violet harbor orchard thunder meadow silver glacier canyon "
         "falcon ember willow quartz prairie cobalt tundra marble").split()


def system_prompt(seed: int, words: int = 120) -> str:
    rng = random.Random(seed)
    return f"You are assistant number {seed}. " + " ".join(rng.choice(WORDS) for _ in range(words))


def chat(system: str, question: str) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        messages=[common_pb2.Message(role="system", content=system), common_pb2.Message(role="user", content=question)],
        sampling=GREEDY, stopping=common_pb2.StoppingCriteria(max_new_tokens=2))


class Replicated:
    """A tokenizer, two model replicas and a gateway routing by prefix over them."""

    def __init__(self) -> None:
        self.tokenizer = start_tokenizer()
        self.models = [start_model("--max-seq-len", "2048"), start_model("--max-seq-len", "2048")]
        self.tokenizer.wait_healthy()
        for model in self.models:
            model.wait_healthy(timeout=300)
        self.gateway = start_gateway(self.tokenizer.address, ",".join(m.address for m in self.models),
                                     "--routing", "prefix").wait_healthy(timeout=60)
        self.channel = grpc.insecure_channel(self.gateway.address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def served(self) -> list[float]:
        """Generate calls each replica has answered OK, by its own metrics."""
        return [metric(m.metrics_text(), "llama_model_requests_total", method="Generate", code="OK") for m in self.models]

    def live(self, index: int) -> int:
        """Sequences running or queued on replica ``index``, by its GetLoad."""
        with grpc.insecure_channel(self.models[index].address) as channel:
            load = model_pb2_grpc.ModelServiceStub(channel).GetLoad(model_pb2.GetLoadRequest(), timeout=10).load
        return load.running_sequences + load.queued_requests

    def hit_tokens(self) -> list[float]:
        return [metric(m.metrics_text(), "llama_model_prefix_cache_hit_tokens_total") for m in self.models]

    def routed(self) -> list[float]:
        text = self.gateway.metrics_text()
        return [sum(metric(text, "llama_gateway_routed_total", replica=m.address, reason=reason)
                    for reason in ("prefix", "least_loaded", "round_robin", "retry")) for m in self.models]

    def close(self) -> None:
        self.channel.close()
        for process in (self.gateway, *self.models, self.tokenizer):
            process.stop()


@pytest.fixture(scope="module")
def replicated():
    replicated = Replicated()
    yield replicated
    replicated.close()


def deltas(after: list[float], before: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


def test_a_family_of_shared_prefix_requests_stays_on_one_replica_and_hits_its_cache(replicated: Replicated):
    system = system_prompt(1)
    served, hits, routed = replicated.served(), replicated.hit_tokens(), replicated.routed()
    first = replicated.stub.Generate(chat(system, "What is the first word?"), timeout=60)
    home = [i for i, d in enumerate(deltas(replicated.served(), served)) if d][0]
    cached = []
    for question in ("Name a colour.", "Count to three.", "Say hello.", "What is a river?", "Pick a metal."):
        reply = replicated.stub.Generate(chat(system, question), timeout=60)
        cached.append(reply.usage.cached_prompt_tokens)
    # Every later member hit the cache of the replica that served the first: most of its prompt.
    assert all(c >= first.usage.prompt_tokens // 2 for c in cached), (cached, first.usage.prompt_tokens)
    # Where the requests went, by the gateway's count and by each replica's own metrics.
    went = [0, 0]
    went[home] = 6
    assert deltas(replicated.served(), served) == went
    assert deltas(replicated.routed(), routed) == went
    hit = deltas(replicated.hit_tokens(), hits)
    assert hit[home] >= sum(cached) and hit[1 - home] == 0, hit
    # One more member held open: the replicas' own GetLoad says it runs at home, nothing elsewhere.
    held = replicated.stub.GenerateStream(gateway_pb2.GenerateStreamRequest(
        messages=chat(system, "Tell a long story.").messages, sampling=GREEDY,
        stopping=common_pb2.StoppingCriteria(max_new_tokens=1800, min_new_tokens=1800)), timeout=120)
    try:
        next(held)
        assert [replicated.live(i) for i in (0, 1)] == [int(i == home) for i in (0, 1)]
    finally:
        held.cancel()


def test_unrelated_requests_spread_over_both_replicas(replicated: Replicated):
    served = replicated.served()
    for seed in range(100, 108):  # 8 families of one request each
        replicated.stub.Generate(chat(system_prompt(seed, words=30), "Hi."), timeout=60)
    spread = deltas(replicated.served(), served)
    assert sum(spread) == 8 and min(spread) >= 3, spread


def test_a_replica_down_sends_everything_to_the_other_without_errors(replicated: Replicated):
    # A family at home on each replica first.
    homes = {}
    for seed in (200, 201, 202, 203):
        served = replicated.served()
        replicated.stub.Generate(chat(system_prompt(seed), "Start."), timeout=60)
        homes[seed] = deltas(replicated.served(), served).index(1)
    assert set(homes.values()) == {0, 1}, homes
    down = replicated.models[1]
    down.process.kill()  # no draining: the gateway finds out from its calls and health checks
    down.process.wait()
    served = metric(replicated.models[0].metrics_text(), "llama_model_requests_total", method="Generate", code="OK")
    for seed in (200, 201, 202, 203, 204, 205):
        reply = replicated.stub.Generate(chat(system_prompt(seed), "Again."), timeout=60)
        assert reply.usage.generated_tokens == 2
        if homes.get(seed) == 0:
            assert reply.usage.cached_prompt_tokens > 0  # still at home
    assert metric(replicated.models[0].metrics_text(), "llama_model_requests_total",
                  method="Generate", code="OK") - served == 6
