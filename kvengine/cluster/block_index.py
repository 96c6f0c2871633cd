"""BlockIndex: which replica holds which KV blocks, by block key (request.py). Pure Python, no Ray.

Two sources, both exact about content: what each replica last reported it holds (its registered chain hashes,
as of its last routing-stats report), and PENDING keys: the blocks of requests the router has sent to a replica
whose report does not show them yet (still queued, prefilling, or the report is older than the request). Without
pending keys a burst of requests sharing a new prefix would scatter over the replicas before the first report
names its holder. A pending key lasts until the replica reports it, or `pending_ttl_s` passes (it may have been
refused, or evicted already). A dead replica is forgotten whole.

Lookups walk the prompt's keys once through an inverted index (key -> replicas), so the cost is the matched
length, not the number of replicas times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

PENDING_TTL_S = 60.0


class BlockIndex:
    def __init__(self, pending_ttl_s: float = PENDING_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.pending_ttl_s = pending_ttl_s
        self.clock = clock
        self._held: dict[str, set[bytes]] = {}  # replica -> keys it reported
        self._holders: dict[bytes, set[str]] = {}  # key -> replicas that reported it
        self._pending: dict[bytes, dict[str, float]] = {}  # key -> replica -> expiry (clock time)
        self._pending_by_replica: dict[str, set[bytes]] = {}

    # ---- updates ------------------------------------------------------------------------------------

    def report(self, replica: str, keys: Iterable[bytes]) -> None:
        """Replace what `replica` holds with `keys` (a full report); its pending keys now reported (or expired)
        are done."""
        new = set(keys)
        old = self._held.get(replica, set())
        for key in old - new:
            self._discard(self._holders, key, replica)
        for key in new - old:
            self._holders.setdefault(key, set()).add(replica)
        self._held[replica] = new
        pending = self._pending_by_replica.get(replica)
        if pending:
            now = self.clock()
            done = {k for k in pending if k in new or self._pending[k][replica] <= now}
            for key in done:
                self._discard(self._pending, key, replica)
            pending -= done

    def add_pending(self, replica: str, keys: Sequence[bytes]) -> None:
        """`replica` was sent a request with these block keys: count them as its own until reported."""
        expiry = self.clock() + self.pending_ttl_s
        held = self._held.get(replica, set())
        mine = self._pending_by_replica.setdefault(replica, set())
        for key in keys:
            if key not in held:
                self._pending.setdefault(key, {})[replica] = expiry
                mine.add(key)

    def forget(self, replica: str) -> None:
        """Drop everything known about `replica` (it died or left)."""
        for key in self._held.pop(replica, set()):
            self._discard(self._holders, key, replica)
        for key in self._pending_by_replica.pop(replica, set()):
            self._discard(self._pending, key, replica)

    # ---- lookups ------------------------------------------------------------------------------------

    def replicas(self) -> set[str]:
        return set(self._held) | {r for r, keys in self._pending_by_replica.items() if keys}

    def num_keys(self, replica: str, pending: bool = False) -> int:
        return len((self._pending_by_replica if pending else self._held).get(replica, ()))

    def matches(self, keys: Sequence[bytes], replicas: Iterable[str]) -> dict[str, int]:
        """For each of `replicas`: how many leading keys of `keys` it holds or has pending."""
        result = dict.fromkeys(replicas, 0)
        alive = set(result)
        now = self.clock()
        for depth, key in enumerate(keys):
            holders = self._holders.get(key, set()) & alive
            pending = self._pending.get(key)
            if pending:
                holders |= {r for r, expiry in pending.items() if r in alive and expiry > now}
            for r in alive - holders:
                result[r] = depth
            alive = holders
            if not alive:
                return result
        for r in alive:
            result[r] = len(keys)
        return result

    @staticmethod
    def _discard(index: dict[bytes, set[str]] | dict[bytes, dict[str, float]], key: bytes, replica: str) -> None:
        entry = index.get(key)
        if entry is None:
            return
        if isinstance(entry, set):
            entry.discard(replica)
        else:
            entry.pop(replica, None)
        if not entry:
            del index[key]
