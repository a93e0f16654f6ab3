"""`aigw serve`: the admin REST API over HTTP, on aiohttp.

Every `/admin` request carries `Authorization: Bearer <admin key>`; a viewer key may only read
(GET). Errors are `{"error": {"type", "message"}}`: 400 a bad payload (naming the field), 401,
403, 404, 405, 409 a duplicate, 502 Cloudflare did not answer, 503 the store did not. The access
log names the method, path, status and admin key id; never a key, not even in a request too
malformed to parse (aiohttp's own answer would quote the header line)."""

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_protocol import RequestHandler

from store.admin_base import AdminError, Conflict, NotFound
from store.api.backend import Backend
from store.api.payloads import PayloadError
from store.api.routes import ACTOR, BACKEND, LocalStoreMissing, check_query, routes
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
        check_query(request)
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
    app.add_routes(vkey_routes)

    async def close(_: web.Application) -> None:
        backend.close()

    app.on_cleanup.append(close)
    return app


class AccessLogger(AbstractAccessLogger):
    """One line a request: client, request line, status, size, time and the admin key id
    (never a header, so never the Authorization)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        actor = request.get(ACTOR, "-")
        self.logger.info('%s "%s %s" %s %s %.4fs %s', request.remote, request.method,
                         request.rel_url, response.status, response.body_length, time, actor)


class _QuietHandler(RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse gets the API's error shape
    and a log line without the exception's text: both would otherwise quote the bad line,
    which may be the Authorization header."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        log.warning("%s: refused a request it could not read (%s, %d)", request.remote,
                    type(exc).__name__ if exc else "error", status)
        if request.writer.output_size > 0:
            raise ConnectionError("the answer was already started")
        kind = "server_error" if status >= 500 else "invalid_request"
        response = error(status, kind, HTTPStatus(status).phrase)
        response.force_close()
        return response


class _Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()

        def protocol() -> RequestHandler:
            return _QuietHandler(server, loop=server._loop, **server._kwargs)

        return _Protocols(server, protocol)


class _Protocols(web.Server):
    """The server aiohttp made, with `_QuietHandler` for its connections."""

    def __init__(self, server: web.Server, protocol: Callable[[], RequestHandler]) -> None:
        self.__dict__.update(server.__dict__)
        self._protocol = protocol

    def __call__(self) -> RequestHandler:
        return self._protocol()


def run(backend: Backend, host: str, port: int, *,
        on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish the requests under way."""

    async def serve() -> None:
        runner = _Runner(make_app(backend), access_log_class=AccessLogger, access_log=log,
                         handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
            if on_ready is not None:
                on_ready(f"http://{host}:{port}")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())
