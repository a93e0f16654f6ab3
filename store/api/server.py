"""`aigw serve`: the admin REST API over HTTP, on aiohttp.

Every `/admin` request carries `Authorization: Bearer <admin key>`; a viewer key may only read
(GET). Errors are `{"error": {"type", "message"}}`: 400 a bad payload (naming the field), 401,
403, 404, 405, 409 a duplicate, 502 Cloudflare did not answer, 503 the store did not. The access
log names the method, path, status and admin key id; never a key."""

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from store.admin_base import AdminError, Conflict, NotFound
from store.api.backend import Backend
from store.api.payloads import PayloadError
from store.api.routes import ACTOR, BACKEND, LocalStoreMissing, routes
from store.api.vkeys import routes as vkey_routes
from store.db import StoreError

log = logging.getLogger("aigw.serve")
READ_METHODS = ("GET", "HEAD")
MAX_BODY = 1 << 20  # an admin payload is a few hundred bytes


def error(status: int, kind: str, message: str) -> web.Response:
    """The one error shape of the admin API."""
    return web.json_response({"error": {"type": kind, "message": message}}, status=status)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, authorize, then turn every failure into the error shape (never a trace,
    never a key)."""
    try:
        if request.path == "/healthz":  # for load balancers: says only that it answers
            return web.json_response({"ok": True})
        backend = request.app[BACKEND]
        token = _bearer(request)
        if token is None:
            return error(401, "auth_error", "missing Authorization: Bearer <admin key>")
        key = await backend.authenticate(token)
        if key is None:
            return error(401, "auth_error", "invalid admin key")
        request[ACTOR] = f"admin_key:{key.admin_key_id}"
        if request.method not in READ_METHODS and key.role != "admin":
            return error(403, "permission_denied",
                         f"admin key {key.admin_key_id} is a viewer: it may only read (GET)")
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            return error(413, "invalid_request", f"the body is over {MAX_BODY} bytes")
        if exc.status == 405:
            return error(405, "method_not_allowed", f"{request.method} is not allowed here")
        if exc.status == 404:
            return error(404, "not_found", f"no endpoint {request.path}")
        return error(exc.status, "invalid_request", exc.reason or "invalid request")
    except PayloadError as exc:
        return error(400, "invalid_request", str(exc))
    except NotFound as exc:
        return error(404, "not_found", str(exc))
    except Conflict as exc:
        return error(409, "conflict", str(exc))
    except AdminError as exc:
        return error(400, "invalid_request", str(exc))
    except LocalStoreMissing as exc:
        return error(503, "store_unavailable", str(exc))
    except StoreError as exc:
        return error(503, "store_unavailable", f"the store did not answer: {exc}")
    except Exception as exc:
        if type(exc).__name__ == "SyncError":  # the Cloudflare target (imported only for it)
            return error(502, "upstream_error", f"Cloudflare KV did not answer: {exc}")
        log.error("%s %s: internal error %s", request.method, request.path,
                  type(exc).__name__)
        return error(500, "server_error", f"internal error: {type(exc).__name__}")


def make_app(backend: Backend) -> web.Application:
    """The admin API over `backend`."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)
    app[BACKEND] = backend
    app.add_routes(routes)
    app.add_routes(vkey_routes)  # the later Workers gateway's /admin/vkeys and /admin/metrics
    app.router.add_get("/healthz", lambda request: web.json_response({"ok": True}))

    async def close(_: web.Application) -> None:
        backend.close()

    app.on_cleanup.append(close)
    return app


ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'  # no headers: never the Authorization


def run(backend: Backend, host: str, port: int, *,
        on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM."""

    async def ready(_: web.Application) -> None:
        if on_ready is not None:
            on_ready(f"http://{host}:{port}")

    app = make_app(backend)
    app.on_startup.append(ready)
    web.run_app(app, host=host, port=port, print=None, access_log=log,
                access_log_format=ACCESS_LOG_FORMAT, handle_signals=True)
