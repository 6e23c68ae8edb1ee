from __future__ import annotations

import pytest

from voltage_ray.ingress.images import negotiate


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("application/json", "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        ("image/png", "image/png"),
        ("image/jpeg", "image/jpeg"),
        ("IMAGE/PNG", "image/png"),
        ("image/*", "image/png"),
        ("image/png, application/json", "application/json"),  # JSON acceptable: JSON
        ("image/png, */*;q=0.8", "image/png"),
        ("image/png;q=0.9, application/json;q=0.5", "image/png"),
        ("image/jpeg, image/png;q=0.5", "image/jpeg"),
        ("image/*;q=0.5, image/jpeg", "image/jpeg"),
        ("application/json;q=0, image/png", "image/png"),
        ("image/png;q=0", "application/json"),
        ("image/png;q=oops", "application/json"),
        ("text/html", "application/json"),  # nothing offered is acceptable: JSON anyway
        ("image/webp", "application/json"),
    ],
)
def test_negotiate(accept: str | None, expected: str) -> None:
    assert negotiate(accept) == expected
