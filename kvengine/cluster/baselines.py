"""Baseline request routers for `kvengine bench cluster`: round robin (what a plain load balancer does).
Power-of-two choices is Ray Serve's default router; Ray's PrefixCacheAffinityRouter is used as Ray ships it."""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica


class RoundRobinRouter(FIFOMixin, RequestRouter):
    def initialize_state(self) -> None:
        self._next = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        chosen = ordered[self._next % len(ordered)]
        self._next += 1
        return [[chosen]]
