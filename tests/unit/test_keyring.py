"""An ingress replica's copy of the keys: every refusal without a remote call, and why."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from voltage_ray.limits.keyring import KeyRing
from voltage_ray.limits.keys import KeyStore


def test_keys_are_checked_by_shape_id_and_hash(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    record, key = store.create("pro", "alice")
    ring = KeyRing()
    ring.apply(store.changes(0))
    assert len(ring) == 1 and ring.seq > 0 and ring.source == str(tmp_path / "k.db")
    principal, failure = ring.verify(key)
    assert failure is None and principal is not None
    assert (principal.key_id, principal.name, principal.plan) == (record.id, "alice", "pro")
    secret = key.split("_", 2)[2]
    refused = {
        "": "missing",
        "vr_short_x": "malformed",
        "vr_" + secret[:12] + "_" + secret: "malformed",  # the id is 12 hex digits
        key + "\n": "malformed",
        "vr_0123456789ab_" + secret: "unknown",
        key[:-1] + ("A" if key[-1] != "A" else "B"): "mismatch",
    }
    for presented, why in refused.items():
        assert ring.verify(presented) == (None, why), presented


def test_changes_apply_in_place_and_a_full_update_replaces(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "k.db")
    kept, kept_key = store.create("pro")
    gone, gone_key = store.create("pro")
    ring = KeyRing()
    ring.apply(store.changes(ring.seq))
    _, late_key = store.create("free")
    store.revoke(kept.id)
    store.db.execute("DELETE FROM api_keys WHERE id = ?", (gone.id,))
    update = store.changes(ring.seq)
    assert not update.full
    ring.apply(update)
    assert ring.verify(kept_key) == (None, "revoked")
    assert ring.verify(gone_key) == (None, "unknown")
    assert ring.verify(late_key)[0] is not None
    # A full update (another database) holds exactly its keys.
    other = KeyStore(tmp_path / "other.db")
    other.create("pro")
    ring.apply(other.changes(0))
    assert len(ring) == 1 and ring.verify(late_key) == (None, "unknown")
    assert dataclasses.replace(update, full=True).full  # KeyUpdate is a plain frozen record
