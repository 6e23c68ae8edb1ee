from __future__ import annotations

from pathlib import Path

import pytest

from voltage_ray.app import ConfigError, load_args, parse_config
from voltage_ray.config import (
    AppConfig,
    BuiltinSource,
    GGUFSource,
    HubSource,
    LocalSource,
    ModelConfig,
)

REPO = Path(__file__).resolve().parents[2]


def chat_model(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"id": "m", "kind": "chat", "source": {"builtin": "tiny-llama"}}
    base.update(kw)
    return base


def test_sources_are_told_apart_by_their_field() -> None:
    cfg = AppConfig.model_validate(
        {
            "models": [
                chat_model(id="a", source={"hub": "org/x"}),
                chat_model(id="b", source={"path": "/tmp/x"}),
                chat_model(id="c", source={"gguf": "pkg://p/f.gguf"}),
                chat_model(id="d", source={"builtin": "tiny-llama"}),
            ]
        }
    )
    kinds = [type(m.source) for m in cfg.models]
    assert kinds == [HubSource, LocalSource, GGUFSource, BuiltinSource]


def test_unknown_keys_are_rejected_with_their_location() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"models": [chat_model(colour="red")]})
    assert "models.0.colour" in str(err.value)
    with pytest.raises(ConfigError, match=r"deployment\.ray_actor_options\.num_gpu"):
        parse_config({"models": [chat_model(deployment={"ray_actor_options": {"num_gpu": 1}})]})


def test_duplicate_names_and_mismatched_settings_are_rejected() -> None:
    with pytest.raises(ConfigError, match="used by both"):
        parse_config({"models": [chat_model(id="a", aliases=["x"]), chat_model(id="x")]})
    with pytest.raises(ConfigError, match="has 'images' settings"):
        parse_config({"models": [chat_model(images={"max_batch_size": 2})]})
    with pytest.raises(ConfigError, match="models"):
        parse_config({"models": []})


def test_kind_settings_default_and_deployment_options_translate() -> None:
    cfg = parse_config(
        {
            "models": [
                chat_model(
                    deployment={
                        "autoscaling_config": {"min_replicas": 1, "max_replicas": 3},
                        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 0.25},
                    }
                )
            ]
        }
    )
    model = cfg.models[0]
    assert model.chat is not None and model.chat.default_max_tokens == 512
    opts = model.deployment.to_serve()
    assert opts["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert "max_replicas_per_node" not in opts  # Serve's default unless set


def test_max_replicas_per_node_reaches_serve() -> None:
    cfg = parse_config({"models": [chat_model(deployment={"max_replicas_per_node": 1})]})
    assert cfg.models[0].deployment.to_serve()["max_replicas_per_node"] == 1
    with pytest.raises(ConfigError, match="max_replicas_per_node"):
        parse_config({"models": [chat_model(deployment={"max_replicas_per_node": 0})]})


def test_chat_replica_concurrency_follows_its_batch_unless_set() -> None:
    derived = parse_config(
        {
            "models": [
                chat_model(
                    chat={"max_num_seqs": 12},
                    deployment={"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
                )
            ]
        }
    ).models[0]
    opts = derived.deployment.to_serve()
    # Its rows (12, and a headroom row) twice, and its share of the queue (4 x 12 x 3 over 3):
    # every request reaches a replica, whose fair queue decides who waits.
    assert derived.replica_queue == 48 and opts["max_queued_requests"] == 144
    assert opts["max_ongoing_requests"] == 2 * 13 + 48
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 12
    explicit = parse_config(
        {
            "models": [
                chat_model(
                    chat={"max_num_seqs": 12},
                    deployment={
                        "max_ongoing_requests": 5,
                        "autoscaling_config": {"max_replicas": 3, "target_ongoing_requests": 2},
                    },
                )
            ]
        }
    ).models[0]
    opts = explicit.deployment.to_serve()
    assert opts["max_ongoing_requests"] == 5
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 2
    # A dumped config (what replicas receive) keeps the derived values.
    again = ModelConfig.model_validate(derived.model_dump(mode="json"))
    assert again.deployment.to_serve() == derived.deployment.to_serve()


def test_model_queues_are_bounded_by_default() -> None:
    cfg = parse_config(
        {
            "models": [
                chat_model(
                    chat={"max_num_seqs": 6},
                    deployment={"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}},
                ),
                {
                    "id": "e",
                    "kind": "embeddings",
                    "source": {"builtin": "tiny-llama"},
                    "embeddings": {"max_batch_size": 16},
                    "deployment": {"num_replicas": 2},
                },
                {
                    "id": "i",
                    "kind": "images",
                    "source": {"builtin": "tiny-sd"},
                    "deployment": {"max_queued_requests": -1},
                },
            ]
        }
    )
    chat, embeddings, images = (m.deployment.to_serve() for m in cfg.models)
    assert chat["max_queued_requests"] == 4 * 6 * 3  # 4 batches per replica, at most replicas
    assert embeddings["max_queued_requests"] == 4 * 16 * 2
    assert images["max_queued_requests"] == -1  # explicitly unbounded
    assert "max_queued_requests" not in cfg.ingress.deployment.to_serve()  # Serve's default
    with pytest.raises(ConfigError, match="max_queued_requests"):
        parse_config({"models": [chat_model(deployment={"max_queued_requests": 0})]})


def test_auth_throttle_settings() -> None:
    cfg = parse_config({"models": [chat_model()]})
    assert cfg.auth.failures_per_minute == 30
    assert [str(n) for n in cfg.auth.networks()] == ["127.0.0.0/8", "::1/128"]
    custom = parse_config({"models": [chat_model()], "auth": {"trusted_proxies": ["10.0.0.0/8"]}})
    assert [str(n) for n in custom.auth.networks()] == ["10.0.0.0/8"]
    with pytest.raises(ConfigError, match="trusted_proxies"):
        parse_config({"models": [chat_model()], "auth": {"trusted_proxies": ["not-a-net"]}})


def test_environment_overrides_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VOLTAGE_DB", str(tmp_path / "env.db"))
    monkeypatch.delenv("VOLTAGE_PLANS", raising=False)
    cfg = parse_config({"models": [chat_model()], "database": "/elsewhere.db"})
    assert cfg.database == str(tmp_path / "env.db")
    assert cfg.plans and cfg.plans.endswith("plans.yaml")
    assert cfg.cache_dir


def test_default_serve_config_is_valid() -> None:
    args = load_args(REPO / "serve_config.yaml")
    cfg = parse_config(args)
    kinds = {m.kind for m in cfg.models}
    assert kinds == {"chat", "embeddings", "images"}
    names = {n for m in cfg.models for n in m.names}
    assert {"gpt-4", "text-embedding-ada-002"} <= names
    # The CPU default never asks for a GPU.
    assert all(m.deployment.ray_actor_options.num_gpus == 0 for m in cfg.models)
    # Chat's llama.cpp threads are set apart from its reservation, and the reservations fit a
    # 2-CPU node.
    chat = next(m for m in cfg.models if m.kind == "chat")
    assert chat.chat is not None and chat.chat.threads == 2  # both cores when the others idle
    assert chat.deployment.ray_actor_options.num_cpus == 1
    reserved = sum(m.deployment.ray_actor_options.num_cpus for m in cfg.models)
    assert reserved + cfg.ingress.deployment.ray_actor_options.num_cpus <= 2
