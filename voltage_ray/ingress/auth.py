"""Who is calling: the key presented (`X-VoltageGPU-Key` or `Authorization: Bearer`) and the
client address that failed authentications are throttled by.

The key is checked in this process (``limits/keyring.py``) and never logged.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request

KEY_HEADER = "x-voltagegpu-key"
FORWARDED_HEADER = b"x-forwarded-for"
MAX_ADDRESS_CHARS = 64  # a forwarded address is the client's word: bounded before it is kept

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def presented_key(request: Request) -> str:
    """The key sent with the request, or "" when none was."""
    key = request.headers.get(KEY_HEADER, "").strip()
    if not key:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            key = token.strip()
    return key


def client_address(scope: Mapping[str, Any], trusted: Sequence[Network]) -> str:
    """The address of the client that sent the request.

    The peer, unless it is a trusted proxy: then the nearest address of ``X-Forwarded-For``
    (read right to left) that is not itself a trusted proxy. A client cannot choose its address
    this way: an untrusted peer's header is ignored, and a trusted proxy appends the address it
    saw after whatever the client wrote.
    """
    client = scope.get("client")
    address = str(client[0]) if client else ""
    if not _trusted(address, trusted):
        return address[:MAX_ADDRESS_CHARS]
    hops = [
        hop.strip()
        for name, value in scope.get("headers") or ()
        if name == FORWARDED_HEADER
        for hop in value.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, trusted):
            break
    return address[:MAX_ADDRESS_CHARS]


def _trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
