"""llama.cpp as a batched forward pass: GGUF chat models on CPU under voltage_ray's scheduler.

llama.cpp runs quantized GGUF weights as they are (no fp32 dequantization) with kernels built for
this CPU, several times faster than transformers on the same file. voltage_ray keeps its own
continuous-batching scheduler and sampler, so this module exposes only what they need, through
llama-cpp-python's low-level C API (``llama_cpp.llama_cpp``; its high-level ``Llama`` holds one
sequence): one ``llama_decode`` per scheduler step over several sequences, each in its own KV
slot (``seq_id``), returning float32 logits, plus dropping and forking a slot.

The KV cache is split per sequence (``kv_unified=False``, as llama-server with ``--parallel``):
each slot owns ``n_ctx_per_seq`` cells, attention reads only its own cells (one long
conversation never slows the others) and a sequence's numerics do not depend on the others'
cells, so seeded text is the same alone or batched. NOTE: llama.cpp then puts only runs of
consecutive ``seq_id``s in one compute pass (``llama_batch_allocr::split_equal``): measured here
on SmolLM2 (2 threads), 4 rows in slots 0-3 decode in 27.2 ms, in slots 0, 2, 4, 6 in 38.4 ms
(a unified cache: 21 ms either way, but a row's cells then sit among the others' and its logits
change with them, by rounding, enough to change seeded text). ``LlamaCppScheduler`` therefore
keeps running rows in adjacent slots. Forking copies the source slot's buffer.

The import is lazy: without the binding, :func:`llama_cpp_unavailable` says why and how to
install it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "run scripts/install (builds llama.cpp once, a few minutes) or "
    "pip install 'voltage_ray[llama-cpp]'"
)
# ggml_log_level: 3 WARN, 4 ERROR, 5 CONT (continues the previous message)
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_LOG_CONT = 5


class LlamaCppError(RuntimeError):
    """llama.cpp refused or failed a call (model load, context creation, ``llama_decode``)."""


@dataclass(frozen=True)
class Chunk:
    """Tokens to append to one sequence in a forward pass."""

    seq_id: int  # KV sequence slot, 0 <= seq_id < n_seq_max
    tokens: list[int]  # tokens to append to that sequence
    pos: int  # position of tokens[0]: the sequence's current length
    logits: bool  # want the logits of the last token of this chunk
    every: bool = False  # want the logits of every token (scoring a prompt; implies ``logits``)

    @property
    def outputs(self) -> int:
        """Logit rows this chunk asks for."""
        return len(self.tokens) if self.every else int(self.logits)


@functools.cache
def llama_cpp_unavailable() -> str | None:
    """Why the llama.cpp engine cannot run in this process (with how to get it), else None.

    Importing the binding loads libllama, so a broken build is caught here, not at first use.
    """
    try:
        _binding()
    except Exception as exc:  # ImportError, or OSError from loading the shared library
        return f"llama.cpp is not available ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
    return None


@functools.cache
def _binding() -> Any:
    """The ctypes module of llama-cpp-python, with the backend started and its log routed."""
    import llama_cpp.llama_cpp as lib

    lib.llama_backend_init()
    lib.llama_log_set(_log_callback(lib), ctypes.c_void_p(0))
    return lib


@functools.cache
def _ggml_cpu() -> Any:
    """ggml's CPU threadpool API (libggml-cpu, libggml-base: beside libllama in the binding's
    ``lib``), which llama-cpp-python does not bind; and libllama's ``llama_attach_threadpool``."""
    from pathlib import Path

    import llama_cpp
    import llama_cpp._ctypes_extensions as ext
    import llama_cpp.llama_cpp as lib

    where = Path(llama_cpp.__file__).parent / "lib"
    cpu, base = (
        ext.load_shared_library("ggml-cpu", where),
        ext.load_shared_library("ggml-base", where),
    )
    base.ggml_threadpool_params_init.argtypes = [ctypes.c_void_p, ctypes.c_int]
    base.ggml_threadpool_params_init.restype = None
    cpu.ggml_threadpool_new.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_new.restype = ctypes.c_void_p
    cpu.ggml_threadpool_free.argtypes = [ctypes.c_void_p]
    cpu.ggml_threadpool_free.restype = None
    attach = lib._lib.llama_attach_threadpool
    attach.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    attach.restype = None
    return base, cpu, attach


