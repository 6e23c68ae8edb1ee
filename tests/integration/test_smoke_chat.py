from __future__ import annotations

from tests.integration.conftest import ServedApp


def test_chat_basic(served: ServedApp) -> None:
    with served.client() as c:
        r = c.post(
            "/v1/chat/completions",
            headers=served.headers(),
            json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
        )
        print(r.status_code, r.text)
        assert r.status_code == 200
