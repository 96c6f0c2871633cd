"""The `kvengine` command. Errors a user can cause print one line and exit 2; nothing else is caught."""

from __future__ import annotations

import sys

from kvengine.cli.app import app
from kvengine.errors import KVEngineError

# Each module registers its commands on `app` when imported.
from kvengine.cli import accounting, bench, bench_cluster, bench_long, cluster, eval, generate, serve  # noqa: E402,F401,E501  isort: skip


def main() -> None:
    try:
        app()
    except KVEngineError as e:
        print(f"error: {e.message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


__all__ = ["app", "main"]