class _PoolParams(ctypes.Structure):
    """ggml's ``struct ggml_threadpool_params`` (ggml.h)."""

    _fields_ = [
        ("cpumask", ctypes.c_bool * 512),  # GGML_MAX_N_THREADS
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),  # enum ggml_sched_priority
        ("poll", ctypes.c_uint32),  # 0: sleep as soon as a graph is done ... 100
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


def _threadpool(ctx: Any, n_threads: int, poll: int) -> Any:
    """A persistent ggml threadpool of ``n_threads``, attached to ``ctx`` (None if ggml refused).

    NOTE: without one, ggml (built without OpenMP, as scripts/install builds it) starts a
    disposable pool inside every ``llama_decode``: fresh threads for each step. llama-server
    attaches a pool as this does; hybrid polling (ggml's default, 50) as there: threads spin
    briefly between graphs, then sleep. In process, SmolLM2, 2 threads, greedy: 1 stream
    ~1.04x and 8 streams ~1.1x the tokens/s of no pool (noisy, 2 runs each). ``poll``: how
    long an idle thread spins before it sleeps (ggml's 0-100; the engine passes 0).
    """
    base, cpu, attach = _ggml_cpu()
    params = _PoolParams()
    base.ggml_threadpool_params_init(ctypes.byref(params), n_threads)
    params.poll = poll
    pool = cpu.ggml_threadpool_new(ctypes.byref(params))
    if not pool:
        logger.warning(
            "ggml could not start a %d-thread pool; llama.cpp makes one per step", n_threads
        )
        return None
    attach(ctx, pool, pool)
    return pool


@functools.cache  # NOTE: cached so the ctypes callback outlives every call from C
def _log_callback(lib: Any) -> Any:
    """llama.cpp's warnings and errors go to this module's logger; its chatter is dropped."""
    last = [0]

    def forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        level = last[0] if level == _LOG_CONT else level
        last[0] = level
        if level in _LOG_LEVELS:
            message = text.decode("utf-8", "replace").rstrip()
            if message:
                logger.log(_LOG_LEVELS[level], "llama.cpp: %s", message)

    return lib.llama_log_callback(forward)


def _layout(chunks: Sequence[Chunk]) -> tuple[np.ndarray, ...]:
    """Per token: its sequence, id, position, and output row (-1: no logits wanted).

    NOTE: sorted by sequence: with a split KV cache llama.cpp puts only runs of consecutive
    seq_ids in one compute pass (``split_equal``), so order matters for speed, not results.
    """
    ordered = sorted(range(len(chunks)), key=lambda k: chunks[k].seq_id)
    first_row = np.cumsum([0] + [c.outputs for c in chunks])
    seq, tokens, pos, row = [], [], [], []
    for k in ordered:
        c, n = chunks[k], len(chunks[k].tokens)
        seq.append(np.full(n, c.seq_id, np.int32))
        tokens.append(np.asarray(c.tokens, np.int32))
        pos.append(c.pos + np.arange(n, dtype=np.int32))
        row.append(np.full(n, -1, np.int64))
        if c.every:
            row[-1][:] = first_row[k] + np.arange(n)
        elif c.logits:
            row[-1][-1] = first_row[k]
    return tuple(np.concatenate(a) for a in (seq, tokens, pos, row))


