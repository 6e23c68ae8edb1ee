from __future__ import annotations

from voltage_ray.limits.db import Database
from voltage_ray.limits.keys import KeyStore, hash_key, parse_key


def test_create_stores_only_a_hash(database: str) -> None:
    store = KeyStore(database)
    record, key = store.create("free", "alice")
    assert parse_key(key) == record.id
    raw = store.db.all("SELECT * FROM api_keys")
    flat = " ".join(str(v) for row in raw for v in row)
    secret = key.split("_", 2)[2]
    assert secret not in flat and key not in flat
    assert hash_key(key) in flat


def test_verify_resolve_and_revoke(database: str) -> None:
    store = KeyStore(database)
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
    secret = "A" * 43
    for bad in ["", "vr_", "vr_short_x", "xx_0123456789ab_secret", "vr_0123456789ab_"]:
        assert parse_key(bad) is None
    for bad in [
        "vr_0123456789AB_" + secret,  # the id is lowercase hex
        "vr_0123456789ag_" + secret,
        "vr_0123456789ab_short",
        "vr_0123456789ab_" + secret + "!",  # outside the URL-safe alphabet
        "vr_0123456789ab_" + "A" * 129,
    ]:
        assert parse_key(bad) is None, bad
    assert parse_key("vr_0123456789ab_" + secret) == "0123456789ab"


def test_every_change_is_logged_in_order(database: str) -> None:
    store = KeyStore(database)
    start = store.changes(0)
    assert start.full and start.records == () and start.seq == 1  # the log starts at 1
    a, _ = store.create("free")
    b, _ = store.create("free")
    after_create = store.changes(start.seq)
    assert not after_create.full and [r.id for r in after_create.records] == [a.id, b.id]
    # Any writer, even plain SQL on another connection, is logged by the triggers.
    raw = Database(database)
    raw.execute("UPDATE api_keys SET plan = 'pro' WHERE id = ?", (a.id,))
    raw.execute("DELETE FROM api_keys WHERE id = ?", (b.id,))
    raw.close()
    update = store.changes(after_create.seq)
    assert [(r.id, r.plan) for r in update.records] == [(a.id, "pro")]
    assert update.removed == (b.id,)
    assert store.changes(update.seq).records == ()
    # A second store on the same database (the CLI beside the service) shares the log.
    assert KeyStore(database).changes(update.seq).seq == update.seq
