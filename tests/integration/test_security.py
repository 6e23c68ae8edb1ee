"""Security checks: keys never in logs and stored only hashed, image URLs unguessable,
every route but /health and image files behind a key."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from tests.integration.conftest import ServedApp

CHAT = {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
PUBLIC = {
    "/health",
    "/v1/health",
    "/api/voltage/v1/health",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
}


def session_logs() -> list[Path]:
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p for p in logs.rglob("*") if p.is_file()]


def test_keys_and_their_parts_never_reach_any_log(served: ServedApp) -> None:
    key = served.new_key("test", "log-probe")
    secret = key.split("_", 2)[2]
    with served.client() as c:
        for headers in (
            {"X-VoltageGPU-Key": key},
            {"Authorization": f"Bearer {key}"},
            {"X-VoltageGPU-Key": key[:-3] + "zzz"},  # forged: same id, wrong secret
            {"X-VoltageGPU-Key": "vr_" + secret[:12] + "_" + secret},  # junk made from parts
        ):
            c.post("/v1/chat/completions", json=CHAT, headers=headers)
            c.post("/v1/chat/completions", json={"model": "gpt-4"}, headers=headers)  # a 400
            c.get("/v1/models", headers=headers)
        c.post("/v1/chat/completions", json={**CHAT, "model": key}, headers=served.headers())
    time.sleep(2)  # let Ray flush replica logs to the session directory
    probes = {key, secret, secret[:10], secret[-10:], served.key, served.key.split("_", 2)[2]}
    files = session_logs()
    assert files
    for path in files:
        text = path.read_bytes().decode("utf-8", "replace")
        for probe in probes:
            assert probe not in text, f"part of a key found in {path}"


def test_the_database_holds_no_key(served: ServedApp) -> None:
    key = served.new_key("test", "db-probe")
    dump = "\n".join(sqlite3.connect(served.db).iterdump())
    assert key.split("_", 2)[2] not in dump
    assert served.key.split("_", 2)[2] not in dump


def test_every_route_but_health_and_image_files_needs_a_key(served: ServedApp) -> None:
    with served.client() as c:
        spec = c.get("/openapi.json").json()
        checked = 0
        for path, methods in spec["paths"].items():
            if path in PUBLIC or "/images/files/" in path:
                continue
            url = path.replace("{model}", "gpt-4").replace("{model:path}", "gpt-4")
            for method in methods:
                r = c.request(method.upper(), url, json={})
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["details"]["status"] == 401
                checked += 1
        assert checked >= 10  # chat, embeddings, images, models x 2 prefixes
        for path in ("/health", "/v1/health"):
            assert c.get(path).status_code == 200


def test_image_urls_cannot_be_guessed_or_enumerated(served: ServedApp) -> None:
    body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 10, "n": 2}
    with served.client() as c:
        r = c.post("/v1/images/generations", json=body, headers=served.headers())
        assert r.status_code == 200, r.text
        urls = [d["url"] for d in r.json()["data"]]
        ids = [u.rsplit("/", 1)[1].removesuffix(".png") for u in urls]
        for image_id in ids:
            assert len(image_id) >= 32  # >= 192 random bits
            assert c.get(urls[0]).status_code == 200
        assert ids[0][:8] != ids[1][:8]
        base = urls[0].rsplit("/", 1)[0]
        for guess in (
            ids[0][:-1] + ("A" if ids[0][-1] != "A" else "B"),
            "1",
            "0" * 32,
            ids[0].upper(),
            "../voltage.db",
        ):
            g = c.get(f"{base}/{guess}.png")
            assert g.status_code == 404, guess
            assert g.json()["details"]["status"] == 404
        assert c.get(base).status_code in (404, 405)
        assert c.get(base + "/").status_code in (404, 405)


def test_errors_never_echo_internals(served: ServedApp) -> None:
    with served.client() as c:
        for body in ({"model": "gpt-4", "messages": "x" * 50}, [1, 2], {"model": None}):
            r = c.post("/v1/chat/completions", json=body, headers=served.headers())
            assert r.status_code == 400
            text = r.text
            for marker in ("Traceback", 'File "', "site-packages", "voltage_ray.", "ray."):
                assert marker not in text
