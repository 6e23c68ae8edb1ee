from __future__ import annotations

import pickle

from voltage_ray.errors import BadRequest, QuotaExceeded, RateLimited, VoltageError, unwrap
from voltage_ray.ingress.errors import to_voltage_error, validation_message


def test_body_has_the_spec_shape() -> None:
    err = QuotaExceeded(details={"plan": "free", "usage": {"tokens_used": 1, "tokens_limit": 1}})
    body = err.body("/v1/chat/completions")
    assert body == {
        "error": "Quota exceeded",
        "details": {
            "status": 403,
            "endpoint": "/v1/chat/completions",
            "plan": "free",
            "usage": {"tokens_used": 1, "tokens_limit": 1},
        },
    }


def test_errors_survive_pickling_with_details_and_headers() -> None:
    err = RateLimited(details={"retry_after": 7}, headers={"Retry-After": "7"})
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is RateLimited
    assert copy.status == 429 and copy.details == {"retry_after": 7}
    assert copy.headers == {"Retry-After": "7"}


def test_unwrap_finds_the_cause_behind_wrappers() -> None:
    class Wrapper(Exception):
        def __init__(self, cause: BaseException) -> None:
            self.cause = cause

    inner = BadRequest("bad")
    assert unwrap(Wrapper(Wrapper(inner))) is inner


def test_unknown_exceptions_become_a_bare_500() -> None:
    err = to_voltage_error(RuntimeError("secret internals /etc/passwd"), "/v1/x", "rid")
    assert isinstance(err, VoltageError) and err.status == 500
    assert "secret" not in err.message


def test_validation_messages_are_readable() -> None:
    message, items = validation_message(
        [
            {
                "loc": ("body", "temperature"),
                "msg": "Input should be less than or equal to 2",
                "type": "less_than_equal",
            },
            {
                "loc": ("body", "foo"),
                "msg": "Extra inputs are not permitted",
                "type": "extra_forbidden",
            },
        ]
    )
    assert message.startswith("Invalid request parameters: temperature:")
    assert items[1] == {"loc": "foo", "msg": "Unrecognized request argument supplied"}
    message, _ = validation_message([{"loc": ("body", 1), "msg": "x", "type": "json_invalid"}])
    assert message == "Malformed JSON body"
