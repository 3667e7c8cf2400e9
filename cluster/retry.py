"""Every retry policy of the coordination code, on tenacity, in one place.

Failing over between etcd members inside one call is :mod:`cluster.etcd`'s job; repeating
calls over time is decided here. Each policy is bounded both in attempts and in time, and
sleeps through a caller-supplied function (normally ``threading.Event.wait``) so a stop
request cuts the wait short. Only idempotent operations are retried; nothing here ever
retries a ``/run``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

from cluster.errors import AccessDenied, BackendUnavailable

log = logging.getLogger("ctrl-exec.cluster")

T = TypeVar("T")


def _sleeper(stop: threading.Event | None) -> Callable[[float], None]:
    if stop is None:
        return time.sleep

    def sleep(seconds: float) -> None:
        stop.wait(seconds)

    return sleep


class _Custom(tenacity.stop.stop_base):
    def __init__(self, fn: Callable[[tenacity.RetryCallState], bool]) -> None:
        self._fn = fn

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._fn(retry_state)


#: what the time-bounded policies repeat: an unreachable store, not refused credentials
_retryable = tenacity.retry_if_exception_type(
    BackendUnavailable
) & tenacity.retry_if_not_exception_type(AccessDenied)


def backend_call(
    fn: Callable[[], T],
    *,
    deadline: float,
    attempts: int = 10,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Call an idempotent backend operation until it answers or ``deadline`` (monotonic) passes.

    Exponential backoff from 50 ms, capped at 0.5 s and at the time left.
    Raises the last :class:`BackendUnavailable`.
    """

    def out_of_time(_state: tenacity.RetryCallState) -> bool:
        return clock() >= deadline or (stop is not None and stop.is_set())

    retrying = tenacity.Retrying(
        retry=_retryable,
        stop=tenacity.stop_after_attempt(attempts) | _Custom(out_of_time),
        wait=tenacity.wait_exponential(multiplier=0.05, max=0.5),
        sleep=_sleeper(stop),
        reraise=True,
        before_sleep=_log_retry,
    )
    return retrying(fn)


def keepalive_call(
    fn: Callable[[], T],
    *,
    give_up_at: float,
    interval: float,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Keep a lease alive through short outages: retry every ``interval`` until ``give_up_at``.

    ``give_up_at`` is the monotonic time by which leader-only work must have stopped (the
    lease deadline minus the safety margin); after it the caller steps down.
    """

    def out_of_time(state: tenacity.RetryCallState) -> bool:
        return clock() + interval >= give_up_at or (stop is not None and stop.is_set())

    retrying = tenacity.Retrying(
        retry=_retryable,
        stop=tenacity.stop_after_attempt(50) | _Custom(out_of_time),
        wait=tenacity.wait_fixed(interval),
        sleep=_sleeper(stop),
        reraise=True,
        before_sleep=_log_retry,
    )
    return retrying(fn)


def reauth_call(
    fn: Callable[[], T],
    *,
    expired: Callable[[BaseException], bool],
    renew: Callable[[], None],
) -> T:
    """Call ``fn``; when it fails because the auth token ``expired``, ``renew`` it (drop the
    token so the next call authenticates again) and call ``fn`` once more, at once.

    etcd's simple tokens lapse after 5 idle minutes (``--auth-token-ttl``) and JWTs at
    their expiry; one fresh authentication is all a lapsed token needs, so a second
    "expired" answer is an error for the caller.
    """

    def before_retry(state: tenacity.RetryCallState) -> None:
        log.info("etcd auth token expired, authenticating again")
        renew()

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(expired),
        stop=tenacity.stop_after_attempt(2),
        wait=tenacity.wait_none(),
        before_sleep=before_retry,
        reraise=True,
    )
    return retrying(fn)


def _log_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("coordination call failed (attempt %d), retrying: %s", state.attempt_number, exc)
