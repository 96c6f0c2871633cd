"""KVCacheRouter: a Ray Serve request router that sends each request to the replica holding the longest run of
its prompt's KV blocks, unless that would unbalance the load (policy.py).

Ray Serve builds one router per deployment handle (here: in the frontend's process) and calls
`choose_replicas` for every request. The router reads the request's block keys (hashed once by the frontend),
looks them up in its BlockIndex, fed by every replica's routing stats (the keys it can reuse now, pushed by
Ray Serve each `request_routing_stats_period_s`) and by the pending keys of the requests it routed itself;
the load of a replica is its requests in flight from this router (Ray Serve's queue-length cache, kept exact
by this router's sends and completions) plus the requests it was sent lately (policy.RecentLoad). A replica
that dies or leaves the deployment is forgotten. Requests without block keys (describe, stats) go to the least
loaded replica.

Its ClusterView (view.py) keeps the replicas' last stats for the frontend's /metrics and dashboard.
"""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING, Any

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from kvengine.cluster.block_index import PENDING_TTL_S, BlockIndex
from kvengine.cluster.policy import LOAD_HALF_LIFE_S, MAX_OVER_MEAN, SLACK, Balance, RecentLoad, choose
from kvengine.cluster.request import RoutedRequest

if TYPE_CHECKING:
    from kvengine.cluster.view import ClusterView

log = logging.getLogger("ray.serve")


class KVCacheRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, max_over_mean: float = MAX_OVER_MEAN, slack: float = SLACK,
                         load_half_life_s: float = LOAD_HALF_LIFE_S, pending_ttl_s: float = PENDING_TTL_S,
                         seed: int | None = None) -> None:
        self.balance = Balance(max_over_mean, slack)
        self.recent = RecentLoad(load_half_life_s)
        self.index = BlockIndex(pending_ttl_s)
        self.rng = random.Random(seed)
        self._stats_seen: dict[str, dict[str, Any]] = {}  # replica -> the last stats dict indexed
        # internal request id -> (replica chosen, its block keys, blocks matched there), until it is sent
        self._chosen: dict[str, tuple[str, list[bytes], int]] = {}
        self._dead: set[str] = set()  # replicas seen dying: their last stats are never indexed again

    @property
    def view(self) -> ClusterView:
        """This deployment's view (its id may be unknown when initialize_state runs). Imported here, at run time:
        Ray Serve ships the router class by value, with copies of the module globals it references."""
        from kvengine.cluster.view import view_of

        return view_of(self._deployment_id.name if self._deployment_id else "")

    # ---- Ray Serve hooks ----------------------------------------------------------------------------

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        try:
            return self._choose(candidate_replicas, pending_request)
        except Exception:  # noqa: BLE001 - a routing bug must not stall requests: fall back to the least loaded
            log.exception("kvengine router failed; routing by load alone")
            return [sorted(candidate_replicas, key=self._load)]

    def _choose(self, candidate_replicas: list[RunningReplica],
                pending_request: PendingRequest | None) -> list[list[RunningReplica]]:
        self._refresh(candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {rid: self._load(r) for rid, r in by_id.items()}
        request = _routed_request(pending_request)
        keys = request.block_keys if request is not None else []
        matches = self.index.matches(keys, by_id) if keys else {}
        chosen = choose(matches, loads, self.balance, self.rng)
        if pending_request is not None:  # counted at once: requests chosen before this one is sent see it
            request_id = pending_request.metadata.internal_request_id
            earlier = self._chosen.pop(request_id, None)
            if earlier is not None:  # chosen before and not sent (the replica was full): undo that choice
                self.recent.add(earlier[0], -1.0)
            self._chosen[request_id] = (chosen, keys, matches.get(chosen, 0))
            self.recent.add(chosen)
            self.index.add_pending(chosen, keys)
        rest = sorted((rid for rid in by_id if rid != chosen), key=lambda rid: loads[rid])
        return [[by_id[chosen]]] + ([[by_id[rid] for rid in rest]] if rest else [])

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        rid = replica_id.unique_id
        self.view.routed[rid] = self.view.routed.get(rid, 0) + 1
        chosen, keys, matched = self._chosen.pop(pending_request.metadata.internal_request_id, (rid, [], 0))
        if chosen != rid:  # sent to a lower rank: move the count and the pending blocks' claim
            self.recent.add(chosen, -1.0)
            self.recent.add(rid)
            self.index.add_pending(rid, keys)
            matched = 0
        self.view.matched_blocks += matched
        self.view.prompt_blocks += len(keys)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._dead.add(replica_id.unique_id)
        self._forget(replica_id.unique_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._refresh(replicas)
        live = {r.replica_id.unique_id for r in replicas}
        for rid in self.index.replicas() | set(self.view.stats):
            if rid not in live:
                self._forget(rid)

    # ---- helpers ------------------------------------------------------------------------------------

    def _refresh(self, replicas: list[RunningReplica]) -> None:
        """Index every replica's newest routing stats (each report once)."""
        for r in replicas:
            stats = r.routing_stats
            keys = stats.get("keys") if stats else None
            rid = r.replica_id.unique_id
            if keys is None or rid in self._dead or self._stats_seen.get(rid) is stats:
                continue
            self._stats_seen[rid] = stats
            self.index.report(rid, keys)
            self.view.stats[rid] = stats.get("stats", {})
            self.view.pids[rid] = stats.get("pid", 0)
            self.view.indexed[rid] = self.index.num_keys(rid)

    def _load(self, replica: RunningReplica) -> float:
        """Requests in flight (this router's count, else the replica's last report) plus those it got lately."""
        rid = replica.replica_id.unique_id
        in_flight = self.replica_queue_len_cache.get(replica.replica_id)
        if in_flight is None:
            stats = self.view.stats.get(rid, {})
            in_flight = stats.get("running", 0) + stats.get("waiting", 0)
        return in_flight + self.recent.get(rid)

    def _forget(self, rid: str) -> None:
        self.index.forget(rid)
        self.recent.forget(rid)
        self.view.forget(rid)
        self._stats_seen.pop(rid, None)


def _routed_request(pending: PendingRequest | None) -> RoutedRequest | None:
    if pending is None:
        return None
    for arg in list(pending.args) + list(pending.kwargs.values()):
        if isinstance(arg, RoutedRequest):
            return arg
    return None
