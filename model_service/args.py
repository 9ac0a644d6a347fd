"""Architecture of a Llama 3 model: one frozen dataclass, built from whatever config a checkpoint carries.

Only architecture lives here. Runtime limits (cache slots, serving sequence length, dtype, device) are
given to ``Transformer.setup_caches``; per-rank sizes under tensor parallelism are computed where the
layers are built.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

# Meta's reference applies these whenever params.json says use_scaled_rope (it hard-codes them; newer
# params.json files may spell them out, and HF configs always do).
LLAMA3_ROPE_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_context": 8192}


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: plain multi-head attention
    vocab_size: int = 128256
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit SwiGLU hidden size (HF / GGUF state it), else derived
    head_dim_override: int | None = None  # only when a config states head_dim != dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Llama 3.1 / 3.2 frequency-dependent RoPE scaling
    rope_scaling_factor: float = LLAMA3_ROPE_SCALING["factor"]
    rope_low_freq_factor: float = LLAMA3_ROPE_SCALING["low_freq_factor"]
    rope_high_freq_factor: float = LLAMA3_ROPE_SCALING["high_freq_factor"]
    rope_original_context: int = LLAMA3_ROPE_SCALING["original_context"]
    max_seq_len: int = 8192  # the context the checkpoint was trained for, not the serving limit
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_heads <= 0 or self.dim <= 0 or self.n_layers <= 0:
            raise ValueError(f"dim, n_layers and n_heads must be positive: {self}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not a multiple of n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        # Meta's rule: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    # ---- constructors -------------------------------------------------------------------------

    @classmethod
    def from_params_json(cls, path: str | Path) -> ModelArgs:
        """Meta's ``params.json`` (vocab_size may be -1 there; the caller fills it from the weights)."""
        params: dict[str, Any] = json.loads(Path(path).read_text())
        use_scaled = bool(params.get("use_scaled_rope", False))
        return cls(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=params.get("vocab_size", -1),
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=params.get("norm_eps", 1e-5),
            rope_theta=params.get("rope_theta", 500000.0),
            use_scaled_rope=use_scaled,
            rope_scaling_factor=params.get("rope_scaling_factor") or LLAMA3_ROPE_SCALING["factor"],
            rope_high_freq_factor=params.get("rope_high_freq_factor") or LLAMA3_ROPE_SCALING["high_freq_factor"],
            # params.json has no context length: Llama 3 was trained for 8K, 3.1 / 3.2 for 128K.
            max_seq_len=params.get("max_seq_len") or (131072 if use_scaled else 8192),
        )

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """A Hugging Face ``config.json`` of a ``LlamaForCausalLM`` (transformers 4.x or 5.x spelling)."""
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"config.json describes model_type={model_type!r}; only Llama models are supported")
        if config.get("attention_bias") or config.get("mlp_bias"):
            raise ValueError("config.json asks for attention/MLP biases, which the Llama 3 architecture has none of")
        # transformers 5 moved rope_theta and rope_scaling into rope_parameters.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"RoPE scaling type {rope_type!r} is not supported (only default and llama3)")
        n_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim")
        scaled = rope_type == "llama3"
        return cls(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            head_dim_override=head_dim if head_dim and head_dim != config["hidden_size"] // n_heads else None,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            use_scaled_rope=scaled,
            rope_scaling_factor=float(rope.get("factor", 8.0)) if scaled else LLAMA3_ROPE_SCALING["factor"],
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)) if scaled else 1.0,
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)) if scaled else 4.0,
            rope_original_context=int(rope.get("original_max_position_embeddings", 8192)) if scaled else 8192,
            max_seq_len=config.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    @classmethod
    def from_gguf(cls, metadata: dict[str, Any], rope_freq_factors: list[float] | None,
                  has_output_weight: bool) -> ModelArgs:
        """GGUF key/values of a ``general.architecture == llama`` file.

        llama.cpp stores Llama 3.1 scaling not as keys but as a ``rope_freqs`` tensor of per-frequency
        divisors; ``rope_freq_factors`` is that tensor. We recover the scaling parameters from it and
        check that they reproduce it exactly, so an unfamiliar scheme fails loudly instead of silently.
        """
        arch = metadata.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"GGUF general.architecture is {arch!r}; only 'llama' is supported")
        n_heads = int(metadata["llama.attention.head_count"])
        dim = int(metadata["llama.embedding_length"])
        head_dim = int(metadata.get("llama.rope.dimension_count") or dim // n_heads)
        vocab = metadata.get("llama.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
        args = cls(
            dim=dim,
            n_layers=int(metadata["llama.block_count"]),
            n_heads=n_heads,
            n_kv_heads=int(metadata.get("llama.attention.head_count_kv") or n_heads),
            vocab_size=int(vocab),
            hidden_dim=int(metadata["llama.feed_forward_length"]),
            head_dim_override=head_dim if head_dim != dim // n_heads else None,
            norm_eps=float(metadata.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(metadata.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=int(metadata.get("llama.context_length", 8192)),
            tie_word_embeddings=not has_output_weight,
        )
        if rope_freq_factors is None:
            return args
        scaled = replace(args, use_scaled_rope=True, rope_scaling_factor=float(max(rope_freq_factors)))
        expected = llama3_rope_divisors(scaled)
        if any(not math.isclose(a, b, rel_tol=1e-4) for a, b in zip(expected, rope_freq_factors, strict=True)):
            raise ValueError("GGUF rope_freqs tensor does not match Llama 3.1 RoPE scaling; cannot load it")
        return scaled


def llama3_rope_divisors(args: ModelArgs) -> list[float]:
    """Per-frequency divisors that Llama 3.1 scaling applies (what llama.cpp writes as ``rope_freqs``)."""
    low_wavelen = args.rope_original_context / args.rope_low_freq_factor
    high_wavelen = args.rope_original_context / args.rope_high_freq_factor
    divisors = []
    for i in range(0, args.head_dim, 2):
        freq = 1.0 / (args.rope_theta ** (i / args.head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            divisors.append(1.0)
        elif wavelen > low_wavelen:
            divisors.append(args.rope_scaling_factor)
        else:
            smooth = (args.rope_original_context / wavelen - args.rope_low_freq_factor) / (
                args.rope_high_freq_factor - args.rope_low_freq_factor)
            divisors.append(1.0 / ((1 - smooth) / args.rope_scaling_factor + smooth))
    return divisors
