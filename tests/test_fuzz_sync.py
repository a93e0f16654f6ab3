"""Property tests of a sync pass (store/cloudflare/sync.py) against any answer the KV REST API
could give: records of every kind with any value, listings with any names and metadata, list
pages, bulk-get, single-get and bulk-put answers malformed in any way. In-process: the client's
HTTP goes to an httpx.MockTransport that draws each answer (tests/test_sync.py drives the real
client against tests/support/fake_kv.py; this draws what no fake would say).

The properties: a pass either completes or raises SyncError (`aigw sync` then reports it and
retries), never another exception; a pass that fails leaves the replica exactly as it was; a
pass that completes holds only valid records, each either kept from before or the value KV gave,
and names every record it refused with a reason; and a clean pass afterwards brings the replica
to exactly the namespace's valid records, whatever the earlier passes met."""

import json
from collections.abc import Iterator
from urllib.parse import unquote

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from store import Store
from store.cloudflare import (
    STAMP,
    USAGE_PREFIX,
    CloudflareSettings,
    KVClient,
    Replicator,
    RequestBudget,
    SyncError,
    SyncSettings,
    stamp_of,
)
from store.money import month_of, utc_now
from store.records import RecordError, validate_record
from tests.support.fuzz import json_values as json_values_of

MONTH = month_of(utc_now())
BASE = "http://kv.invalid/client/v4"
PATH = "/accounts/acct/storage/kv/namespaces/ns"

# Valid records of every kind a pass applies.
GOOD = {
    "org:o1:config": {"org_id": "o1", "name": "O", "monthly_budget_usd": 10},
    "org:o1:quota": {"month_usage_usd": 1.5, "current_month": MONTH, "request_count": 2},
    "user:u1:config": {"user_id": "u1", "email": "u@example.com", "org_id": "o1",
                       "status": "active", "monthly_limit_usd": 5},
    "user:u1:quota": {"month_usage_usd": 0.5, "current_month": MONTH, "request_count": 1},
    "apikey:" + "a" * 64: {"user_id": "u1", "key_id": "k1", "org_id": "o1", "status": "active"},
    "user:u1:keys:k1": {"name": "laptop", "created_at": "2024-03-01T10:00:00Z"},
    "cache:other-tool": {"anything": [1, 2]},
}
RECORD_NAMES = [*GOOD, "org:o2:config", "user:u2:config", "apikey:" + "b" * 64,
                "vkey:" + "c" * 64 + ":config", "user:u2:quota", "aigw:reset:org:o1", "x" * 600,
                "", "org:o1:config:extra"]
USAGE_NAMES = [f"{USAGE_PREFIX}node-b:{MONTH}:org:o1", f"{USAGE_PREFIX}node-c:{MONTH}:user:u1",
               f"{USAGE_PREFIX}node-b:2026-13:org:o1", f"{USAGE_PREFIX}node-b:{MONTH}:team:x",
               f"{USAGE_PREFIX}node-b:{MONTH}:key:" + "k" * 600, f"{USAGE_PREFIX}x"]

json_values = json_values_of(max_leaves=8)


@st.composite
def record_values(draw, name: str) -> bytes:
    """A value under `name`: its valid record, that record with one field of any value, any
    JSON, any bytes."""
    good = GOOD.get(name, {"org_id": "o2", "user_id": "u2"})
    choice = draw(st.sampled_from(["good", "field", "json", "bytes"]))
    if choice == "good":
        return json.dumps(good).encode()
    if choice == "field":
        field = draw(st.one_of(st.sampled_from(sorted(good)), st.text(max_size=8)))
        return json.dumps({**good, field: draw(json_values)}).encode()
    if choice == "json":
        return json.dumps(draw(json_values)).encode()
    return draw(st.binary(max_size=40))


