"""The price table: USD per 1M tokens per model, to integer nano-dollars per request."""

import logging
import re
from dataclasses import dataclass

from addon.providers.base import Usage

log = logging.getLogger("aigw.pricing")
_SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{8}|\d{4})$")
# What one request may cost (and so reserve) at most: $1,000,000. A client's `max_tokens: 2**62`
# or a provider's `prompt_tokens: 2**63` priced as is would overflow the ledger's 64-bit
# counters: the request would then never be settled (its reservation held, its write retried).
MAX_COST_NUSD = 10**15


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per 1M tokens (integers, so a request's cost sums exactly)."""

    input: int
    output: int
    cached_input: int
    cache_write: int
    cache_write_1h: int

    @classmethod
    def from_usd_per_1m(
        cls,
        input_per_1m: float,
        output_per_1m: float,
        cached_input_per_1m: float | None = None,
        cache_write_per_1m: float | None = None,
        cache_write_1h_per_1m: float | None = None,
    ) -> "Price":
        def micro(v: float) -> int:
            return round(v * 1_000_000)

        return cls(
            input=micro(input_per_1m),
            output=micro(output_per_1m),
            cached_input=micro(
                input_per_1m if cached_input_per_1m is None else cached_input_per_1m
            ),
            # Anthropic's cache writes cost 1.25x input (5 minutes) and 2x (1 hour) where no
            # price is given.
            cache_write=micro(
                input_per_1m * 1.25 if cache_write_per_1m is None else cache_write_per_1m
            ),
            cache_write_1h=micro(
                input_per_1m * 2 if cache_write_1h_per_1m is None else cache_write_1h_per_1m
            ),
        )

    def cost_nusd(self, usage: Usage) -> int:
        """Nano-dollars for `usage`, rounded once at the end, at most MAX_COST_NUSD."""
        micro_total = (
            usage.input_tokens * self.input
            + usage.cached_input_tokens * self.cached_input
            + usage.cache_write_tokens * self.cache_write
            + usage.cache_write_1h_tokens * self.cache_write_1h
            + usage.output_tokens * self.output
        )
        return min((micro_total + 500) // 1000, MAX_COST_NUSD)


class PriceTable:
    def __init__(self, models: dict[str, Price], fallback: Price) -> None:
        self._models = models
        self.fallback = fallback
        self._warned: set[str] = set()
        self._resolved: dict[str, Price | None] = {}

    def lookup(self, model: str | None) -> Price | None:
        """The model's price: its exact name, or a listed name plus a snapshot date
        (gpt-4o-2024-08-06, claude-sonnet-4-5-20250929, gpt-4-0613), ignoring a `models/`
        prefix; None if unknown. A bare prefix is not enough: claude-opus-4-6 is not
        claude-opus-4, and guessing would misprice it."""
        if not model:
            return None
        if model in self._resolved:
            return self._resolved[model]
        name = model.removeprefix("models/")
        price = self._models.get(name)
        if price is None:
            base = _SNAPSHOT.sub("", name)
            price = self._models.get(base) if base != name else None
        if len(self._resolved) < 10_000:
            self._resolved[model] = price
        return price

    def price(self, model: str | None) -> Price:
        """The model's price, or the fallback with a warning (once per model): never $0."""
        price = self.lookup(model)
        if price is not None:
            return price
        if model not in self._warned and len(self._warned) < 10_000:
            self._warned.add(model or "")
            log.warning("no price for model %r: charging the fallback price", model)
        return self.fallback
