"""`kvengine bench sessions` on a tiny model: four servers (child processes, each killed with SIGKILL after the
first turn and started again), the turn after the restart served from disk only where the directory was kept."""

from __future__ import annotations

import pytest

from kvengine.bench.sessions import MODES
from kvengine.errors import ConfigError


def test_bench_sessions_files_and_fields(bench_folder, run_bench, check_common):
    pytest.importorskip("openai")
    _, last, data, out = run_bench("sessions", "-m", str(bench_folder), "--users", "1", "--turns", "2",
                                   "--history-items", "8", "--max-tokens", "3")
    check_common(data, last, out, "sessions")
    turns = data["results"]["turns"]
    assert len(turns) == len(MODES) * 2
    after = {t["mode"]: t for t in turns if t["turn"] == 1}
    assert after["memory + disk"]["disk_tokens"] > 0
    assert after["memory + disk"]["cached_tokens"] == after["memory + disk"]["disk_tokens"]
    assert after["memory + empty disk"]["cached_tokens"] == 0 and after["memory only"]["cached_tokens"] == 0
    assert after["no prefix cache"]["cached_tokens"] == 0
    assert last["restart_turn"] == 2 and set(last["ttft_after_restart_s"]) == set(MODES)


def test_bench_sessions_refuses_a_restart_with_no_turn_after_it(bench_folder, run_bench):
    with pytest.raises(ConfigError, match="--restart-after"):
        run_bench("sessions", "-m", str(bench_folder), "--turns", "2", "--restart-after", "2")
