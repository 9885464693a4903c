"""What one lower KV tier (host memory or disk) holds, as the scheduler sees it: keys in LRU order, the owner
each is charged to, per-owner usage against a quota, and pins on entries that a transfer is using.

No bytes here: an entry may carry a host-memory slot number, which the runner's offloader maps to its own
buffer. An entry is `ready` once its bytes are known to be in place (a disk write is confirmed by the
runner); only ready entries are offered to lookups, and pinned or unready ones are never evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tokenforge.kv.block_hash import BlockKey


@dataclass
class TierEntry:
    owner: bytes
    slot: int | None = None  # the host-memory slot (L2); None on disk
    ready: bool = True
    pins: int = 0  # transfers reading the entry now


class TierIndex:
    """`capacity` blocks in all; `quota(owner)` blocks at most per owner (None: no limit)."""

    def __init__(self, capacity: int, quota: Callable[[bytes], int | None], num_slots: int = 0):
        self.capacity = capacity
        self.quota = quota
        self.entries: OrderedDict[BlockKey, TierEntry] = OrderedDict()  # least recently used first
        self.by_owner: dict[bytes, OrderedDict[BlockKey, None]] = {}
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first

    def __len__(self) -> int:
        return len(self.entries)

    def usage(self, owner: bytes) -> int:
        return len(self.by_owner.get(owner, ()))

    def find(self, key: BlockKey) -> TierEntry | None:
        """The entry if its bytes can be read now."""
        entry = self.entries.get(key)
        return entry if entry is not None and entry.ready else None

    def touch(self, key: BlockKey) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            self.entries.move_to_end(key)
            self.by_owner[entry.owner].move_to_end(key)

    def victim(self, owner: bytes) -> BlockKey | None | bool:
        """What must go before `owner` can add a block: a key (the owner's own LRU entry when it is at its
        quota, else the tier's LRU entry when full), None when there is room, False when nothing can go."""
        quota = self.quota(owner)
        if quota is not None and self.usage(owner) >= quota:
            return self._first_evictable(self.by_owner.get(owner, {})) if quota > 0 else False
        if len(self.entries) >= self.capacity:
            return self._first_evictable(self.entries)
        return None

    def _first_evictable(self, keys) -> BlockKey | bool:
        for key in keys:
            entry = self.entries[key]
            if entry.ready and not entry.pins:
                return key
        return False

    def add(self, key: BlockKey, owner: bytes, ready: bool = True) -> TierEntry:
        """Index a new key (the caller made room); takes a free slot when the tier has slots."""
        entry = TierEntry(owner, self.free_slots.pop() if self.free_slots else None, ready)
        self.entries[key] = entry
        self.by_owner.setdefault(owner, OrderedDict())[key] = None
        return entry

    def remove(self, key: BlockKey) -> TierEntry:
        entry = self.entries.pop(key)
        keys = self.by_owner[entry.owner]
        del keys[key]
        if not keys:
            del self.by_owner[entry.owner]
        if entry.slot is not None:
            self.free_slots.append(entry.slot)
        return entry

    def pin(self, key: BlockKey) -> None:
        self.entries[key].pins += 1

    def unpin(self, key: BlockKey) -> None:
        entry = self.entries.get(key)
        if entry is not None:
            entry.pins -= 1

    @property
    def num_pinned(self) -> int:
        return sum(1 for e in self.entries.values() if e.pins or not e.ready)