def threads_for_step(tokens: int, n_threads: int, one_row_threads: int) -> int:
    """llama.cpp threads for a pass of ``tokens`` tokens: ``one_row_threads`` for one decode
    row (capped by ``n_threads``), all ``n_threads`` for anything larger (rows decoding
    together, a prompt chunk): those passes are compute-bound and scale with cores.

    NOTE: the attached pool has ``n_threads`` workers; a pass may use fewer (ggml sets the
    graph's thread count per compute; the pool's size caps it, ``ggml_graph_compute``), and the
    idle workers wait. Figures at ``llama_cpp_engine.ONE_ROW_THREADS``.
    """
    return max(1, min(n_threads, one_row_threads if tokens <= 1 else n_threads))


def _free(lib: Any, model: Any, ctx: Any, batch: Any, pool: Any) -> None:
    # NOTE: order matters: the batch and context before the threadpool and the model they use.
    lib.llama_batch_free(batch)
    lib.llama_free(ctx)
    if pool:
        _ggml_cpu()[1].ggml_threadpool_free(pool)
    lib.llama_model_free(model)


class LlamaCppModel:
    """One llama.cpp model and context: forward passes over several sequences in one batch.

    ``n_threads`` is the size of the threadpool and the threads of every pass of more than one
    token; a pass of one token (one row decoding) takes ``one_row_threads`` (default
    ``n_threads``): :func:`threads_for_step`. Never more than the cores the replica may use
    (llama.cpp's threads spin at barriers, so oversubscribed cores stall every step).
    ``poll``: ggml's polling level for the pool's idle threads (0 sleeps at once). llama.cpp
    rounds ``n_ctx_per_seq`` up to a multiple of 256; the attribute holds the real size. Not
    thread-safe: one scheduler thread calls it (``llama_decode`` releases the GIL).
    """

    def __init__(
        self,
        gguf_path: str,
        *,
        n_ctx_per_seq: int,
        n_seq_max: int,
        n_threads: int,
        n_batch: int = 512,
        one_row_threads: int | None = None,
        poll: int = 50,
    ) -> None:
        reason = llama_cpp_unavailable()
        if reason is not None:
            raise LlamaCppError(reason)
        lib = self._lib = _binding()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not model:
            raise LlamaCppError(f"llama.cpp could not load {gguf_path}")
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx_per_seq * n_seq_max
        params.n_seq_max = n_seq_max
        params.n_batch = params.n_ubatch = n_batch  # one compute graph per llama_decode
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = False
        params.no_perf = True
        ctx = lib.llama_init_from_model(model, params)
        if not ctx:
            lib.llama_model_free(model)
            raise LlamaCppError(f"llama.cpp could not create a context for {gguf_path}")
        batch = lib.llama_batch_init(n_batch, 0, n_seq_max)
        pool = _threadpool(ctx, n_threads, poll)
        self._ctx, self._memory = ctx, lib.llama_get_memory(ctx)
        self._closer = weakref.finalize(self, _free, lib, model, ctx, batch, pool)
        self._batch = batch
        self.vocab_size: int = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        self.context_length: int = lib.llama_model_n_ctx_train(model)
        self.n_ctx_per_seq: int = lib.llama_n_ctx_seq(ctx)
        self.n_seq_max, self.n_batch, self.n_threads = n_seq_max, n_batch, n_threads
        self.one_row_threads = n_threads if one_row_threads is None else one_row_threads
        self.threads_used = n_threads  # the thread count of the last pass
        # numpy views of the batch's arrays, so filling a batch is a few vector copies
        self._token = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        self._want = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        self._n_seq_id[:] = 1

    def forward(self, chunks: Sequence[Chunk]) -> np.ndarray:
        """Append each chunk's tokens to its sequence; float32 logits ``[wanted, vocab]``.

        One row per chunk with ``logits=True`` (a row per token with ``every=True``), in chunk
        order. Tokens that fit ``n_batch`` go
        in one ``llama_decode``, more are split over several in order. Each sequence appears at
        most once. On :class:`LlamaCppError` the sequences in ``chunks`` may hold part of their
        tokens: drop them.
        """
        self._check(chunks)
        seq, tokens, pos, row = _layout(chunks)
        out = np.empty((int(row.max(initial=-1)) + 1, self.vocab_size), np.float32)
        for start in range(0, len(tokens), self.n_batch):
            window = slice(start, start + self.n_batch)
            self._decode(seq[window], tokens[window], pos[window], row[window] >= 0)
            for i in np.flatnonzero(row[window] >= 0):
                logits = self._lib.llama_get_logits_ith(self._ctx, int(i))
                out[row[start + i]] = np.ctypeslib.as_array(logits, shape=(self.vocab_size,))
        return out

    def _check(self, chunks: Sequence[Chunk]) -> None:
        if not self._closer.alive:
            raise LlamaCppError("the model is closed")
        if not chunks:
            raise ValueError("forward needs at least one chunk")
        seen: set[int] = set()
        for c in chunks:
            if not 0 <= c.seq_id < self.n_seq_max or c.seq_id in seen:
                raise ValueError(f"seq_id {c.seq_id} is out of range or repeated")
            if not c.tokens or c.pos < 0 or c.pos + len(c.tokens) > self.n_ctx_per_seq:
                raise ValueError(
                    f"chunk of {len(c.tokens)} tokens at {c.pos} does not fit the "
                    f"{self.n_ctx_per_seq}-token context of a sequence"
                )
            seen.add(c.seq_id)

    def _decode(
        self, seq: np.ndarray, tokens: np.ndarray, pos: np.ndarray, want: np.ndarray
    ) -> None:
        n = len(tokens)
        threads = threads_for_step(n, self.n_threads, self.one_row_threads)
        if threads != self.threads_used:
            # NOTE: both counts: llama.cpp takes n_threads for a one-token ubatch and
            # n_threads_batch for a larger one (llama_context::graph_compute)
            self._lib.llama_set_n_threads(self._ctx, threads, threads)
            self.threads_used = threads
        self._token[:n], self._pos[:n], self._want[:n] = tokens, pos, want
        seq_ids = self._batch.seq_id
        for i, s in enumerate(seq.tolist()):
            seq_ids[i][0] = s
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            # 1: no KV slot (the cache is as before), -1: bad batch, 2 / < -1: aborted or failed
            raise LlamaCppError(f"llama_decode failed with code {rc}")

    def drop(self, seq_id: int) -> None:
        """Forget a sequence's KV cells, so its slot starts empty at position 0."""
        self._lib.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def save(self, seq_id: int) -> Any:
        """A copy of a sequence's KV cells (a ctypes byte array) for :meth:`restore`."""
        size = self._lib.llama_state_seq_get_size(self._ctx, seq_id)
        state = (ctypes.c_uint8 * size)()
        got = self._lib.llama_state_seq_get_data(self._ctx, state, size, seq_id)
        if got != size:
            raise LlamaCppError(f"llama.cpp saved {got} of {size} bytes of sequence {seq_id}")
        return state

    def restore(self, seq_id: int, state: Any) -> None:
        """Make ``seq_id`` hold the cells :meth:`save` copied (from any sequence)."""
        self.drop(seq_id)
        if self._lib.llama_state_seq_set_data(self._ctx, state, len(state), seq_id) == 0:
            self.drop(seq_id)
            raise LlamaCppError(f"llama.cpp could not restore sequence {seq_id}")

    def truncate(self, seq_id: int, keep: int) -> None:
        """Keep a sequence's first ``keep`` positions, forget the rest."""
        self._lib.llama_memory_seq_rm(self._memory, seq_id, keep, -1)

    def fork(self, src: int, dst: int) -> None:
        """Make ``dst`` a copy of ``src`` (``n`` choices sharing one prefilled prompt).

        Across split KV streams llama.cpp copies the whole buffer at the next decode.
        """
        self._lib.llama_memory_seq_rm(self._memory, dst, -1, -1)
        self._lib.llama_memory_seq_cp(self._memory, src, dst, -1, -1)

    def close(self) -> None:
        """Free the context and model now (otherwise when collected, or at interpreter exit)."""
        self._closer()
