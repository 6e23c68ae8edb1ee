"""A :class:`Prepared` chat request with OpenAI's defaults, for the engine unit tests."""

from __future__ import annotations

from typing import Any

from voltage_ray.backends.chat import Prepared


def prepared(**kw: Any) -> Prepared:
    """A prepared request: OpenAI's defaults, a two-token prompt, 4 tokens; ``kw`` overrides."""
    base: dict[str, Any] = dict(
        input_ids=[1, 2],
        max_tokens=4,
        n=1,
        temperature=1.0,
        top_p=1.0,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        stop=[],
        seed=None,
    )
    base.update(kw)
    return Prepared(**base)
