"""A bounded mapping that evicts its least recently used entries: a cache at its limit keeps
answering from what is hot instead of emptying itself (a latency cliff)."""

from collections import OrderedDict


class LRU[K, V]:
    """At most `size` entries; `get` marks an entry used, `put` evicts the oldest past the size."""

    __slots__ = ("_data", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"an LRU holds at least one entry, not {size}")
        self.size = size
        self._data: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The entry for `key`, marked as the most recently used; None if absent."""
        data = self._data
        value = data.get(key)
        if value is not None:
            data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Store `value`, evicting the least recently used entries beyond `size`."""
        data = self._data
        data[key] = value
        data.move_to_end(key)
        while len(data) > self.size:
            data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Remove and return the entry for `key`, if any."""
        return self._data.pop(key, None)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data
