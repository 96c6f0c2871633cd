"""The `kvengine` command as a user runs it (a real subprocess): output, --json, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kvtest import make_tiny_hf_folder

KVENGINE = [sys.executable, "-m", "kvengine.cli"]


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*KVENGINE, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_generate_json_reports_run_and_cache(tiny_folder):
    r = run("generate", "The reference topics", "--model", str(tiny_folder), "--max-tokens", "12",
            "--ignore-eos", "--json", "--weights", "fp32")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("text", "token_ids", "prompt_tokens", "completion_tokens", "ttft_s", "decode_tokens_per_s",
                "kv_cache_bytes", "use_cache"):
        assert key in data
    assert data["completion_tokens"] == len(data["token_ids"]) == 12 and data["use_cache"] is True
    # 2 layers x 2 kv heads x 16 dims x 2 (K, V) x 4 bytes = 512 bytes per token, for prompt + 11 computed
    assert data["kv_cache_bytes"] == 512 * (data["prompt_tokens"] + 11)
    assert "KV cache held" in r.stderr and "no-cache run computes" in r.stderr
    r2 = run("generate", "The reference topics", "--model", str(tiny_folder), "--max-tokens", "12",
             "--ignore-eos", "--json", "--no-cache", "--weights", "fp32")
    nocache = json.loads(r2.stdout.strip().splitlines()[-1])
    assert nocache["token_ids"] == data["token_ids"] and nocache["kv_cache_bytes"] == 0


def test_generate_streams_text(tiny_folder):
    r = run("generate", "Hello", "--model", str(tiny_folder), "--max-tokens", "5", "--ignore-eos", "--raw")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "time to first token" in r.stderr


def _corrupt_gguf(tmp: Path) -> Path:
    p = tmp / "broken.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    return p


def _falcon_gguf(tmp: Path) -> Path:
    import gguf
    import numpy as np

    p = tmp / "falcon.gguf"
    w = gguf.GGUFWriter(str(p), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "arch", "max_tokens", "dtype", "device",
                                  "too_long"])
def test_bad_input_is_one_clear_line(case, tmp_path, tiny_folder, default_gguf):
    args, expect = {
        "missing": (["--model", str(tmp_path / "nope.gguf")], "not found: no file or folder at"),
        "corrupt": (["--model", str(_corrupt_gguf(tmp_path))], "is truncated or corrupt"),
        "truncated": (["--model", str(_truncated(default_gguf, tmp_path))], "is truncated"),
        "arch": (["--model", str(_falcon_gguf(tmp_path))], "unsupported GGUF architecture 'falcon' (supported: "),
        "max_tokens": (["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
        "dtype": (["--dtype", "float64"], "unknown dtype 'float64'"),
        "device": (["--device", "tpu"], "unknown device 'tpu'"),
        "too_long": (["--model", str(tiny_folder), "--raw"], "the prompt has"),
    }[case]
    prompt = "word " * 200 if case == "too_long" else "hi"
    r = run("generate", prompt, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_a_kernel_tier_the_cpu_cannot_run_is_one_clear_line(tiny_folder):
    """KVENGINE_ISA naming no tier (or one the CPU lacks): one error line naming the tiers this CPU runs."""
    env = {**os.environ, "KVENGINE_ISA": "sse9"}
    r = subprocess.run([*KVENGINE, "generate", "hi", "--model", str(tiny_folder)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    want = "error: KVENGINE_ISA=sse9 is not a kernel tier (amx, avx512vnni, avx512, avxvnni, avx2, portable); this "
    assert len(lines) == 1 and lines[0].startswith(want), r.stderr


def _truncated(src: Path, tmp: Path) -> Path:
    p = tmp / "truncated.gguf"
    with src.open("rb") as f:
        p.write_bytes(f.read(20 << 20))  # the header and some tensors, not all
    return p


def test_generate_with_a_bounded_cache_runs_past_the_window(tiny_folder):
    """--kv-window 8 --sink-tokens 2: the KV held at the end is 10 tokens' worth, whatever the length."""
    r = run("generate", "The reference topics", "--model", str(tiny_folder), "--max-tokens", "40", "--ignore-eos",
            "--json", "--kv-window", "8", "--sink-tokens", "2", "--weights", "fp32")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout.strip().splitlines()[-1])
    assert data["completion_tokens"] == 40
    assert data["kv_cache_bytes"] == 512 * 10  # 512 bytes per token (see above) x (2 sinks + 8 recent)
    assert "every layer keeps at most 2 sink + 8 recent tokens" in r.stderr
    bad = run("generate", "hi", "--model", str(tiny_folder), "--sink-tokens", "2")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: sink_tokens needs kv_window (the recent tokens kept beside the sinks)"
