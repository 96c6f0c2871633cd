#!/usr/bin/env python3
"""/health latency while the server refuses a maximum-size request (issue 18: the event loop never does work
proportional to a request's size). Starts `kvengine serve` (the default model, or --model) unless --port names a
running server, then for each case sends one big request from a thread and polls /health every 10 ms until it is
answered; prints the median and max /health latency per case, idle first.

Cases: a completions prompt and a chat message filling the body limit (parsed off the loop, refused 400 as longer
than the context), and a body one byte over the limit (refused 413 while it is read).

    .venv/bin/python scripts/health_during_refusal.py [--model PATH] [--port PORT]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import threading
import time

from kvengine.server.state import MAX_BODY_BYTES


def post(port: int, path: str, body: bytes, out: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    start = time.perf_counter()
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        status = conn.getresponse().status
    except OSError as e:  # a 413 may close the connection while the body is still being sent
        status = type(e).__name__
    out.append((status, time.perf_counter() - start))
    conn.close()


def health_ms(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start = time.perf_counter()
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200
    conn.close()
    return (time.perf_counter() - start) * 1000


def filled(template: dict, key_path: list[str | int], size: int) -> bytes:
    """`template` with the string at key_path grown so the JSON body is exactly `size` bytes."""
    base = len(json.dumps(template).encode())
    node = template
    for k in key_path[:-1]:
        node = node[k]
    node[key_path[-1]] = "x" * (size - base)
    return json.dumps(template).encode()


def measure(port: int, path: str, body: bytes) -> tuple[list[float], tuple]:
    result: list = []
    sender = threading.Thread(target=post, args=(port, path, body, result))
    sender.start()
    latencies = []
    while sender.is_alive():
        latencies.append(health_ms(port))
        time.sleep(0.01)
    sender.join()
    return latencies, result[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=None, help="a running server's port (else one is started)")
    args = ap.parse_args()
    proc, port = None, args.port or 18431
    if args.port is None:
        cmd = [sys.executable, "-m", "kvengine.cli", "serve", "--port", str(port), "--log-level", "warning"]
        proc = subprocess.Popen(cmd + (["--model", args.model] if args.model else []))
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                health_ms(port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.5)
        idle = [health_ms(port) for _ in range(50)]
        print(f"idle: /health median {statistics.median(idle):.1f} ms, max {max(idle):.1f} ms (50 polls)", flush=True)
        cases = [("completions prompt at the limit", "/v1/completions",
                  filled({"prompt": "", "max_tokens": 1}, ["prompt"], MAX_BODY_BYTES)),
                 ("chat message at the limit", "/v1/chat/completions",
                  filled({"messages": [{"role": "user", "content": ""}]}, ["messages", 0, "content"], MAX_BODY_BYTES)),
                 ("body 1 byte over the limit", "/v1/completions",
                  filled({"prompt": ""}, ["prompt"], MAX_BODY_BYTES + 1))]
        for name, path, body in cases:
            lat, (status, seconds) = measure(port, path, body)
            print(f"{name} ({len(body)} bytes): refused {status} in {seconds * 1000:.0f} ms; /health during it: "
                  f"{len(lat)} polls, median {statistics.median(lat):.1f} ms, max {max(lat):.1f} ms", flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
