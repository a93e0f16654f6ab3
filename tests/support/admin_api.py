"""A real `aigw serve` for the admin API tests: started as a subprocess on a free loopback port,
with an admin and a viewer key made by `aigw admin-key create`, driven over HTTP with httpx."""

import json
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.gateway import AIGW


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_aigw(args: Sequence[str], env: dict[str, str] | None = None) -> dict:
    done = subprocess.run([AIGW, *args], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@dataclass
class AdminServer:
    """`aigw serve` with `global_args` (--config/--store/--target); `admin` and `viewer` are
    the raw keys of an admin and a viewer admin key."""

    global_args: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    admin: str = ""
    viewer: str = ""
    admin_id: str = ""
    url: str = ""
    process: subprocess.Popen | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    def aigw(self, *args: str) -> dict:
        return run_aigw([*self.global_args, *args], self.env)

    def start(self) -> "AdminServer":
        made = self.aigw("admin-key", "create", "--name", "tests")
        self.admin, self.admin_id = made["api_key"], made["admin_key_id"]
        self.viewer = self.aigw("admin-key", "create", "--name", "dash", "--role",
                                "viewer")["api_key"]
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [AIGW, *self.global_args, "serve", "--listen", f"127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 20
        while "admin API on" not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"aigw serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        return self

    def client(self, key: str | None = None) -> httpx.Client:
        """An httpx client for the server, with `key` (default: the admin key) as bearer."""
        key = self.admin if key is None else key
        headers = {"authorization": f"Bearer {key}"} if key else {}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=30)
        self.clients.append(client)
        return client

    def log_text(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
