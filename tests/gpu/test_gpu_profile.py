"""The GPU profile end to end, on a machine with a CUDA GPU (skipped everywhere else).

A real Ray Serve app from ``build_app`` with the deployment options of ``configs/gpu.yaml``
(fractional ``num_gpus`` per replica, its chat/embeddings/images settings), but offline models:
tiny-llama for chat, tiny-sd for images, and for embeddings a tiny random-weight BERT that this
module builds (WordPiece tokenizer trained on a fixed corpus, mean pooling, normalization, saved
with ``SentenceTransformer.save``). gpu.yaml's GPU asks add up to more than one card, so they are
scaled, in proportion, to fill exactly one: every replica then shares the one GPU.

It checks over real HTTP (the OpenAI SDK and httpx) chat (JSON and SSE), embeddings (float and
base64) and an image; that Serve scheduled every replica with its fractional ask on the one GPU
(Ray's GPU accounting and the GCS actor table's resources of each replica); and that each model
runs on CUDA (the replicas' ``info()``, and for the embeddings encoder process, nvidia-smi's
compute processes or, where it lists none, that process's GPU assignment and CUDA driver).

    bash scripts/gpu_check                          # on the GPU host (see that script)
    VOLTAGE_GPU_CHECK_ON_CPU=1 pytest tests/gpu     # rehearsal on a CPU: Ray is told of one
                                                    # GPU, so the scheduling is the same; the
                                                    # models run on the CPU
"""

from __future__ import annotations

import base64
import importlib.util
import io
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.cluster import CUDA, ON_CPU, REQUIRE_CUDA, init_ray
from tests.integration.conftest import REPO, free_port, wait_healthy

pytestmark = pytest.mark.skipif(
    not (CUDA or ON_CPU or REQUIRE_CUDA),
    reason="needs a CUDA GPU (VOLTAGE_GPU_CHECK_ON_CPU=1 rehearses on a CPU)",
)

APP = "voltage"
GPU_PROFILE = REPO / "configs" / "gpu.yaml"
# gpu.yaml's models (by kind), served offline: (id, source); aliases and settings stay gpu.yaml's.
OFFLINE = {
    "chat": ("tiny-llama", {"builtin": "tiny-llama"}),
    "embeddings": ("tiny-bert", None),  # built by build_tiny_sentence_transformer
    "images": ("tiny-sd", {"builtin": "tiny-sd"}),
}
EMBEDDING_WIDTH = 32
HEALTHY_WITHIN_S = 240.0
PLANS = (
    "plans:\n  test: {requests_per_minute: null, tokens_per_month: null, images_per_month: null}\n"
)


# --- the app -------------------------------------------------------------------------------------


