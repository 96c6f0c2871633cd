"""Server test fixtures: a tiny real HF model folder, servers on 127.0.0.1 (uvicorn in a thread, free port),
and raw-HTTP helpers for what the openai client would never send."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kvtest import make_tiny_hf_folder

from kvengine.llm import LLM
from kvengine.server.app import ServerThread, create_app

TINY_KV_BYTES = 4 << 20  # 512 blocks of 16 tokens for the tiny model (512 bytes per token)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("server") / "tiny", max_position_embeddings=512)


@pytest.fixture(scope="session")
def tiny_reference(tiny_folder) -> LLM:
    """A second engine on the same weights, for offline reference outputs (never served)."""
    return LLM(str(tiny_folder), weights="fp32", kv_cache_memory=TINY_KV_BYTES)


class Served:
    """A running server: its url, the LLM it serves and its app state (engine thread, metrics)."""

    def __init__(self, llm: LLM, **app_args: Any) -> None:
        self.llm = llm
        self.app = create_app(llm, **app_args)
        self.state = self.app.state.kv
        self.thread = ServerThread(self.app).start()
        self.url = self.thread.url
        self.port = self.thread.port

    def stop(self) -> None:
        self.state.engine.resume()
        self.thread.stop()

    def request(self, method: str, path: str, body: bytes | str | dict | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        """Raw HTTP; returns (status, headers, parsed JSON or text)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = json.dumps(body).encode() if isinstance(body, dict) else body
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read().decode()
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, parsed
        finally:
            conn.close()

    def state_json(self) -> dict[str, Any]:
        keys = self.state.api_keys
        auth = {"Authorization": f"Bearer {keys[0].decode()}"} if keys else None
        status, _, data = self.request("GET", "/dashboard/state", headers=auth)
        assert status == 200
        return data

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 20.0) -> dict[str, Any]:
        """Poll /dashboard/state until predicate(state) holds (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.state_json()
            if predicate(data):
                return data
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout} s; last state: {data}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def start_server(tiny_folder):
    """start_server(**app_args) -> Served on a fresh tiny engine (or on `llm=`, one the test built); every server is
    stopped after the module."""
    servers: list[Served] = []

    def start(llm: LLM | None = None, **app_args: Any) -> Served:
        if llm is None:
            llm = LLM(str(tiny_folder), weights="fp32",
                      kv_cache_memory=app_args.pop("kv_cache_memory", TINY_KV_BYTES),
                      max_num_seqs=app_args.pop("max_num_seqs", 64), kv_disk_dir=app_args.pop("kv_disk_dir", None),
                      max_model_len=app_args.pop("max_model_len", None))
        servers.append(Served(llm, **app_args))
        return servers[-1]

    yield start
    for served in servers:
        served.stop()


@pytest.fixture(scope="module")
def tiny_server(start_server):
    return start_server()


@pytest.fixture
def client(tiny_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
