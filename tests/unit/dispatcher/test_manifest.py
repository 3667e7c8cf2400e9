"""Manifest entries: permission bits from the store are masked to 0o777."""

from __future__ import annotations

import pytest

from dispatcher.ha.manifest import Entry


@pytest.mark.parametrize("mode", [0o4777, 0o2755, 0o1777, 0o104600])
def test_setuid_setgid_sticky_and_type_bits_never_pass(mode: int) -> None:
    e = Entry.from_json({"path": "ca/ca.key", "mode": mode, "size": 1, "sha256": "0" * 64})
    assert e.mode == mode & 0o777
    assert e.mode & ~0o777 == 0
