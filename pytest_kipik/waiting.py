"""Waiting for a condition with a deadline, and saying exactly what was awaited when it fails."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from pytest_kipik.errors import WaitTimeout

T = TypeVar("T")


class NotYet(Exception):
    """Raised by a check that is not satisfied yet; its message is the state it saw."""


def wait_until(
    check: Callable[[], T],
    *,
    what: str,
    timeout: float,
    hint: str,
    interval: float = 0.2,
) -> T:
    """Call ``check`` until it returns instead of raising :class:`NotYet`, or time runs out.

    Raises :class:`WaitTimeout` naming ``what`` was awaited, the last state ``check``
    reported, and ``hint``.
    """
    retrying = Retrying(
        stop=stop_after_delay(max(timeout, 0.0)),
        wait=wait_fixed(interval),
        retry=retry_if_exception_type(NotYet),
        reraise=False,
    )
    try:
        return retrying(check)
    except RetryError as exc:
        last = exc.last_attempt.exception()
        raise WaitTimeout(what, timeout, str(last) or "(nothing)", hint) from None
