"""The llama.cpp peer's own process: `bench peers` starts this file by path (`python llama_worker.py`) and drives
it over pipes, one JSON request per line in, one JSON reply per line out.

Started by path, the process imports neither kvengine nor PyTorch: llama.cpp's runtime (its OpenMP thread pool,
its CPU kernels) has the process to itself, so nothing the two libraries share can skew a timing, and a crash
inside llama.cpp ends this process, not the bench. Timestamps are taken here, next to the tokens.

Requests: {"op": "load", "path", "threads", "n_ctx", "extra_bufts"} -> {"version", "system_info"};
{"op": "generate", "ids", "n"} -> {"tokens", "times", "text"}. A Python error is {"error": "<one line>"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, TextIO


class Worker:
    def __init__(self) -> None:
        self.llm: Any = None

    def load(self, path: str, threads: int, n_ctx: int, extra_bufts: bool = True) -> dict[str, Any]:
        import llama_cpp
        import llama_cpp.llama as llama_module

        if not extra_bufts:  # no repacked/AMX weight buffers: the Llama constructor takes no flag for it
            defaults = llama_cpp.llama_model_default_params

            def params() -> Any:
                p = defaults()
                p.use_extra_bufts = False
                return p

            llama_module.llama_cpp.llama_model_default_params = params
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_ctx=n_ctx, verbose=False, seed=0)
        return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}

    def generate(self, ids: list[int], n: int) -> dict[str, Any]:
        """Greedy, exactly `n` tokens after `ids` (no reuse of an earlier run's KV), each timestamped."""
        self.llm.reset()
        tokens: list[int] = []
        times: list[float] = []
        t0 = time.perf_counter()
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            times.append(time.perf_counter() - t0)
            tokens.append(int(tok))
            if len(tokens) == n:
                break
        text = self.llm.detokenize(tokens).decode("utf-8", errors="replace")
        return {"tokens": tokens, "times": times, "text": text}


def serve(requests: TextIO, replies: TextIO) -> None:
    worker = Worker()
    for line in requests:
        req = json.loads(line)
        op = req.pop("op")
        try:
            reply = getattr(worker, op)(**req) if op in ("load", "generate") else {"error": f"unknown op {op!r}"}
        except Exception as e:  # reported to the bench as one line
            text = str(e).strip().splitlines()
            reply = {"error": f"{type(e).__name__}: {text[0]}" if text else type(e).__name__}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    replies = os.fdopen(os.dup(1), "w")  # the protocol keeps the real stdout;
    os.dup2(2, 1)  # anything the C libraries print goes to stderr
    serve(sys.stdin, replies)
