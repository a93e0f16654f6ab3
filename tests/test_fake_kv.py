"""The fake Cloudflare Workers KV REST API (tests/support/fake_kv.py), driven over real HTTP."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.fake_kv import FakeKV

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def server() -> Iterator[FakeKV]:
    with FakeKV(read_only_tokens=["read-only-token"]) as fake:
        yield fake


@pytest.fixture
def kv(server: FakeKV) -> Iterator[FakeKV]:
    server.reset()
    yield server
    server.reset()


@pytest.fixture
def client(kv: FakeKV) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=kv.namespace_url, headers=kv.auth_headers, timeout=5.0) as c:
        yield c


class Clock:
    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def clock(kv: FakeKV) -> Clock:
    c = Clock()
    kv.clock = c
    return c


def q(key: str) -> str:
    return urllib.parse.quote(key, safe="")


def list_all(client: httpx.Client, **params: Any) -> tuple[list[str], list[dict[str, Any]]]:
    """Follow cursors to the end; returns (names, raw pages)."""
    names: list[str] = []
    pages: list[dict[str, Any]] = []
    cursor = ""
    while True:
        p = dict(params)
        if cursor:
            p["cursor"] = cursor
        r = client.get("/keys", params=p)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["success"] is True and body["errors"] == [] and body["messages"] == []
        assert body["result_info"]["count"] == len(body["result"])
        pages.append(body)
        names += [item["name"] for item in body["result"]]
        cursor = body["result_info"].get("cursor") or ""
        if not cursor:
            return names, pages


def assert_error(r: httpx.Response, status: int, code: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False
    assert body["result"] is None and body["messages"] == []
    assert [e["code"] for e in body["errors"]] == [code], body
    return body


# --------------------------------------------------------------------------- listing


def test_list_pages_sorted_by_utf8_bytes_and_cursor_ends(kv: FakeKV, client: httpx.Client) -> None:
    keys = [f"k{i:02d}" for i in range(25)] + ["z", "é", "中", "😀", "Z", "a:b/c"]
    for k in keys:
        kv.put(k, "v")
    names, pages = list_all(client, limit=10)
    assert names == sorted(keys, key=lambda s: s.encode())
    assert [len(p["result"]) for p in pages] == [10, 10, 10, 1]
    assert pages[-1]["result_info"]["cursor"] == ""
    assert all(p["result_info"]["cursor"] for p in pages[:-1])
    # default limit 1000: one page
    names, pages = list_all(client)
    assert len(pages) == 1 and len(names) == len(keys)


def test_list_prefix_metadata_and_expiration(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("user:1", "a", {"v": 1})
    kv.put("user:2", "b", expiration=int(time.time()) + 3600)
    kv.put("other", "c")
    body = client.get("/keys", params={"prefix": "user:"}).json()
    assert body["result"] == [
        {"name": "user:1", "metadata": {"v": 1}},
        {"name": "user:2", "expiration": kv.entry("user:2").expiration},
    ]
    assert body["result_info"] == {"count": 2, "cursor": ""}


def test_list_empty_pages_inside_at_start_and_at_end(kv: FakeKV, client: httpx.Client) -> None:
    keys = [f"k{i:03d}" for i in range(30)]
    kv.load_bulk([{"key": k, "value": "x"} for k in keys])
    kv.empty_pages = 2  # after the first page
    names, pages = list_all(client, limit=10)
    assert names == keys
    assert [len(p["result"]) for p in pages] == [10, 0, 0, 10, 10]
    kv.empty_pages = {0: 1, 3: 2}  # before the first data page and after the last one
    names, pages = list_all(client, limit=10)
    assert names == keys
    assert [len(p["result"]) for p in pages] == [0, 10, 10, 10, 0, 0]
    assert all(p["result_info"]["cursor"] for p in pages[:-1])
    # an empty namespace can still answer an empty page with a cursor first
    kv.clear()
    kv.empty_pages = {0: 2}
    names, pages = list_all(client)
    assert names == [] and [len(p["result"]) for p in pages] == [0, 0]
    assert pages[0]["result_info"]["cursor"] and pages[1]["result_info"]["cursor"] == ""


def test_list_limit_and_cursor_validation(client: httpx.Client) -> None:
    assert_error(client.get("/keys", params={"limit": 5}), 400, 10026)
    assert_error(client.get("/keys", params={"limit": 1001}), 400, 10026)
    assert_error(client.get("/keys", params={"cursor": "not-a-cursor"}), 400, 10026)
    assert client.get("/keys", params={"limit": 10}).status_code == 200


def test_list_100k_namespace_in_pages_of_1000(kv: FakeKV, client: httpx.Client) -> None:
    kv.load_bulk({"key": f"key:{i:06d}", "value": str(i)} for i in range(100_000))
    names, pages = list_all(client)
    assert len(names) == 100_000 and len(pages) == 100
    assert names == sorted(names)
    assert kv.op_counts["list"] == 100


# --------------------------------------------------------------------------- reads


def test_get_value_raw_bytes_404_and_metadata(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("bin", b"\x00\xff\x10", {"stamp": 7})
    r = client.get("/values/bin")
    assert r.status_code == 200 and r.content == b"\x00\xff\x10"
    assert r.headers["content-type"] == "application/octet-stream"
    body = assert_error(client.get("/values/missing"), 404, 10009)
    assert body["errors"][0]["message"] == "get: 'key not found'"
    assert client.get("/metadata/bin").json() == {
        "success": True, "errors": [], "messages": [], "result": {"stamp": 7}}
    kv.put("plain", "p")
    assert client.get("/metadata/plain").json()["result"] is None
    assert_error(client.get("/metadata/missing"), 404, 10009)
    # expiration header on a read of an expiring key
    kv.put("exp", "e", expiration_ttl=3600)
    assert client.get("/values/exp").headers["expiration"] == str(kv.entry("exp").expiration)


@pytest.mark.parametrize("key", ["a:b/c", "ü/ñ 漢字", "sp ace", "100%", "+plus", "q?x=1&y#z",
                                 "😀", "dot.in.name"])
def test_percent_encoded_keys_round_trip(kv: FakeKV, client: httpx.Client, key: str) -> None:
    r = client.put(f"/values/{q(key)}", content=b"value-" + key.encode())
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert kv.get(key) == b"value-" + key.encode()
    assert kv.last.key == key
    assert client.get(f"/values/{q(key)}").content == b"value-" + key.encode()
    names, _ = list_all(client)
    assert names == [key]
    assert client.delete(f"/values/{q(key)}").json()["success"] is True
    assert kv.get(key) is None


def test_unencoded_slash_in_key_is_a_routing_error(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("a/b", "x")
    assert_error(client.get("/values/a/b"), 404, 7003)
    assert client.get("/values/a%2Fb").content == b"x"


def test_bulk_get_text_json_metadata_and_missing(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("t", "hello", {"m": 1})
    kv.put("j", json.dumps({"n": 2}))
    kv.put("e", "x", expiration=int(time.time()) + 3600)
    r = client.post("/bulk/get", json={"keys": ["t", "j", "nope"]})
    assert r.json() == {"success": True, "errors": [], "messages": [],
                        "result": {"values": {"t": "hello", "j": '{"n": 2}', "nope": None}}}
    r = client.post("/bulk/get", json={"keys": ["j"], "type": "json"})
    assert r.json()["result"]["values"] == {"j": {"n": 2}}
    r = client.post("/bulk/get", json={"keys": ["t", "j", "e", "nope"], "withMetadata": True})
    assert r.json()["result"]["values"] == {
        "t": {"value": "hello", "metadata": {"m": 1}},
        "j": {"value": '{"n": 2}', "metadata": None},
        "e": {"value": "x", "metadata": None, "expiration": kv.entry("e").expiration},
        "nope": None,
    }
    assert_error(client.post("/bulk/get", json={"keys": ["t"], "type": "json"}), 400, 10026)
    kv.put("bin", b"\xff\xfe")
    assert_error(client.post("/bulk/get", json={"keys": ["bin"]}), 400, 10026)


def test_bulk_get_at_most_100_keys(kv: FakeKV, client: httpx.Client) -> None:
    keys = [f"k{i}" for i in range(101)]
    assert_error(client.post("/bulk/get", json={"keys": keys}), 400, 10026)
    r = client.post("/bulk/get", json={"keys": keys[:100]})
    assert r.status_code == 200 and len(r.json()["result"]["values"]) == 100


# --------------------------------------------------------------------------- writes


def test_bulk_put_metadata_base64_round_trip(kv: FakeKV, client: httpx.Client) -> None:
    pairs = [
        {"key": "a", "value": "1", "metadata": {"v": "s1", "n": [1, 2]}},
        {"key": "b", "value": base64.b64encode(b"\x00\x01").decode(), "base64": True},
        {"key": "c", "value": "3", "expiration_ttl": 120},
    ]
    r = client.put("/bulk", json=pairs)
    assert r.json() == {"success": True, "errors": [], "messages": [],
                        "result": {"successful_key_count": 3, "unsuccessful_keys": []}}
    assert kv.get("a") == b"1" and kv.metadata("a") == {"v": "s1", "n": [1, 2]}
    assert kv.get("b") == b"\x00\x01"
    assert kv.entry("c").expiration is not None
    body = client.get("/keys").json()
    assert body["result"][0] == {"name": "a", "metadata": {"v": "s1", "n": [1, 2]}}
    assert kv.dump()[0] == {"key": "a", "value": "1", "metadata": {"v": "s1", "n": [1, 2]}}
    assert [k for k, _ in kv.writes] == ["a", "b", "c"]


def test_bulk_put_limits(kv: FakeKV, client: httpx.Client) -> None:
    too_many = [{"key": f"k{i}", "value": "v"} for i in range(10_001)]
    assert_error(client.put("/bulk", json=too_many), 400, 10026)
    big_md = {"x": "y" * 1100}
    assert_error(client.put("/bulk", json=[{"key": "k", "value": "v", "metadata": big_md}]),
                 400, 10034)
    assert_error(client.put("/bulk", json=[{"key": "k", "value": 5}]), 400, 10026)
    assert_error(client.put("/bulk", json=[{"key": "k", "value": "v", "expiration_ttl": 10}]),
                 400, 10026)
    assert kv.keys() == []
    r = client.put("/bulk", json=too_many[:10_000])
    assert r.json()["result"]["successful_key_count"] == 10_000


def test_key_512_byte_limit(kv: FakeKV, client: httpx.Client) -> None:
    ok, too_long = "é" * 256, "k" * 513  # 512 and 513 bytes
    assert client.put(f"/values/{q(ok)}", content=b"v").status_code == 200
    assert kv.get(ok) == b"v"
    body = assert_error(client.put(f"/values/{q(too_long)}", content=b"v"), 400, 10033)
    assert "512" in body["errors"][0]["message"]
    assert_error(client.put("/bulk", json=[{"key": too_long, "value": "v"}]), 400, 10033)
    assert_error(client.post("/bulk/get", json={"keys": [too_long]}), 400, 10033)
    with pytest.raises(Exception, match="too long"):
        kv.put(too_long, "v")


def test_put_multipart_with_metadata_and_ttl(kv: FakeKV, client: httpx.Client) -> None:
    md = {"writer": "gw1", "version": 3}
    before = int(time.time())
    r = client.put("/values/mp", params={"expiration_ttl": 300},
                   files={"value": (None, b"\x00bin\r\nary--"), "metadata": (None, json.dumps(md))})
    after = int(time.time())
    assert r.status_code == 200 and r.json()["success"] is True, r.text
    assert kv.get("mp") == b"\x00bin\r\nary--"
    assert kv.metadata("mp") == md
    assert before + 300 <= kv.entry("mp").expiration <= after + 300  # the put's own second
    assert client.get("/metadata/mp").json()["result"] == md
    # metadata over 1024 bytes serialized
    r = client.put("/values/mp2", files={"value": (None, b"v"),
                                         "metadata": (None, json.dumps({"x": "y" * 1020}))})
    assert_error(r, 400, 10034)
    assert_error(client.put("/values/mp3", params={"expiration_ttl": 30}, content=b"v"), 400, 10026)


def test_delete_and_bulk_delete(kv: FakeKV, client: httpx.Client) -> None:
    for k in "abcde":
        kv.put(k, k)
    assert client.delete("/values/a").json()["success"] is True
    assert client.delete("/values/never-existed").json()["success"] is True
    r = client.post("/bulk/delete", json=["b", "c", "zzz"])
    assert r.json()["result"] == {"successful_key_count": 3, "unsuccessful_keys": []}
    assert kv.keys() == ["d", "e"]
    # the older DELETE /bulk form
    r = client.request("DELETE", "/bulk", json=["d"])
    assert r.json()["result"]["successful_key_count"] == 1
    assert list_all(client)[0] == ["e"]


def test_fail_keys_reports_unsuccessful_then_retry_succeeds(kv: FakeKV, client: httpx.Client
                                                           ) -> None:
    kv.fail_keys("b", times=1)
    r = client.put("/bulk", json=[{"key": k, "value": k} for k in "abc"])
    assert r.json()["result"] == {"successful_key_count": 2, "unsuccessful_keys": ["b"]}
    assert kv.keys() == ["a", "c"]
    r = client.put("/bulk", json=[{"key": "b", "value": "b"}])
    assert r.json()["result"] == {"successful_key_count": 1, "unsuccessful_keys": []}
    kv.fail_keys("a", times=None)
    for _ in range(2):
        r = client.post("/bulk/delete", json=["a", "c"])
        assert r.json()["result"]["unsuccessful_keys"] == ["a"]
    assert kv.keys() == ["a", "b"]


def test_write_log_and_enforced_write_rate(kv: FakeKV, client: httpx.Client, clock: Clock) -> None:
    client.put("/values/k", content=b"1")
    clock.advance(0.5)
    client.put("/values/k", content=b"2")
    clock.advance(1.0)
    client.put("/values/k", content=b"3")
    assert kv.writes == [("k", T0), ("k", T0 + 0.5), ("k", T0 + 1.5)]
    assert kv.write_violations() == [("k", 0.5)]
    kv.enforce_write_rate = True
    clock.advance(0.2)
    body = assert_error(client.put("/values/k", content=b"4"), 429, 10100)
    assert "429 Too Many Requests" in body["errors"][0]["message"]
    assert kv.get("k") == b"3"
    r = client.put("/bulk", json=[{"key": "k", "value": "5"}, {"key": "other", "value": "o"}])
    assert r.json()["result"] == {"successful_key_count": 1, "unsuccessful_keys": ["k"]}
    clock.advance(1.0)
    assert client.put("/values/k", content=b"6").status_code == 200


# --------------------------------------------------------------------------- auth, routing


def test_auth_failures_and_token_never_recorded(kv: FakeKV) -> None:
    url = kv.namespace_url + "/keys"
    assert_error(httpx.get(url), 401, 10000)
    body = assert_error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401, 10000)
    assert body["errors"][0]["message"] == "Authentication error"
    assert_error(httpx.get(url, headers={"Authorization": kv.token}), 401, 10000)
    ok = httpx.get(url, headers=kv.auth_headers)
    assert ok.status_code == 200
    recs = kv.requests
    assert [r.authorized for r in recs] == [False, False, False, True]
    assert all(kv.token not in str(v) for r in recs for v in r.headers.values())
    assert recs[-1].headers["Authorization"] == "Bearer <redacted>"
    assert kv.token not in repr(kv) and kv.token not in repr(recs[-1])
    assert not kv.saw_secret(kv.token)


def test_read_only_token_cannot_write(kv: FakeKV) -> None:
    h = {"Authorization": "Bearer read-only-token"}
    kv.put("a", "1")
    assert httpx.get(kv.namespace_url + "/values/a", headers=h).content == b"1"
    assert_error(httpx.put(kv.namespace_url + "/values/a", headers=h, content=b"2"), 403, 10000)
    assert_error(httpx.post(kv.namespace_url + "/bulk/delete", headers=h, json=["a"]), 403, 10000)
    assert kv.get("a") == b"1"


def test_unknown_namespace_account_and_route(kv: FakeKV) -> None:
    h = kv.auth_headers
    base = kv.api_base + "/accounts"
    r = httpx.get(f"{base}/{kv.account_id}/storage/kv/namespaces/{'0' * 32}/keys", headers=h)
    body = assert_error(r, 404, 10013)
    assert body["errors"][0]["message"] == "namespace not found"
    assert_error(httpx.get(f"{base}/{'1' * 32}/storage/kv/namespaces/{kv.namespace_id}/keys",
                           headers=h), 404, 10013)
    assert_error(httpx.get(kv.namespace_url + "/nothing", headers=h), 404, 7003)
    assert_error(httpx.post(kv.namespace_url + "/keys", headers=h), 405, 10405)
    r = httpx.get(kv.namespace_url, headers=h)
    assert r.json()["result"]["id"] == kv.namespace_id


# --------------------------------------------------------------------------- rate limit


def test_rate_limit_429_with_retry_after(kv: FakeKV, client: httpx.Client, clock: Clock) -> None:
    kv.rate_limit = (3, 60.0)  # one token per 20 s
    for _ in range(3):
        assert client.get("/keys").status_code == 200
    r = client.get("/keys")
    body = assert_error(r, 429, 971)
    assert body["errors"][0]["message"] == "Please wait and consider throttling your request speed"
    assert r.headers["retry-after"] == "20"
    clock.advance(20)
    assert client.get("/keys").status_code == 200
    assert_error(client.get("/keys"), 429, 971)
    assert kv.request_count == 6 and kv.op_counts["list"] == 6
    assert kv.path_counts[f"GET {kv.namespace_path}/keys"] == 6
    # the real API's lockout: everything is refused for a while once the limit is passed
    kv.rate_limit = (2, 300.0)
    kv.rate_limit_block_s = 300
    client.get("/keys"), client.get("/keys")
    assert client.get("/keys").headers["retry-after"] == "300"
    clock.advance(299)
    assert client.get("/keys").status_code == 429
    clock.advance(1)
    assert client.get("/keys").status_code == 200


# --------------------------------------------------------------------------- faults


def test_fault_5xx_after_n_calls_one_shot(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("a", "1")
    kv.fail("list", status=503, times=1, after=2)
    assert [client.get("/keys").status_code for _ in range(4)] == [200, 200, 503, 200]
    kv.fail("get", status=502)
    r = client.get("/values/a")
    assert_error(r, 502, 10001)
    assert client.get("/values/a").content == b"1"


def test_fault_429_persistent_and_clear(kv: FakeKV, client: httpx.Client) -> None:
    f = kv.fail("bulk_get", status=429, retry_after=7, times=None)
    for _ in range(3):
        r = client.post("/bulk/get", json={"keys": ["a"]})
        assert_error(r, 429, 971)
        assert r.headers["retry-after"] == "7"
    assert f.fired == 3
    kv.clear_faults()
    assert client.post("/bulk/get", json={"keys": ["a"]}).status_code == 200


def test_fault_status_does_not_apply_the_write(kv: FakeKV, client: httpx.Client) -> None:
    kv.fail("bulk_put", status=500)
    assert_error(client.put("/bulk", json=[{"key": "a", "value": "1"}]), 500, 10001)
    assert kv.keys() == [] and kv.writes == []


def test_fault_timeout_write_lands_but_answer_is_late(kv: FakeKV) -> None:
    kv.fail("put", "timeout", delay=1.0)
    with httpx.Client(base_url=kv.namespace_url, headers=kv.auth_headers, timeout=0.2) as c:
        with pytest.raises(httpx.TimeoutException):  # no answer within 0.2 s of the 1.0
            c.put("/values/a", content=b"1")
    assert kv.get("a") == b"1"


def test_fault_truncated_body(kv: FakeKV, client: httpx.Client) -> None:
    kv.put("a", "1")
    kv.fail("list", "truncate")
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/keys")
    assert client.get("/keys").json()["result"] == [{"name": "a"}]


def test_fault_malformed_json(kv: FakeKV, client: httpx.Client) -> None:
    kv.fail("metadata", "malformed")
    kv.put("a", "1")
    r = client.get("/metadata/a")
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()


def test_fault_success_false_with_200(kv: FakeKV, client: httpx.Client) -> None:
    kv.fail("bulk_delete", "unsuccessful", code=10001, message="boom")
    kv.put("a", "1")
    r = client.post("/bulk/delete", json=["a"])
    assert r.status_code == 200
    assert r.json() == {"success": False, "errors": [{"code": 10001, "message": "boom"}],
                        "messages": [], "result": None}
    assert kv.get("a") == b"1"


def test_fault_any_operation(kv: FakeKV, client: httpx.Client) -> None:
    kv.fail("*", status=500, times=2)
    assert client.get("/keys").status_code == 500
    assert client.get("/values/x").status_code == 500
    assert client.get("/values/x").status_code == 404
    with pytest.raises(ValueError):
        kv.fail("lsit")


# --------------------------------------------------------------------------- consistency, expiry


def test_lag_hides_writes_from_reads_and_listings(kv: FakeKV, client: httpx.Client,
                                                  clock: Clock) -> None:
    kv.put("a", "old")
    kv.lag_s = 60
    client.put("/values/a", content=b"new")
    client.put("/values/b", content=b"fresh")
    client.delete("/values/c")
    assert client.get("/values/a").content == b"old"
    assert_error(client.get("/values/b"), 404, 10009)
    assert list_all(client)[0] == ["a"]
    assert client.post("/bulk/get", json={"keys": ["a", "b"]}).json()["result"]["values"] == {
        "a": "old", "b": None}
    assert kv.get("a", latest=True) == b"new"
    clock.advance(30)
    client.delete("/values/a")  # visible at +90
    clock.advance(30)
    assert client.get("/values/a").content == b"new"
    assert list_all(client)[0] == ["a", "b"]
    clock.advance(30)
    assert_error(client.get("/values/a"), 404, 10009)
    assert list_all(client)[0] == ["b"]


def test_expiration_ttl_and_min_ttl(kv: FakeKV, client: httpx.Client, clock: Clock) -> None:
    assert client.put("/values/a", params={"expiration_ttl": 60}, content=b"1").status_code == 200
    assert client.put("/bulk", json=[{"key": "b", "value": "2", "expiration": int(T0) + 100}]
                      ).status_code == 200
    assert kv.entry("a").expiration == int(T0) + 60
    clock.advance(60)
    assert_error(client.get("/values/a"), 404, 10009)
    assert list_all(client)[0] == ["b"]
    clock.advance(40)
    assert list_all(client)[0] == []
    kv.min_ttl = 1
    assert client.put("/values/c", params={"expiration_ttl": 1}, content=b"3").status_code == 200
    clock.advance(1)
    assert kv.get("c") is None


# --------------------------------------------------------------------------- direct helpers


def test_direct_state_helpers(kv: FakeKV) -> None:
    n = kv.load_bulk([{"key": "b", "value": "2", "metadata": {"v": 1}},
                      {"key": "a", "value": base64.b64encode(b"\x01").decode(), "base64": True}])
    assert n == 2 and kv.keys() == ["a", "b"]
    assert kv.get("a") == b"\x01" and kv.metadata("b") == {"v": 1}
    assert kv.entry("b").text == "2"
    kv.put("c", "3")
    kv.delete("a")
    assert kv.keys() == ["b", "c"] and kv.get("a") is None
    assert kv.dump() == [{"key": "b", "value": "2", "metadata": {"v": 1}},
                         {"key": "c", "value": "3"}]
    assert kv.request_count == 0 and kv.writes == []
    with pytest.raises(Exception, match="Metadata is too large"):
        kv.put("d", "4", {"x": "y" * 2000})