def build_tiny_sentence_transformer(out_dir: Path) -> None:
    """A 2-layer BERT with seeded random weights, a WordPiece tokenizer trained on a fixed
    corpus, mean pooling and normalization, saved as a sentence-transformers model."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    try:  # sentence-transformers >= 6 moved the modules; the old path still works, deprecated
        from sentence_transformers.sentence_transformer import modules as st_modules
    except ImportError:
        from sentence_transformers import models as st_modules  # type: ignore[attr-defined,no-redef]
    from sentence_transformers import SentenceTransformer

    from voltage_ray.backends.tiny import _corpus

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        _corpus(),
        trainer=trainers.WordPieceTrainer(
            vocab_size=400, special_tokens=specials, show_progress=False
        ),
    )
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    hf_dir = out_dir.parent / (out_dir.name + "-hf")
    fast.save_pretrained(str(hf_dir))
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(fast),
            hidden_size=EMBEDDING_WIDTH,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            pad_token_id=fast.pad_token_id,
        ),
        add_pooling_layer=False,
    )
    bert.save_pretrained(str(hf_dir))
    transformer = st_modules.Transformer(str(hf_dir), max_seq_length=128)
    pooling = st_modules.Pooling(EMBEDDING_WIDTH, pooling_mode="mean")
    model = SentenceTransformer(
        modules=[transformer, pooling, st_modules.Normalize()], device="cpu"
    )
    model.save(str(out_dir))
    shutil.rmtree(hf_dir)


def gpu_profile_args(tmp: Path, embeddings_dir: Path) -> dict[str, Any]:
    """configs/gpu.yaml's args with offline models, one replica each, and GPU asks scaled to
    fill one card."""
    from voltage_ray.app import load_args

    args = load_args(GPU_PROFILE)
    models = args["models"]
    assert sorted(m["kind"] for m in models) == ["chat", "embeddings", "images"], models
    asks = {m["kind"]: float(m["deployment"]["ray_actor_options"]["num_gpus"]) for m in models}
    assert all(0 < a < 1 for a in asks.values()), f"gpu.yaml should ask GPU fractions: {asks}"
    scale = min(1.0, 1.0 / sum(asks.values()))
    for m in models:
        model_id, source = OFFLINE[m["kind"]]
        m["id"] = model_id
        m["source"] = source or {"path": str(embeddings_dir)}
        deployment = m["deployment"]
        if "autoscaling_config" in deployment:  # one replica per model: a fixed GPU sum
            deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
            deployment["autoscaling_config"].pop("initial_replicas", None)
        options = deployment["ray_actor_options"]
        options["num_gpus"] = round(asks[m["kind"]] * scale, 4)
        if m["kind"] == "chat" and importlib.util.find_spec("vllm") is None:
            # gpu.yaml's chat runs on vLLM; where it is not installed (the device image), the
            # profile's other settings are checked on the transformers engine, and
            # test_gpu_engines.py checks both engines.
            m["chat"]["engine"] = "transformers"
            for vllm_only in ("max_model_len", "enable_prefix_caching"):
                m["chat"].pop(vllm_only, None)
    ingress = args.setdefault("ingress", {}).setdefault("deployment", {})
    if "autoscaling_config" in ingress:
        ingress["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    args.update(
        database=str(tmp / "voltage.db"),
        plans=str(tmp / "plans.yaml"),
        cache_dir=str(tmp / "cache"),
    )
    return args


@dataclass
class GpuApp:
    base_url: str
    key: str
    args: dict[str, Any]
    gpus_total: float
    gpus_free_before: float

    def asks(self) -> dict[str, float]:
        return {
            m["kind"]: float(m["deployment"]["ray_actor_options"]["num_gpus"])
            for m in self.args["models"]
        }

    def deployment(self, kind: str) -> str:
        from voltage_ray.config import ModelConfig
        from voltage_ray.deployments.builder import deployment_name

        model = next(m for m in self.args["models"] if m["kind"] == kind)
        return deployment_name(ModelConfig.model_validate(model))

    def handle(self, kind: str) -> Any:
        from ray import serve

        return serve.get_deployment_handle(self.deployment(kind), app_name=APP)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GpuApp]:
    import ray
    from ray import serve

    from voltage_ray.app import build_app
    from voltage_ray.limits.keys import KeyStore

    if not (CUDA or ON_CPU):
        pytest.fail("torch sees no CUDA device (VOLTAGE_GPU_CHECK_REQUIRE_CUDA=1)")
    tmp = tmp_path_factory.mktemp("gpu")
    started = time.monotonic()
    build_tiny_sentence_transformer(tmp / "tiny-bert")
    print(f"\n[gpu-check] tiny sentence-transformer built in {time.monotonic() - started:.1f} s")
    (tmp / "plans.yaml").write_text(PLANS)
    args = gpu_profile_args(tmp, tmp / "tiny-bert")
    store = KeyStore(tmp / "voltage.db")
    key = store.create("test", "gpu-check")[1]
    store.close()

    init_ray()
    try:
        total = float(ray.cluster_resources().get("GPU", 0.0))
        free_before = float(ray.available_resources().get("GPU", 0.0))
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=APP, route_prefix="/", blocking=False)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, "the app", HEALTHY_WITHIN_S)
        print(f"[gpu-check] app healthy {time.monotonic() - started:.1f} s after the start")
        yield GpuApp(base, key, args, total, free_before)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def client(app: GpuApp) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{app.base_url}/v1", api_key=app.key, max_retries=0, timeout=120)


# --- where the replicas run ----------------------------------------------------------------------


@dataclass
class Replica:
    pid: int
    required: dict[str, float]  # resources held for the actor's lifetime
    gpus: list[tuple[int, float]]  # (GPU index, fraction) that Ray assigned


def replicas(app: GpuApp) -> dict[str, Replica]:
    """The live replica actor of each model deployment, from the GCS actor table."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    found: dict[str, Replica] = {}
    for raw in state._connect_and_get_accessor().get_actor_table(None, "ALIVE"):
        actor = gcs_pb2.ActorTableData.FromString(raw)  # type: ignore[attr-defined]
        for kind in ("chat", "embeddings", "images"):
            if f"#{app.deployment(kind)}#" in actor.name:
                assert kind not in found, f"more than one {kind} replica"
                gpus = [
                    (int(r.index), float(r.quantity))
                    for m in actor.resource_mapping
                    if m.name == "GPU"
                    for r in m.resource_ids
                ]
                found[kind] = Replica(int(actor.pid), dict(actor.required_resources), gpus)
    assert sorted(found) == ["chat", "embeddings", "images"], found
    return found


