"""weights="fast" resolves once, where the EngineConfig is made, and says whether it chose kvengine's int4 path."""

from __future__ import annotations

from kvengine.engine.config import EngineConfig
from kvengine.layers import native


def test_fast_resolves_once_and_says_what_it_chose(monkeypatch):
    fast = EngineConfig(weights="fast")
    tier = native.chosen()
    assert (fast.weights, fast.fast_chosen) == (("int4", True) if tier is not None else ("auto", False))
    assert EngineConfig(weights="int4").fast_chosen is False  # asked for, not chosen
    assert EngineConfig(weights="fast", dtype="float32").weights == "auto"  # an explicit dtype keeps float weights
    monkeypatch.setenv("KVENGINE_NATIVE", "0")  # no kernel tier: "fast" is the float weights
    off = EngineConfig(weights="fast")
    assert (off.weights, off.fast_chosen) == ("auto", False)
