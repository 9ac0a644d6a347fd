"""Settings for every test session."""

import os

# Model services started by tests (in-process or as subprocesses, which inherit this) run eager unless a
# test asks for --compile: compiling takes ~15 s a start even with a warm cache, and most tests start
# several services. tests/model_service/test_model_compile.py covers the compiled path and the default.
os.environ.setdefault("LLAMA_MODEL_COMPILE", "0")
