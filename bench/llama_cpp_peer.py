"""llama.cpp (llama-cpp-python) on a GGUF file, driven over stdin/stdout JSON; runs in the peer venv
that `make peers` builds (.peers/venv), which has no torch. Used by `make bench` and by the greedy
agreement test (tests/model_service/test_llama_cpp_agreement.py).

Input, one JSON object: {"model": PATH, "threads": 2, "n_ctx": 2048, "jobs": [JOB, ...]} where a JOB is
{"prompt": TEXT or "prompt_ids": [ids], "max_new_tokens": N}. Output, one JSON object:
{"results": [{"prompt_ids": [...], "token_ids": [...], "ttft_s": s, "decode_tok_s": r}, ...], "rss_mb": m}.
Decoding is greedy (top_k=1, no penalties) and stops at the file's end-of-generation token.
"""

from __future__ import annotations

import json
import resource
import sys
import time


def main() -> None:
    import llama_cpp
    import llama_cpp.llama_cpp as llama_cpp_c

    # No repacked weight buffers ("extra buffer types"): on CPUs that report AMX, llama.cpp 0.3.36 crashes
    # in the first decode step without this, even built with GGML_AMX_INT8=OFF (the Makefile's flag, which
    # was enough on the machine of earlier rounds). Llama() takes no argument for it, so the defaults it
    # starts from are patched.
    default_params = llama_cpp_c.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp_c.llama_model_default_params = model_params
    spec = json.load(sys.stdin)
    threads = int(spec.get("threads", 2))
    llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=int(spec.get("n_ctx", 2048)), n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    results = []
    for job in spec["jobs"]:
        ids = job.get("prompt_ids") or llm.tokenize(job["prompt"].encode(), add_bos=False, special=True)
        started, stamps, tokens = time.perf_counter(), [], []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            if llama_cpp.llama_token_is_eog(llm._model.vocab, token):
                break
            tokens.append(int(token))
            if len(tokens) >= int(job["max_new_tokens"]):
                break
        decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
        results.append({"prompt_ids": [int(i) for i in ids], "token_ids": tokens,
                        "ttft_s": stamps[0] - started if stamps else None, "decode_tok_s": decode})
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    json.dump({"results": results, "rss_mb": rss_mb}, sys.stdout)


if __name__ == "__main__":
    main()