def process_env(pid: int) -> dict[str, str]:
    """A process's environment at its start (a Ray worker sets CUDA_VISIBLE_DEVICES later, in
    os.environ: only the processes it starts after that show it here)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").partition("=")[::2] for item in raw if b"=" in item)


def spawned_workers(pid: int) -> list[int]:
    """The multiprocessing (spawn) worker processes under a process; not its resource tracker."""
    import psutil

    return [
        child.pid
        for child in psutil.Process(pid).children(recursive=True)
        if "spawn_main" in " ".join(child.cmdline())
    ]


def nvidia_smi_pids() -> dict[int, str] | None:
    """Processes holding a CUDA context, per nvidia-smi (None where it can't say)."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    return {int(r[0]): r[1].strip() for r in rows if r[0].strip().isdigit()}


def test_replicas_scheduled_with_fractional_gpu_asks(app: GpuApp) -> None:
    import ray
    from ray import serve
    from ray.serve.schema import ReplicaState

    asks = app.asks()
    print(f"[gpu-check] GPU asks {asks}; cluster GPUs {app.gpus_total}")
    status = serve.status().applications[APP]
    assert status.status == "RUNNING", status
    for kind in asks:
        dep = status.deployments[app.deployment(kind)]
        assert dep.status == "HEALTHY", (kind, dep)
        assert dep.replica_states.get(ReplicaState.RUNNING) == 1, (kind, dep.replica_states)

    assert app.gpus_total >= 1 and app.gpus_free_before == app.gpus_total
    assert all(0 < a < 1 for a in asks.values()), asks
    assert sum(asks.values()) == pytest.approx(1.0, abs=1e-6)  # all three share one card
    used = app.gpus_total - float(ray.available_resources().get("GPU", 0.0))
    print(f"[gpu-check] Ray's GPU accounting: {used:.4f} of {app.gpus_total} in use")
    assert used == pytest.approx(sum(asks.values()), abs=1e-4)

    found = replicas(app)
    for kind, replica in found.items():
        print(f"[gpu-check] {kind} replica: {replica}")
        assert replica.required.get("GPU") == pytest.approx(asks[kind], abs=1e-4), replica
        assert replica.gpus and sum(q for _, q in replica.gpus) == pytest.approx(asks[kind])
    indexes = {i for replica in found.values() for i, _ in replica.gpus}
    assert len(indexes) == 1 or app.gpus_total > 1, indexes  # one card, shared


def test_each_model_replica_runs_on_cuda(app: GpuApp) -> None:
    expected = "cuda" if CUDA else "cpu"
    chat = app.handle("chat").info.remote().result()
    images = app.handle("images").info.remote().result()
    embeddings = app.handle("embeddings").info.remote().result()
    print(f"[gpu-check] chat {chat}\n[gpu-check] images {images}\n[gpu-check] embed {embeddings}")
    assert str(chat["device"]).startswith(expected), chat
    assert str(images["device"]).startswith(expected), images
    assert chat["dtype"] == "bfloat16", chat  # gpu.yaml's chat dtype
    assert embeddings["dimensions"] == EMBEDDING_WIDTH, embeddings
    if "device" in embeddings:
        assert str(embeddings["device"]).startswith(expected), embeddings

    # The embeddings model runs in a child process of its replica, started after Ray assigned
    # the replica its GPU. Where nvidia-smi lists the processes that hold a CUDA context, that
    # child must be one (as must the chat and images replicas); elsewhere, the child must have
    # the replica's GPU and have loaded the CUDA driver.
    found = replicas(app)
    encoder = spawned_workers(found["embeddings"].pid)
    assert encoder, "the embeddings replica has no encoder process"
    visible = process_env(encoder[0]).get("CUDA_VISIBLE_DEVICES")
    print(f"[gpu-check] encoder pids {encoder}: CUDA_VISIBLE_DEVICES={visible!r}")
    assert visible == ",".join(str(i) for i, _ in found["embeddings"].gpus), visible
    if not CUDA:
        return
    on_gpu = nvidia_smi_pids()
    pids = {kind: replica.pid for kind, replica in found.items()}
    print(f"[gpu-check] nvidia-smi compute processes {on_gpu}; replicas {pids}")
    if on_gpu and (pids["chat"] in on_gpu or pids["images"] in on_gpu):
        assert pids["chat"] in on_gpu and pids["images"] in on_gpu, (on_gpu, pids)
        assert any(pid in on_gpu for pid in encoder), (on_gpu, encoder)
    else:
        print("[gpu-check] nvidia-smi lists no replica process: reading the encoder's maps")
        maps = Path(f"/proc/{encoder[0]}/maps").read_text()
        assert "libcuda.so" in maps, "the encoder process never loaded the CUDA driver"


# --- the API over HTTP ---------------------------------------------------------------------------


def test_chat_json_and_stream(app: GpuApp, client: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model="gpt-4", messages=messages, max_tokens=16, temperature=0
    )
    assert reply.model == "tiny-llama"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.prompt_tokens > 0 and 1 <= reply.usage.completion_tokens <= 16

    chunks = list(
        client.chat.completions.create(
            model="gpt-4",
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish and finish[-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert 1 <= usage.completion_tokens <= 16 and isinstance(text, str)


def test_chat_streams_batch_on_the_device(app: GpuApp, client: Any) -> None:
    """Continuous batching on CUDA (bfloat16): 8 concurrent seeded streams share decode steps
    and give the texts they give alone (bfloat16 matmuls vary slightly with the batch shape, so
    a rare row may part ways; on CPU float32 the integration tests require all to match)."""
    from concurrent.futures import ThreadPoolExecutor

    def complete(i: int) -> str:
        reply = client.chat.completions.create(
            model="gpt-4",
            messages=[{"role": "user", "content": f"Tell me story number {i}"}],
            max_tokens=24,
            temperature=0.8,
            seed=i,
        )
        return str(reply.choices[0].message.content)

    alone = [complete(i) for i in range(8)]
    before = app.handle("chat").info.remote().result()["batch_sizes"]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, range(8)))
    after = app.handle("chat").info.remote().result()
    print(f"[gpu-check] chat batch sizes {after['batch_sizes']}")
    same = sum(a == b for a, b in zip(alone, together, strict=True))
    print(f"[gpu-check] seeded texts equal alone and batched: {same}/8")
    assert same >= 6
    grown = [size for size, n in after["batch_sizes"].items() if n > before.get(size, 0)]
    assert max(grown) > 1 and after["running"] == 0


def test_embeddings_float_and_base64(app: GpuApp, client: Any) -> None:
    import httpx
    import numpy as np

    from tests.base64_vectors import decode_base64

    texts = ["the quick brown fox", "a city at sunset", "tell me a story"]
    result = client.embeddings.create(
        model="text-embedding-ada-002", input=texts, encoding_format="float"
    )
    floats = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert floats.shape == (3, EMBEDDING_WIDTH)
    assert np.allclose(np.linalg.norm(floats, axis=1), 1.0, atol=1e-3)  # Normalize module
    assert result.usage.prompt_tokens > 0

    r = httpx.post(
        f"{app.base_url}/v1/embeddings",
        headers={"Authorization": f"Bearer {app.key}"},
        json={"model": "text-embedding-ada-002", "input": texts, "encoding_format": "base64"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    b64 = np.array([decode_base64(d["embedding"]) for d in r.json()["data"]], dtype=np.float32)
    assert np.allclose(b64, floats, atol=1e-5)
    raw = np.frombuffer(base64.b64decode(r.json()["data"][0]["embedding"]), dtype="<f4")
    assert raw.shape == (EMBEDDING_WIDTH,)


def test_image_generation(app: GpuApp, client: Any) -> None:
    from PIL import Image

    result = client.images.generate(
        model="dall-e-2",
        prompt="A sunset over the mountains",
        size="256x256",
        n=1,
        response_format="b64_json",
    )
    assert len(result.data) == 1
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (256, 256)
    stats = app.handle("images").stats.remote().result()
    assert stats["images"] >= 1, stats
