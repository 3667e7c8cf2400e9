"""A resumed TLS session shows the certificate of its first handshake again: the session
cache offers a session only while the registry pins that one serial, so a pending renewal
(two serials) or a promoted one (another serial) forces a full handshake."""

from __future__ import annotations

from typing import Any, cast

from dispatcher.client.wire import SessionCache


def test_a_session_is_offered_only_while_its_serial_is_the_one_pinned() -> None:
    cache = SessionCache()
    session = cast(Any, object())
    cache.put("10.0.0.7", 7443, session, "aa01")
    assert cache.get("10.0.0.7", 7443) is session  # unpinned (an upstream record)
    assert cache.get("10.0.0.7", 7443, ("aa01",)) is session
    assert cache.get("10.0.0.7", 7443, ("aa01", "bb02")) is None  # renewal pending
    assert cache.get("10.0.0.7", 7443, ("bb02",)) is None  # promoted: a new certificate
    cache.put("10.0.0.7", 7443, session, None)  # made without knowing the serial
    assert cache.get("10.0.0.7", 7443, ("aa01",)) is None
