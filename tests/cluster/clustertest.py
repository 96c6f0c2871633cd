"""Shared by the cluster tests: whether Ray Serve is installed, and the mark that skips Ray tests without it."""

from __future__ import annotations

import importlib.util

import pytest


def _have_ray() -> bool:
    try:
        return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None
    except (ImportError, ValueError):  # ValueError: sys.modules holds None for it (a test hiding Ray)
        return False


HAVE_RAY = _have_ray()
SKIP_REASON = "Ray Serve is not installed (pip install 'kvengine[cluster]')"
needs_ray = pytest.mark.skipif(not HAVE_RAY, reason=SKIP_REASON)
