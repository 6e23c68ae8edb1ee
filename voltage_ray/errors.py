"""The one exception hierarchy a client can see.

Every error rendered to a client is a :class:`VoltageError` carrying its HTTP status and the
spec's ``details``; one handler in the ingress renders them all as
``{"error": message, "details": {"status", "endpoint", ...}}``. Nothing else maps to a 4xx.
Exceptions stay picklable: they cross Ray actor boundaries (model replicas, the limiter).
"""

from __future__ import annotations

from typing import Any


class VoltageError(Exception):
    """Base class: an error with an HTTP status and extra spec ``details``."""

    status: int = 500
    default_message: str = "Internal server error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = dict(details or {})
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments are not restored by the default reduce.
        return (_rebuild, (type(self), self.message, self.details, self.headers))

    def body(self, endpoint: str, **extra: Any) -> dict[str, Any]:
        """The spec's error body for this error raised at ``endpoint``."""
        details: dict[str, Any] = {"status": self.status, "endpoint": endpoint}
        details.update(self.details)
        details.update(extra)
        return {"error": self.message, "details": details}


def _rebuild(
    cls: type[VoltageError], message: str, details: dict[str, Any], headers: dict[str, str]
) -> VoltageError:
    return cls(message, details=details, headers=headers)


class BadRequest(VoltageError):
    """400: the request is malformed or a parameter is out of range."""

    status = 400
    default_message = "Invalid request parameters"


class Unauthorized(VoltageError):
    """401: missing, unknown or revoked API key."""

    status = 401
    default_message = "Invalid or missing API key"


class QuotaExceeded(VoltageError):
    """403: the key's plan has no quota left for this request."""

    status = 403
    default_message = "Quota exceeded"


class Forbidden(VoltageError):
    """403: the key's plan does not allow this request (a model outside its allow-list)."""

    status = 403
    default_message = "Forbidden"


class NotFound(VoltageError):
    """404: unknown route, model or image."""

    status = 404
    default_message = "Not found"


class Conflict(VoltageError):
    """409: a request with the same Idempotency-Key is still being answered; retry shortly."""

    status = 409
    default_message = "A request with this Idempotency-Key is in progress"


class PayloadTooLarge(VoltageError):
    """413: the request body is larger than the configured limit."""

    status = 413
    default_message = "Request body too large"


class RateLimited(VoltageError):
    """429: the key's plan allows no more requests right now."""

    status = 429
    default_message = "Rate limit exceeded"


class InternalError(VoltageError):
    """500: an unexpected failure; the client sees only a request id."""

    status = 500
    default_message = "Internal server error"


class ServiceUnavailable(VoltageError):
    """503: a dependency (a model, the limiter) is not ready; try again shortly."""

    status = 503
    default_message = "Service temporarily unavailable"


class Overloaded(ServiceUnavailable):
    """503: the model's queue is full for this request's key (it holds its fair share, or gave
    way to a key under its share); retry shortly. ``details.reason``: ``refused`` or ``shed``."""

    default_message = "The model is at capacity; retry shortly"

    @classmethod
    def at(cls, model: str, max_queued: int | None, reason: str) -> Overloaded:
        return cls(
            f"Model '{model}' is at capacity; retry shortly",
            details={"model": model, "max_queued_requests": max_queued, "reason": reason},
            headers={"Retry-After": "1"},
        )


class GatewayTimeout(VoltageError):
    """504: a model call exceeded its deadline."""

    status = 504
    default_message = "Model call timed out"


def shown(value: str, limit: int = 80) -> str:
    """A client's string as an error message repeats it: at most ``limit`` characters (a
    megabyte of model name is not echoed back whole)."""
    return value if len(value) <= limit else value[:limit] + "..."


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind Ray's wrappers (RayTaskError and friends)."""
    seen = 0
    while seen < 8:
        cause = getattr(exc, "cause", None)
        if isinstance(exc, VoltageError) and type(exc).__module__ == __name__:
            return exc
        if cause is None or cause is exc or not isinstance(cause, BaseException):
            return exc
        exc = cause
        seen += 1
    return exc
