"""The routing decision, shared by the Ray Serve router (router.py) and the simulation (simulation.py).

Longest prefix match unless that would unbalance the load. A replica's load is its requests in flight plus the
requests it was sent lately (RecentLoad); a replica may take the request only if, with it, its load stays
within `max_over_mean` times the mean load (over the candidates, this request counted) plus `slack` requests.
Among the replicas within that bound: the longest match of the prompt's leading blocks, then the least loaded,
then chance. The least loaded replica is always allowed, so a hot prefix spills to another replica once its
holder is busy enough; that replica then holds it too, and later requests for it spread over both.

`slack` keeps two or three lightly loaded replicas from spilling on a difference of a request or two: with 2
replicas and no slack an idle peer would take the second request of every burst; with the defaults (1.3x,
slack 2) a holder keeps up to 4 more than its idle peer, and at most 1.86x its peer's load plus 5 at any load.
The defaults were chosen with the simulation at 64 and 128 replicas (docs/cluster.md).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_OVER_MEAN = 1.3
SLACK = 2.0
LOAD_HALF_LIFE_S = 10.0


@dataclass(frozen=True, slots=True)
class Balance:
    max_over_mean: float = MAX_OVER_MEAN
    slack: float = SLACK


class RecentLoad:
    """Requests routed to each replica, decayed with a half-life: what each replica was given lately. Balancing
    on it, not only on requests in flight, keeps a replica that owns a hot prefix (whose requests are cheap
    hits, so few are ever in flight) from drawing far more than its share over time."""

    def __init__(self, half_life_s: float = LOAD_HALF_LIFE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = math.log(2) / half_life_s
        self.clock = clock
        self._value: dict[str, tuple[float, float]] = {}  # replica -> (value, clock time of value)

    def get(self, replica: str) -> float:
        value, then = self._value.get(replica, (0.0, 0.0))
        return value * math.exp(-self.rate * (self.clock() - then)) if value else 0.0

    def add(self, replica: str, amount: float = 1.0) -> None:
        self._value[replica] = (self.get(replica) + amount, self.clock())

    def forget(self, replica: str) -> None:
        self._value.pop(replica, None)


def choose(matches: Mapping[str, int], loads: Mapping[str, float], balance: Balance = Balance(),
           rng: random.Random | None = None) -> str:
    """The replica for one request. `matches`: leading blocks each replica holds; `loads`: requests in flight
    on each (the candidates are the keys of `loads`)."""
    if not loads:
        raise ValueError("no replica to choose from")
    rng = rng or random
    bound = balance.max_over_mean * (sum(loads.values()) + 1) / len(loads) + balance.slack
    least = min(loads.values())
    allowed = [r for r, load in loads.items() if load + 1 <= bound or load == least]
    best = max((matches.get(r, 0), -loads[r]) for r in allowed)
    ties = [r for r in allowed if (matches.get(r, 0), -loads[r]) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)
