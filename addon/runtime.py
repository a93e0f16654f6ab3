"""What the gateway runs on: its configuration and its store, opened, watched and closed; and
why it is not ready when it cannot decide. No hooks here (addon/gateway.py has them)."""

import functools
import logging
import os
import re
import secrets
import socket
import time
import traceback
from pathlib import Path

from addon.config import SHIPPED_CONFIG, GatewayConfig, Provider, load_config, normalize_host
from addon.providers.openai import OpenAIAdapter
from store import Store, StoreUnavailable
from store.db import Flusher, StoreMissing
from store.settings import ConfigError

log = logging.getLogger("aigw")

STORE_WARN_EVERY_S = 30.0
STREAMING_REFUSED = (
    "aigw: mitmproxy's stream_large_bodies sends a request body upstream before the gateway "
    "has decided on it; unset it (the gateway streams provider responses itself)")

# Kept across script reloads (this module is imported, not reloaded): the last good
# configuration, whose providers give a not-ready gateway's answers their native shape, and the
# allow_hosts the gateway derived, so a new instance still recognises them as its own.
_LAST_GOOD: list[GatewayConfig] = []
_DERIVED_ALLOW_HOSTS: list[list[str]] = []
_GATEWAYS_HERE: set[str] = set()  # the gateways (instances) running in this process


class Runtime:
    """The configuration and the store of one gateway instance."""

    def __init__(self) -> None:
        self.config: GatewayConfig | None = None
        self.store: Store | None = None
        self.not_ready: str | None = "not configured yet"  # why requests cannot be decided
        self.config_seen: tuple[str, float] | None = None  # a bad file's path and mtime
        self._flusher: Flusher | None = None
        self._store_warned_at = -1e9
        # Reservations name their owner, so a restarted gateway can release a crashed one's.
        self.owner = {"pid": os.getpid(), "host": f"{_HOSTNAME}/{secrets.token_hex(4)}"}

    def load(self, path: str, store_override: str | None) -> str | None:
        """(Re)read mitm.yaml and open the store; the error that leaves the gateway not ready."""
        self.close()
        self.config = None
        try:
            config = load_config(path, store_override)
        except Exception as exc:  # ConfigError names file, key and reason; anything else too
            message = str(exc) if isinstance(exc, ConfigError) else (
                f"{path}: cannot be read: {fault_text(exc)}")
            self.config_seen = (path, _mtime(path))
            self.not_ready = f"invalid configuration: {message}"
            return message
        self.config_seen = None
        self.config = config
        _LAST_GOOD[:] = [config]
        self.not_ready = self.open_store()
        if self.not_ready is None:
            _warn_of_missing_credentials(config)
        return self.not_ready

    def config_changed(self) -> bool:
        """Whether the invalid file the gateway waits on has changed since."""
        return self.config_seen is not None and _mtime(self.config_seen[0]) != self.config_seen[1]

    def open_store(self) -> str | None:
        """Open the store. A missing one is an error (returned: the gateway is not ready); one
        that cannot be opened now leaves `store` None: failure modes apply until a retry works."""
        assert self.config is not None
        settings = self.config.store
        try:
            store = Store(settings.path, hash_algorithm=settings.hash_algorithm, create=False)
        except StoreMissing as exc:
            return str(exc)
        except StoreUnavailable as exc:
            # A warning, not an error: mitmdump ends on an error logged at startup, and the
            # gateway must start and apply the failure modes until the store opens.
            if time.monotonic() - self._store_warned_at >= STORE_WARN_EVERY_S:
                self._store_warned_at = time.monotonic()
                log.warning("aigw: store unavailable (%s); applying failure modes, retrying", exc)
            return None
        try:
            store.ledger.join(self.owner["host"], _process_info(), is_live)
        except StoreUnavailable as exc:
            log.warning("aigw: could not register on the ledger (%s); applying failure modes",
                        exc)
            store.close()
            return None
        self.store = store
        _GATEWAYS_HERE.add(self.owner["host"])
        self._flusher = Flusher(store, self.config.policy.flush_interval_s)
        self._flusher.start()
        released = self.release_stale()
        log.info("aigw ready: store %s, %d providers%s", settings.path,
                 len(self.config.providers),
                 f", released {released} stale reservations" if released else "")
        return None

    def close(self) -> None:
        if self.store is not None:
            try:
                self.store.ledger.leave()
            except Exception as exc:
                log_fault("could not leave the ledger cleanly", exc)
            _GATEWAYS_HERE.discard(self.owner["host"])
        if self._flusher is not None:
            self._flusher.stop()
            self._flusher = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def release_stale(self) -> int:
        """Release reservations of gateways no longer registered (crashed, or stopped before
        their requests ended) and any older than the configured timeout."""
        if self.store is None or self.config is None:
            return 0
        # Liveness is read inside the transaction that releases: no gateway registers between.
        return self.store.ledger.release_stale(self.config.policy.reservation_timeout_s * 1000)

    def derived_allow_hosts(self, allow_hosts: list[str], ignore_hosts: list[str]
                            ) -> list[str] | None:
        """The allow_hosts to set so that only the providers' hosts are intercepted (everything
        else is tunnelled untouched); None to leave what the operator set."""
        if self.config is None:
            return None
        ours = _DERIVED_ALLOW_HOSTS[0] if _DERIVED_ALLOW_HOSTS else None
        if allow_hosts or ignore_hosts:
            if allow_hosts != ours:
                return None
        derived = self.config.allow_hosts()
        _DERIVED_ALLOW_HOSTS[:] = [derived]
        return derived if allow_hosts != derived else None


