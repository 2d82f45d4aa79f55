"""A server's near cache: the vectors it read from Redis lately, in its own memory.

A cache key names one vector for good (the model's fingerprint, the options and the text's
SHA-256: see embedq.keys), so a copy here never goes stale and needs no invalidation. A call
whose texts are all here is answered without a Redis round trip and without waiting for the
dispatcher's next flush: the latency of a hot text is then gRPC's own (measured, a 1-text
`Encode` that hits: docs/benchmarks.md). Only values Redis returned are kept (never a worker's
reply: a text seen once costs no memory here, and a server whose view of a model is stale
keeps nothing Redis does not have), least recently used first out, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# Python's own cost of one entry beside its key's and value's lengths: the dict slot, the str
# and bytes headers (measured with tracemalloc and sys.getsizeof over 20,000 entries of a
# 95-character key and a 1,536-byte value: ~150 bytes; counting 200 keeps the total above
# what the entries really take).
ENTRY_OVERHEAD_BYTES = 200


class NearCache:
    """Least-recently-used values by key, within `max_bytes` (0: off, keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """What the entries cost, by the count put() keeps under max_bytes."""
        return self._bytes

    def get_all(self, keys: Sequence[str]) -> list[bytes] | None:
        """The values of all `keys` (now the most recently used), or None if one is missing."""
        entries = self._entries
        values = []
        for key in keys:
            value = entries.get(key)
            if value is None:
                return None
            values.append(value)
        for key in keys:
            entries.move_to_end(key)
        return values

    def put(self, key: str, value: bytes) -> None:
        """Keep `value` under `key`, dropping the least recently used past the budget."""
        cost = _cost(key, value)
        if cost > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= _cost(key, old)
        self._entries[key] = value
        self._bytes += cost
        while self._bytes > self.max_bytes:
            dropped, dropped_value = self._entries.popitem(last=False)
            self._bytes -= _cost(dropped, dropped_value)


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES
