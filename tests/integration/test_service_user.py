"""``ced`` run by root acts as ``service_user`` when that user owns ``state_dir``: what it
creates (keys, locks, records) is the daemon's to use; ``issue-operator`` keeps root (it
writes where the operator says).

Run on a lab host (:mod:`ops.lab.hosts`): its own ``/etc/ctrl-exec`` and
``/var/lib/ctrl-exec``, and a ``/root`` that the service user can traverse to this Python.
"""

from __future__ import annotations

import os
import pwd
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab.hosts import Host, available, lab

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
]
UID = pwd.getpwnam("nobody").pw_uid
CONF = "/etc/ctrl-exec/ctrl-exec.conf"


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with lab(tmp_path, ["d1"]) as the_lab:
        h = the_lab.hosts["d1"]
        for d in ("/etc/ctrl-exec", "/var/lib/ctrl-exec"):
            os.chown(h.path(d), UID, -1)
        h.path(CONF).write_text("service_user = nobody\nlog_target = stderr\n")
        yield h


def ced(h: Host, *args: str) -> tuple[int, str]:
    got = h.run([sys.executable, "-m", "dispatcher.ced", "--config", CONF, *args], check=False,
                env=h.env({"PYTHONPATH": str(ROOT)}))  # fmt: skip
    return got.returncode, got.stdout + got.stderr


def test_files_ced_creates_belong_to_the_service_user(host: Host) -> None:
    rc, out = ced(host, "setup-ca")
    assert rc == 0, out
    assert host.path("/etc/ctrl-exec/ca.key").stat().st_uid == UID


def test_root_stays_root_when_the_state_is_not_the_service_users(host: Host) -> None:
    os.chown(host.path("/var/lib/ctrl-exec"), 0, -1)
    os.chown(host.path("/etc/ctrl-exec"), 0, -1)
    rc, out = ced(host, "setup-ca")
    assert rc == 0, out
    assert host.path("/etc/ctrl-exec/ca.key").stat().st_uid == 0


def test_issue_operator_keeps_root(host: Host) -> None:
    assert ced(host, "setup-ca")[0] == 0
    assert ced(host, "setup-operator-ca")[0] == 0
    host.run("install -d -m 0700 /root/operators")  # root's: the service user cannot write
    rc, out = ced(host, "issue-operator", "alice", "--out", "/root/operators")
    assert rc == 0, out
    assert host.path("/root/operators/alice.key").stat().st_uid == 0
    assert host.path("/etc/ctrl-exec/operator-ca.key").stat().st_uid == UID
