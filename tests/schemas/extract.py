"""Regenerate openai_responses.json from a local copy of OpenAI's OpenAPI document.

    python tests/schemas/extract.py path/to/openapi.yaml --commit <sha> --date <YYYY-MM-DD>

It reads only the file it is given (YAML or JSON: the openai/openai-openapi repository's
`openapi.yaml`) and keeps the response schemas that tests/openai_schema.py checks, with every
schema they reference, minus the `x-oaiMeta` documentation blocks. Nothing else is changed: the
OpenAPI specifics (`nullable`) are translated when the tests load the file, not here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",  # legacy completions: its JSON body and every stream chunk
    "CreateEmbeddingResponse",
    "ImagesResponse",
    "ListModelsResponse",
    "Model",
    # The Responses API: the answer, its stream's events, the input item list, input_tokens'
    # answer (the delete answer has no schema, only an example), and the two request bodies,
    # which the unit tests hold their sample requests against.
    "Response",
    "ResponseStreamEvent",
    "ResponseItemList",
    "TokenCountsResource",
    "CreateResponse",
    "TokenCountsBody",
)
PREFIX = "#/components/schemas/"
OUT = Path(__file__).with_name("openai_responses.json")
REPOSITORY = "https://github.com/openai/openai-openapi"
LICENSE = Path(__file__).with_name("LICENSE-openai-openapi")


def refs(node: Any) -> list[str]:
    """The names of the component schemas that ``node`` references, anywhere inside it."""
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [name for value in node.values() for name in refs(value)]
    if isinstance(node, list):
        return [name for value in node for name in refs(value)]
    return []


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> dict[str, Any]:
    """``roots`` and every schema they reach through ``$ref``, sorted by name."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for ref in refs(schemas[name]):
            if not ref.startswith(PREFIX):
                raise ValueError(f"{name}: a $ref outside the component schemas: {ref}")
            todo.append(ref.removeprefix(PREFIX))
    return {name: strip_meta(schemas[name]) for name in sorted(seen)}


def strip_meta(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip_meta(v) for k, v in node.items() if k != "x-oaiMeta"}
    if isinstance(node, list):
        return [strip_meta(v) for v in node]
    return node


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("document", type=Path, help="openapi.yaml (or .json) of openai-openapi")
    parser.add_argument("--commit", required=True, help="the repository commit it came from")
    parser.add_argument("--date", required=True, help="that commit's date, YYYY-MM-DD")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = args.document.read_text(encoding="utf-8")
    document = json.loads(text) if args.document.suffix == ".json" else yaml.safe_load(text)
    extract = {
        "x-source": {
            "repository": REPOSITORY,
            "file": args.document.name,
            "commit": args.commit,
            "date": args.date,
            "openapi": document["openapi"],
            "info_version": document["info"]["version"],
            "license": "MIT, Copyright (c) OpenAI (https://openai.com); full text in "
            + LICENSE.name,
            "roots": list(ROOTS),
        },
        "components": {"schemas": closure(document["components"]["schemas"], ROOTS)},
    }
    args.out.write_text(json.dumps(extract, indent=1, ensure_ascii=False) + "\n", "utf-8")
    print(f"{args.out}: {len(extract['components']['schemas'])} schemas", file=sys.stderr)


if __name__ == "__main__":
    main()
