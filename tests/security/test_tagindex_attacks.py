"""A forged tag index (``<registry_dir>/.index/tags.json``) cannot widen a ``--tags`` run.

The index is a cache; whoever can write it could name any agent under any tag. Each
attack must fail to act (the agent without the tag is not selected) and leave the
registry records unchanged; each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from dispatcher import tagindex
from dispatcher.registry import Registry
from dispatcher.targets import Selection, parse_tags, select


def _snapshot(reg: Registry) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in reg.dir.glob("*.json")}


def _forge(reg: Registry, tags: dict[str, dict[str, list[str]]]) -> None:
    """Write an index carrying the directory's current stamp (so it is trusted as current)."""
    path = tagindex.index_path(reg)
    path.parent.mkdir(exist_ok=True)
    past = time.time() - 60
    os.utime(reg.dir, (past, past))
    st = os.stat(reg.dir)
    doc = {"version": tagindex.VERSION, "dir": [st.st_dev, st.st_ino, st.st_mtime_ns],
           "tags": tags}  # fmt: skip
    path.write_text(json.dumps(doc))
    os.utime(reg.dir, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_forged_index_cannot_add_an_agent_to_a_tag(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "agents")
    reg.register("web1", ip="10.0.0.1", tags={"role": "web"})
    reg.register("db1", ip="10.0.0.2", tags={"role": "db"})
    before = _snapshot(reg)
    _forge(reg, {"role": {"web": ["web1", "db1", "ghost"]}})
    got = select(reg, Selection(tags=parse_tags("role=web"), strict=False), 7443, 500)
    assert [t.name for t in got.targets] == ["web1"] and got.unknown == []
    assert _snapshot(reg) == before
    print("[attack] forged tag index names db1 and a ghost under role=web: refused (each "
          "candidate's record re-checked; only web1 selected, records unchanged)")  # fmt: skip


def test_forged_index_with_traversal_names_selects_nothing_outside(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "agents")
    reg.register("web1", ip="10.0.0.1", tags={"role": "web"})
    (tmp_path / "evil.json").write_text(json.dumps({"hostname": "evil", "ip": "6.6.6.6",
                                                    "tags": {"role": "web"}}))  # fmt: skip
    before = _snapshot(reg)
    _forge(reg, {"role": {"web": ["web1", "../evil", "/etc/passwd"]}})
    got = select(reg, Selection(tags=parse_tags("role=web"), strict=False), 7443, 500)
    assert [t.name for t in got.targets] == ["web1"]
    assert all(t.address != "6.6.6.6" for t in got.targets)
    assert _snapshot(reg) == before
    print("[attack] forged tag index with ../evil and /etc/passwd names: refused (names come "
          "from the registry listing; the index only narrows them)")  # fmt: skip
