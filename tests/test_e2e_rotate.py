"""Key rotation through a real mitmdump and the official openai SDK: `aigw key rotate` gives a
new raw key for the same key_id (the same usage); the old one stops at once, keeps working for
its grace period, and is refused once its `expires_at` has passed."""

import json

import openai
import pytest

from store.records import apikey_key
from tests.support.gateway import aigw, chat, settled

pytestmark = pytest.mark.e2e


def refused(client) -> openai.AuthenticationError:
    with pytest.raises(openai.AuthenticationError) as raised:
        chat(client)
    assert raised.value.status_code == 401 and raised.value.body["code"] == "invalid_api_key"
    return raised.value


def test_after_a_rotation_the_old_key_is_401_and_the_new_one_continues_its_usage(
        gateway, fake_provider, account):
    acct = account()
    chat(gateway.openai_client(acct.api_key))
    first = settled(gateway.store, acct.key_id)

    rotated = aigw(gateway, "key", "rotate", acct.key_id)

    assert rotated["key_id"] == acct.key_id and rotated["previous_key_expires_at"] is None
    assert acct.api_key not in json.dumps(rotated)
    refused(gateway.openai_client(acct.api_key))
    chat(gateway.openai_client(rotated["api_key"]))
    both = settled(gateway.store, acct.key_id, requests=2)
    assert both.used_nusd == 2 * first.used_nusd
    usage = aigw(gateway, "usage", "key", acct.key_id)
    assert usage["request_count"] == 2
    assert len(fake_provider.requests) == 2  # the refused request never left the gateway
    assert not fake_provider.saw_secret(rotated["api_key"])


def test_in_its_grace_period_the_old_key_works_and_once_it_expired_it_is_401(
        gateway, fake_provider, account):
    acct = account()
    rotated = aigw(gateway, "key", "rotate", acct.key_id, "--grace-s", "3600")
    assert rotated["previous_key_expires_at"] is not None
    old, new = (gateway.openai_client(raw) for raw in (acct.api_key, rotated["api_key"]))
    chat(old)
    chat(new)
    assert settled(gateway.store, acct.key_id, requests=2).requests == 2

    # The grace period over, as the records say (not by waiting for it).
    name = apikey_key(gateway.store.hash(acct.api_key))
    record = json.loads(gateway.store.records.get(name))
    assert record["expires_at"] == rotated["previous_key_expires_at"]
    record["expires_at"] = "2020-01-01T00:00:00Z"
    gateway.store.records.write({name: json.dumps(record).encode()})

    error = refused(old)
    assert "grace period has ended" in error.body["message"]
    chat(new)
    assert settled(gateway.store, acct.key_id, requests=3).requests == 3
    assert len(fake_provider.requests) == 3
