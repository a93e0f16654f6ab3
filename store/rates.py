"""Rate windows: a level's requests and tokens over a rolling window of whole seconds, and its
requests in flight. Pure arithmetic on one packed record per level (the ledger's `rates` db).

A request counts in the second it was admitted, for `window_s` seconds: at time t the window
holds the buckets of seconds s with floor(t) - window_s < s <= floor(t). Counts are exact (one
bucket a second, never sampled), so a limit triggers at its figure, never before. A bucket
dated after the clock (the clock stepped back) is moved to the current second, so a step back
delays nothing by more than one window.
"""

import functools
import math
import struct
from dataclasses import dataclass, field

MAX_WINDOW_S = 3600


@functools.lru_cache(maxsize=4 * MAX_WINDOW_S)
def _format(count: int) -> struct.Struct:
    """window_s, in_flight, then (second, requests, tokens) per bucket: all int64."""
    return struct.Struct(f"<{count}q")


@dataclass(slots=True)
class Window:
    """One level's rate record: its buckets, oldest first, flat as second, requests, tokens
    (a request path read and write: no object per bucket)."""

    window_s: int = 60
    in_flight: int = 0
    data: list[int] = field(default_factory=list)

    @classmethod
    def unpack(cls, raw: bytes | None, window_s: int) -> "Window":
        if not raw:
            return cls(window_s)
        values = _format(len(raw) // 8).unpack(raw)
        return cls(values[0], values[1], list(values[2:]))

    def pack(self) -> bytes:
        data = self.data
        return _format(len(data) + 2).pack(self.window_s, self.in_flight, *data)

    @property
    def buckets(self) -> list[list[int]]:
        """The buckets as [second, requests, tokens]."""
        d = self.data
        return [d[i:i + 3] for i in range(0, len(d), 3)]

    def advance(self, now: float, window_s: int | None = None) -> "Window":
        """Drop the buckets that have left the window at `now` (and clamp future ones)."""
        if window_s is not None:
            self.window_s = window_s
        d = self.data
        if not d:
            return self
        second = math.floor(now)
        oldest = second - self.window_s
        if d[0] > oldest and d[-3] <= second:
            return self  # the common case: nothing has left, nothing is ahead of the clock
        kept: list[int] = []
        for i in range(0, len(d), 3):
            at = d[i]
            if at <= oldest:
                continue
            if at > second:  # the clock stepped back: count it from now
                at = second
            if kept and kept[-3] == at:
                kept[-2] += d[i + 1]
                kept[-1] += d[i + 2]
            else:
                kept += (at, d[i + 1], d[i + 2])
        self.data = kept
        return self

    @property
    def requests(self) -> int:
        return sum(self.data[1::3])

    @property
    def tokens(self) -> int:
        return sum(self.data[2::3])

    def add(self, second: int, requests: int, tokens: int) -> None:
        """Count an admitted request (or its tokens) in `second` (the current one)."""
        d = self.data
        if d and d[-3] == second:
            d[-2] += requests
            d[-1] += tokens
        elif not d or d[-3] < second:
            d += (second, requests, tokens)
        else:
            triples = sorted([*self.buckets, [second, requests, tokens]], key=lambda b: b[0])
            self.data = []
            for b in triples:
                self.add(*b)

    def adjust(self, second: int, requests: int, tokens: int) -> None:
        """Change a bucket still in the window (a settled or released request); a bucket that
        has left it is left alone (its counts no longer matter)."""
        d = self.data
        for i in range(len(d) - 3, -1, -3):  # newest first: a request settles soon after
            if d[i] == second:
                d[i + 1] = max(0, d[i + 1] + requests)
                d[i + 2] = max(0, d[i + 2] + tokens)
                return

    def wait_for(self, now: float, index: int, limit: int) -> int:
        """Whole seconds from `now` until the window's total of `index` (1: requests, 2:
        tokens) is below `limit`: when enough of the oldest buckets have left it (at least 1)."""
        d = self.data
        total = sum(d[index::3])
        for i in range(0, len(d), 3):
            if total < limit:
                break
            total -= d[i + index]
            if total < limit:
                return max(1, math.ceil(d[i] + self.window_s - now))
        return 1 if total < limit else self.window_s

    def reset_in(self, now: float, index: int) -> int:
        """Whole seconds until every bucket that counts `index` has left the window (0: none)."""
        d = self.data
        for i in range(len(d) - 3, -1, -3):
            if d[i + index]:
                return max(1, math.ceil(d[i] + self.window_s - now))
        return 0


def duration_text(seconds: int) -> str:
    """OpenAI's duration format of the x-ratelimit-reset-* headers: `6s`, `1m0s`, `1h2m3s`."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
