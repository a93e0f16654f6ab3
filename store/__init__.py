"""aigw's embedded store: LMDB records (the Workers gateway's KV layout), the usage ledger,
key hashing and admin operations. Knows nothing of mitmproxy or HTTP."""

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
