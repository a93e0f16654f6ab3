"""Keys of the admin API (`aigw serve`): created, listed and revoked by `aigw admin-key`, stored
like gateway keys as a hash only, beside the records they manage (the local store or the KV
namespace), under `aigw:admin_key:{hash}`.

A role is `admin` (every endpoint) or `viewer` (GET only)."""

import hmac
import secrets

import orjson

from store.admin_base import AdminError, NotFound, _check_text, _dump, _write, new_id, now_iso
from store.records import ADMIN_KEY_PREFIX, AdminKeyRecord, RecordError
from store.target import AdminTarget

ADMIN_KEY_PREFIX_RAW = "aigw_admin_"
ROLES = ("admin", "viewer")


def looks_like_admin_key(raw: str) -> bool:
    """Shaped like a key `new_admin_key` makes: the prefix and 40 hex characters."""
    body = raw.removeprefix(ADMIN_KEY_PREFIX_RAW)
    return len(raw) == len(ADMIN_KEY_PREFIX_RAW) + 40 and body != raw and all(
        c in "0123456789abcdef" for c in body)


def new_admin_key() -> str:
    """A fresh admin key: `aigw_admin_` and 40 random hex characters."""
    return ADMIN_KEY_PREFIX_RAW + secrets.token_hex(20)


def _shown(record: AdminKeyRecord) -> dict:
    return {"admin_key_id": record.admin_key_id, "name": record.name, "role": record.role,
            "status": record.status, "created_at": record.created_at,
            "revoked_at": record.revoked_at}


def create_admin_key(target: AdminTarget, name: str, role: str = "admin") -> dict:
    """Create an admin key; the result holds the raw key (`api_key`), shown this once."""
    if role not in ROLES:
        raise AdminError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    raw = new_admin_key()
    record = {"admin_key_id": new_id("adm"), "name": _check_text(name, "name"), "role": role,
              "status": "active", "created_at": now_iso()}
    _write(target, {ADMIN_KEY_PREFIX + target.hash(raw): _dump(record)})
    return {**record, "api_key": raw}


def _all(target: AdminTarget) -> list[tuple[str, AdminKeyRecord]]:
    """Every admin key (hash, record); a record that does not parse is left out (it
    authenticates nobody)."""
    out = []
    for name, raw in target.records.scan(ADMIN_KEY_PREFIX):
        key_hash = name.removeprefix(ADMIN_KEY_PREFIX)
        try:
            out.append((key_hash, AdminKeyRecord.parse(key_hash, raw)))
        except RecordError:
            continue
    return out


def list_admin_keys(target: AdminTarget) -> dict:
    """The admin keys (never a key or its hash), oldest first."""
    keys = sorted((_shown(record) for _, record in _all(target)),
                  key=lambda k: (str(k["created_at"]), k["admin_key_id"]))
    return {"admin_keys": keys}


def revoke_admin_key(target: AdminTarget, admin_key_id: str) -> dict:
    """Revoke an admin key by its id: it stops authenticating at once (within the admin
    server's few seconds of cache)."""
    for key_hash, record in _all(target):
        if record.admin_key_id != admin_key_id:
            continue
        if not record.active:
            return _shown(record)
        name = ADMIN_KEY_PREFIX + key_hash
        stored = orjson.loads(target.records.get(name) or b"{}")
        stored.update(status="revoked", revoked_at=now_iso())
        _write(target, {name: _dump(stored)})
        return _shown(AdminKeyRecord.parse(key_hash, stored))
    raise NotFound(f"unknown admin key {admin_key_id}")


class AdminKeys:
    """The active admin keys as (hash, record), to authenticate requests against."""

    def __init__(self, target: AdminTarget) -> None:
        self._target = target
        self._keys = [(h, r) for h, r in _all(target) if r.active]

    def authenticate(self, raw: str) -> AdminKeyRecord | None:
        """The active admin key `raw` is, or None. The digest is compared with every key's in
        constant time, whichever matches."""
        if not looks_like_admin_key(raw):
            return None
        digest = self._target.hash(raw).encode()
        found = None
        for key_hash, record in self._keys:
            if hmac.compare_digest(key_hash.encode(), digest):
                found = record
        return found
