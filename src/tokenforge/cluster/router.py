"""Which replica takes a request: round-robin, least-loaded, or KV-aware over an index of cached prefixes.

The KV-aware policy scores each replica as Dynamo's router does, lower is better:

    cost = prefill_weight x (prompt blocks that replica does not hold) + active blocks on that replica

so a replica that holds the prompt's prefix wins unless it is already much busier. When replicas are
badly imbalanced (one has `max_imbalance` more requests in flight than the least loaded), the busy ones
are left out first: prefix hits must not pile every user of a popular prompt onto one replica.

`KVIndex` learns from the replicas' KV events (block stored, evicted), keyed by the stable chained block
keys, which name a whole prefix. It heals itself: a gap in a replica's event numbering, or a periodic
timer, replaces that replica's entries with a fresh snapshot (resync); and the blocks a request is
predicted to leave on the replica it was routed to count until their events arrive or a time-to-live
passes, so a lost or late event never routes traffic to the wrong replica for long.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tokenforge.cluster.messages import KVEvents
from tokenforge.kv.block_hash import BlockKey

ROUTERS = ("round-robin", "least-loaded", "kv-aware")


@dataclass
class ReplicaView:
    """A candidate as the client sees it right now."""

    replica_id: int
    num_requests: int  # requests in flight on it (routed and not finished)
    active_blocks: int  # KV blocks those requests hold or will hold (prompt + tokens so far)


class Router(Protocol):
    def choose(self, candidates: Sequence[ReplicaView], keys: Sequence[BlockKey], now: float) -> int:
        """The chosen candidate's replica id; `keys` are the prompt's full-block keys."""
        ...


class RoundRobinRouter:
    def __init__(self):
        self._turn = itertools.count()

    def choose(self, candidates: Sequence[ReplicaView], keys: Sequence[BlockKey], now: float) -> int:
        ordered = sorted(candidates, key=lambda c: c.replica_id)
        return ordered[next(self._turn) % len(ordered)].replica_id


class LeastLoadedRouter:
    def choose(self, candidates: Sequence[ReplicaView], keys: Sequence[BlockKey], now: float) -> int:
        return min(candidates, key=lambda c: (c.num_requests, c.active_blocks, c.replica_id)).replica_id


class KVIndex:
    """Which replica holds which prefix blocks. Confirmed entries come from events or snapshots; predicted
    ones (a request was just routed there) expire after `ttl` seconds unless an event confirms them."""

    def __init__(self, ttl: float = 10.0):
        self.ttl = ttl
        self._confirmed: dict[int, set[BlockKey]] = {}
        self._predicted: dict[int, dict[BlockKey, float]] = {}  # key -> expiry time
        self._next_seq: dict[int, int] = {}
        self.num_resyncs = 0

    def apply(self, replica_id: int, events: KVEvents) -> bool:
        """Take one event batch; False when batches were lost (the caller then resyncs this replica)."""
        expected = self._next_seq.get(replica_id, 1)
        if events.seq < expected:
            return True  # older than the last snapshot, which already reflects it
        if events.seq > expected:
            return False
        self._next_seq[replica_id] = events.seq + 1
        held = self._confirmed.setdefault(replica_id, set())
        predicted = self._predicted.get(replica_id, {})
        for key in events.stored:
            held.add(key)
            predicted.pop(key, None)
        held.difference_update(events.evicted)
        for key in events.evicted:
            predicted.pop(key, None)
        return True

    def resync(self, replica_id: int, next_seq: int, keys: Iterable[BlockKey]) -> None:
        """Replace the replica's entries with a snapshot; event batches from `next_seq` on apply after it."""
        self._confirmed[replica_id] = set(keys)
        self._predicted.pop(replica_id, None)
        self._next_seq[replica_id] = next_seq
        self.num_resyncs += 1

    def predict(self, replica_id: int, keys: Sequence[BlockKey], now: float) -> None:
        expiry = now + self.ttl
        predicted = self._predicted.setdefault(replica_id, {})
        for key in keys:
            predicted[key] = expiry

    def drop(self, replica_id: int) -> None:
        """Forget a replica (it died or left): its cache is gone."""
        self._confirmed.pop(replica_id, None)
        self._predicted.pop(replica_id, None)
        self._next_seq.pop(replica_id, None)

    def overlap(self, replica_id: int, keys: Sequence[BlockKey], now: float) -> int:
        """How many of the prompt's leading blocks the replica holds (confirmed, or predicted and fresh)."""
        held = self._confirmed.get(replica_id, set())
        predicted = self._predicted.get(replica_id, {})
        n = 0
        for key in keys:
            expiry = predicted.get(key)
            if key not in held and (expiry is None or expiry < now):
                break
            n += 1
        return n

    def expire(self, now: float) -> None:
        for predicted in self._predicted.values():
            for key in [k for k, expiry in predicted.items() if expiry < now]:
                del predicted[key]

    def num_keys(self, replica_id: int) -> int:
        return len(self._confirmed.get(replica_id, ()))


class KVAwareRouter:
    def __init__(self, index: KVIndex, prefill_weight: float = 1.0, max_imbalance: int = 8):
        self.index = index
        self.prefill_weight = prefill_weight
        self.max_imbalance = max_imbalance
        self.last_overlap = 0  # blocks of the last routed prompt the chosen replica held (for metrics)

    def choose(self, candidates: Sequence[ReplicaView], keys: Sequence[BlockKey], now: float) -> int:
        least = min(c.num_requests for c in candidates)
        balanced = [c for c in candidates if c.num_requests - least <= self.max_imbalance]
        scored = []
        for c in balanced:
            overlap = self.index.overlap(c.replica_id, keys, now)
            cost = self.prefill_weight * (len(keys) - overlap) + c.active_blocks
            scored.append((cost, c.num_requests, c.replica_id, overlap))
        cost, _, replica_id, overlap = min(scored)
        self.last_overlap = overlap
        self.index.predict(replica_id, keys, now)
        return replica_id


def make_router(name: str, index: KVIndex) -> Router:
    if name == "round-robin":
        return RoundRobinRouter()
    if name == "least-loaded":
        return LeastLoadedRouter()
    if name == "kv-aware":
        return KVAwareRouter(index)
    raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}")
