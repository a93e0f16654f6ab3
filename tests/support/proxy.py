"""Start mitmdump for end-to-end tests, and build SDK clients that go through it.

    proxy = start_mitmdump(tmp_path, scripts=[REDIRECT_SCRIPT], upstream=fake.address)
    try:
        client = proxy.openai_client("sk-test")       # real base URL, through the proxy
        ...
    finally:
        proxy.stop()

mitmdump listens on 127.0.0.1 with port 0 (the port it really got is read from its log, so
parallel test runs cannot race for a port), with its own confdir (a fresh CA in
`<tmp>/confdir/mitmproxy-ca-cert.pem`) and `connection_strategy=lazy`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORT_DIR = Path(__file__).resolve().parent
REPO_ROOT = SUPPORT_DIR.parent.parent
REDIRECT_SCRIPT = SUPPORT_DIR / "redirect.py"
MITMDUMP = Path(sys.executable).parent / "mitmdump"

_LISTENING = re.compile(r"proxy listening at (?:\[[^\]]*\]|[^\s:]+):(\d+)")

DEFAULT_AZURE_ENDPOINT = "https://myres.openai.azure.com"
DEFAULT_AZURE_API_VERSION = "2024-10-21"


class ProxyStartError(RuntimeError):
    """mitmdump exited (`returncode`) or did not come up (`returncode` None); `log` holds its
    output."""

    def __init__(self, message: str, returncode: int | None = None, log: str = "") -> None:
        super().__init__(message)
        self.returncode = returncode
        self.log = log


@dataclass
class Proxy:
    process: subprocess.Popen[bytes]
    port: int
    confdir: Path
    log_path: Path
    sdk_timeout: float = 30.0
    _clients: list[Any] = field(default_factory=list, repr=False)

    # ------------------------------------------------------------------ basics

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_path(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def pid(self) -> int:
        return self.process.pid

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts (only) this proxy's CA."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Wait until the log matches the regex `pattern` (mitmdump logs asynchronously)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log_text())
            if m:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not in mitmdump log:\n{self.log_text()}")
            time.sleep(0.05)

    def is_running(self) -> bool:
        return self.process.poll() is None

    def client_env(self) -> dict[str, str]:
        """Environment for a subprocess client: proxy variables and this CA."""
        return {
            "HTTPS_PROXY": self.url,
            "HTTP_PROXY": self.url,
            "https_proxy": self.url,
            "http_proxy": self.url,
            "SSL_CERT_FILE": str(self.ca_path),
            "REQUESTS_CA_BUNDLE": str(self.ca_path),
        }

    # ------------------------------------------------------------------ stopping

    def _close_clients(self) -> None:
        for c in self._clients:
            try:
                c.close()
            except Exception:
                pass
        self._clients.clear()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        self._close_clients()
        p = self.process
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        return p.returncode

    def kill9(self) -> int | None:
        """SIGKILL right away (a crash); returns the exit code."""
        p = self.process
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        self._close_clients()
        return p.returncode

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ HTTP clients

    def httpx_client(self, **kwargs: Any):
        """A plain httpx.Client through the proxy, trusting its CA."""
        import httpx

        kwargs.setdefault("timeout", self.sdk_timeout)
        c = httpx.Client(proxy=self.url, verify=self.ssl_context(), **kwargs)
        self._clients.append(c)
        return c

    def openai_client(self, api_key: str, base_url: str | None = None, **kwargs: Any):
        import openai

        http_client = openai.DefaultHttpxClient(proxy=self.url, verify=self.ssl_context())
        self._clients.append(http_client)
        kwargs.setdefault("timeout", self.sdk_timeout)
        return openai.OpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client, **kwargs
        )

    def async_openai_client(self, api_key: str, base_url: str | None = None, **kwargs: Any):
        import openai

        http_client = openai.DefaultAsyncHttpxClient(proxy=self.url, verify=self.ssl_context())
        kwargs.setdefault("timeout", self.sdk_timeout)
        return openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client, **kwargs
        )

    def azure_client(
        self,
        api_key: str,
        azure_endpoint: str = DEFAULT_AZURE_ENDPOINT,
        api_version: str = DEFAULT_AZURE_API_VERSION,
        **kwargs: Any,
    ):
        import openai

        http_client = openai.DefaultHttpxClient(proxy=self.url, verify=self.ssl_context())
        self._clients.append(http_client)
        kwargs.setdefault("timeout", self.sdk_timeout)
        return openai.AzureOpenAI(
            api_key=api_key,
            azure_endpoint=azure_endpoint,
            api_version=api_version,
            max_retries=0,
            http_client=http_client,
            **kwargs,
        )

    def anthropic_client(self, api_key: str, base_url: str | None = None, **kwargs: Any):
        import anthropic

        http_client = anthropic.DefaultHttpxClient(proxy=self.url, verify=self.ssl_context())
        self._clients.append(http_client)
        kwargs.setdefault("timeout", self.sdk_timeout)
        return anthropic.Anthropic(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client, **kwargs
        )

    def async_anthropic_client(self, api_key: str, base_url: str | None = None, **kwargs: Any):
        import anthropic

        http_client = anthropic.DefaultAsyncHttpxClient(
            proxy=self.url, verify=self.ssl_context()
        )
        kwargs.setdefault("timeout", self.sdk_timeout)
        return anthropic.AsyncAnthropic(
            api_key=api_key, base_url=base_url, max_retries=0, http_client=http_client, **kwargs
        )

    def genai_client(
        self,
        api_key: str,
        *,
        base_url: str | None = None,
        api_version: str | None = None,
        headers: Mapping[str, str] | None = None,
    ):
        """google-genai Client through the proxy (sync: httpx2, `client.aio`: aiohttp).

        google-genai takes the proxy and CA through `client_args` (httpx2.Client kwargs) and
        `async_client_args` (filtered to httpx2.AsyncClient kwargs, and to aiohttp
        `ClientSession._request` kwargs for its aiohttp path, which wants `ssl` not `verify`).
        It does not retry unless `retry_options` is given.
        """
        from google import genai
        from google.genai import types

        ctx = self.ssl_context()
        opts = types.HttpOptions(
            base_url=base_url,
            api_version=api_version,
            headers=dict(headers) if headers else None,
            timeout=int(self.sdk_timeout * 1000),  # milliseconds
            client_args={"proxy": self.url, "verify": ctx},
            async_client_args={"proxy": self.url, "verify": ctx, "ssl": ctx},
        )
        client = genai.Client(api_key=api_key, http_options=opts)
        self._clients.append(client)
        return client


def _read_port(log_path: Path) -> int | None:
    try:
        m = _LISTENING.search(log_path.read_text(errors="replace"))
    except FileNotFoundError:
        return None
    return int(m.group(1)) if m else None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_mitmdump(
    tmp_path: Path,
    *,
    scripts: Sequence[str | os.PathLike[str]] = (),
    sets: Mapping[str, str | int | bool] | None = None,
    env: Mapping[str, str] | None = None,
    upstream: str | None = None,
    args: Sequence[str] = (),
    timeout: float = 20.0,
    name: str = "mitmdump",
) -> Proxy:
    """Start mitmdump and wait (bounded by `timeout`) until it accepts connections and its CA
    file exists. `upstream` ("127.0.0.1:PORT") is passed as AIGW_TEST_UPSTREAM for the redirect
    addon. `sets` become `--set k=v` (bools as true/false); `env` is added to os.environ.
    The log (stdout and stderr) is `<tmp_path>/<name>.log`. Raises ProxyStartError (with the
    log) if it exits or does not come up in time."""
    tmp_path = Path(tmp_path)
    confdir = tmp_path / "confdir"
    confdir.mkdir(parents=True, exist_ok=True)
    log_path = tmp_path / f"{name}.log"

    cmd: list[str] = [
        str(MITMDUMP),
        "--listen-host", "127.0.0.1",
        "-p", "0",
        "--set", f"confdir={confdir}",
        "--set", "connection_strategy=lazy",
    ]
    for script in scripts:
        cmd += ["-s", str(script)]
    for key, value in (sets or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        cmd += ["--set", f"{key}={value}"]
    cmd += list(args)

    child_env = dict(os.environ)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                "all_proxy"):
        child_env.pop(var, None)
    child_env["PYTHONUNBUFFERED"] = "1"
    if upstream is not None:
        child_env["AIGW_TEST_UPSTREAM"] = upstream
    child_env.update(env or {})

    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=str(REPO_ROOT),
            env=child_env,
        )

    proxy: Proxy | None = None
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                output = log_path.read_text(errors="replace")
                raise ProxyStartError(
                    f"mitmdump exited with {process.returncode}:\n{' '.join(cmd)}\n{output}",
                    process.returncode, output,
                )
            port = _read_port(log_path)
            if port and proxy is None:
                proxy = Proxy(process=process, port=port, confdir=confdir, log_path=log_path)
            if proxy is not None and proxy.ca_path.exists() and _port_open(port):
                return proxy
            if time.monotonic() > deadline:
                raise ProxyStartError(
                    f"mitmdump did not come up within {timeout}s:\n"
                    f"{' '.join(cmd)}\n{log_path.read_text(errors='replace')}"
                )
            time.sleep(0.05)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        raise
