"""The Cloudflare target of the admin operations: the records API of the store over a KV
namespace, so `aigw --target cloudflare org|user|key ...` manages every node from one place. Every
value is written with its version stamp, so each node's next pass fetches it."""

import time
from collections.abc import Iterable, Mapping, Sequence

import orjson

from store.cloudflare.client import BULK_GET, BULK_PUT, KVClient, SyncError
from store.cloudflare.sync import STAMP, stamp_of
from store.hashing import hash_key
from store.records import listing_metadata, record_label

SAME_KEY_WRITE_S = 1.1  # Cloudflare refuses a second write to a key within a second


def _item(key: str, value: bytes) -> dict:
    return {"key": key, "value": value.decode(),
            "metadata": {STAMP: stamp_of(value), **listing_metadata(key, value)}}


def _put(client: KVClient, items: list[dict]) -> list[str]:
    """Bulk put; the keys Cloudflare reports unwritten get one more try. The keys still not
    written."""
    failed: list[str] = []
    for start in range(0, len(items), BULK_PUT):
        failed += client.bulk_put(items[start:start + BULK_PUT])
    if failed:
        again = set(failed)
        failed = client.bulk_put([item for item in items if item["key"] in again])
    return failed


def _labels(names: Sequence[str]) -> str:
    shown = ", ".join(record_label(name) for name in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def write_records(client: KVClient, records: dict[str, bytes], deletes: Iterable[str] = (),
                  before: Mapping[str, bytes] | None = None) -> None:
    """Admin writes straight to KV, each value with its version stamp (so syncs fetch it), then
    the deletes. KV has no transaction: when some keys are not written and `before` holds the
    values the written keys had (absent: they had none), those are put back (or deleted), so a
    failed write leaves the namespace as it was; SyncError either way."""
    items = [_item(k, v) for k, v in records.items()]
    failed = _put(client, items) if items else []
    if failed:
        outcome = "nothing else was written"
        if before is not None:
            time.sleep(SAME_KEY_WRITE_S)  # KV takes one write a second per key
            unwritten = set(failed)
            written = [item["key"] for item in items if item["key"] not in unwritten]
            restore = [_item(k, before[k]) for k in written if k in before]
            remove = [k for k in written if k not in before]
            left = (_put(client, restore) if restore else []) + \
                (client.bulk_delete(remove) if remove else [])
            outcome = ("the keys it did write were put back as they were" if not left else
                       f"{len(left)} keys it did write could not be put back: {_labels(left)}")
        elif len(failed) < len(items):
            outcome = "the other keys were written"
        raise SyncError(f"Cloudflare did not write {len(failed)} of {len(items)} keys "
                        f"({_labels(failed)}); {outcome}")
    names = list(deletes)
    if names:
        failed = client.bulk_delete(names)
        if failed:
            raise SyncError(f"Cloudflare did not delete {len(failed)} keys ({_labels(failed)}); "
                            f"the keys written stay")


class KVRecords:
    """The records API of the store (`get`, `get_json`, `scan`, `write`) over a KV namespace, so
    the admin operations can manage every node from one place (`aigw --target cloudflare`)."""

    def __init__(self, client: KVClient) -> None:
        self._client = client

    def get(self, key: str) -> bytes | None:
        return self._client.get(key)

    def get_json(self, key: str) -> dict | None:
        raw = self.get(key)
        return None if raw is None else orjson.loads(raw)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those `keys` that exist, fetched in bulk (BULK_GET a request)."""
        names = list(keys)
        out = {}
        for start in range(0, len(names), BULK_GET):
            values = self._client.bulk_get(names[start:start + BULK_GET])
            for name in names[start:start + BULK_GET]:
                entry = values.get(name)
                value = entry.get("value") if isinstance(entry, dict) else entry
                if value is None:
                    raw = self._client.get(name)
                    if raw is not None:
                        out[name] = raw
                else:
                    out[name] = (value.encode() if isinstance(value, str)
                                 else orjson.dumps(value))
        return out

    def names(self, prefix: str = "") -> list[str]:
        """The keys that start with `prefix` (a listing only: no value is fetched)."""
        return [item["name"] for item in self._client.list_all(prefix=prefix)
                if isinstance(item.get("name"), str)]

    def scan(self, prefix: str = "") -> list[tuple[str, bytes]]:
        names = self.names(prefix)
        values = self.get_many(names)
        return [(name, values[name]) for name in names if name in values]

    def write(self, puts: dict[str, bytes], deletes: Iterable[str] = ()) -> None:
        """All or nothing as far as KV allows: with more than one key, the values they had are
        read first, to put back should Cloudflare write only some (`write_records`)."""
        before = self.get_many(puts) if len(puts) > 1 else None
        write_records(self._client, puts, deletes, before)

    def listing(self, prefix: str) -> list[dict]:
        """Every key under `prefix` with its metadata ({name, metadata?}), as a pass lists it:
        what aigw's usage keys and reset markers hold is read from their metadata."""
        return self._client.list_all(prefix=prefix)


class CloudflareTarget:
    """The admin operations' target (`store.target.AdminTarget`) with the records in
    Cloudflare KV."""

    def __init__(self, client: KVClient, hash_algorithm: str, key_layout: str | None = None
                 ) -> None:
        hash_key("", hash_algorithm)  # rejects an unknown algorithm early
        self._records = KVRecords(client)
        self.hash_algorithm = hash_algorithm
        self.key_layout = key_layout  # None: as the namespace shows

    @property
    def records(self) -> KVRecords:
        """The namespace's records."""
        return self._records

    def hash(self, raw_key: str) -> str:
        """The digest under which a presented key is stored."""
        return hash_key(raw_key, self.hash_algorithm)

    def last_metered(self, key_ids: Sequence[str], month: str) -> list[int | None]:
        """Unknown for every key: metering is in each node's own ledger, not in KV."""
        return [None] * len(key_ids)
