"""The KV disk tier in the engine (tiny random Llama, real files): a new engine on the same directory loads the
blocks instead of recomputing them and gives the same tokens; salts, models and damaged files stay apart; a
failing disk never fails a request; every KV dtype round-trips."""

from __future__ import annotations

import logging
import os

import pytest
from kvtest import tiny_pair

from kvengine.errors import ConfigError
from kvengine.llm import LLM
from kvengine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
BS = 8


@pytest.fixture(scope="module")
def model():
    return tiny_pair()[0]


def prompt(n: int, seed: int = 0) -> list[int]:
    return [(7 * seed * j + 3 * j + seed + 1) % 96 for j in range(n)]


def engine(model, root, **kw) -> LLM:
    return LLM.from_model(model, None, block_size=BS, kv_cache_memory=1 << 22, kv_disk_dir=str(root), **kw)


def run(llm: LLM, ids: list[int], salt: str | None = None):
    (out,) = llm.generate(prompt_token_ids=[ids], sampling_params=GREEDY, cache_salt=salt)
    llm.engine.disk.flush()
    return out


def test_a_restarted_engine_loads_the_prefix_from_disk(model, tmp_path):
    ids = prompt(70)
    first = run(engine(model, tmp_path), ids)
    assert first.metrics.cached_tokens == 0 and first.metrics.disk_tokens == 0
    files = list((tmp_path / "blocks").glob("*.kvb"))
    assert len(files) == (70 + 8 - 1) // BS  # every full block of prompt + output, none twice
    second = run(engine(model, tmp_path), ids)  # a new process's view: empty memory, same directory
    m = second.metrics
    assert second.token_ids == first.token_ids
    assert m.disk_tokens == m.cached_tokens == 64 and m.computed_prompt_tokens == 6
    assert m.miss_reason == "loaded_from_disk"
    assert m.disk_bytes_read > 0 and m.disk_load_s > 0 and m.reuse_flops_disk > 0 and m.reuse_flops_memory == 0
    longer = ids + first.token_ids + prompt(20, seed=3)  # the next turn: history from disk, only the new tokens
    third = run(engine(model, tmp_path), longer)
    assert third.metrics.disk_tokens == 72 and third.metrics.computed_prompt_tokens == len(longer) - 72
    plain = LLM.from_model(model, None, block_size=BS, kv_cache_memory=1 << 22)
    assert third.token_ids == plain.generate(prompt_token_ids=[longer], sampling_params=GREEDY)[0].token_ids


def test_memory_first_then_disk(model, tmp_path):
    llm = engine(model, tmp_path)
    ids = prompt(50)
    run(llm, ids)
    again = run(llm, ids)
    assert again.metrics.cached_tokens == 48 and again.metrics.disk_tokens == 0  # memory served it
    llm.engine.block_tables.manager.reset_prefix_cache()
    third = run(llm, ids)
    assert third.metrics.disk_tokens == 48 and third.token_ids == again.token_ids


def test_salts_stay_apart_across_restarts(model, tmp_path):
    ids = prompt(40)
    run(engine(model, tmp_path), ids, salt="tenant-a")
    other = run(engine(model, tmp_path), ids, salt="tenant-b")
    assert other.metrics.cached_tokens == 0 and other.metrics.disk_tokens == 0
    unsalted = run(engine(model, tmp_path), ids)
    assert unsalted.metrics.disk_tokens == 0
    same = run(engine(model, tmp_path), ids, salt="tenant-a")
    assert same.metrics.disk_tokens == 32


def test_another_model_never_loads_these_blocks(model, tmp_path):
    ids = prompt(40)
    run(engine(model, tmp_path), ids)
    other_model = tiny_pair(seed=1)[0]
    out = run(engine(other_model, tmp_path), ids)
    assert out.metrics.disk_tokens == 0
    assert run(engine(model, tmp_path, kv_cache_dtype="bfloat16"), ids).metrics.disk_tokens == 0


