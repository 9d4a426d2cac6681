"""The keys file's schema: what parses, how quotas combine, and every refusal saying why."""

from __future__ import annotations

import hashlib
import json

import pytest

from loraserve.api.auth import Authenticator
from loraserve.api.keys_file import parse_keys
from loraserve.types import TenantQuota

DIGEST = hashlib.sha256(b"hashed-key").hexdigest()
GOOD = {
    "keys": [
        {"key": "plain-key", "tenant": "acme", "scopes": ["generate", "adapters:write"]},
        {"key_sha256": DIGEST, "tenant": "ops", "scopes": ["admin"]},
    ],
    "default_quota": {"max_requests_in_flight": 8, "max_adapters": 5},
    "quotas": {"acme": {"max_adapters": 20, "max_stored_bytes": 1000}},
}


def parsed(data: dict):
    return parse_keys(json.dumps(data).encode(), "keys.json")


def test_keys_scopes_and_quotas_parse_with_defaults_per_field():
    table = parsed(GOOD)
    assert table.tenants == {"acme", "ops"}
    assert table.quota("acme") == TenantQuota(
        max_adapters=20, max_stored_bytes=1000, max_requests_in_flight=8
    )
    assert table.quota("ops") == TenantQuota(max_adapters=5, max_requests_in_flight=8)
    assert table.principals[bytes.fromhex(DIGEST)].scopes == {"admin"}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda d: d["keys"][0].update(tenant="../evil"), "not a valid tenant name"),
        (lambda d: d["keys"][0].update(key_sha256=DIGEST), "exactly one of key or key_sha256"),
        (lambda d: d["keys"][1].update(key_sha256="zz"), "keys.1.key_sha256"),
        (lambda d: d["keys"][0].update(scopes=["root"]), "keys.0.scopes.0"),
        (lambda d: d["keys"][0].update(role="x"), "keys.0.role"),
        (lambda d: d["keys"].append(dict(d["keys"][0])), "the same key as an earlier entry"),
        (lambda d: d["quotas"].update(ghost={}), "quotas.ghost: no key belongs to this tenant"),
        (lambda d: d["quotas"]["acme"].update(max_versions=-1), "quotas.acme.max_versions"),
        (lambda d: d["quotas"]["acme"].update(max_adapters="9"), "quotas.acme.max_adapters"),
        (lambda d: d["default_quota"].update(max_requests_in_flight=0), "max_requests_in_flight"),
        (lambda d: d.update(extra=1), "extra"),
        (lambda d: d.pop("keys"), "keys"),
    ],
)
def test_a_bad_entry_is_refused_naming_it(change, words):
    data = json.loads(json.dumps(GOOD))
    change(data)
    with pytest.raises(ValueError, match=r"API keys file keys\.json") as refused:
        parsed(data)
    assert words in str(refused.value)


def test_not_json_and_nan_are_refused():
    for text in (b"{", b'{"keys": [], "default_quota": {"max_adapters": NaN}}'):
        with pytest.raises(ValueError, match=r"keys\.json"):
            parse_keys(text, "keys.json")


def test_reload_swaps_the_table_or_keeps_the_old_one(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(GOOD))
    auth = Authenticator.from_file(path)
    bearer = (("authorization", "Bearer plain-key"),)
    assert auth.principal(bearer).tenant == "acme"
    path.write_text('{"keys": [{"key": "new-key", "tenant": "acme"}]}')
    auth.reload()
    assert auth.principal(bearer) is None
    assert auth.principal((("authorization", "Bearer new-key"),)).tenant == "acme"
    path.write_text("not json")
    with pytest.raises(ValueError):
        auth.reload()
    assert auth.principal((("authorization", "Bearer new-key"),)).tenant == "acme"
    with pytest.raises(ValueError, match="development mode"):
        Authenticator(None).reload()
