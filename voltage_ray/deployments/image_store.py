"""The image store: the PNGs behind `response_format: url`, readable by every ingress replica.

One named, detached actor per Serve application keeps the images in memory, each until its expiry
(``ttl_s`` after it was stored), and at most ``max_bytes`` of them: past that the oldest expire
early. Ids are unguessable (``secrets.token_urlsafe``), so the URL itself is the capability and
fetching it needs no API key. Ray restarts the actor if it dies; the images it held are gone
then, and their URLs answer 404 like expired ones.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import ray

from voltage_ray.errors import ServiceUnavailable

NAMESPACE = "voltage_ray"
ID_BYTES = 24  # 192 random bits, 32 URL-safe characters
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{32}")
CALL_TIMEOUT_S = 10.0


def store_name(app_name: str) -> str:
    """The actor name of an application's store (each application has its own settings)."""
    return f"voltage_ray_images:{app_name or 'default'}"


class ImageStore:
    """Images by id with an expiry each and a byte cap. Plain class: the actor wraps it."""

    def __init__(
        self,
        ttl_s: float = 3600.0,
        max_bytes: int = 1 << 30,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.clock = clock
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # oldest first
        self._bytes = 0

    def configure(self, ttl_s: float, max_bytes: int) -> None:
        """New settings for images stored from now on; the cap applies at once."""
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._purge()

    def put(self, images: list[bytes]) -> list[str]:
        """Store ``images``; their ids, in order."""
        expires = self.clock() + self.ttl_s
        ids = []
        for data in images:
            image_id = secrets.token_urlsafe(ID_BYTES)
            self._items[image_id] = (data, expires)
            self._bytes += len(data)
            ids.append(image_id)
        self._purge()
        return ids

    def get(self, image_id: str) -> tuple[bytes, float] | None:
        """(bytes, seconds until expiry) of a live image, else None."""
        self._purge()
        item = self._items.get(image_id)
        if item is None:
            return None
        left = item[1] - self.clock()
        return (item[0], left) if left > 0 else None

    def stats(self) -> dict[str, Any]:
        self._purge()
        return {"images": len(self._items), "bytes": self._bytes, "ttl_s": self.ttl_s}

    def _purge(self) -> None:
        # Insertion order is expiry order while ttl_s is unchanged; after a change an entry may
        # outlive its expiry here until those before it go, and get() checks each expiry itself.
        now = self.clock()
        while self._items:
            image_id, (data, expires) = next(iter(self._items.items()))
            if expires > now and self._bytes <= self.max_bytes:
                break
            del self._items[image_id]
            self._bytes -= len(data)


def get_or_create_store(app_name: str, ttl_s: float, max_bytes: int) -> Any:
    """The application's store actor, created on first use (detached, restarted on death)."""
    actor_cls = ray.remote(ImageStore)
    return actor_cls.options(
        name=store_name(app_name),
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        num_cpus=0,
    ).remote(ttl_s, max_bytes)


async def call(method: Any, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """Call a store method; an unreachable store is a 503."""
    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s)
    except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as exc:
        raise ServiceUnavailable("Image store unavailable, retry shortly") from exc
    except asyncio.TimeoutError as exc:
        raise ServiceUnavailable("Image store did not answer in time, retry shortly") from exc
