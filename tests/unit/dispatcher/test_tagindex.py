"""The registry's tag index (dispatcher/tagindex.py): O(selected) reads once settled, never stale."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from dispatcher import tagindex
from dispatcher.registry import Registry
from dispatcher.targets import Selection, parse_tags, select


class CountingRegistry(Registry):
    reads = 0

    def get(self, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get(name)


def settle(reg: Registry) -> None:
    """Age the directory's mtime past SETTLE (as if the last write was a while ago)."""
    past = time.time() - tagindex.SETTLE - 5
    os.utime(reg.dir, (past, past))


def fleet(tmp_path: Path, n: int = 1000) -> CountingRegistry:
    reg = CountingRegistry(tmp_path / "agents")
    for i in range(n):
        reg.register(f"n{i:04d}", ip="10.1.0.1", tags={"rack": str(i % 10), "role": "web"})
    return reg


def chosen(reg: Registry, tags: str) -> list[str]:
    got = select(reg, Selection(tags=parse_tags(tags), strict=False), 7443, 5000)
    return [t.name for t in got.targets]


def test_settled_index_reads_only_the_selected_records(tmp_path: Path) -> None:
    reg = fleet(tmp_path)
    settle(reg)
    assert len(chosen(reg, "rack=3")) == 100  # builds (one scan) and saves
    # creating .index/ changed the directory: settle again, then the saved index is current
    settle(reg)
    chosen(reg, "rack=3")
    assert tagindex.index_path(reg).exists()
    reg.reads = 0
    assert chosen(reg, "rack=3,role=web") == [f"n{i:04d}" for i in range(3, 1000, 10)]
    assert reg.reads <= 2 * 100, reg.reads  # tags re-checked, then the target: no scan
    assert reg.names() == sorted(f"n{i:04d}" for i in range(1000))  # .index is not an agent


def test_a_write_is_never_missed(tmp_path: Path) -> None:
    reg = fleet(tmp_path, 50)
    settle(reg)
    chosen(reg, "rack=1")
    settle(reg)
    chosen(reg, "rack=1")
    saved = tagindex.index_path(reg).read_bytes()
    reg.register("late", ip="10.1.0.2", tags={"rack": "1"})  # no settle: same second
    assert "late" in chosen(reg, "rack=1")
    reg.update("n0001", tags={"rack": "2"})
    assert "n0001" not in chosen(reg, "rack=1") and "n0001" in chosen(reg, "rack=2")
    reg.delete("n0011")
    assert "n0011" not in chosen(reg, "rack=1")
    # a fresh (unsettled) index was not saved over the settled one
    assert tagindex.index_path(reg).read_bytes() == saved


def test_a_stale_index_cannot_select_an_agent_without_the_tag(tmp_path: Path) -> None:
    reg = fleet(tmp_path, 20)
    settle(reg)
    chosen(reg, "rack=1")
    settle(reg)
    chosen(reg, "rack=1")
    # edited in place (no rename: the directory's mtime does not move)
    path = reg.path_of("n0001")
    st = os.stat(reg.dir)
    rec = json.loads(path.read_text())
    rec["tags"] = {"rack": "9"}
    with open(path, "r+") as fh:
        fh.truncate(0)
        fh.write(json.dumps(rec))
    os.utime(reg.dir, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert "n0001" not in chosen(reg, "rack=1")


def test_a_corrupt_or_foreign_index_is_rebuilt(tmp_path: Path) -> None:
    reg = fleet(tmp_path, 20)
    path = tagindex.index_path(reg)
    path.parent.mkdir()
    settle(reg)
    for junk in (b"{not json", b"[]", json.dumps({"version": 1, "dir": [0, 0, 0], "tags": {
            "rack": {"1": ["n0002"]}}}).encode()):  # fmt: skip
        path.write_bytes(junk)
        assert chosen(reg, "rack=1") == ["n0001", "n0011"]


def test_matching() -> None:
    tags = {"a": {"1": ["x", "y"], "2": ["z"]}, "b": {"1": ["y", "z"]}}
    assert tagindex.matching(tags, [("a", "1"), ("b", "1")]) == {"y"}
    assert tagindex.matching(tags, [("a", "3")]) == set()
    assert tagindex.matching(tags, [("c", "1"), ("a", "1")]) == set()
