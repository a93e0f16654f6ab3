"""aigw's embedded store: LMDB records (the Workers gateway's KV layout), the usage ledger,
key hashing and admin operations. Knows nothing of mitmproxy or HTTP.

Its parts, each readable alone: `lmdb_env` (one LMDB environment: map growth, the lock),
`records_db` (the configuration records and the request path's look-up), `ledger` (usage
counters, reservations, the usage log, the grace ledger), `registry` (the gateway processes
sharing a ledger), `db` (the `Store` facade opening both environments), `records` (the record
schemas), `admin` (admin operations over a `target.AdminTarget`), `cloudflare` (replication
from Workers KV), `hashing`, `money`, `lru`."""

from store.db import Store, StoreError, StoreUnavailable
from store.hashing import hash_key, new_gateway_key
from store.money import USD, from_usd, to_usd

__all__ = [
    "USD",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "from_usd",
    "hash_key",
    "new_gateway_key",
    "to_usd",
]