@st.composite
def namespaces(draw) -> dict[str, tuple[bytes, object]]:
    """{name: (value, metadata)}: records with or without aigw's stamp (or a stamp of any
    type), other nodes' usage keys with figures of any value, reset markers."""
    out: dict[str, tuple[bytes, object]] = {}
    for name in draw(st.lists(st.one_of(st.sampled_from(RECORD_NAMES), st.text(max_size=20)),
                              unique=True, max_size=8)):
        value = draw(record_values(name))
        stamp = draw(st.sampled_from(["good", "none", "other"]))
        metadata = {STAMP: stamp_of(value)} if stamp == "good" else (
            None if stamp == "none" else draw(json_values))
        out[name] = (value, metadata)
    for name in draw(st.lists(st.sampled_from(USAGE_NAMES), unique=True, max_size=3)):
        out[name] = (b"{}", draw(st.one_of(
            st.fixed_dictionaries({"n": json_values, "r": json_values}),
            st.fixed_dictionaries({"n": st.integers(0, 2**63), "r": st.integers(0, 2**63)}),
            json_values)))
    if draw(st.booleans()):
        out["aigw:reset:org:o1"] = (b"{}", draw(st.one_of(
            st.fixed_dictionaries({"m": st.just(MONTH), "t": st.integers(-1, 2**64)}),
            json_values)))
    return out


def valid(name: str, value: bytes) -> bool:
    try:
        validate_record(name, value)
    except RecordError:
        return False
    return 0 < len(name.encode()) <= 511


class Namespace:
    """The KV REST API over a namespace; with `data`, each answer may instead be drawn
    malformed (a wrong status, an envelope or result of any shape)."""

    def __init__(self, items: dict[str, tuple[bytes, object]], data=None) -> None:
        self.items = items
        self.data = data
        self.served: dict[str, list[object]] = {}  # the values given for each name
        self.cut_short = False  # a page said the listing ended before it did

    def serve(self, name: str, value: object) -> object:
        self.served.setdefault(name, []).append(value)
        return value

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.raw_path.decode().split("?")[0].removeprefix("/client/v4" + PATH)
        if self.data is not None and self.data.draw(st.integers(0, 5), label="fault?") == 0:
            answer = self.data.draw(st.one_of(
                st.sampled_from([400, 404, 429, 500, 503]).map(
                    lambda s: httpx.Response(s, content=b'{"success": false}')),
                json_values.map(lambda v: httpx.Response(200, content=orjson.dumps(v))),
                st.builds(lambda errors: httpx.Response(200, content=orjson.dumps(
                    {"success": False, "errors": errors})), json_values),
                st.binary(max_size=20).map(lambda b: httpx.Response(200, content=b)),
            ), label=f"answer to {request.method} {path}")
            if path.startswith("/values/"):  # whatever it is, it is the value given
                self.serve(unquote(path.removeprefix("/values/")), answer.content)
            return answer
        if path == "/keys":
            return self._page(request)
        if path == "/bulk/get":
            names = orjson.loads(request.content)["keys"]
            try:
                texts = {n: self.items[n][0].decode() for n in names if n in self.items}
            except UnicodeDecodeError:  # as Cloudflare does: type text cannot return it
                return httpx.Response(400, content=b'{"success": false, "errors": []}')
            values = {n: ({"value": texts[n],
                           "metadata": self.items[n][1]} if n in self.items else None)
                      for n in names}
            if self.data is not None:
                values = self.data.draw(st.one_of(st.just(values), st.fixed_dictionaries(
                    {}, optional={n: json_values for n in names})), label="bulk values")
            for name, entry in values.items():
                value = entry.get("value") if isinstance(entry, dict) else entry
                self.serve(name, value.encode() if isinstance(value, str) else
                           orjson.dumps(value))
            return ok({"values": values})
        if path.startswith("/values/"):
            name = unquote(path.removeprefix("/values/"))
            if name not in self.items:
                return httpx.Response(404, content=b'{"success": false, "errors": []}')
            return httpx.Response(200, content=self.serve(name, self.items[name][0]))
        if path == "/bulk":
            result = {"successful_key_count": 0, "unsuccessful_keys": []}
            if self.data is not None:
                result = self.data.draw(st.one_of(st.just(result), json_values,
                                                  st.fixed_dictionaries(
                                                      {"unsuccessful_keys": json_values})),
                                        label="bulk put result")
            return ok(result)
        return httpx.Response(404, content=b'{"success": false}')

    def _page(self, request: httpx.Request) -> httpx.Response:
        names = sorted(self.items)
        cursor = request.url.params.get("cursor") or "0"
        if not cursor.isdigit():  # not a cursor this API gave
            return httpx.Response(400, content=b'{"success": false, "errors": []}')
        start = int(cursor)
        page = names[start:start + 3]  # small pages: the cursor is followed
        cursor = str(start + 3) if start + 3 < len(names) else ""
        info: object = {"cursor": cursor, "count": len(page)}
        if self.data is not None:
            info = self.data.draw(st.one_of(
                st.just(info), st.fixed_dictionaries({"cursor": json_values}), json_values),
                label="result_info")
            if cursor and isinstance(info, dict) and info.get("cursor") in (None, ""):
                self.cut_short = True  # KV's word for the end (a missing cursor is one)
        return ok([{"name": n, "metadata": self.items[n][1]} for n in page], result_info=info)


