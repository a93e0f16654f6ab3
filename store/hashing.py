"""Gateway keys: generation and the one-way hash under which a key is stored."""

import hashlib
import secrets

import blake3

KEY_PREFIX = "gw_live_"
HASH_ALGORITHMS = ("blake3", "sha256")


GATEWAY_KEY_HEX = (32, 48)  # aigw's and the first Workers gateway's; the later gateway's


def new_gateway_key(hex_chars: int = 32) -> str:
    """A fresh gateway key, `gw_live_` + 32 random hex characters (48 in the later Workers
    gateway's layout)."""
    if hex_chars not in GATEWAY_KEY_HEX:
        raise ValueError(f"a gateway key has {' or '.join(map(str, GATEWAY_KEY_HEX))} hex "
                         f"characters, not {hex_chars}")
    return KEY_PREFIX + secrets.token_hex(hex_chars // 2)


def hash_key(raw: str, algorithm: str = "blake3") -> str:
    """Hex digest of a presented key: blake3 by default, sha256 for the older gateway's data."""
    data = raw.encode("utf-8")
    if algorithm == "blake3":
        return blake3.blake3(data).digest().hex()  # the same text as hexdigest(), in half the time
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown hash algorithm {algorithm!r} (expected one of {HASH_ALGORITHMS})")


def looks_like_gateway_key(raw: str) -> bool:
    """Whether a credential is shaped as a gateway key of either layout (by its prefix: a key
    of any length the gateway does not know is still refused as one, never passed through)."""
    return raw.startswith(KEY_PREFIX)
