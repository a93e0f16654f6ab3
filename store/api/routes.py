"""The admin API's endpoints: the Workers gateway's paths and payloads, each calling the admin
operation the CLI calls. Answers keep the Workers gateway's shapes (`{"organization": ...}`,
`{"user": ...}`, `api_keys`, `usage`) and add the record's fields at the top level."""

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from aiohttp import web

from store import admin, audit
from store.api.backend import Backend
from store.api.payloads import (
    UNSET,
    KeyCreate,
    KeyRotate,
    KeyUpdate,
    OrgCreate,
    OrgUpdate,
    PayloadError,
    QuotaReset,
    UserCreate,
    UserUpdate,
    decode,
)
from store.records import ApiKey
from store.report import (
    GROUPS,
    LOG_FORMATS,
    REPORT_FORMATS,
    LogFilter,
    log_lines,
    month_report,
    parse_month,
    parse_time,
    report_text,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
routes = web.RouteTableDef()
BACKEND = web.AppKey("backend", Backend)
LOG_PAGE_LINES = 2000  # usage log lines read per turn of the worker thread
ACTOR = web.RequestKey("aigw_actor", str)  # the authenticated admin key's audit name


def backend_of(request: web.Request) -> Backend:
    return request.app[BACKEND]


async def _body[T](request: web.Request, kind: type[T]) -> T:
    return decode(kind, await request.read())


async def _write(request: web.Request, operation: Callable[[Any], Any]) -> Any:
    """Run a writing operation on the target, audited as this request's admin key."""
    backend = backend_of(request)
    return await backend.run(lambda: operation(backend.target), actor=request[ACTOR],
                             action=f"{request.method} {request.path}")


async def _read(request: web.Request, operation: Callable[[Any], Any]) -> Any:
    backend = backend_of(request)
    return await backend.run(lambda: operation(backend.target))


def _json(value: Any, status: int = 200) -> web.Response:
    return web.json_response(value, status=status)


def _query(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    return value.strip() or None if value is not None else None


# The query parameters each endpoint takes; every other endpoint takes none. The guard answers
# 400 for any other: a misspelt filter must not answer with everything.
QUERY_PARAMS: dict[str, tuple[str, ...]] = {
    "/admin/users": ("org_id", "email"),
    "/admin/organizations/{org_id}/usage": ("month",),
    "/admin/users/{user_id}/usage": ("month",),
    "/admin/users/{user_id}/api-keys/{key_id}/usage": ("month",),
    "/admin/audit": ("since", "limit"),
    "/admin/usage/log": ("since", "until", "org_id", "user_id", "key_id", "model", "format"),
    "/admin/usage/report": ("month", "by", "format"),
    "/admin/dashboard": ("month", "by"),
    "/admin/vkeys": ("org_id", "user"),
    "/admin/metrics": ("mode",),  # the later gateway's; counts here are always exact
}


def check_query(request: web.Request) -> None:
    """PayloadError for a query parameter the endpoint does not take."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return
    names = QUERY_PARAMS.get(resource.canonical, ())
    unknown = sorted(set(request.query) - set(names))
    if unknown:
        takes = f"it takes {', '.join(names)}" if names else "it takes none"
        raise PayloadError(f"{unknown[0]}: not a query parameter of this endpoint ({takes})")


# Organizations


@routes.post("/admin/organizations")
async def create_org(request: web.Request) -> web.Response:
    body = await _body(request, OrgCreate)
    known = backend_of(request).known_providers
    org = await _write(request, lambda t: admin.create_org(
        t, body.name, body.monthly_budget_usd, body.failure_mode, body.fallback_daily_limit,
        allowed_models=body.allowed_models, provider_keys=body.provider_keys or None,
        rates=body.rates(), known_providers=known))
    return _json({**org, "organization": org, "message": "Organization created successfully"},
                 201)


@routes.get("/admin/organizations")
async def list_orgs(request: web.Request) -> web.Response:
    return _json(await _read(request, admin.list_orgs))


@routes.get("/admin/organizations/{org_id}")
async def show_org(request: web.Request) -> web.Response:
    org = await _read(request, lambda t: admin.show_org(t, request.match_info["org_id"]))
    return _json({**org, "organization": org})


@routes.patch("/admin/organizations/{org_id}")
async def update_org(request: web.Request) -> web.Response:
    body = await _body(request, OrgUpdate)
    org_id = request.match_info["org_id"]
    known = backend_of(request).known_providers

    def update(target: Any) -> dict:
        provider_keys = None
        if body.provider_keys is not UNSET:  # the Workers gateway replaces the whole map
            stored = admin.show_org(target, org_id).get("provider_keys")
            provider_keys = {name: None for name in stored} if isinstance(stored, dict) else {}
            provider_keys.update(body.provider_keys)
        return admin.update_org(
            target, org_id, name=_given(body.name), budget_usd=_given(body.monthly_budget_usd),
            failure_mode=_given(body.failure_mode),
            fallback_daily_limit_usd=_given(body.fallback_daily_limit),
            allowed_models=[] if body.allowed_models is None else _given(body.allowed_models),
            provider_keys=provider_keys, rates=body.rates(), known_providers=known)

    org = await _write(request, update)
    return _json({**org, "organization": org, "message": "Organization updated successfully"})


@routes.get("/admin/organizations/{org_id}/users")
async def org_users(request: web.Request) -> web.Response:
    org_id = request.match_info["org_id"]
    found = await _read(request, lambda t: admin.list_users(t, org_id=org_id))
    return _json({"organization_id": org_id, **found})


@routes.get("/admin/organizations/{org_id}/usage")
async def org_usage(request: web.Request) -> web.Response:
    org_id = request.match_info["org_id"]
    usage = await _usage(request, "org", org_id)
    return _json({**usage, "organization_id": org_id,
                  "month_usage_usd": usage["current_usage_usd"],
                  "remaining_budget_usd": usage["remaining_usd"], "last_update": _now_ms_iso()})


@routes.post("/admin/organizations/{org_id}/reset-quota")
async def reset_org(request: web.Request) -> web.Response:
    org_id = request.match_info["org_id"]
    await _read(request, lambda t: admin.show_org(t, org_id))  # 404 before anything else
    result = await _reset(request, "org", org_id)
    return _json({"message": "Organization quota reset successfully", "organization_id": org_id,
                  **result})


# Users


@routes.post("/admin/users")
async def create_user(request: web.Request) -> web.Response:
    """A user and, as the Workers gateway does, a first key for them (shown this once)."""
    body = await _body(request, UserCreate)
    created = await _write(request, lambda t: admin.create_user_with_key(
        t, body.org_id, body.email, body.monthly_limit_usd, rates=body.rates()))
    user = created["user"]
    return _json({**user, "user": user, "api_key": created["api_key"],
                  "key_id": created["key_id"],
                  "message": "User created successfully. Save the API key - it will not be "
                             "shown again."}, 201)


@routes.get("/admin/users")
async def list_users(request: web.Request) -> web.Response:
    org_id, email = _query(request, "org_id"), _query(request, "email")
    return _json(await _read(request, lambda t: admin.list_users(t, org_id=org_id, email=email)))


@routes.get("/admin/users/{user_id}")
async def show_user(request: web.Request) -> web.Response:
    user = await _read(request, lambda t: admin.show_user(t, request.match_info["user_id"]))
    return _json({**user, "user": user})


@routes.patch("/admin/users/{user_id}")
async def update_user(request: web.Request) -> web.Response:
    body = await _body(request, UserUpdate)
    user = await _write(request, lambda t: admin.update_user(
        t, request.match_info["user_id"], limit_usd=_given(body.monthly_limit_usd),
        status=_given(body.status), email=_given(body.email), rates=body.rates()))
    return _json({**user, "user": user, "message": "User updated successfully"})


@routes.delete("/admin/users/{user_id}")
async def delete_user(request: web.Request) -> web.Response:
    """The user, its quota record and its keys go (as the Workers gateway's DELETE)."""
    result = await _write(request, lambda t: admin.delete_user(t, request.match_info["user_id"]))
    return _json({**result, "message": "User deleted successfully"})


@routes.get("/admin/users/{user_id}/usage")
async def user_usage(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    user = await _read(request, lambda t: admin.show_user(t, user_id))
    usage = await _usage(request, "user", user_id)
    return _json({**usage, "user_id": user_id, "email": user.get("email"),
                  "usage": _seed_usage(usage, "monthly_limit_usd")})


@routes.post("/admin/users/{user_id}/reset-quota")
async def reset_user(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    await _read(request, lambda t: admin.show_user(t, user_id))
    result = await _reset(request, "user", user_id)
    return _json({"message": "User quota reset successfully", "user_id": user_id, **result})


# Keys


@routes.post("/admin/users/{user_id}/api-keys")
async def create_key(request: web.Request) -> web.Response:
    body = await _body(request, KeyCreate)
    key = await _write(request, lambda t: admin.create_key(
        t, request.match_info["user_id"], body.name, body.monthly_limit_usd, rates=body.rates()))
    return _json({**key, "message": "API key created successfully. Save the key - it will not "
                                    "be shown again."}, 201)


@routes.get("/admin/users/{user_id}/api-keys")
async def list_keys(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    found = await _read(request, lambda t: admin.list_keys(t, user_id=user_id))
    keys = [{k: v for k, v in key.items() if k not in ("key_hash", "previous_key_hash")}
            for key in found["keys"]]
    return _json({"user_id": user_id, "api_keys": keys})


def _owned_key(target: Any, user_id: str, key_id: str) -> None:
    """NotFound unless the user exists and owns the key."""
    admin.show_user(target, user_id)
    ref = admin.find_key(target, key_id)
    owners = {ref.listing_key.split(":")[1]} if ref.listing_key else set()
    if ref.record is not None and ref.key_hash is not None:
        owners.add(ApiKey.parse(ref.key_hash, ref.record).user_id)
    if user_id not in owners:
        raise admin.NotFound(f"user {user_id} has no key {key_id}")


def _key_route(path: str) -> Callable[[Callable], Handler]:
    """A handler for `/admin/users/{user_id}/api-keys/{key_id}{path}`: 404 unless the user
    owns the key; the handler gets (request, key_id)."""

    def decorate(handler: Callable[[web.Request, str], Awaitable[web.Response]]) -> Handler:
        async def checked(request: web.Request) -> web.Response:
            user_id, key_id = request.match_info["user_id"], request.match_info["key_id"]
            await _read(request, lambda t: _owned_key(t, user_id, key_id))
            return await handler(request, key_id)

        return checked

    return decorate


@_key_route("")
async def revoke_key(request: web.Request, key_id: str) -> web.Response:
    result = await _write(request, lambda t: admin.revoke_key(t, key_id))
    return _json({**result, "message": "API key revoked successfully",
                  "user_id": request.match_info["user_id"]})


@_key_route("")
async def update_key(request: web.Request, key_id: str) -> web.Response:
    body = await _body(request, KeyUpdate)
    result = await _write(request, lambda t: admin.update_key(
        t, key_id, limit_usd=_given(body.monthly_limit_usd), rates=body.rates()))
    return _json({**result, "message": "API key updated successfully"})


@_key_route("/usage")
async def key_usage(request: web.Request, key_id: str) -> web.Response:
    usage = await _usage(request, "key", key_id)
    return _json({**usage, "key_id": key_id, "usage": _seed_usage(usage, "monthly_limit_usd")})


@_key_route("/reset-quota")
async def reset_key(request: web.Request, key_id: str) -> web.Response:
    result = await _reset(request, "key", key_id)
    return _json({"message": "API key quota reset successfully", "key_id": key_id, **result})


@_key_route("/rotate")
async def rotate_key(request: web.Request, key_id: str) -> web.Response:
    body = await _body(request, KeyRotate)
    result = await _write(request, lambda t: admin.rotate_key(t, key_id, body.grace_s))
    return _json({**result, "message": "API key rotated. Save the new key - it will not be "
                                       "shown again."}, 201)


_KEY = "/admin/users/{user_id}/api-keys/{key_id}"
routes.delete(_KEY)(revoke_key)
routes.patch(_KEY)(update_key)
routes.get(_KEY + "/usage")(key_usage)
routes.post(_KEY + "/reset-quota")(reset_key)
routes.post(_KEY + "/rotate")(rotate_key)


# Usage, quota resets, health, audit, reports


async def _usage(request: web.Request, level: str, level_id: str) -> dict:
    month = _query(request, "month")
    if month is not None:
        month = _parsed(parse_month, month, "month")
    return await _read(request, lambda t: admin.level_usage(t, level, level_id, month))


def _seed_usage(usage: dict, limit_field: str) -> dict:
    """The Workers gateway's `usage` object of a usage answer."""
    return {"current_month": usage["current_month"], "usage_usd": usage["current_usage_usd"],
            "limit_usd": usage.get(limit_field), "remaining_usd": usage["remaining_usd"],
            "request_count": usage["request_count"], "last_update": _now_ms_iso()}


def _now_ms_iso() -> str:
    """Now as the Workers gateway writes `last_update` in its answers (ISO, milliseconds)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _reset(request: web.Request, level: str, level_id: str) -> dict:
    body = await _body(request, QuotaReset)
    result = await _write(request, lambda t: admin.reset_quota(t, level, level_id,
                                                               body.reset_reason))
    month = result.get("current_month")
    return {**result, "quota": {"month_usage_usd": 0, "current_month": month,
                                "request_count": 0}}


@routes.get("/admin/health")
async def health(request: web.Request) -> web.Response:
    backend = backend_of(request)
    if backend.local is not None and backend.target_name == "local":
        found = await _read(request, lambda t: admin.health(t))
    else:
        def reach(target: Any) -> dict:  # one listing: the namespace answers this token
            names = target.records.names("org:")
            return {"ok": True, "kv": "healthy",
                    "organizations": sum(name.endswith(":config") for name in names)}

        found = await _read(request, reach)
    return _json({"status": "ok", "timestamp": _now(), "target": backend.target_name, **found})


@routes.get("/admin/audit")
async def audit_log(request: web.Request) -> web.Response:
    since = _query(request, "since")
    when = None if since is None else _parsed(_utc_time, since, "since")
    limit = _query(request, "limit")
    count = None if limit is None else _parsed(_count, limit, "limit")
    return _json(await _read(request, lambda t: audit.entries(t, when, count)))


def _local(request: web.Request) -> Any:
    store = backend_of(request).local
    if store is None:
        raise LocalStoreMissing("this server has no local store: the usage log and reports "
                                "are each node's own (start aigw serve with --store)")
    return store


class LocalStoreMissing(Exception):
    """The endpoint reads this node's ledger, and the server runs without a local store."""


@routes.get("/admin/usage/log")
async def usage_log(request: web.Request) -> web.StreamResponse:
    fmt = _choice(request, "format", LOG_FORMATS, "jsonl")
    times = {name: _parsed(parse_time, value, name) for name in ("since", "until")
             if (value := _query(request, name)) is not None}
    where = LogFilter(times.get("since"), times.get("until"), _query(request, "org_id"),
                      _query(request, "user_id"), _query(request, "key_id"),
                      _query(request, "model"))
    store, backend = _local(request), backend_of(request)
    lines = log_lines(store, where, fmt)
    # Streamed a page at a time: a long log never sits in memory whole, and the worker thread
    # is free between pages for other requests.
    response = web.StreamResponse(headers={
        "content-type": ("text/csv" if fmt == "csv" else "application/x-ndjson")
        + "; charset=utf-8"})
    await response.prepare(request)
    while page := await backend.run(lambda: "".join(islice(lines, LOG_PAGE_LINES))):
        await response.write(page.encode())
    await response.write_eof()
    return response


def _month_of(request: web.Request) -> str:
    month = _query(request, "month")
    if month is None:
        return datetime.now(UTC).strftime("%Y-%m")
    return _parsed(parse_month, month, "month")


@routes.get("/admin/usage/report")
async def usage_report(request: web.Request) -> web.StreamResponse:
    month, by = _month_of(request), _choice(request, "by", GROUPS, "model")
    fmt = _choice(request, "format", REPORT_FORMATS, "json")
    store = _local(request)
    if fmt == "json":
        return _json(await backend_of(request).run(lambda: month_report(store, month, by)))
    return await _text_report(request, store, month, by, fmt)


@routes.get("/admin/dashboard")
async def dashboard(request: web.Request) -> web.StreamResponse:
    month, by = _month_of(request), _choice(request, "by", GROUPS, "model")
    return await _text_report(request, _local(request), month, by, "html")


async def _text_report(request: web.Request, store: Any, month: str, by: str,
                       fmt: str) -> web.Response:
    text = await backend_of(request).run(lambda: report_text(store, month, by, fmt))
    kinds = {"csv": "text/csv", "table": "text/plain", "html": "text/html"}
    response = web.Response(text=text, content_type=kinds[fmt], charset="utf-8")
    if fmt == "html":  # the page is self-contained: nothing to load, nothing to run
        response.headers["content-security-policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; img-src data:")
    return response


# Query values


def _given(value: Any) -> Any:
    return None if value is UNSET else value


def _utc_time(text: str) -> datetime:
    try:
        return datetime.fromtimestamp(parse_time(text, "since"), UTC)
    except (OverflowError, OSError):
        raise ValueError("out of range") from None


def _count(text: str) -> int:
    number = int(text)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _parsed(parse: Callable[[str], Any], text: str, name: str) -> Any:
    try:
        return parse(text)
    except ValueError as exc:
        raise PayloadError(f"{name}: {exc}") from None


def _choice(request: web.Request, name: str, choices: tuple[str, ...], default: str) -> str:
    value = _query(request, name) or default
    if value not in choices:
        raise PayloadError(f"{name}: must be one of {', '.join(choices)}, not {value!r}")
    return value


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = ["ACTOR", "BACKEND", "LocalStoreMissing", "routes"]