def test_a_renamed_foreign_file_is_skipped_with_its_reason(model, tmp_path):
    ids = prompt(40)
    a, b = tmp_path / "a", tmp_path / "b"
    run(engine(model, a), ids)
    run(engine(model, b), ids, salt="tenant-b")
    names_a = sorted(p.name for p in (a / "blocks").glob("*.kvb"))
    first = ids[:BS]
    llm = engine(model, a)
    tier = llm.engine.disk
    from kvengine.cache.block_manager import chain_keys

    wanted = tier.file_key(chain_keys(first, None, BS, 0, 1)[0]).name + ".kvb"
    assert wanted in names_a
    (tmp_path / "a-copy").write_bytes((a / "blocks" / wanted).read_bytes())
    salted = tier.file_key(chain_keys(first, "tenant-b", BS, 0, 1)[0]).name + ".kvb"
    os.replace(b / "blocks" / salted, a / "blocks" / wanted)  # tenant B's first block under A's name
    out = run(llm, ids)
    assert out.metrics.disk_tokens == 0
    assert tier.store.stats.skipped == {"salt": 1}
    assert (a / "blocks" / wanted).read_bytes() == (tmp_path / "a-copy").read_bytes()  # removed, then rewritten
    assert out.token_ids == run(engine(model, tmp_path / "c"), ids).token_ids


@pytest.mark.parametrize("damage, reason", [(lambda raw: raw[: len(raw) // 3], "truncated"),
                                            (lambda raw: raw[:-9] + bytes([raw[-9] ^ 4]) + raw[-8:], "checksum")])
def test_damaged_files_are_skipped_never_loaded(model, tmp_path, damage, reason):
    ids = prompt(40)
    clean = run(engine(model, tmp_path), ids)
    files = sorted((tmp_path / "blocks").glob("*.kvb"), key=lambda p: p.stat().st_size)
    for p in files:
        p.write_bytes(damage(p.read_bytes()))
    llm = engine(model, tmp_path)
    out = run(llm, ids)
    assert out.metrics.disk_tokens == 0 and out.token_ids == clean.token_ids
    assert llm.engine.disk.store.stats.skipped == {reason: 1}  # the first block; the lookup stops there


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "fp8", "int8", "int4"])
def test_every_kv_dtype_round_trips(model, tmp_path, kv_dtype):
    ids = prompt(40)
    first = run(engine(model, tmp_path, kv_cache_dtype=kv_dtype), ids)
    second = run(engine(model, tmp_path, kv_cache_dtype=kv_dtype), ids)
    assert second.metrics.disk_tokens == 32 and second.token_ids == first.token_ids


def test_a_failing_disk_never_fails_a_request(model, tmp_path, caplog):
    llm = engine(model, tmp_path)
    blocks = tmp_path / "blocks"
    blocks.rename(tmp_path / "gone")
    blocks.write_bytes(b"")  # writes now fail as on a disk that went away
    with caplog.at_level(logging.WARNING, logger="kvengine.disk"):
        outs = [run(llm, prompt(40, seed=s)) for s in range(3)]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len([r for r in caplog.records if "no more writes" in r.getMessage()]) == 1


def test_a_budget_smaller_than_a_block_means_no_disk_tier(model, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="kvengine.disk"):
        llm = engine(model, tmp_path, kv_disk_budget=100)
        outs = [run(llm, prompt(40, seed=s)) for s in range(2)]
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len(caplog.records) == 1 and not list((tmp_path / "blocks").glob("*.kvb"))


def test_bad_directory_and_budget(model, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="not a directory"):
        engine(model, f)
    with pytest.raises(ConfigError, match="positive"):
        engine(model, tmp_path, kv_disk_budget=-1)
    with pytest.raises(ConfigError, match="needs kv_disk_dir"):
        LLM.from_model(model, None, kv_disk_budget=1e9)


def test_two_engines_share_one_directory(model, tmp_path):
    a, b = engine(model, tmp_path), engine(model, tmp_path)
    ids_a, ids_b = prompt(40, seed=1), prompt(40, seed=2)
    out_a, out_b = run(a, ids_a), run(b, ids_b)
    cross_a, cross_b = run(a, ids_b), run(b, ids_a)  # each loads what the other wrote
    assert cross_a.metrics.disk_tokens == cross_b.metrics.disk_tokens == 32
    assert cross_a.token_ids == out_b.token_ids and cross_b.token_ids == out_a.token_ids
    assert not a.engine.disk.store.stats.skipped and not b.engine.disk.store.stats.skipped


def test_run_summary_names_memory_and_disk(model, tmp_path):
    import io

    from kvengine.cli.report import run_summary

    ids = prompt(40)
    run(engine(model, tmp_path), ids)
    llm = engine(model, tmp_path)
    out = run(llm, ids)
    text = io.StringIO()
    run_summary(llm, out, file=text)
    line = next(ln for ln in text.getvalue().splitlines() if ln.startswith("KV disk tier"))
    assert "reused 0 tokens from memory, 32 from disk" in line and "FLOPs" in line
