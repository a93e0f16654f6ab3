"""`aigw proxy`'s supervisor without processes: flags, per-worker options, backoff, the port."""

import asyncio
import logging
import socket

import pytest
from mitmproxy import master
from mitmproxy.log import LegacyLogEvents
from mitmproxy.options import Options

from addon.supervisor import (
    BadFlag,
    ProxySpec,
    SupervisorError,
    check,
    reserve,
    restart_backoff,
    worker_sets,
)
from addon.worker import drop_legacy_log_events


def test_modes_are_parsed_and_udp_modes_refused():
    modes = check(ProxySpec(workers=2, modes=["regular", "reverse:https://api.openai.com@9443"]))
    assert [m.type_name for m in modes] == ["regular", "reverse"]
    for udp in ("reverse:quic://api.openai.com", "dns", "wireguard"):
        with pytest.raises(BadFlag, match="TCP modes only"):
            check(ProxySpec(workers=2, modes=[udp]))
    with pytest.raises(BadFlag, match="--mode 'reverse:x@0': give the mode a port"):
        check(ProxySpec(workers=2, modes=["reverse:x@0"]))


@pytest.mark.parametrize("sets, message", [
    (["listen_host=0.0.0.0"], "use --listen-host"),
    (["mode=transparent"], "use --mode"),
    (["server=false"], "aigw proxy runs the proxy server"),
    (["novalue"], "expected OPTION=VALUE"),
])
def test_options_the_supervisor_owns_are_refused(sets, message):
    with pytest.raises(BadFlag, match=message):
        check(ProxySpec(workers=1, sets=sets))


def test_each_worker_gets_its_own_metrics_port_and_request_log_file():
    spec = ProxySpec(workers=3, config="/etc/aigw/mitm.yaml", store="/var/lib/aigw/store",
                     sets=["aigw_metrics=0.0.0.0:9200", "confdir=/etc/aigw/ca",
                           "aigw_request_log_file=/var/log/aigw/requests.jsonl"])
    assert worker_sets(spec, "w3", 2) == [
        "aigw_config=/etc/aigw/mitm.yaml", "aigw_store=/var/lib/aigw/store",
        "confdir=/etc/aigw/ca", "aigw_metrics=0.0.0.0:9202",
        "aigw_request_log_file=/var/log/aigw/requests.jsonl.w3"]
    ephemeral = ProxySpec(workers=2, sets=["aigw_metrics=127.0.0.1:0"])
    assert worker_sets(ephemeral, "w2", 1) == ["aigw_metrics=127.0.0.1:0"]  # each its own


def test_set_aigw_config_wins_over_the_global_config():
    spec = ProxySpec(workers=1, config="a.yaml", store="s", sets=["aigw_config=b.yaml"])
    assert worker_sets(spec, "w1", 0) == ["aigw_store=s", "aigw_config=b.yaml"]


def test_restarts_back_off_only_while_a_worker_keeps_dying_young():
    assert [restart_backoff(n) for n in range(0, 9)] == [0, 0, 1, 2, 4, 8, 16, 30, 30]


def test_the_reserved_port_takes_no_connections_and_is_refused_when_taken():
    placeholder = reserve("127.0.0.1", 0)
    try:
        port = placeholder.getsockname()[1]
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0  # bound, not listening
        with socket.socket() as worker:  # a worker binds it beside the placeholder
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with pytest.raises(SupervisorError, match=f"cannot listen on 127.0.0.1:{port}"):
                reserve("127.0.0.1", port).close()  # an aigw proxy already serves it
    finally:
        placeholder.close()


def test_no_socket_without_so_reuseport_can_take_the_reserved_port():
    """While no worker listens (a restart), the placeholder alone holds the port: a socket of
    any user that only sets SO_REUSEADDR must not bind it (with SO_REUSEADDR on the
    placeholder too, Linux would let it, and it would get the proxy's connections)."""
    placeholder = reserve("127.0.0.1", 0)
    try:
        port = placeholder.getsockname()[1]
        with socket.socket() as thief:
            thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError):
                thief.bind(("127.0.0.1", port))
    finally:
        placeholder.close()


def test_a_mode_names_a_port_only_and_the_address_is_given():
    with pytest.raises(BadFlag, match="the address is --listen-host's"):
        check(ProxySpec(workers=1, modes=["regular@0.0.0.0:9000"]))
    with pytest.raises(BadFlag, match="--listen-host: give an address"):
        check(ProxySpec(workers=1, listen_host=""))
    assert check(ProxySpec(workers=1, modes=["regular@9000"]))[0].custom_listen_port == 9000


def test_a_closed_stderr_never_stops_the_supervisor(monkeypatch):
    import io

    from addon import supervisor

    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(supervisor.sys, "stderr", closed)
    supervisor.say("worker w1 died")  # no exception: restarts and the drain go on


def test_the_ca_bundle_never_reads_its_own_output_as_the_system_roots(tmp_path, monkeypatch):
    from addon import ca

    confdir = tmp_path / "conf"
    first = ca.write_bundle(str(confdir))
    monkeypatch.setenv("SSL_CERT_FILE", first["bundle"])  # as the laptop guide says
    for _ in range(2):
        again = ca.write_bundle(str(confdir))
    text = (confdir / ca.BUNDLE_NAME).read_text()
    assert text.count(ca.BUNDLE_MARK) == 1 and again["system_roots"] != first["bundle"]
    # A rotated CA (the old one deleted) replaces the old one in the bundle: never both.
    old = text.split(ca.BUNDLE_MARK)[1]
    for path in confdir.glob("mitmproxy-ca*"):
        path.unlink()
    ca.write_bundle(str(confdir))
    rotated = (confdir / ca.BUNDLE_NAME).read_text()
    assert rotated.count(ca.BUNDLE_MARK) == 1 and old not in rotated


def test_the_worker_master_hands_no_log_record_to_add_log():
    async def left_installed() -> list:
        proxy = master.Master(Options())
        drop_legacy_log_events(proxy)
        return [h for h in logging.getLogger().handlers
                if isinstance(h, LegacyLogEvents) and h.master is proxy]

    assert asyncio.run(left_installed()) == []


def test_a_workers_log_line_reaches_the_shared_file_in_one_write(monkeypatch):
    """Workers append to one file: a line handed over in two writes (text, then its newline,
    as print does) let another worker's line land in between, two lines mangled into one."""
    from addon import worker

    writes: list[bytes] = []
    monkeypatch.setattr(worker.os, "write", lambda fd, data: writes.append(bytes(data))
                        or len(data))
    out = worker.WholeLines(2)
    print("[w1] client disconnect", file=out)
    out.write("half ")
    assert writes == [b"[w1] client disconnect\n"]
    out.write("and the rest\nnext")
    assert writes[-1] == b"half and the rest\n"
