"""Hold a response body against OpenAI's own OpenAPI schemas (tests/schemas/openai_responses.json).

The document is OpenAPI 3.1, whose schemas are JSON Schema 2020-12 plus a few OpenAPI specifics:
``nullable: true`` (still on some of OpenAI's schemas) becomes ``anyOf [schema, null]``, and
``$ref: '#/components/schemas/X'`` resolves inside the stored document. Formats are checked where
OpenAI names one (``uri``, ``date``, ``unixtime``); ``discriminator`` and ``x-*`` keys are
annotations only.

Request bodies (:func:`assert_request_conforms`) are read with every ``oneOf`` as ``anyOf``:
OpenAI's request unions overlap (a developer message with content parts is both an
`EasyInputMessage` and an `InputMessage`), which OpenAPI's ``discriminator`` settles and JSON
Schema's ``oneOf`` would refuse.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry
from referencing.jsonschema import DRAFT202012

DOCUMENT = Path(__file__).with_name("schemas") / "openai_responses.json"
URI = "urn:openai-openapi"
SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")

FORMATS = FormatChecker(formats=())


@FORMATS.checks("uri")
def _uri(value: object) -> bool:
    """RFC 3986: an absolute URI (a scheme), no spaces."""
    if not isinstance(value, str):
        return True
    scheme = urlsplit(value).scheme
    return bool(scheme) and SCHEME.fullmatch(scheme) is not None and not re.search(r"\s", value)


@FORMATS.checks("date", raises=ValueError)
def _date(value: object) -> bool:
    if isinstance(value, str):
        date.fromisoformat(value)
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) is not None
    return True


@FORMATS.checks("unixtime")
def _unixtime(value: object) -> bool:
    """Seconds since the epoch: not negative."""
    return not isinstance(value, int) or value >= 0


def translate(node: Any, one_of: str = "oneOf") -> Any:
    """OpenAPI's ``nullable: true`` as JSON Schema: ``anyOf [the schema, {type: null}]``;
    ``oneOf`` renamed ``one_of``."""
    if isinstance(node, list):
        return [translate(item, one_of) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        (one_of if key == "oneOf" else key): (
            {k: translate(v, one_of) for k, v in value.items()}
            if key == "properties"
            else translate(value, one_of)
        )
        for key, value in node.items()
        if key != "nullable"
    }
    return {"anyOf": [out, {"type": "null"}]} if node.get("nullable") is True else out


@functools.cache
def _registry(one_of: str = "oneOf") -> Registry[Any]:
    document = translate(json.loads(DOCUMENT.read_text(encoding="utf-8")), one_of)
    return Registry().with_resource(URI, DRAFT202012.create_resource(document))


@functools.cache
def validator(schema_name: str, one_of: str = "oneOf") -> Draft202012Validator:
    schemas = _registry(one_of).contents(URI)["components"]["schemas"]
    if schema_name not in schemas:
        raise KeyError(f"{schema_name} is not among the stored schemas: {sorted(schemas)}")
    schema = {"$ref": f"{URI}#/components/schemas/{schema_name}"}
    return Draft202012Validator(schema, registry=_registry(one_of), format_checker=FORMATS)


def violations(schema_name: str, obj: Any, one_of: str = "oneOf") -> list[str]:
    """Every way ``obj`` breaks OpenAI's ``schema_name``, one line each (empty: it conforms)."""
    errors = sorted(
        validator(schema_name, one_of).iter_errors(obj), key=lambda e: list(e.absolute_path)
    )
    lines = []
    for error in errors:
        where = "".join(f"[{p!r}]" for p in error.absolute_path) or "(the body)"
        causes = "; ".join(sorted({c.message for c in error.context or ()}))[:300]
        lines.append(f"{where}: {error.message[:300]}" + (f" ({causes})" if causes else ""))
    return lines


def assert_conforms(schema_name: str, obj: Any) -> None:
    """Fail, naming every violation, unless ``obj`` validates against OpenAI's ``schema_name``."""
    found = violations(schema_name, obj)
    assert not found, f"not an OpenAI {schema_name}:\n  " + "\n  ".join(found)


def assert_completion_conforms(body: Any, *, chunk: bool = False, echo: bool = False) -> None:
    """A legacy `POST /completions` body: the JSON answer or a stream chunk (OpenAI's
    completions stream sends the same `text_completion` object).

    Three nulls OpenAI's API itself sends where its document types a value, each allowed only
    where the API sends it: `finish_reason` of a stream chunk before the choice ends, `usage`
    of a stream chunk but the last (with ``stream_options.include_usage``), and, with ``echo``,
    the logprob and alternatives of the prompt's first token (nothing precedes it to score it).
    They are replaced by a conforming value before the check; any other null is a violation.
    """
    body = json.loads(json.dumps(body))
    if chunk and body.get("usage", 0) is None:
        del body["usage"]
    for choice in body.get("choices", []):
        if chunk and choice.get("finish_reason") is None:
            choice["finish_reason"] = "length"
        lp = choice.get("logprobs")
        if echo and lp and lp["token_logprobs"] and lp["token_logprobs"][0] is None:
            lp["token_logprobs"][0] = 0.0
            if lp["top_logprobs"][0] is None:
                lp["top_logprobs"][0] = {}
    assert_conforms("CreateCompletionResponse", body)


def assert_request_conforms(schema_name: str, body: Any) -> None:
    """A request body (``CreateResponse``, ...), its unions read with OpenAPI's leniency."""
    found = violations(schema_name, body, one_of="anyOf")
    assert not found, f"not an OpenAI {schema_name}:\n  " + "\n  ".join(found)


@functools.cache
def _event_schemas() -> dict[str, str]:
    """Each Responses stream event type, and the name of OpenAI's schema for it."""
    schemas = _registry().contents(URI)["components"]["schemas"]
    names = [m["$ref"].rsplit("/", 1)[-1] for m in schemas["ResponseStreamEvent"]["anyOf"]]
    return {kind: name for name in names for kind in schemas[name]["properties"]["type"]["enum"]}


def assert_event_conforms(event: Any) -> None:
    """A Responses stream event: OpenAI's schema for its ``type`` (named in a failure), and
    the `ResponseStreamEvent` union."""
    name = _event_schemas().get(event.get("type"))
    assert name is not None, f"{event.get('type')!r} is no event type OpenAI documents"
    assert_conforms(name, event)
    assert_conforms("ResponseStreamEvent", event)
