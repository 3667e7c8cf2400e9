from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent import allowlist, revocation, trustmap
from agent.common.errors import ConfigError


def test_trustmap_parse_and_canonicalise() -> None:
    text = "# header\n\nDE:AD disp-a\n0x1f disp-b # comment\n12 disp-c\nbad\nff bad id!\n"
    entries, warnings = trustmap.parse(text)
    assert entries == {"dead": "disp-a", "1f": "disp-b", "c": "disp-c"}
    assert [n for n, _ in warnings] == [6, 7]


def test_trustmap_add_remove(tmp_path: Path) -> None:
    p = tmp_path / "map"
    assert trustmap.add(p, "AB:CD", "d1") == "abcd"
    trustmap.add(p, "ef01", "d2")
    text = p.read_text()
    assert text.startswith(trustmap.HEADER)
    assert text.splitlines()[2:] == ["abcd d1", "ef01 d2"]
    with pytest.raises(PermissionError, match="not owned by 'd1'"):
        trustmap.remove(p, "ef01", "d1")
    assert trustmap.remove(p, "abcd", "d1") is True
    assert trustmap.remove(p, "abcd", "d1") is False
    assert trustmap.load(p)[0] == {"ef01": "d2"}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(ValueError):
        trustmap.add(p, "zz", "d1")
    with pytest.raises(ValueError):
        trustmap.add(p, "ab", "bad id")


def test_revocation_strict(tmp_path: Path) -> None:
    assert revocation.load(tmp_path / "absent") is None
    p = tmp_path / "revoked"
    p.write_text("# revoked\nDE:AD\n0x1f # old\n")
    assert revocation.load(p) == frozenset({"dead", "1f"})
    p.write_text("dead\nnot-a-serial\n")
    with pytest.raises(ConfigError, match=r"revoked:2:"):
        revocation.load(p)


def test_allowlist_parse(tmp_path: Path) -> None:
    (tmp_path / "ok.sh").write_text("#!/bin/sh\n")
    text = (
        f"good = {tmp_path}/ok.sh profile=web\n"
        "rel = scripts/x.sh\n"
        "two = /a /b\n"
        "none = profile=x\n"
        "bad/name = /x\n"
        "garbage line\n"
        f"outside = /etc/passwd\n"
    )
    scripts, warnings = allowlist.parse(text, "scripts.conf", [str(tmp_path)])
    assert list(scripts) == ["good"]
    assert scripts["good"].profile == "web"
    assert len(warnings) == 6
    assert warnings[0].startswith("scripts.conf:2:")


def test_allowlist_symlink_escape(tmp_path: Path) -> None:
    d = tmp_path / "scripts"
    d.mkdir()
    (d / "link.sh").symlink_to("/bin/sh")
    assert not allowlist.within_dirs(str(d / "link.sh"), [str(d)])
    assert not allowlist.within_dirs(str(d / ".." / "x"), [str(d)])
    assert allowlist.within_dirs("/anything", [])


def test_allowlist_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="allowlist not found"):
        allowlist.load(tmp_path / "nope")
