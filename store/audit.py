"""The audit log: every admin write through the CLI or the admin API, with who made it, what,
when, and each record before and after (secrets redacted).

An entry is a record of its own, `aigw:audit:{time}:{id}`, written in the same write as the
records it describes (all or nothing), wherever those records live: the local store, or the
Cloudflare KV namespace with `--target cloudflare`. Writes are audited while a command or an API
request runs inside `audited(actor, action)`; the admin operations need not know of it.
"""

import getpass
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from store.records import ADMIN_KEY_PREFIX
from store.target import AdminTarget

AUDIT_PREFIX = "aigw:audit:"
MAX_CHANGES_SHOWN = 50  # records shown in full in one entry (a bulk import lists the rest)


@dataclass(frozen=True)
class Audit:
    """Who is writing (`cli:USER` or `admin_key:ID`) and what (`org create`, `POST /admin/...`)."""

    actor: str
    action: str


_CURRENT: ContextVar[Audit | None] = ContextVar("aigw_audit", default=None)


@contextmanager
def audited(actor: str, action: str) -> Iterator[None]:
    """Audit every admin write made inside this block as `actor` doing `action`."""
    token = _CURRENT.set(Audit(actor, action))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def cli_actor() -> str:
    """The actor of a CLI command: `cli:` and the OS user running it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's bare uid)
        user = f"uid {os.getuid()}"
    return f"cli:{user}"


def _now() -> datetime:
    return datetime.now(UTC)


def _shown(raw: bytes | None, redact: Callable[[dict], dict]) -> Any:
    """A record as the audit log keeps it: JSON with secrets redacted (text if not JSON)."""
    if raw is None:
        return None
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "<not JSON>"
    return redact(value) if isinstance(value, dict) else value


def _redact(record: dict) -> dict:
    from store.admin_base import _redacted  # the one redaction of admin output

    return _redacted(record)


def _label(name: str) -> str:
    """A record key as the log shows it: an admin key's hash shortened (the log is readable by
    viewers; the full digest of an admin key is nobody's business)."""
    if name.startswith(ADMIN_KEY_PREFIX):
        return name[:len(ADMIN_KEY_PREFIX) + 12] + "..."
    return name


def entry_for(target: AdminTarget, puts: Mapping[str, bytes], deletes: Iterable[str] = (),
              details: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """The audit entry describing a write (as puts to add to it), or nothing outside
    `audited`. Records before the write are read from `target` now."""
    audit = _CURRENT.get()
    if audit is None:
        return {}
    names = [name for name in dict.fromkeys([*puts, *deletes]) if not name.startswith(AUDIT_PREFIX)]
    before = target.records.get_many(names[:MAX_CHANGES_SHOWN]) if names else {}
    changes = [{"key": _label(name), "before": _shown(before.get(name), _redact),
                "after": _shown(puts.get(name), _redact)}
               for name in names[:MAX_CHANGES_SHOWN]]
    at = _now()
    entry: dict[str, Any] = {
        "id": f"aud_{secrets.token_hex(6)}",
        "at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": audit.actor,
        "action": audit.action,
        "changes": changes,
    }
    if len(names) > MAX_CHANGES_SHOWN:
        entry["more_keys"] = names[MAX_CHANGES_SHOWN:]
    if details:
        entry["details"] = dict(details)
    return {f"{AUDIT_PREFIX}{entry['at']}:{entry['id']}": orjson.dumps(entry)}


def note(target: AdminTarget, details: Mapping[str, Any]) -> None:
    """Log an admin action that writes no record (a ledger reset) inside `audited`."""
    entry = entry_for(target, {}, (), details)
    if entry:
        target.records.write(entry)


def entries(target: AdminTarget, since: datetime | None = None,
            limit: int | None = None) -> dict:
    """The audit log, oldest first: entries at or after `since`, the newest `limit` of them."""
    floor = "" if since is None else AUDIT_PREFIX + since.astimezone(UTC).strftime(
        "%Y-%m-%dT%H:%M:%S.%fZ")
    names = [name for name in target.records.names(AUDIT_PREFIX) if name >= floor]
    if limit is not None:
        names = names[-limit:] if limit else []
    values = target.records.get_many(names)  # only the entries asked for are read
    found = []
    for name in names:
        raw = values.get(name)
        if raw is None:
            continue
        try:
            entry = orjson.loads(raw)
        except orjson.JSONDecodeError:
            entry = {"key": name, "error": "not JSON"}
        found.append(entry if isinstance(entry, dict) else {"key": name, "error": "not an object"})
    return {"entries": found, "count": len(found)}
