"""The routing decision, shared by the Ray Serve router (router.py) and the simulation (simulation.py).

Longest prefix match unless that would unbalance the load: a replica may take the request only if, with it,
its load stays within `max_over_mean` times the mean load (over the candidates, this request counted) plus
`slack` requests. Among the replicas within that bound: the longest match of the prompt's leading blocks,
then the least loaded, then chance. The least loaded replica is always within the bound (it is at or below
the mean), so a hot prefix spills to the next replica once its holder is busy enough; that replica then holds
it too, and later requests for it spread over both. `slack` keeps two or three lightly loaded replicas from
spilling on a difference of one or two requests (with 2 replicas and a bound of 1.5x the mean, an idle peer
would otherwise take the second request of every burst).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Balance:
    max_over_mean: float = 1.5
    slack: float = 2.0


def choose(matches: Mapping[str, int], loads: Mapping[str, int], balance: Balance = Balance(),
           rng: random.Random | None = None) -> str:
    """The replica for one request. `matches`: leading blocks each replica holds; `loads`: requests in flight
    on each (the candidates are the keys of `loads`)."""
    if not loads:
        raise ValueError("no replica to choose from")
    rng = rng or random
    bound = balance.max_over_mean * (sum(loads.values()) + 1) / len(loads) + balance.slack
    allowed = [r for r, load in loads.items() if load + 1 <= bound] or list(loads)
    best = max((matches.get(r, 0), -loads[r]) for r in allowed)
    ties = [r for r in allowed if (matches.get(r, 0), -loads[r]) == best]
    return ties[0] if len(ties) == 1 else rng.choice(ties)