def unsafe_options(options: object, config: GatewayConfig | None) -> str | None:
    """Why mitmproxy's options would let a provider request through undecided or a credential
    out, or None. Checked on every configure, as `stream_large_bodies` is."""
    if getattr(options, "ssl_insecure", False):
        return ("aigw: ssl_insecure turns off the check of the provider's certificate while "
                "provider keys are sent to it; unset it")
    if getattr(options, "proxy_debug", False):
        return ("aigw: proxy_debug logs requests' raw bytes, credentials included; unset it")
    if config is None:
        return None
    ours = _DERIVED_ALLOW_HOSTS[0] if _DERIVED_ALLOW_HOSTS else None
    allow = list(getattr(options, "allow_hosts", []) or [])
    for provider in config.providers:
        for host in provider.hosts:
            name = f"{host.replace('*', 'x', 1)}:443"  # mitmproxy matches `host:port`
            for option in ("ignore_hosts", "tcp_hosts"):
                if any(_matches(pattern, name) for pattern in getattr(options, option, []) or []):
                    return (f"aigw: {option} matches provider host {host}: its requests would "
                            f"pass undecided; leave the providers out of {option}")
            if allow and allow != ours and not any(_matches(p, name) for p in allow):
                return (f"aigw: allow_hosts leaves out provider host {host}: its requests "
                        f"would pass undecided; add it, or leave allow_hosts to the gateway")
    return None


def _matches(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name, re.IGNORECASE) is not None
    except re.error:  # mitmproxy refuses a bad pattern itself
        return False


def shape_provider(host: str) -> Provider:
    """A provider to answer in the native shape of when the gateway cannot route: the last good
    configuration's (or the shipped one's) provider of the host, else OpenAI's shape."""
    name = normalize_host(host)
    for config in _LAST_GOOD or _shipped():
        found = config.provider_for(name)
        if found is not None:
            return found
    return _FALLBACK_PROVIDER


@functools.lru_cache(maxsize=1)
def _shipped_config() -> GatewayConfig | None:
    try:
        return load_config(SHIPPED_CONFIG)
    except ConfigError:
        return None


def _shipped() -> list[GatewayConfig]:
    shipped = _shipped_config()
    return [shipped] if shipped is not None else []


_FALLBACK_PROVIDER = Provider("unknown", "openai", OpenAIAdapter(), (), None)


def fault_text(exc: BaseException) -> str:
    """An exception for a log line without its message (a message may quote the string it
    failed on, a credential among them): its type and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


def log_fault(what: str, exc: BaseException) -> None:
    log.error("aigw: %s: %s", what, fault_text(exc))


def _mtime(path: str) -> float:
    try:
        return Path(path).stat().st_mtime
    except OSError:
        return -1.0


def _warn_of_missing_credentials(config: GatewayConfig) -> None:
    """Say at start which providers have no key on the gateway host: their requests get 502
    unless the org has its own (`provider_keys`)."""
    missing = [p for p in config.providers if p.api_key_env and p.default_credential() is None]
    if missing:
        log.warning(
            "aigw: no gateway-host credential for %s; their requests need the org's "
            "provider_keys or get 502 provider_credential_missing",
            ", ".join(f"{p.name} (${p.api_key_env} unset)" for p in missing),
        )


# --- whether another gateway process on the ledger still runs ---------------------------------


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


_PIDNS = _pid_namespace()
_HOSTNAME = socket.gethostname()


def _process_info() -> dict:
    """What another gateway needs to tell whether this process still runs."""
    return {"pid": os.getpid(), "host": _HOSTNAME, "pidns": _PIDNS}


def is_live(gateway: str, entry: dict) -> bool:
    """Whether a registered gateway whose heartbeat is recent still runs. Its pid tells only in
    our own pid namespace on this host; elsewhere (another host, another container) the
    heartbeat alone decides."""
    if entry.get("host") != _HOSTNAME or entry.get("pidns") != _PIDNS:
        return True
    pid = entry.get("pid")
    if pid == os.getpid():  # ours: a gateway of this process, or a reused pid's
        return gateway in _GATEWAYS_HERE
    return _pid_alive(pid)


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
