from __future__ import annotations

import pytest
from pydantic import ValidationError

from voltage_ray.config import AppConfig, ImageStoreConfig
from voltage_ray.deployments.image_store import ID_PATTERN, ImageStore, store_name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_are_unguessable_and_images_come_back() -> None:
    store = ImageStore(ttl_s=60, max_bytes=1 << 20, clock=Clock())
    ids = store.put([b"one", b"two"])
    assert len(set(ids)) == 2
    assert all(ID_PATTERN.fullmatch(i) for i in ids)
    assert store.get(ids[0]) == (b"one", 60)
    assert store.get(ids[1]) == (b"two", 60)
    assert store.get("A" * 32) is None


def test_images_expire_after_ttl() -> None:
    clock = Clock()
    store = ImageStore(ttl_s=10, max_bytes=1 << 20, clock=clock)
    (old,) = store.put([b"old"])
    clock.now += 6
    (new,) = store.put([b"new"])
    assert store.get(old) == (b"old", 4)
    clock.now += 4  # old expires exactly now
    assert store.get(old) is None
    assert store.get(new) == (b"new", 6)
    clock.now += 6
    assert store.get(new) is None
    assert store.stats() == {"images": 0, "bytes": 0, "ttl_s": 10}


def test_byte_cap_drops_the_oldest() -> None:
    store = ImageStore(ttl_s=60, max_bytes=10, clock=Clock())
    a, b = store.put([b"aaaa", b"bbbb"])
    (c,) = store.put([b"cccc"])  # 12 bytes: a goes
    assert store.get(a) is None
    assert store.get(b) is not None and store.get(c) is not None
    assert store.stats()["bytes"] == 8


def test_configure_applies_the_cap_at_once_and_the_ttl_to_new_images() -> None:
    clock = Clock()
    store = ImageStore(ttl_s=60, max_bytes=100, clock=clock)
    a, b = store.put([b"aaaa", b"bbbb"])
    store.configure(ttl_s=5, max_bytes=4)
    assert store.get(a) is None and store.get(b) == (b"bbbb", 60)
    (c,) = store.put([b"cc"])  # b goes for the cap
    assert store.get(c) == (b"cc", 5)
    assert store.get(b) is None


def test_each_application_has_its_own_store() -> None:
    assert store_name("voltage") != store_name("voltage-ttl")


def test_store_config_defaults_and_validation() -> None:
    config = ImageStoreConfig()
    assert (config.ttl_s, config.max_bytes, config.public_base_url) == (3600.0, 1 << 30, None)
    app = AppConfig.model_validate(
        {
            "models": [{"id": "m", "kind": "images", "source": {"builtin": "tiny-sd"}}],
            "image_store": {"ttl_s": 60, "public_base_url": "https://api.example.com"},
        }
    )
    assert app.image_store.ttl_s == 60
    for bad in (
        {"public_base_url": "api.example.com"},
        {"ttl_s": 0},
        {"max_bytes": 1000},
        {"ttl": 5},
    ):
        with pytest.raises(ValidationError):
            ImageStoreConfig.model_validate(bad)
