"""`kvengine serve --kv-disk-dir`: a real server process, killed with SIGKILL after a conversation's first turn and
started again on the same directory, answers the second turn (a 2,000+ token history) from disk with the same
tokens as a server that never stopped, computing only the new turn; salts stay apart across the restart; bad
directories and budgets are one error line before the model loads."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from kvtest import make_tiny_hf_folder

KVENGINE = [sys.executable, "-m", "kvengine.cli"]
HISTORY = " ".join(f"item {i} of the list, remember it." for i in range(100))  # 2,000+ tokens of history


@pytest.fixture(scope="module")
def long_folder(tmp_path_factory):
    return make_tiny_hf_folder(tmp_path_factory.mktemp("kvdisk") / "tiny-long", max_position_embeddings=8192)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, folder, disk_dir=None) -> None:
        self.port = free_port()
        args = [*KVENGINE, "serve", "--model", str(folder), "--port", str(self.port), "--kv-cache-memory", "64e6",
                "--log-level", "warning"]
        if disk_dir is not None:
            args += ["--kv-disk-dir", str(disk_dir), "--kv-disk-budget", "1"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            assert self.proc.poll() is None, self.proc.stderr.read()
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        import openai

        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def chat(self, messages, salt=None):
        extra = {"ignore_eos": True, **({"cache_salt": salt} if salt else {})}
        return self.client.chat.completions.create(model="tiny-long", messages=messages, max_tokens=12,
                                                   temperature=0, extra_body=extra)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            return r.read().decode()

    def wait_written(self) -> None:
        """Until the disk writer's queue is empty (what a kill -9 would lose otherwise)."""
        deadline = time.monotonic() + 60
        while "kvengine_kv_disk_pending 0.0" not in self.metrics():
            assert time.monotonic() < deadline
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()


def turns():
    first = [{"role": "user", "content": HISTORY + " What was item 7?"}]
    return first, lambda answer: [*first, {"role": "assistant", "content": answer},
                                  {"role": "user", "content": "And item 12?"}]


def test_second_turn_after_kill_9_comes_from_disk(long_folder, tmp_path):
    pytest.importorskip("openai")
    first, second = turns()
    plain = Server(long_folder)  # the uninterrupted run, no disk tier
    try:
        ref1 = plain.chat(first)
        ref2 = plain.chat(second(ref1.choices[0].message.content))
    finally:
        plain.kill()
    assert ref1.usage.prompt_tokens > 2000

    server = Server(long_folder, tmp_path / "kv")
    try:
        one = server.chat(first)
        server.wait_written()
    finally:
        server.kill()
    assert one.choices[0].message.content == ref1.choices[0].message.content
    assert (tmp_path / "kv" / "blocks").is_dir() and oct((tmp_path / "kv").stat().st_mode & 0o777) == "0o700"

    restarted = Server(long_folder, tmp_path / "kv")
    try:
        two = restarted.chat(second(one.choices[0].message.content))
        text = restarted.metrics()
    finally:
        restarted.kill()
    assert two.choices[0].message.content == ref2.choices[0].message.content
    assert two.usage.completion_tokens == ref2.usage.completion_tokens
    cached = two.usage.prompt_tokens_details.cached_tokens
    ext = two.usage.model_extra["kvengine"]
    assert cached > 2000 and ext["cached_tokens_disk"] == cached and ext["cached_tokens_memory"] == 0
    assert ext["miss_reason"] == "loaded_from_disk" and ext["disk_bytes_read"] > 0
    new_turn = two.usage.prompt_tokens - one.usage.prompt_tokens
    assert two.usage.prompt_tokens - cached <= new_turn + 16  # only the new turn (and a partial block) computed
    assert f"kvengine_kv_disk_tokens_loaded_total {float(cached)}" in text


def test_salts_stay_apart_across_a_restart(long_folder, tmp_path):
    pytest.importorskip("openai")
    first, _ = turns()
    server = Server(long_folder, tmp_path / "kv")
    try:
        server.chat(first, salt="tenant-a")
        server.wait_written()
    finally:
        server.kill()
    restarted = Server(long_folder, tmp_path / "kv")
    try:
        other = restarted.chat(first, salt="tenant-b")
        same = restarted.chat(first[:1], salt="tenant-a")
    finally:
        restarted.kill()
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert other.usage.model_extra["kvengine"]["cached_tokens_disk"] == 0
    assert same.usage.model_extra["kvengine"]["cached_tokens_disk"] > 2000


@pytest.mark.parametrize("args, message", [
    (["--kv-disk-dir", "{file}"], "is not a directory"),
    (["--kv-disk-dir", "{dir}", "--kv-disk-budget", "-1"], "must be a positive number of GiB"),
    (["--kv-disk-dir", "{dir}", "--kv-disk-budget", "1e12"], "exceeds the size of the file system"),
    (["--kv-disk-budget", "2"], "needs --kv-disk-dir"),
])
def test_bad_disk_settings_are_refused_before_the_model_loads(tmp_path, args, message):
    from typer.testing import CliRunner

    import kvengine.cli.serve  # noqa: F401  registers `serve`
    from kvengine.cli.app import app
    from kvengine.errors import ConfigError

    f = tmp_path / "file"
    f.write_text("")
    args = [a.format(file=f, dir=tmp_path / "kv") for a in args]
    # a model that does not exist: the disk settings must be refused before the model is even looked for
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "no-model"), *args])
    assert isinstance(result.exception, ConfigError) and message in result.exception.message


def test_a_bad_directory_is_one_error_line(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    result = subprocess.run([*KVENGINE, "chat", "--model", str(tmp_path / "no-model"), "--kv-disk-dir", str(f)],
                            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and "--kv-disk-dir" in lines[0]


def test_metrics_and_dashboard_show_the_disk_tier(start_server, tmp_path):
    served = start_server(kv_disk_dir=str(tmp_path / "kv"))
    body = {"prompt": "a prompt long enough to fill a few blocks of sixteen tokens " * 4, "max_tokens": 4}
    assert served.request("POST", "/v1/completions", body)[0] == 200
    served.llm.engine.disk.flush()
    served.llm.engine.block_tables.manager.reset_prefix_cache()
    status, _, again = served.request("POST", "/v1/completions", body)
    assert status == 200 and again["usage"]["kvengine"]["cached_tokens_disk"] > 0
    disk = served.state_json()["disk"]
    assert disk["dir"] == str(tmp_path / "kv") and disk["store_files"] > 0 and disk["tokens_loaded"] > 0
    _, _, text = served.request("GET", "/metrics")
    for name in ("tokens_loaded_total", "store_reads_total", "store_misses_total", "store_bytes_read_total",
                 "store_evictions_total", "store_files", "store_budget", "writes_stopped"):
        assert f"kvengine_kv_disk_{name} " in text, name
    _, _, html = served.request("GET", "/dashboard")
    assert 'id="disk-card"' in html
