"""llama.cpp side of bench/vs_llamacpp.py: batched multi-sequence greedy decode through
llama-cpp-python's low-level API (one `llama_batch`, one token per sequence per step).

Runs in its own venv (the `bench` extra: llama-cpp-python); imports nothing of sinkserve.
Protocol: argv = GGUF path, threads; then one request per stdin line
`{"sequences": N, "prompt_tokens": P, "new_tokens": G}`, one JSON reply per stdout line:
prefill time, decode time and tok/s for the G decode steps of all N sequences.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from typing import Any

import llama_cpp as L
import numpy as np


def run(
    model: object, threads: int, n_seq: int, prompt_len: int, new_tokens: int
) -> dict[str, Any]:
    per_seq = prompt_len + new_tokens + 16
    cp = L.llama_context_default_params()
    cp.n_seq_max = n_seq
    cp.n_ctx = n_seq * per_seq  # split evenly between the sequences (kv_unified off)
    cp.n_batch = max(cp.n_ctx, 512)
    cp.n_ubatch = 512
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.kv_unified = False
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama_init_from_model failed")
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(max(n_seq * prompt_len, n_seq), 0, 1)
    try:
        # The same token-id prompt for every sequence (ids 1000.. are ordinary words).
        prompt = [1000 + (i * 7) % 5000 for i in range(prompt_len)]
        t0 = time.perf_counter()
        n = 0
        for s in range(n_seq):
            for i, tok in enumerate(prompt):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = tok, i, 1
                batch.seq_id[n][0] = s
                batch.logits[n] = i == prompt_len - 1
                n += 1
        batch.n_tokens = n
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("prefill llama_decode failed")
        last = [(s + 1) * prompt_len - 1 for s in range(n_seq)]
        t1 = time.perf_counter()
        pos = prompt_len
        for _ in range(new_tokens):
            nxt = [greedy(ctx, row, n_vocab) for row in last]
            for s, tok in enumerate(nxt):
                batch.token[s], batch.pos[s], batch.n_seq_id[s] = tok, pos, 1
                batch.seq_id[s][0] = s
                batch.logits[s] = True
            batch.n_tokens = n_seq
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("decode llama_decode failed")
            last = list(range(n_seq))
            pos += 1
        t2 = time.perf_counter()
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    return {
        "sequences": n_seq,
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "decode_tok_s": n_seq * new_tokens / (t2 - t1),
    }


def greedy(ctx: object, row: int, n_vocab: int) -> int:
    ptr = L.llama_get_logits_ith(ctx, row)
    logits = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (n_vocab,))
    return int(logits.argmax())


def main() -> None:
    path, threads = sys.argv[1], int(sys.argv[2])
    L.llama_backend_init()
    quiet = L.llama_log_callback(lambda level, text, data: None)  # referenced until exit
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
    if not model:
        raise RuntimeError(f"cannot load {path}")
    print(json.dumps({"ready": True, "system_info": L.llama_print_system_info().decode()}))
    sys.stdout.flush()
    for line in sys.stdin:
        req = json.loads(line)
        out = run(model, threads, req["sequences"], req["prompt_tokens"], req["new_tokens"])
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
