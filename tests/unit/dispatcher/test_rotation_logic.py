"""Decision logic of rotation and renewal (no agent processes)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from agent.common.certs import openssl_date
from dispatcher.pki import ca as pki
from dispatcher.pki import rotation
from dispatcher.pki import rotation_state as rs
from dispatcher.pki.renewal import expiry_epoch, is_staged, renewal_due
from dispatcher.pki.rotation import (
    acknowledged,
    all_acknowledged,
    days_left,
    retirement_reason,
    rotation_due,
    stale_candidates,
)
from ops.lab.dispatcherenv import make_env

DAY = 86400
NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z


def expiry_in(seconds: float, now: float = NOW) -> str:
    import datetime as dt

    return openssl_date(dt.datetime.fromtimestamp(now + seconds, dt.UTC))


def ping(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"status": "ok", "staged": False, "expiry": expiry_in(100 * DAY)}
    base.update(kw)
    return base


def rec(name: str, status: str, serial: str) -> dict[str, Any]:
    return {"hostname": name, "serial_status": status, "dispatcher_serial": serial}


def state(now: float = NOW, days: int = 30, previous: str | None = "a1") -> rs.RotationState:
    s = rs.RotationState.new("b2c3", "a1", days, now)
    return s if previous else s.retired(now)


# ----- renewal trigger (spec 4.5) ------------------------------------------------------------


def test_renewal_due_threshold_is_half_of_cert_days() -> None:
    half = 365 / 2 * DAY  # 182.5 days
    assert renewal_due(ping(expiry=expiry_in(half - 60)), 365, NOW)
    assert not renewal_due(ping(expiry=expiry_in(half + 60)), 365, NOW)
    assert not renewal_due(ping(expiry=expiry_in(825 * DAY)), 365, NOW)
    assert renewal_due(ping(expiry=expiry_in(-DAY)), 365, NOW)  # already expired
    assert renewal_due(ping(expiry=expiry_in(300 * DAY)), 1000, NOW)  # follows cert_days


@pytest.mark.parametrize(
    "override",
    [
        {"status": "error"},
        {"staged": True},
        {"staged": 1},
        {"staged": "1"},
        {"staged": "true"},
        {"expiry": ""},
        {"expiry": None},
        {"expiry": "not a date"},
    ],
)
def test_renewal_not_due(override: dict[str, Any]) -> None:
    assert not renewal_due(ping(expiry=expiry_in(DAY)) | override, 365, NOW)


def test_staged_and_expiry_parsing() -> None:
    assert not is_staged(False) and not is_staged(0) and not is_staged("0")
    assert not is_staged("false") and not is_staged(None)
    assert is_staged(True) and is_staged("yes")
    assert expiry_epoch("Jan 15 08:00:00 2027 GMT") == NOW
    assert expiry_epoch("Jan  5 08:00:00 2027 GMT") == NOW - 10 * DAY
    assert expiry_epoch(42) is None


# ----- rotation due ----------------------------------------------------------------------------


def test_days_left_truncates_like_upstream() -> None:
    assert days_left(NOW + 90 * DAY, NOW) == 90
    assert days_left(NOW + 90 * DAY + DAY - 1, NOW) == 90
    assert days_left(NOW + 90 * DAY - 1, NOW) == 89
    assert days_left(NOW - DAY / 2, NOW) == 0  # toward zero, as Perl int()
    assert days_left(NOW - 2 * DAY, NOW) == -2


def test_rotation_due_at_or_below_threshold() -> None:
    assert rotation_due(90, 90)
    assert rotation_due(0, 90) and rotation_due(-5, 90)
    assert not rotation_due(91, 90)


# ----- overlap arithmetic and retirement ---------------------------------------------------------


def test_overlap_arithmetic() -> None:
    s = state(days=30)
    assert s.overlap_expires_at() == NOW + 30 * DAY
    assert s.overlap_expires == rs.format_iso(NOW + 30 * DAY)
    assert not s.overlap_over(NOW + 30 * DAY)  # strictly after, as upstream
    assert s.overlap_over(NOW + 30 * DAY + 1)
    assert rs.RotationState.new("b", "a", 0, NOW).overlap_over(NOW + 1)


def test_retirement_waits_for_overlap_or_everyone() -> None:
    s = state()
    one_pending = [rec("a", "current", "b2c3"), rec("b", "pending", "a1")]
    all_current = [rec("a", "current", "b2c3"), rec("b", "current", "B2C3")]
    assert retirement_reason(s, one_pending, NOW + DAY) is None
    assert retirement_reason(s, all_current, NOW + DAY) == "all-acknowledged"
    assert retirement_reason(s, one_pending, NOW + 31 * DAY) == "overlap-expired"
    assert retirement_reason(s, one_pending, NOW + DAY, force=True) == "forced"
    # "current" on an older serial is not an acknowledgement of this rotation.
    stale_current = [rec("a", "current", "b2c3"), rec("b", "current", "a1")]
    assert retirement_reason(s, stale_current, NOW + DAY) is None
    # A stale or unknown agent holds early retirement back too.
    for status in ("stale", "unknown"):
        assert retirement_reason(s, [rec("a", "current", "b2c3"), rec("b", status, "")],
                                 NOW + DAY) is None  # fmt: skip
    # Nothing to retire.
    assert retirement_reason(None, all_current, NOW + 99 * DAY) is None
    assert retirement_reason(state(previous=None), all_current, NOW + 99 * DAY, True) is None
    # No agents at all: nobody left to tell, early retirement is fine.
    assert retirement_reason(s, [], NOW + DAY) == "all-acknowledged"


def test_acknowledged_compares_canonical_serials() -> None:
    assert acknowledged(rec("a", "current", "0B2C3"), "b2c3")
    assert acknowledged(rec("a", "current", "0b:2c:3"), "b2c3")
    assert not acknowledged(rec("a", "current", "b2c4"), "b2c3")
    assert not acknowledged(rec("a", "pending", "b2c3"), "b2c3")
    assert not acknowledged({"hostname": "a"}, "b2c3")
    assert all_acknowledged([], "b2c3")


def test_stale_only_after_overlap_and_only_pending() -> None:
    s = state()
    recs = [rec("p", "pending", "a1"), rec("c", "current", "b2c3"), rec("u", "unknown", "")]
    assert stale_candidates(s, recs, NOW + 30 * DAY) == []
    assert stale_candidates(s, recs, NOW + 30 * DAY + 1) == ["p"]
    assert stale_candidates(None, recs, NOW + 99 * DAY) == []


# ----- state handling without agents (files only) -----------------------------------------------


def test_rotate_without_agents_then_retire_early(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    d, cfg = env.d, env.d.cfg
    old = pki.cert_serial_hex(cfg.cert)
    report = asyncio.run(rotation.rotate(d, now=NOW))
    assert report["old_serial"] == old and report["agents_pending"] == 0
    assert pki.cert_serial_hex(cfg.cert) == report["new_serial"]
    assert Path(cfg.key).stat().st_mode & 0o777 == 0o600
    assert Path(f"{cfg.key}.prev").stat().st_mode & 0o777 == 0o600
    s = rs.load(cfg.rotation_file)
    assert s is not None and s.overlap_expires == rs.format_iso(NOW + 30 * DAY)
    # every write went through the writer
    written = {p for op, p in env.writer.log if op == "write"}
    assert {cfg.cert, cfg.key, cfg.rotation_file, f"{cfg.cert}.prev"} <= written
    res = asyncio.run(rotation.retire(d, now=NOW + 1))
    assert res["retired"] is True and res["reason"] == "all-acknowledged"
    assert rotation.serial_status(d)["state"]["previous_retired"] == rs.format_iso(NOW + 1)


def test_interrupted_install_is_finished_before_retiring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = make_env(tmp_path)
    d, cfg = env.d, env.d.cfg
    old = pki.cert_serial_hex(cfg.cert)
    real_install = rotation._install

    def crash(*a: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(rotation, "_install", crash)
    with pytest.raises(OSError):
        asyncio.run(rotation.rotate(d, now=time.time()))
    s = rs.load(cfg.rotation_file)
    assert s is not None and s.previous_serial == old and s.unfinished
    assert pki.cert_serial_hex(cfg.cert) == old  # the crash left the old pair live
    monkeypatch.setattr(rotation, "_install", real_install)
    res = asyncio.run(rotation.retire(d))  # the intent is not finished: nothing to retire
    assert res["retired"] is False and res["reason"] == "rotation not finished yet"
    asyncio.run(rotation.broadcast(d))  # maintain's broadcast finishes it (the pair is here)
    assert not rs.load(cfg.rotation_file).unfinished  # type: ignore[union-attr]
    res = asyncio.run(rotation.retire(d))
    assert res["retired"] is True
    assert pki.cert_serial_hex(cfg.cert) == s.current_serial
    assert not Path(f"{cfg.cert}.next").exists()


def test_retire_refuses_when_installed_cert_is_not_current(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    d, cfg = env.d, env.d.cfg
    old = pki.cert_serial_hex(cfg.cert)
    rs.save(rs.RotationState.new("abc123def", old, 30, NOW), cfg.rotation_file, d.writer)
    res = asyncio.run(rotation.retire(d, now=NOW + 31 * DAY))
    assert res["retired"] is False and "refusing to retire" in res["error"]
    assert rs.load(cfg.rotation_file).previous_serial == old  # type: ignore[union-attr]


def test_check_and_rotate_threshold(tmp_path: Path) -> None:
    env = make_env(tmp_path, cert_renewal_days=90)
    d, cfg = env.d, env.d.cfg
    not_after = rotation.cert_not_after(cfg.cert)
    assert asyncio.run(rotation.check_and_rotate(d, not_after - 91 * DAY)) is None
    report = asyncio.run(rotation.check_and_rotate(d, not_after - 90 * DAY))
    assert report is not None and report["rotated"] == 1


def test_second_rotation_retires_the_first_previous_serial(tmp_path: Path) -> None:
    env = make_env(tmp_path)
    d, cfg = env.d, env.d.cfg
    first = asyncio.run(rotation.rotate(d, now=NOW))
    second = asyncio.run(rotation.rotate(d, now=NOW + DAY))
    assert second["old_serial"] == first["new_serial"]
    s = rs.load(cfg.rotation_file)
    assert s is not None
    assert (s.current_serial, s.previous_serial) == (second["new_serial"], first["new_serial"])
    assert pki.cert_serial_hex(f"{cfg.cert}.prev") == first["new_serial"]
    assert pki.cert_serial_hex(cfg.cert) == second["new_serial"]
