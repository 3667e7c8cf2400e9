"""Attacks through the new target forms (globs, tags, --all, -o DIR) against real agents.

Each must fail to act and leave nothing changed; each refusal prints
``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.test_ced import ced
from tests.integration.test_ced_fleet import Fleet, fleet  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

DENY_WEB2 = """#!/bin/sh
case ",$ENVEXEC_HOSTS," in *,web2,*) echo "web2 is off limits" >&2; exit 1 ;; esac
exit 0
"""


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _hooked(fleet: Fleet) -> Path:  # noqa: F811
    hook = fleet.tmp / "deny-web2.sh"
    hook.write_text(DENY_WEB2)
    hook.chmod(0o755)
    conf = fleet.tmp / "hooked.conf"
    conf.write_text(fleet.conf.read_text() + f"auth_hook = {hook}\n")
    return conf


@pytest.mark.parametrize("form", [["web*"], ["--tags", "role=web"], ["--all"], ["w?b[12]"]])
def test_a_wide_target_cannot_slip_a_host_past_the_auth_hook(
    fleet: Fleet,  # noqa: F811
    form: list[str],
    tmp_path: Path,
) -> None:
    conf = _hooked(fleet)
    out = tmp_path / "out"
    p = ced("run", "-o", str(out), *form, "echo-args", conf=conf)
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Denied" in p.stderr and "==>" not in p.stdout
    assert not out.exists()  # no host ran: nothing written
    assert ced("list-locks", conf=conf).stdout == "No locks currently held.\n"
    allowed = ced("run", "web1", "echo-args", conf=conf)
    assert allowed.returncode == 0  # the hook itself lets web1 through
    print(f"[attack] {' '.join(form)} hides web2 from the auth hook: refused (the hook saw "
          "the resolved names, denied, nothing ran)")  # fmt: skip


def test_output_dir_never_writes_outside_itself(fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "root"
    out = root / "out"
    out.mkdir(parents=True)
    refs = ["../evil", "../../evil2", "/tmp/evil3", "..", "../*", "web1"]
    p = ced("run", "-o", str(out), *refs, "echo-args", conf=fleet.conf)
    assert p.returncode == 1  # the unknown ones
    assert _files(root) == {"out", "out/web1.stdout", "out/web1.stderr", "out/web1.exit"}
    assert not os.path.exists("/tmp/evil3.stdout")
    print(
        "[attack] -o DIR with host names ../evil, /tmp/evil3, ../*: refused (unknown "
        "agents, only out/web1.* written)"
    )


def test_max_hosts_holds_for_all_and_globs(fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    conf = tmp_path / "small.conf"
    conf.write_text(fleet.conf.read_text() + "max_hosts = 2\n")
    out = tmp_path / "out"
    for form in (["--all"], ["*"], ["web*", "db*"]):
        p = ced("run", "-o", str(out), *form, "echo-args", conf=conf)
        assert p.returncode == 2, (form, p.stderr)
        assert "too many hosts (max 2)" in p.stderr and "==>" not in p.stdout
        assert "Traceback" not in p.stderr
        assert not out.exists()
        print(f"[attack] {' '.join(form)} past max_hosts = 2: refused (usage error, nothing ran)")
