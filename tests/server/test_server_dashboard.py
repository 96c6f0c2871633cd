"""The dashboard: its static files and JSON, and the page rendered by headless Chromium (Debian's package)
while requests hold KV blocks: a real screenshot, and the live numbers in the DOM equal the engine's stats."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
SHARED = "A system prompt long enough to fill several blocks of sixteen tokens, shared by every request. " * 2


def chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", "--window-size=1280,900", "--virtual-time-budget=3000", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def dom_number(dom: str, element_id: str) -> str:
    m = re.search(rf'id="{element_id}"[^>]*>([^<]*)<', dom)
    assert m, f"#{element_id} not in the DOM"
    return m.group(1)


def test_static_files_and_state_json(tiny_server):
    status, headers, html = tiny_server.request("GET", "/dashboard")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for asset in re.findall(r'(?:src|href)="(/dashboard/static/[^"]+)"', html):
        assert tiny_server.request("GET", asset)[0] == 200, asset
    state = tiny_server.state_json()
    engine_stats = tiny_server.llm.engine.block_tables.stats()
    assert state["blocks_total"] == engine_stats.total
    assert state["kv_dtype"] == "float32" and state["bytes_per_token"] == tiny_server.llm.kv_cache_spec.bytes_per_token
    assert {"tokens_per_s", "prefix_hit_rate", "running", "waiting", "requests", "model"} <= set(state)


def open_streams(served, prompts: list[str]) -> list[http.client.HTTPConnection]:
    """Start streaming requests one after the other (each past its first token, so later ones share the
    earlier ones' prefix blocks)."""
    conns = []
    for prompt in prompts:
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
        body = {"prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: {")
        conns.append(conn)
    return conns


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (scripts/setup --test installs it)")
def test_headless_chromium_shows_the_live_numbers(start_server, tmp_path):
    served = start_server(max_num_seqs=8)
    conns = open_streams(served, [SHARED + f"Question {i}?" for i in range(5)] + ["Something else entirely."])
    served.state.engine.pause()  # freeze the numbers while the browser looks
    try:
        state = served.wait_for(lambda s: s["running"] == 6)
        assert state["blocks_shared"] > 0
        url = f"{served.url}/dashboard"
        shot = tmp_path / "dashboard.png"
        done = chromium(url, tmp_path / "profile", f"--screenshot={shot}")
        assert done.returncode == 0, done.stderr[-2000:]
        assert png_size(shot) == (1280, 900)
        assert shot.stat().st_size > 20_000  # a drawn page, not a blank one
        dom = chromium(url, tmp_path / "profile", "--dump-dom")
        assert dom.returncode == 0, dom.stderr[-2000:]
        assert dom_number(dom.stdout, "blocks-used") == str(state["blocks_used"])
        assert dom_number(dom.stdout, "blocks-total") == str(state["blocks_total"])
        assert dom_number(dom.stdout, "blocks-shared") == str(state["blocks_shared"])
        assert dom_number(dom.stdout, "running") == "6"
        assert dom_number(dom.stdout, "kv-dtype") == "float32"
        assert dom_number(dom.stdout, "bytes-per-token") == "512 B"
        assert dom_number(dom.stdout, "hit-rate") == f"{100 * state['prefix_hit_rate']:.1f}%"
        assert dom.stdout.count('<span class="pill running">') == 6
    finally:
        served.state.engine.resume()
        for conn in conns:
            conn.close()
    served.wait_for(lambda s: s["running"] == 0 and s["blocks_used"] == 0)


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (scripts/setup --test installs it)")
def test_headless_chromium_shows_the_disk_tier(start_server, tmp_path):
    """A server with --kv-disk-dir writes a prompt's full blocks; a second server on the same directory loads them
    for the same prompt; its dashboard's disk card, as the browser renders it, shows the tier's counters."""
    disk = tmp_path / "kv"
    prompt = {"prompt": SHARED, "max_tokens": 2, "temperature": 0}
    first = start_server(kv_disk_dir=str(disk))
    assert first.request("POST", "/v1/completions", prompt)[0] == 200
    first.wait_for(lambda s: s["disk"]["store_writes"] > 0 and s["disk"]["pending"] == 0)
    served = start_server(kv_disk_dir=str(disk))
    status, _, body = served.request("POST", "/v1/completions", prompt)
    assert status == 200 and body["usage"]["kvengine"]["cached_tokens_disk"] > 0
    d = served.state_json()["disk"]
    dom = chromium(f"{served.url}/dashboard", tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(r'id="disk-card"(?![^>]*hidden)', dom.stdout), "the disk card is hidden"
    assert dom_number(dom.stdout, "disk-dir") == str(disk)
    assert dom_number(dom.stdout, "disk-files") == str(d["store_files"])
    assert dom_number(dom.stdout, "disk-tokens") == str(d["tokens_loaded"]) != "0"
    assert dom_number(dom.stdout, "disk-hits") == str(d["store_reads"]) != "0"
    assert dom_number(dom.stdout, "disk-written") == str(d["store_writes"])
    assert dom_number(dom.stdout, "disk-budget").endswith("iB")
