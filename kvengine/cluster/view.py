"""ClusterView: what the kvengine router last heard from each replica, for the frontend's /metrics and dashboard.

One per engine deployment, in the frontend's process, where Ray Serve runs the router of the frontend's handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClusterView:
    """What the router last heard from each replica (engine stats) and how it routed."""

    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    indexed: dict[str, int] = field(default_factory=dict)  # block keys the router's index holds for each replica
    routed: dict[str, int] = field(default_factory=dict)  # requests sent to each replica
    matched_blocks: int = 0  # prompt blocks the chosen replica held (or had pending) at routing time
    prompt_blocks: int = 0

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Per replica: pid, requests routed to it, block keys indexed for it, its engine stats."""
        return {rid: {"pid": self.pids.get(rid, 0), "routed": self.routed.get(rid, 0),
                      "indexed_blocks": self.indexed.get(rid, 0), **stats}
                for rid, stats in self.stats.items()}

    def forget(self, replica: str) -> None:
        for table in (self.stats, self.pids, self.indexed):
            table.pop(replica, None)


_VIEWS: dict[str, ClusterView] = {}  # deployment name -> its router's view


def view_of(deployment: str) -> ClusterView:
    return _VIEWS.setdefault(deployment, ClusterView())


def find_view(deployment: str) -> ClusterView | None:
    return _VIEWS.get(deployment)
