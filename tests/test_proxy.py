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


def test_the_worker_master_hands_no_log_record_to_add_log():
    async def left_installed() -> list:
        proxy = master.Master(Options())
        drop_legacy_log_events(proxy)
        return [h for h in logging.getLogger().handlers
                if isinstance(h, LegacyLogEvents) and h.master is proxy]

    assert asyncio.run(left_installed()) == []
