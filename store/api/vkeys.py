"""The later Workers gateway's admin endpoints: `/admin/vkeys` (its virtual keys) and
`/admin/metrics`, with its paths, payloads, status codes and answer shapes, so a script written
against it works unchanged. Each calls the admin operation the CLI calls (`store.admin`); a key
of the first layout is not a virtual key here (404), as there."""

from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Literal

import msgspec
from aiohttp import web

from store import admin
from store.api.payloads import UNSET, PayloadError, QuotaReset, Unset
from store.api.routes import _body, _json, _query, _read, _write
from store.records import QuotaRecord, RecordError, vkey_quota_key

routes = web.RouteTableDef()
DEFAULT_LIMIT_USD = 10.0  # the later gateway's default monthly_limit_usd of a new key
Positive = float | int


class VKeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    org_id: str
    user: str
    name: str | None = None
    monthly_limit_usd: Positive = DEFAULT_LIMIT_USD


class VKeyUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str | Unset = UNSET
    monthly_limit_usd: Positive | Unset = UNSET
    status: Literal["active", "revoked"] | Unset = UNSET
    user: str | Unset = UNSET


def _positive(value: Any) -> float | None:
    """A limit as the later gateway takes it: a number above 0 (UNSET: not given)."""
    if value is UNSET:
        return None
    if isinstance(value, bool) or not value > 0:
        raise PayloadError(f"monthly_limit_usd: must be a number above 0, not {value!r}")
    return value


def _key_id(request: web.Request) -> str:
    return request.match_info["key_id"]


@routes.post("/admin/vkeys")
async def create_vkey(request: web.Request) -> web.Response:
    body = await _body(request, VKeyCreate)
    limit = _positive(body.monthly_limit_usd)
    created = await _write(request, lambda t: admin.create_vkey(
        t, body.org_id, body.user, body.name, limit))
    return _json({**created, "message": "Virtual key created successfully. Save the API key - "
                                        "it will not be shown again."})


@routes.get("/admin/vkeys")
async def list_vkeys(request: web.Request) -> web.Response:
    org_id, user = _query(request, "org_id"), _query(request, "user")
    return _json(await _read(request, lambda t: admin.list_vkeys(t, org_id, user)))


def _shown(target: Any, key_id: str) -> dict:
    return admin.shown_vkey(admin.find_vkey(target, key_id).record or {})


@routes.get("/admin/vkeys/{key_id}")
async def show_vkey(request: web.Request) -> web.Response:
    key_id = _key_id(request)
    return _json({"virtual_key": await _read(request, lambda t: _shown(t, key_id))})


@routes.patch("/admin/vkeys/{key_id}")
async def update_vkey(request: web.Request) -> web.Response:
    body = await _body(request, VKeyUpdate)
    key_id = _key_id(request)
    limit = _positive(body.monthly_limit_usd)

    def update(target: Any) -> dict:
        admin.find_vkey(target, key_id)
        admin.update_key(target, key_id, limit_usd=limit, name=_given(body.name),
                         status=_given(body.status), user_id=_given(body.user))
        return _shown(target, key_id)

    shown = await _write(request, update)
    return _json({"virtual_key": shown, "message": "Virtual key updated successfully"})


@routes.delete("/admin/vkeys/{key_id}")
async def delete_vkey(request: web.Request) -> web.Response:
    key_id = _key_id(request)

    def delete(target: Any) -> None:
        admin.find_vkey(target, key_id)
        admin.delete_key(target, key_id)

    await _write(request, delete)
    return _json({"message": "Virtual key deleted successfully"})


def _last_update(target: Any, key_hash: str | None) -> str:
    """When the key's Workers quota record was last written (ISO, ms), else now."""
    raw = target.records.get(vkey_quota_key(key_hash)) if key_hash else None
    at = None
    if raw is not None:
        try:
            at = QuotaRecord.parse(raw).last_update
        except RecordError:
            at = None
    when = datetime.fromtimestamp(at / 1000, UTC) if isinstance(at, int | float) \
        else datetime.now(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@routes.get("/admin/vkeys/{key_id}/usage")
async def vkey_usage(request: web.Request) -> web.Response:
    key_id = _key_id(request)

    def usage(target: Any) -> dict:
        ref = admin.find_vkey(target, key_id)
        found = admin.level_usage(target, "key", key_id)
        record = ref.record or {}
        return {"key_id": key_id, "name": record.get("name"), "user": record.get("user"),
                "usage": {"current_month": found["current_month"],
                          "usage_usd": found["current_usage_usd"],
                          "limit_usd": found["monthly_limit_usd"],
                          "remaining_usd": found["remaining_usd"],
                          "request_count": found["request_count"],
                          "last_update": _last_update(target, ref.key_hash)}}

    return _json(await _read(request, usage))


@routes.post("/admin/vkeys/{key_id}/reset-quota")
async def reset_vkey(request: web.Request) -> web.Response:
    body = await _body(request, QuotaReset)  # the later gateway takes no body: optional here
    key_id = _key_id(request)

    def reset(target: Any) -> dict:
        admin.find_vkey(target, key_id)
        return admin.reset_quota(target, "key", key_id, body.reset_reason)

    result = await _write(request, reset)
    return _json({"message": "Virtual key quota reset successfully", "key_id": key_id,
                  "quota": {"month_usage_usd": 0, "current_month": result["current_month"],
                            "request_count": 0,
                            "last_update": int(datetime.now(UTC).timestamp() * 1000)}})


@routes.get("/admin/metrics")
async def metrics(request: web.Request) -> web.Response:
    """Entity counts, exact whatever `mode` asks (the later gateway estimates past 1000)."""
    counts = await _read(request, admin.count_entities)
    return _json({"timestamp": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
                  "system": {"version": _version()}, "entities": counts})


def _version() -> str:
    try:
        return version("aigw")
    except PackageNotFoundError:
        return "unknown"


def _given(value: Any) -> Any:
    return None if value is UNSET else value
