"""The presented key and the client address, from headers and the ASGI scope."""

from __future__ import annotations

import ipaddress
from typing import Any

from starlette.requests import Request

from voltage_ray.ingress.auth import client_address, presented_key

LOCAL = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]


def scope(peer: str | None, forwarded: list[str] | None = None, **headers: str) -> dict[str, Any]:
    raw = [(b"x-forwarded-for", value.encode()) for value in forwarded or []]
    raw += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": "http", "client": (peer, 1234) if peer else None, "headers": raw}


def test_the_key_comes_from_either_header() -> None:
    assert presented_key(Request(scope(None, x_voltagegpu_key=" vr_k "))) == "vr_k"
    assert presented_key(Request(scope(None, authorization="Bearer vr_b"))) == "vr_b"
    assert presented_key(Request(scope(None, authorization="Basic vr_b"))) == ""
    assert presented_key(Request(scope(None))) == ""


def test_the_forwarded_address_counts_only_from_a_trusted_proxy() -> None:
    assert client_address(scope("203.0.113.5"), LOCAL) == "203.0.113.5"
    # An untrusted peer cannot pick its address.
    assert client_address(scope("203.0.113.5", ["198.51.100.1"]), LOCAL) == "203.0.113.5"
    # A trusted proxy appends the address it saw: the nearest untrusted one is the client,
    # whatever the client wrote before it.
    hops = ["1.1.1.1, 198.51.100.7", "127.0.0.2"]
    assert client_address(scope("127.0.0.1", hops), LOCAL) == "198.51.100.7"
    assert client_address(scope("::1", ["2001:db8::1"]), LOCAL) == "2001:db8::1"
    # Nothing forwarded, or only proxies: the last address seen.
    assert client_address(scope("127.0.0.1"), LOCAL) == "127.0.0.1"
    assert client_address(scope("127.0.0.1", ["127.0.0.9"]), LOCAL) == "127.0.0.9"
    assert client_address(scope("127.0.0.1", ["junk" * 40]), LOCAL) == ("junk" * 40)[:64]
    assert client_address(scope(None), LOCAL) == ""
