"""Rate windows: a level's requests and tokens over a rolling window of whole seconds, and its
requests in flight. Pure arithmetic on one packed record per level (the ledger's `rates` db).

A request counts in the second it was admitted, for `window_s` seconds: at time t the window
holds the buckets of seconds s with floor(t) - window_s < s <= floor(t). Counts are exact (one
bucket a second, never sampled), so a limit triggers at its figure, never before. A bucket
dated after the clock (the clock stepped back) is moved to the current second, so a step back
delays nothing by more than one window.
"""

import math
import struct
from dataclasses import dataclass, field

_HEAD = struct.Struct("<qq")  # window_s, in_flight
_BUCKET = struct.Struct("<qqq")  # second, requests, tokens
MAX_WINDOW_S = 3600


@dataclass(slots=True)
class Window:
    """One level's rate record: its buckets (second, requests, tokens), oldest first."""

    window_s: int = 60
    in_flight: int = 0
    buckets: list[list[int]] = field(default_factory=list)

    @classmethod
    def unpack(cls, raw: bytes | None, window_s: int) -> "Window":
        if not raw:
            return cls(window_s)
        stored_window, in_flight = _HEAD.unpack_from(raw)
        buckets = [list(b) for b in _BUCKET.iter_unpack(raw[_HEAD.size:])]
        return cls(stored_window, in_flight, buckets)

    def pack(self) -> bytes:
        return _HEAD.pack(self.window_s, self.in_flight) + b"".join(
            _BUCKET.pack(*b) for b in self.buckets)

    def advance(self, now: float, window_s: int | None = None) -> "Window":
        """Drop the buckets that have left the window at `now` (and clamp future ones)."""
        if window_s is not None:
            self.window_s = window_s
        second = math.floor(now)
        oldest = second - self.window_s
        kept: list[list[int]] = []
        for b in self.buckets:
            if b[0] <= oldest:
                continue
            if b[0] > second:  # the clock stepped back: count it from now
                b[0] = second
            if kept and kept[-1][0] == b[0]:
                kept[-1][1] += b[1]
                kept[-1][2] += b[2]
            else:
                kept.append(b)
        self.buckets = kept
        return self

    @property
    def requests(self) -> int:
        return sum(b[1] for b in self.buckets)

    @property
    def tokens(self) -> int:
        return sum(b[2] for b in self.buckets)

    def add(self, second: int, requests: int, tokens: int) -> None:
        """Count an admitted request (or its tokens) in `second` (the current one)."""
        if self.buckets and self.buckets[-1][0] == second:
            self.buckets[-1][1] += requests
            self.buckets[-1][2] += tokens
        else:
            self.buckets.append([second, requests, tokens])
            self.buckets.sort(key=lambda b: b[0])

    def adjust(self, second: int, requests: int, tokens: int) -> None:
        """Change a bucket still in the window (a settled or released request); a bucket that
        has left it is left alone (its counts no longer matter)."""
        for b in self.buckets:
            if b[0] == second:
                b[1] = max(0, b[1] + requests)
                b[2] = max(0, b[2] + tokens)
                return

    def wait_for(self, now: float, index: int, limit: int) -> int:
        """Whole seconds from `now` until the window's total of `index` (1: requests, 2:
        tokens) is below `limit`: when enough of the oldest buckets have left it (at least 1)."""
        total = sum(b[index] for b in self.buckets)
        for b in self.buckets:
            if total < limit:
                break
            total -= b[index]
            if total < limit:
                return max(1, math.ceil(b[0] + self.window_s - now))
        return 1 if total < limit else self.window_s

    def reset_in(self, now: float, index: int) -> int:
        """Whole seconds until every bucket that counts `index` has left the window (0: none)."""
        for b in reversed(self.buckets):
            if b[index]:
                return max(1, math.ceil(b[0] + self.window_s - now))
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
