from __future__ import annotations

import sqlite3
from pathlib import Path

from voltage_ray.limits.keys import KeyStore, hash_key, parse_key


def test_create_stores_only_a_hash(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    record, key = store.create("free", "alice")
    assert parse_key(key) == record.id
    raw = sqlite3.connect(tmp_path / "k.db").execute("SELECT * FROM api_keys").fetchall()
    flat = " ".join(str(v) for row in raw for v in row)
    secret = key.split("_", 2)[2]
    assert secret not in flat and key not in flat
    assert hash_key(key) in flat


def test_verify_resolve_and_revoke(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    record, key = store.create("pro")
    assert store.verify(record.id, hash_key(key)) is not None
    assert store.verify(record.id, hash_key(key + "x")) is None
    assert store.resolve(key) == store.get(record.id)
    assert store.resolve(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    revoked = store.revoke(record.id)
    assert revoked is not None and revoked.revoked
    assert store.verify(record.id, hash_key(key)) is None
    assert [r.id for r in store.list()] == [record.id]
    assert "key_hash" not in store.list()[0].public()


def test_malformed_keys_do_not_parse() -> None:
    for bad in ["", "vr_", "vr_short_x", "xx_0123456789ab_secret", "vr_0123456789ab_"]:
        assert parse_key(bad) is None
