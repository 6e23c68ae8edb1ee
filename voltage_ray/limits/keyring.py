"""An ingress replica's copy of the key store: authentication without a remote call.

Each ingress replica holds every key's public id, plan and SHA-256 hash, kept fresh from the
key store's change log through the limiter (``Limiter.key_changes``, about once a second). A
presented key is checked here: its shape, then its id, then its hash, compared in constant time.
A request with a malformed or unknown key costs no round trip and no database read, however
many an attacker invents. Only hashes leave the database: SHA-256 of a key with 256 random bits
does not give the key back.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal

from voltage_ray.limits.keys import KeyRecord, KeyUpdate, hash_key, parse_key
from voltage_ray.limits.limiter import Principal

# Why a presented key is refused: the reasons of the auth-failure metric.
Failure = Literal["missing", "malformed", "unknown", "revoked", "mismatch"]


@dataclass(frozen=True)
class _Entry:
    key_hash: str
    principal: Principal
    revoked: bool

    @classmethod
    def of(cls, r: KeyRecord) -> _Entry:
        return cls(r.key_hash, Principal(r.id, r.name, r.plan), r.revoked)


class KeyRing:
    """Every key of the store, by id; updated by :meth:`apply`, read by :meth:`verify`."""

    def __init__(self) -> None:
        self.source = ""  # the database the keys come from
        self.seq = 0  # the last change applied; 0: nothing loaded yet
        self._entries: dict[str, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def apply(self, update: KeyUpdate) -> None:
        entries = {r.id: _Entry.of(r) for r in update.records}
        if update.full:
            self._entries = entries
        else:
            self._entries.update(entries)
            for key_id in update.removed:
                self._entries.pop(key_id, None)
        self.source, self.seq = update.source, update.seq

    def verify(self, key: str) -> tuple[Principal | None, Failure | None]:
        """The principal of a live key, else None and why (``key`` "": none was sent)."""
        if not key:
            return None, "missing"
        key_id = parse_key(key)
        if key_id is None:
            return None, "malformed"
        entry = self._entries.get(key_id)
        if entry is None:
            return None, "unknown"
        if not hmac.compare_digest(entry.key_hash, hash_key(key)):
            return None, "mismatch"
        if entry.revoked:
            return None, "revoked"
        return entry.principal, None
