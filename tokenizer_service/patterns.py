"""Pre-tokenizer regexes (how text is cut into pieces before BPE), by the name llama.cpp writes to
``tokenizer.ggml.pre``."""

from __future__ import annotations

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2's tokenizer.json runs Digits(individual_digits) then GPT-2's ByteLevel regex; this single
# pattern reproduces that pair exactly (the digits split is why a space before a digit stands alone).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?=\p{N})|\s+(?!\S)|\s+"""
# Meta's Llama 3 tokenizer.py ``pat_str``.
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
GGUF_PRE_TOKENIZERS = {
    "default": GPT2_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "smollm": SMOLLM_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
}
