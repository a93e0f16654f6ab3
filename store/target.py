"""What admin operations need of where records live: the local store and the Cloudflare KV
namespace (`aigw --target cloudflare`) both answer it, so an operation never asks which it holds.
"""

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class RecordOps(Protocol):
    """The record operations: KV keys to JSON values, in the Workers gateway's layout."""

    def get(self, key: str) -> bytes | None:
        """The value under `key`, None if there is none."""
        ...

    def get_json(self, key: str) -> dict | None:
        """The value under `key` decoded as JSON, None if there is none."""
        ...

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those `keys` that exist."""
        ...

    def names(self, prefix: str = "") -> list[str]:
        """Every key that starts with `prefix`, in key order (no value read)."""
        ...

    def scan(self, prefix: str = "") -> list[tuple[str, bytes]]:
        """Every (key, value) whose key starts with `prefix`, in key order."""
        ...

    def write(self, puts: dict[str, bytes], deletes: Iterable[str] = ()) -> None:
        """Write and delete records, all or nothing."""
        ...


@runtime_checkable
class AdminTarget(Protocol):
    """Where the org, user, key, usage and quota commands read and write: records, the hash
    under which keys are stored, and what this node metered of each key."""

    hash_algorithm: str
    key_layout: str | None  # where keys are created: apikey, vkey, or None (as records show)

    @property
    def records(self) -> RecordOps:
        """The records."""
        ...

    def hash(self, raw_key: str) -> str:
        """The digest under which a presented key is stored."""
        ...

    def last_metered(self, key_ids: Sequence[str], month: str) -> list[int | None]:
        """For each key, when this node last metered it in `month` (epoch milliseconds), or
        None: never, or not known where the records are."""
        ...
