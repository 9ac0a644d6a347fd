"""``--compile``: the layers run as one torch.compile'd graph and give the eager path's greedy tokens.

Truth is the eager path (itself checked against HF transformers and llama.cpp elsewhere). Inductor fuses
elementwise operations, so floats may differ in the last bits; greedy tokens must not, on a random
checkpoint (float32, prompt chunks and decode steps of several sequences at once) and on the real
SmolLM2 file (packed int4 / int8 weights).
"""

from __future__ import annotations

import shutil

import pytest
import torch

import model_service.model as model_module
from model_service.build import build
from model_service.model import Batch
from model_service.server import ModelServiceConfig, parse_args

STEPS = 12


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Compiled graphs are kept per function, for every model built in this process: start each test
    without the earlier tests' (and within dynamo's limit of graphs a function keeps)."""
    torch._dynamo.reset()


def greedy(model, prompts: list[list[int]], steps: int = STEPS) -> tuple[list[list[int]], torch.Tensor]:
    """Greedy continuations of several prompts decoded together (slot i per prompt), and the first logits."""
    slots = list(range(len(prompts)))
    tokens = torch.tensor([t for p in prompts for t in p])
    logits = model(Batch(tokens, slots, [0] * len(prompts), [len(p) for p in prompts]))
    first = logits.clone()
    out: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        next_tokens = logits.argmax(-1)
        for row, token in zip(out, next_tokens.tolist(), strict=True):
            row.append(token)
        logits = model(Batch(next_tokens, slots, [len(p) + step for p in prompts], [1] * len(prompts)))
    return out, first


@pytest.mark.slow
def test_compiled_random_checkpoint_decodes_the_eager_tokens(tiny_checkpoints):
    prompts = [[1, 5, 9, 200, 3, 77, 12], [1, 42, 8], [1, 300, 301, 302, 303, 304, 305, 306, 307, 308]]
    results = {}
    for compile in (False, True):
        loaded = build(tiny_checkpoints["hf"], max_batch_size=4, max_seq_len=64, compile=compile)
        assert (loaded.info.compile != "off") == compile
        results[compile] = greedy(loaded.model, prompts)
        results[compile, "single"] = greedy(loaded.model, prompts[:1])[0]  # one sequence: one-token graphs
    assert results[True][0] == results[False][0]
    assert results[True, "single"] == results[False, "single"]
    torch.testing.assert_close(results[True][1], results[False][1], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first compile takes ~1 min on 2 busy cores; a warm cache seconds
def test_compiled_smollm2_decodes_the_eager_tokens():
    # The chat prompts "What is the capital of France?" and "Name three colours." in SmolLM2's own
    # tokenizer (transformers' apply_chat_template on the GGUF file).
    system = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407,
              19712, 8182, 2, 198, 1, 4093, 198]
    prompts = [system + [1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198],
               system + [5820, 1296, 14797, 30, 2, 198, 1, 520, 9531, 198]]
    results = {}
    for compile in (False, True):
        model = build(None, max_batch_size=2, max_seq_len=128, compile=compile).model
        # build() compiled every graph: prompts, batched and single decode steps of any size reuse them.
        with torch.compiler.set_stance("fail_on_recompile" if compile else "default"):
            results[compile] = greedy(model, prompts)[0], greedy(model, prompts[:1])[0]
    assert results[True] == results[False]


def test_compile_flag_default_and_its_environment_twin(monkeypatch):
    monkeypatch.delenv("LLAMA_MODEL_COMPILE", raising=False)  # tests/conftest.py turns it off for other tests
    config = lambda *argv: ModelServiceConfig.from_args(parse_args(list(argv)))  # noqa: E731
    assert shutil.which("g++"), "this machine's base image has g++ (inductor's CPU compiler)"
    assert config().compile  # default: on for a CPU model on one rank
    assert not config("--no-compile").compile
    assert config().compile_mode == "auto" and config("--no-compile").compile_mode == "auto"
    assert config("--compile-mode", "max-autotune").compile_mode == "max-autotune"
    with pytest.raises(SystemExit):
        config("--no-compile", "--compile-mode", "max-autotune")  # a mode of the compiled model
    with pytest.raises(SystemExit):
        config("--compile", "--compile-mode", "reduce-overhead")  # CUDA graphs: not on a CPU
    assert config("--device", "cuda", "--compile", "--compile-mode", "reduce-overhead").compile_mode == "reduce-overhead"
    assert not config("--tp", "2").compile  # collectives run eager: off by default ...
    with pytest.raises(SystemExit):
        config("--tp", "2", "--compile")  # ... and refused when asked for
    monkeypatch.setenv("LLAMA_MODEL_COMPILE", "false")
    assert not config().compile
    assert config("--compile").compile
    monkeypatch.setenv("LLAMA_MODEL_COMPILE", "1")
    assert config().compile
    monkeypatch.delenv("LLAMA_MODEL_COMPILE")
    monkeypatch.setenv("PATH", "/nonexistent")  # no C++ compiler: off, and refused when asked for
    assert not config().compile
    with pytest.raises(SystemExit):
        config("--compile")


IN_GRAPH = model_module.TABLES_MAX_CONTEXT


@pytest.mark.parametrize(("quantize", "activations", "tables_max_context", "mode"), [
    ("none", "bfloat16", IN_GRAPH, "default"), ("none", "bfloat16", 0, "default"),
    ("int4", "bfloat16", IN_GRAPH, "default"), ("int4", "bfloat16", 0, "default"),
    ("int4", "int8", IN_GRAPH, "default"),  # steps of several tokens through the int8 op (--packed-activations int8)
    ("int4", "bfloat16", IN_GRAPH, "max-autotune"),  # GEMM templates timed against ATen, weights frozen
    # decode steps padded to the shapes of CUDA graphs (on a CPU inductor skips the graphs themselves)
    ("none", "bfloat16", IN_GRAPH, "reduce-overhead"), ("int4", "bfloat16", IN_GRAPH, "reduce-overhead"),
], ids=["none-in-graph", "none-op", "int4-in-graph", "int4-op", "int4-int8-in-graph", "int4-max-autotune",
        "none-reduce-overhead", "int4-reduce-overhead"])
def test_compiled_steps_of_every_layout_equal_eager(tiny_checkpoints, quantize, activations, tables_max_context,
                                                    mode, monkeypatch):
    # The same steps on an eager and a compiled model: prompts in blocks in no order (one block shared),
    # a prompt chunk over cached blocks beside decoding sequences, six sequences decoding (two gather
    # groups; attention inside the graph over their block tables, or, past TABLES_MAX_CONTEXT, through
    # the op), two decoding within their first block (tables one block wide), one sequence decoding
    # alone over blocks in order and out of order, a one-token prompt, a three-token one.
    monkeypatch.setattr(model_module, "TABLES_MAX_CONTEXT", tables_max_context)
    models = {compile: build(tiny_checkpoints["hf"], max_batch_size=6, max_seq_len=64, quantize=quantize,
                             compile=compile, packed_activations=activations, compile_mode=mode).model
              for compile in (False, True)}
    free = torch.randperm(24, generator=torch.Generator().manual_seed(11)).tolist()
    gen = torch.Generator().manual_seed(12)
    lengths = [20, 9, 33, 5, 17, 21]
    tables = [free[4 * i: 4 * i + 4] for i in range(6)]
    tables[5][0] = tables[0][0]  # sequence 5 shares sequence 0's first block (a cached prefix)
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in lengths]
    prompts[5][:16] = prompts[0][:16]
    # 8 tokens first: tiny's head_dim // 2, a size shape inference would otherwise take for the same
    # symbol as RoPE's; then one token over blocks in order (the view graph), then a chunk over them.
    steps = [Batch(prompts[0][:8], [tables[0]], [0], [8]),
             Batch(prompts[0][8:9], [tables[0][:1]], [8], [1]),
             Batch(prompts[0][9:], [tables[0]], [9], [11])]
    steps += [Batch(p, [t], [0], [len(p)]) for p, t in zip(prompts[1:5], tables[1:5], strict=True)]
    steps.append(Batch(prompts[5][16:], [tables[5]], [16], [len(prompts[5]) - 16]))  # over the shared block
    positions = list(lengths)
    steps.append(Batch(torch.randint(0, 512, (8,), generator=gen), tables[:3], positions[:3], [1, 1, 6]))
    positions[2] += 6
    for _ in range(2):
        steps.append(Batch(torch.randint(0, 512, (6,), generator=gen), tables, list(positions), [1] * 6))
        positions = [p + 1 for p in positions]
    steps.append(Batch(torch.randint(0, 512, (2,), generator=gen), [[free[-1]], [free[-2]]], [0, 3], [1, 1]))
    steps.append(Batch(torch.randint(0, 512, (1,), generator=gen), [tables[3]], [positions[3]], [1]))  # out of order
    steps.append(Batch(torch.randint(0, 512, (1,), generator=gen), [[0, 1]], [0], [1]))  # a one-token prompt
    steps.append(Batch(torch.randint(0, 512, (3,), generator=gen), [[free[-3]]], [0], [3]))  # a short prompt
    # Attention in the graph sums in another order than the op (test_model.py holds it to 1e-5 of a full
    # recompute); packed weights then get its output rounded to bfloat16 (--packed-activations), where a
    # last-bit difference may become one bfloat16 step (2^-7 relative) before the next layer.
    # 8-bit activations the same: a last-bit difference may move one of them a step (1/127 of its row's largest).
    # max-autotune's GEMM templates sum the packed products in another order than the ATen kernel, one more
    # source of such steps (measured: 1 of 4608 logits 0.022 apart in a 9-token prompt step).
    # A packed output layer is autotuned in every mode (Transformer._head): the same, on the logits alone.
    tol = 5e-2 if activations == "int8" or mode == "max-autotune" else 2e-2 if quantize == "int4" else 1e-4
    for i, batch in enumerate(steps):
        with torch.compiler.set_stance("fail_on_recompile"):  # build() compiled every graph a step needs
            compiled = models[True](batch, all_logits=True)
        eager = models[False](batch, all_logits=True)
        torch.testing.assert_close(compiled, eager, rtol=tol, atol=tol, msg=lambda m, i=i: f"step {i}: {m}")
    # Both wrote the same keys and values to the same blocks; nothing but the spare block past the pool
    # (where padded rows of "reduce-overhead" write) holds anything else.
    for layer, eager_layer in zip(models[True].layers, models[False].layers, strict=True):
        for name in ("k", "v"):
            got, expected = getattr(layer.attention.cache, name), getattr(eager_layer.attention.cache, name)
            torch.testing.assert_close(got[:-1], expected[:-1], rtol=tol, atol=tol)


def test_auto_compile_mode_autotunes_small_packed_layers_on_a_cpu_with_amx(tiny_checkpoints, monkeypatch):
    models = {quantize: build(tiny_checkpoints["hf"], max_batch_size=2, max_seq_len=64, quantize=quantize).model
              for quantize in ("int4", "int8", "none")}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert [models[q].auto_compile_mode() for q in ("int4", "int8", "none")] == ["max-autotune"] * 2 + ["default"]
    packed = sum(b.nbytes for layer in models["int4"].layers for b in layer.buffers() if b.dtype == torch.uint8)
    monkeypatch.setattr(model_module, "AUTO_AUTOTUNE_MAX_BYTES", packed - 1)  # under the packed weights alone
    assert models["int4"].auto_compile_mode() == "default"
    monkeypatch.setattr(model_module, "AUTO_AUTOTUNE_MAX_BYTES", 2**40)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert models["int4"].auto_compile_mode() == "default"


def test_a_packed_output_layer_is_autotuned_by_default_up_to_its_size_limit(tiny_checkpoints, monkeypatch):
    # Its frozen graphs keep repacked copies of the matrix (HEAD_AUTOTUNE_MAX_BYTES): a larger packed head,
    # or a float one, stays on the ATen kernel in the default mode.
    def head_autotuned(quantize: str) -> bool:
        model = build(tiny_checkpoints["hf"], max_batch_size=2, max_seq_len=64, quantize=quantize, compile=True).model
        assert model._head_autotuned == ("(autotuned" in model.compiled)
        return model._head_autotuned

    assert head_autotuned("int4") and not head_autotuned("none")
    monkeypatch.setattr(model_module, "HEAD_AUTOTUNE_MAX_BYTES", 1024)  # tiny's int4 head: 512 x 64 packed
    assert not head_autotuned("int4")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max-autotune"])
def test_frozen_graphs_follow_the_weights_they_are_built_for(tmp_path, monkeypatch, mode):
    """Frozen graphs hold the weights as constants: two checkpoints of the same shapes, built one after the
    other with one compile cache, must each give their own eager logits (torch 2.13's graph caches key a
    frozen graph on the weights' shapes only, so a cached graph would bring the first one's weights back),
    and building the first again (a restart) loads its frozen graphs from the cache instead of compiling
    them. max-autotune freezes the graphs of many rows; the default mode a packed output layer's
    (``Transformer._head``)."""
    from torch._dynamo.utils import counters

    from llama_grpc_devtools.make_checkpoint import write_checkpoint

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    prompt = Batch(torch.arange(1, 10), [[0]], [0], [9])
    paths = {seed: write_checkpoint(tmp_path / f"seed{seed}", "hf", preset="tiny", seed=seed, dtype=torch.float32)
             for seed in (1, 2)}
    hits = []
    for seed in (1, 2, 1):
        logits = {}
        for compile in (False, True):
            torch._dynamo.reset()
            counters.clear()
            model = build(paths[seed], max_batch_size=2, max_seq_len=64, quantize="int4", compile=compile,
                          compile_mode=mode).model
            logits[compile] = model(prompt, all_logits=True)
        hits.append(counters["inductor"]["fxgraph_cache_hit"])
        # As in the test above: a last-bit difference may become a bfloat16 step (measured here: <= 0.032).
        torch.testing.assert_close(logits[True], logits[False], rtol=5e-2, atol=5e-2)
    # The second checkpoint's frozen graphs were not the first's; the first's again were all cached (its
    # unfrozen graphs are the second's, cached by then as well).
    graphs = counters["inductor"]["fxgraph_cache_hit"] + counters["inductor"]["fxgraph_cache_miss"]
    assert hits[1] < graphs and hits[2] == graphs, (hits, graphs)
