"""Chat roles and chat-format names: one list for the gateway's validation and every chat format."""

from __future__ import annotations

# "ipython" is the role whose results a tool call returns in Llama 3.1; "tool" is llama-models' name
# for it (its header still reads "ipython").
ROLES = ("system", "user", "assistant", "ipython", "tool")

LLAMA3_CHAT_FORMAT = "llama3"  # Meta's ChatFormat, for a tiktoken tokenizer.model
JINJA_CHAT_FORMAT = "jinja"  # the model's own template (GGUF metadata or tokenizer_config.json)
NO_CHAT_FORMAT = "none"
