"""``strict_schema``: object schemas that do not say otherwise are closed, everywhere."""

from __future__ import annotations

import copy
from typing import Any

from voltage_ray.protocol.tools import strict_schema

CLOSED = {"additionalProperties": False}


def test_object_schemas_are_closed_wherever_they_are() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "at": point,
            "path": {"type": "array", "items": point},
            "pair": {"type": "array", "prefixItems": [point, {"properties": {"y": {}}}]},
            "either": {"anyOf": [point, {"type": "string"}]},
            "one": {"oneOf": [point, {"type": ["object", "null"]}]},
            "ref": {"$ref": "#/$defs/Point"},
            "tagged": {"type": "object", "additionalProperties": point},
            "maybe": {"not": point},
        },
        "$defs": {"Point": point},
        "definitions": {"Old": point},
    }
    out = strict_schema(schema)
    assert out["additionalProperties"] is False
    p = out["properties"]
    assert p["at"] == {**point, **CLOSED}
    assert p["path"]["items"] == {**point, **CLOSED} and "additionalProperties" not in p["path"]
    assert [s.get("additionalProperties") for s in p["pair"]["prefixItems"]] == [False, False]
    assert p["either"]["anyOf"] == [{**point, **CLOSED}, {"type": "string"}]
    assert [s["additionalProperties"] for s in p["one"]["oneOf"]] == [False, False]
    assert p["ref"] == {"$ref": "#/$defs/Point"}
    assert p["tagged"]["additionalProperties"] == {**point, **CLOSED}  # an explicit schema stays
    assert p["maybe"]["not"] == {**point, **CLOSED}
    assert out["$defs"]["Point"] == out["definitions"]["Old"] == {**point, **CLOSED}


def test_explicit_values_are_left_alone() -> None:
    open_map = {"type": "object", "additionalProperties": True}
    typed_map = {"type": "object", "additionalProperties": {"type": "integer"}}
    closed = {"type": "object", "properties": {}, "additionalProperties": False}
    for schema in (open_map, typed_map, closed):
        assert strict_schema(schema) == schema
    assert strict_schema({"type": "string"}) == {"type": "string"}
    assert strict_schema({}) == {}


def test_an_allof_of_several_describes_one_object() -> None:
    """Closing each member would refuse the other members' properties: only their insides are
    closed (a one-member allOf, pydantic's way to describe a $ref, is closed)."""
    a = {"type": "object", "properties": {"a": {"type": "object"}}}
    b = {"type": "object", "properties": {"b": {"type": "string"}}}
    out = strict_schema({"allOf": [a, b]})
    assert [("additionalProperties" in m) for m in out["allOf"]] == [False, False]
    assert out["allOf"][0]["properties"]["a"] == {"type": "object", **CLOSED}
    assert strict_schema({"allOf": [a]})["allOf"][0]["additionalProperties"] is False


def test_the_argument_is_neither_changed_nor_shared() -> None:
    schema = {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a"]}}},
        "required": ["tags"],
    }
    before = copy.deepcopy(schema)
    out = strict_schema(schema)
    assert schema == before
    out["required"].append("x")
    out["properties"]["tags"]["items"]["enum"].append("b")
    assert schema == before