def ok(result: object, **extra: object) -> httpx.Response:
    return httpx.Response(200, content=json.dumps(  # json: integers past 64 bits too
        {"success": True, "errors": [], "messages": [], "result": result, **extra}).encode())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Store]:
    store = Store(tmp_path_factory.mktemp("fuzz_sync") / "store")
    yield store
    store.close()


SYNC = SyncSettings(node_id="node-a", max_attempts=2, max_backoff_s=0.0, timeout_s=1.0)
CLIENT = KVClient(CloudflareSettings("acct", "ns", "token", BASE), SYNC,
                  sleep=lambda seconds: None)  # one: each loads the CA roots, 35 ms


def replicator(store: Store, answer: Namespace) -> Replicator:
    CLIENT._http = httpx.Client(transport=httpx.MockTransport(answer))
    CLIENT.budget = RequestBudget(10**6, 300.0)
    return Replicator(store, CLIENT, SYNC)


def snapshot(store: Store) -> tuple:
    return (store.records.scan(""), store.records.stamps(), store.records.meta("last_sync"))


def clean_pass(store: Store, items: dict[str, tuple[bytes, object]]) -> None:
    """A pass on well-formed answers: the replica then holds exactly the namespace's valid
    records, and of a listed invalid one its previous version, if it had one."""
    previous = dict(store.records.scan(""))
    replicator(store, Namespace(items)).sync_once(full=True)
    expected = {}
    for name, (value, _) in items.items():
        if name.startswith(("aigw:usage:", "aigw:reset:")):
            continue
        if valid(name, value):
            expected[name] = value
        elif name in previous:
            expected[name] = previous[name]
    assert dict(store.records.scan("")) == expected


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data(), before=namespaces(), after=namespaces(), full=st.booleans())
def test_any_kv_answers_apply_a_whole_pass_or_nothing(store, data, before, after, full):
    clean_pass(store, before)  # the replica holds a previous pass
    store.ledger.settle(None, [("org", "o1")], MONTH, 1)  # this node's usage: pushed
    prior = snapshot(store)
    prior_records = dict(prior[0])
    answers = Namespace(after, data)
    try:
        summary = replicator(store, answers).sync_once(full=full)
    except SyncError as exc:
        assert str(exc)
        assert snapshot(store) == prior, "a failed pass changed the replica"
    else:
        for name, value in store.records.scan(""):
            assert valid(name, value), f"an invalid record was applied: {name!r}"
            assert value == prior_records.get(name) or value in answers.served.get(name, [])
        kept = dict(store.records.scan(""))
        for name in prior_records:  # deleted only once a whole listing lacks it
            if name in after and not answers.cut_short:
                assert name in kept, f"{name!r} is still in KV but was deleted"
        for rejected in summary.rejected:
            assert isinstance(rejected["reason"], str) and rejected["reason"]
    clean_pass(store, after)  # nothing the pass met blocks the next


# --- what the property found, kept as plain regression tests ---------------------------------


class Scripted(Namespace):
    """The namespace's answers, with `override(request)` answering first where it returns one."""

    def __init__(self, items, override) -> None:
        super().__init__(items)
        self.override = override

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.override(request) or super().__call__(request)


def stamped(record: dict) -> tuple[bytes, dict]:
    value = json.dumps(record).encode()
    return value, {STAMP: stamp_of(value)}


