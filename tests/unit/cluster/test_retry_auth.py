"""The retry policies and refused credentials: a lapsed token is renewed once; refused
credentials are never repeated by the time-bounded policies."""

from __future__ import annotations

import time

import pytest

from cluster.errors import AccessDenied, BackendUnavailable
from cluster.retry import backend_call, keepalive_call, reauth_call


class Lapsed(BackendUnavailable):
    pass


def test_reauth_renews_once_then_succeeds() -> None:
    calls: list[str] = []

    def fn() -> str:
        calls.append("call")
        if calls.count("call") == 1:
            raise Lapsed("invalid auth token")
        return "ok"

    out = reauth_call(fn, expired=lambda e: isinstance(e, Lapsed),
                      renew=lambda: calls.append("renew"))  # fmt: skip
    assert out == "ok" and calls == ["call", "renew", "call"]


def test_reauth_gives_up_after_one_renewal() -> None:
    calls: list[str] = []

    def fn() -> str:
        calls.append("call")
        raise Lapsed("invalid auth token")

    with pytest.raises(Lapsed):
        reauth_call(fn, expired=lambda e: isinstance(e, Lapsed),
                    renew=lambda: calls.append("renew"))  # fmt: skip
    assert calls == ["call", "renew", "call"]


def test_reauth_leaves_other_errors_alone() -> None:
    renewed: list[int] = []

    def fn() -> str:
        raise BackendUnavailable("down")

    with pytest.raises(BackendUnavailable):
        reauth_call(fn, expired=lambda e: isinstance(e, Lapsed), renew=lambda: renewed.append(1))
    assert renewed == []


@pytest.mark.parametrize("policy", ["backend_call", "keepalive_call"])
def test_refused_credentials_are_not_retried(policy: str) -> None:
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        raise AccessDenied("etcd at https://e1:2379 refused user 'ctrl-exec'")

    with pytest.raises(AccessDenied):
        if policy == "backend_call":
            backend_call(fn, deadline=time.monotonic() + 5)
        else:
            keepalive_call(fn, give_up_at=time.monotonic() + 5, interval=0.01)
    assert calls == [1]


def test_an_unreachable_store_is_still_retried() -> None:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise BackendUnavailable("down")
        return "up"

    assert backend_call(fn, deadline=time.monotonic() + 5) == "up" and len(calls) == 3
