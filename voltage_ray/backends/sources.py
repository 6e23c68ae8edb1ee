"""Turn a configured model source into something a loader can open, offline.

GGUF files are converted once to safetensors in the cache directory and built-in tiny models are
built once there; both under a file lock, so replicas starting together do the work once, and
written to a temporary directory renamed into place, so a crash never leaves half a model.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from voltage_ray.config import BuiltinSource, GGUFSource, HubSource, LocalSource, ModelSource

logger = logging.getLogger(__name__)

PKG_SCHEME = "pkg://"


def resolve_path(value: str) -> Path:
    """A filesystem path; ``pkg://package/sub/path`` points inside an installed package.

    The package is located without being imported (some model packages import heavy deps).
    """
    if not value.startswith(PKG_SCHEME):
        return Path(value).expanduser().resolve()
    package, _, rest = value[len(PKG_SCHEME) :].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a dotted name whose parent is missing, or no name
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (needed by {value!r})")
    return Path(next(iter(spec.submodule_search_locations))) / rest


def unavailable(source: ModelSource) -> str | None:
    """Why ``source`` cannot be opened on this node (with its ``install`` hint), else None.

    Cheap and offline: it looks for a package or path, never loads anything. Hub ids and
    built-in models are always taken as available (a hub cache cannot be checked cheaply).
    """
    if isinstance(source, LocalSource):
        value, what, is_there = source.path, "model directory", Path.exists
    elif isinstance(source, GGUFSource):
        value, what, is_there = source.gguf, "GGUF file", Path.is_file
    else:
        return None
    try:
        path = resolve_path(value)
        problem = None if is_there(path) else f"{what} {path} does not exist"
    except FileNotFoundError as exc:
        problem = str(exc)
    if problem and source.install:
        problem += f"; to get it: {source.install}"
    return problem


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``build(tmp_dir)`` if it does not exist."""
    if (target / ".complete").exists():
        return target
    with _locked(target):
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        try:
            build(tmp)
            (tmp / ".complete").touch()
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_cache_dir(gguf_file: Path, cache_dir: Path) -> Path:
    st = gguf_file.stat()
    key = hashlib.sha256(
        f"{gguf_file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()
    return cache_dir / "gguf" / f"{gguf_file.stem}-{key[:12]}"


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF chat model with transformers and save it as safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors (once)", gguf_file.name)
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), **kwargs)
    # The dequantized weights are plain tensors; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def save_gguf_tokenizer(gguf_file: Path, out_dir: Path) -> None:
    """The tokenizer, config and generation config of a GGUF model, without its weights: what
    an engine that runs the GGUF itself (llama.cpp) needs for prompts and token counts."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    kwargs = {"gguf_file": gguf_file.name}
    AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs).save_pretrained(str(out_dir))
    config = AutoConfig.from_pretrained(str(gguf_file.parent), **kwargs)
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))


def gguf_file(source: GGUFSource) -> Path:
    """The GGUF file a source names; FileNotFoundError (with its install hint) when missing."""
    problem = unavailable(source)
    if problem is not None:
        raise FileNotFoundError(problem)
    return resolve_path(source.gguf)


def materialize_tokenizer(source: GGUFSource, cache_dir: Path) -> str:
    """A directory with the GGUF model's tokenizer and configs (built once in ``cache_dir``)."""
    path = gguf_file(source)
    target = gguf_cache_dir(path, cache_dir / "tokenizers")
    return str(build_once(target, lambda tmp: save_gguf_tokenizer(path, tmp)))


def materialize(source: ModelSource, cache_dir: Path) -> str:
    """A hub id or local directory that ``from_pretrained`` opens, building/converting if needed."""
    if isinstance(source, HubSource):
        return source.hub
    problem = unavailable(source)
    if problem is not None:
        raise FileNotFoundError(problem)
    if isinstance(source, LocalSource):
        return str(resolve_path(source.path))
    if isinstance(source, GGUFSource):
        gguf_file = resolve_path(source.gguf)
        target = gguf_cache_dir(gguf_file, cache_dir)
        return str(build_once(target, lambda tmp: convert_gguf(gguf_file, tmp)))
    if isinstance(source, BuiltinSource):
        from voltage_ray.backends import tiny

        builder = tiny.BUILDERS[source.builtin]
        return str(build_once(cache_dir / "builtin" / builder.dirname, builder.build))
    raise TypeError(f"unknown model source {source!r}")