@pytest.fixture
def fresh_store(tmp_path) -> Iterator[Store]:
    store = Store(tmp_path / "store")
    yield store
    store.close()


def test_an_error_envelope_of_any_shape_fails_the_pass_cleanly(fresh_store):
    """`{"success": false, "errors": 5}` raised TypeError out of the pass (and out of
    `aigw sync`'s loop, which retries only SyncError)."""
    def broken(request):
        return httpx.Response(200, content=b'{"success": false, "errors": 5}')

    with pytest.raises(SyncError, match="unsuccessful response"):
        replicator(fresh_store, Scripted({}, broken)).sync_once()


@pytest.mark.parametrize("cursor", [0, False, [], {}, 7])
def test_a_cursor_that_is_no_string_is_not_taken_for_the_end(fresh_store, cursor):
    """`"cursor": []` (or 0, false) read as the end of the listing: every record listed after
    that page was deleted from the replica while still in KV."""
    items = {f"org:o{i}:config": stamped({"org_id": f"o{i}"}) for i in range(7)}
    clean_pass(fresh_store, items)

    def odd_cursor(request):
        if request.url.path.endswith("/keys"):
            page = [{"name": n, "metadata": items[n][1]} for n in sorted(items)[:3]]
            return ok(page, result_info={"cursor": cursor})
        return None

    with pytest.raises(SyncError, match="a cursor that is no string"):
        replicator(fresh_store, Scripted(items, odd_cursor)).sync_once()
    assert len(fresh_store.records.scan("")) == 7


def test_a_usage_key_longer_than_kv_allows_is_rejected_alone(fresh_store):
    """Another node's usage key of 600 bytes made the LMDB key of its totals too long: the
    store refused every pass (nothing replicated) for as long as it was listed."""
    items = {"org:o1:config": stamped(GOOD["org:o1:config"]),
             f"{USAGE_PREFIX}node-b:{MONTH}:key:" + "k" * 600: (b"{}", {"n": 1, "r": 1})}
    summary = replicator(fresh_store, Namespace(items)).sync_once()
    assert [r["reason"] for r in summary.rejected] == ["a KV key has at most 512 bytes"]
    assert fresh_store.records.get("org:o1:config") == items["org:o1:config"][0]


def test_a_value_read_older_than_its_listing_is_fetched_again(fresh_store):
    """KV listed the new version's stamp but the read returned the old value (its listings
    and reads are eventually consistent apart): the old value was kept with the new stamp, so
    no later pass fetched the new one."""
    old, new = stamped({"org_id": "o1", "name": "Old"}), stamped({"org_id": "o1", "name": "New"})
    clean_pass(fresh_store, {"org:o1:config": old})

    def stale_read(request):
        if request.url.path.endswith("/bulk/get"):
            return ok({"values": {"org:o1:config": {"value": old[0].decode()}}})
        return None

    replicator(fresh_store, Scripted({"org:o1:config": new}, stale_read)).sync_once()
    assert fresh_store.records.get("org:o1:config") == old[0]
    replicator(fresh_store, Namespace({"org:o1:config": new})).sync_once()  # consistent now
    assert fresh_store.records.get("org:o1:config") == new[0]


@pytest.mark.parametrize("result", [True, [], {"unsuccessful_keys": True},
                                    {"unsuccessful_keys": [["a"]]}])
def test_a_malformed_bulk_write_answer_fails_the_push_not_the_pass(fresh_store, result):
    """`"result": true` or `"unsuccessful_keys": [["a"]]` in a bulk put's answer raised
    AttributeError or TypeError out of the pass; the push now fails as a SyncError (pushed
    again next pass) and the records still replicate."""
    fresh_store.ledger.settle(None, [("org", "o1")], MONTH, 1)

    def odd_put(request):
        return ok(result) if request.url.path.endswith("/bulk") else None

    items = {"org:o1:config": stamped(GOOD["org:o1:config"])}
    summary = replicator(fresh_store, Scripted(items, odd_put)).sync_once()
    assert summary.pushed == 0
    assert fresh_store.records.get("org:o1:config") == items["org:o1:config"][0]
