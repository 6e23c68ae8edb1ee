"""Serve's replica log without the refusals a model replica answers in the normal course.

Serve logs every exception a replica method raises as ``Request failed.`` with its traceback.
A request refused for the client's own fault (a 4xx) or because the model's fair queue holds no
place for it (:class:`Overloaded`) is an answer, not a failure: under a flood, thousands of
tracebacks a second would cost the replica the CPU it serves with. This filter drops those
records; every other failure is logged as before.
"""

from __future__ import annotations

import logging

from voltage_ray.errors import Overloaded, VoltageError

SERVE_LOGGER = "ray.serve"


class RefusalFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, VoltageError):
            return True
        return not (error.status < 500 or isinstance(error, Overloaded))


def quiet_refusals() -> None:
    """Install the filter on Serve's logger, once per process."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, RefusalFilter) for f in logger.filters):
        logger.addFilter(RefusalFilter())
