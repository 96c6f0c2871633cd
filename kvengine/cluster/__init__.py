"""kvengine beyond one machine: engine replicas as a Ray Serve application behind one OpenAI endpoint, with a
request router that knows which replica holds which KV blocks (by the engine's own chain hashes).

Pure parts (no Ray): request.py (what travels to a replica, the prompt's block keys), block_index.py (which
replica holds which blocks), policy.py (the routing decision), simulation.py. Ray parts: replica.py (the
engine deployment), frontend.py (the HTTP ingress), router.py (the Ray Serve request router), app.py
(building and running the application). Ray comes from the optional extra `kvengine[cluster]`.
"""

from __future__ import annotations

from kvengine.errors import ConfigError

INSTALL_HINT = "pip install 'kvengine[cluster]'"


def require_ray() -> None:
    """Raise a one-line ConfigError saying how to install Ray Serve when it is missing."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ConfigError(f"Ray Serve is not installed; install the cluster extra: {INSTALL_HINT}") from None
