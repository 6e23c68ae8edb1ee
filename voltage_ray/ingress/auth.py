"""Resolve the caller from `X-VoltageGPU-Key` or `Authorization: Bearer`.

The key itself never leaves this function: the limiter receives its public id and its hash.
"""

from __future__ import annotations

from fastapi import Request

from voltage_ray.errors import Unauthorized
from voltage_ray.limits.keys import hash_key, parse_key

KEY_HEADER = "x-voltagegpu-key"


def presented_key(request: Request) -> tuple[str, str]:
    """(key id, key hash) of the presented key, or Unauthorized for a missing/malformed one."""
    key = request.headers.get(KEY_HEADER, "").strip()
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    if not key:
        raise Unauthorized("Invalid or missing API key")
    key_id = parse_key(key)
    if key_id is None:
        raise Unauthorized("Invalid or missing API key")
    return key_id, hash_key(key)
