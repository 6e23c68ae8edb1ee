"""Fair shares between API keys (backends/fairness.py): the order of claims, who gives way when a
queue is full, which row a preemption pauses, and the places of a batching replica."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from voltage_ray.backends.fairness import (
    ANONYMOUS,
    Places,
    Served,
    Tenant,
    first,
    give_way,
    let_in,
    under_share,
    victim,
)
from voltage_ray.errors import Overloaded

H, L, M = Tenant("heavy"), Tenant("light"), Tenant("middle")
PAID = Tenant("paid", priority=1)


@dataclass
class Item:
    tenant: Tenant
    seq: int


def test_a_tenant_from_a_handle_callers_dict_or_nothing() -> None:
    assert Tenant.of(None) is ANONYMOUS
    assert Tenant.of({"key": "k", "priority": 2}) == Tenant("k", 2)
    assert Tenant.of(PAID) is PAID


def test_claims_go_by_priority_then_rows_held_then_service_then_age() -> None:
    served = Served()
    claims = [Item(H, 0), Item(H, 1), Item(L, 2)]
    # The light key holds no row: it goes first although it came last.
    assert first(claims, {"heavy": 8}, served) == claims[2]
    # Equal rows: the one served less lately, then the oldest.
    served.charge("heavy", 100)
    assert first(claims, {"heavy": 1, "light": 1}, served) == claims[2]
    assert first(claims[:2], {}, served) == claims[0]
    # A higher priority goes first whatever it holds.
    assert first([*claims, Item(PAID, 9)], {"paid": 8}, served) == Item(PAID, 9)


def test_a_key_new_to_the_replica_starts_just_below_the_least_served() -> None:
    served = Served()
    served.charge("heavy", 500)
    assert served.of("light") < served.of("heavy")
    served.forget(["light"])  # heavy left: it banks nothing
    assert "heavy" not in served.work
    assert served.of("heavy") < served.of("light")


def test_the_newest_request_of_the_key_most_over_its_share_gives_way() -> None:
    waiting = [(H, 1), (H, 2), (M, 3), (H, 4)]
    places = {"heavy": 6, "middle": 2}
    # Capacity 8 over three keys: a share of 2.67. Light holds none: heavy's newest gives way.
    assert give_way(waiting, places, L, 8) == 3
    # Heavy itself is over its share: refused.
    assert give_way(waiting, places, H, 8) is None
    # Middle is under its share (2 < 4 with two keys) but no one holds two more: let in.
    assert give_way([(H, 1)], {"heavy": 3, "middle": 2}, M, 5) == -1


def test_a_lower_priority_request_gives_way_to_a_higher_one() -> None:
    waiting = [(H, 1), (L, 2)]
    places = {"heavy": 2, "light": 1, "paid": 9}
    # The paid key holds far more than its share, yet a lower priority gives way to it.
    assert give_way(waiting, places, PAID, 12) in (0, 1)
    # ... never the other way round.
    assert give_way([(PAID, 1)], {"paid": 9}, L, 10) == -1  # under its share: let in past
    assert give_way([(PAID, 1)], {"paid": 1, "light": 9}, L, 10) is None


def test_preemption_takes_from_the_key_holding_most_and_never_inverts_the_gap() -> None:
    @dataclass
    class Row:
        tenant: Tenant
        seq: int

    rows = [Row(H, 1), Row(H, 5), Row(M, 3)]
    assert victim(rows, L, 1, {"heavy": 2, "middle": 1}) == rows[1]  # heavy's newest
    # Heavy with 2 and the claimant with 1: moving one would invert the gap.
    assert victim(rows, L, 1, {"heavy": 2, "light": 1, "middle": 1}) is None
    # A higher priority pauses any lower-priority row.
    assert victim(rows, PAID, 1, {"heavy": 2, "middle": 1, "paid": 5}) is not None


def test_under_share_counts_every_key_holding_or_waiting() -> None:
    assert under_share(L, 1, {"heavy": 8}, 2, 8)
    assert not under_share(H, 1, {"heavy": 8}, 2, 8)
    assert not under_share(L, 5, {}, 2, 8)


def test_places_bound_the_waiting_requests_fairly() -> None:
    places = Places(max_queued=2, running=1)
    a, _ = places.admit(H)
    a.started = True  # running: it cannot give way
    b, _ = places.admit(H)
    c, _ = places.admit(H)
    with pytest.raises(Overloaded):
        places.admit(H)
    d, shed = places.admit(L)
    assert shed is c and c.shed and not b.shed and places.shed == 1
    places.leave(d)
    assert places.keys() == {"heavy"}


def test_past_the_ingress_bound_only_a_key_under_its_share_is_let_in() -> None:
    assert let_in({"heavy": 3}, "heavy", 4)
    assert not let_in({"heavy": 4}, "heavy", 4)  # full, and heavy holds all of it
    assert let_in({"heavy": 4}, "light", 4)  # light holds none of its share of 2
    assert let_in({"heavy": 3, "light": 1}, "light", 4)
    assert not let_in({"heavy": 2, "light": 2}, "light", 4)
