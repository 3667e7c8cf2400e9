"""Target resolution (dispatcher/targets.py): names, globs, tags, all, stdin, strict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dispatcher.registry import Registry, RegistryError
from dispatcher.targets import (
    Selection,
    parse_tags,
    read_stdin_names,
    select,
    tags_of,
)


class CountingRegistry(Registry):
    """A real registry that counts record reads and directory listings."""

    reads = 0
    listings = 0

    def get(self, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return super().get(name)

    def names(self) -> list[str]:
        self.listings += 1
        return super().names()


@pytest.fixture
def reg(tmp_path: Path) -> CountingRegistry:
    r = CountingRegistry(tmp_path / "agents")
    fleet = {
        "web1": {"role": "web", "env": "prod"},
        "web2": {"role": "web", "env": "staging"},
        "web3": {"role": "web", "env": "prod"},
        "db1": {"role": "db", "env": "prod"},
        "db2": {"role": "db"},
    }
    for i, (name, tags) in enumerate(fleet.items()):
        r.register(name, ip=f"10.0.0.{i + 1}", port=7443 + i, lookup_by="ip", tags=tags)
    r.reads = r.listings = 0
    return r


def names(reg: Registry, sel: Selection, max_hosts: int = 500) -> tuple[list[str], list[str]]:
    got = select(reg, sel, 7443, max_hosts)
    return [t.name for t in got.targets], got.unknown


def test_plain_strict_is_upstreams_resolution(reg: CountingRegistry) -> None:
    assert names(reg, Selection(("db1", "web1"))) == (["db1", "web1"], [])
    with pytest.raises(RegistryError, match=r"^unknown agent\(s\): nosuch$"):
        select(reg, Selection(("web1", "nosuch")))
    t = select(reg, Selection(("web2:9000",))).targets[0]
    assert (t.name, t.address, t.port) == ("web2", "10.0.0.2", 9000)


def test_globs_expand_over_registered_names_in_order(reg: CountingRegistry) -> None:
    assert names(reg, Selection(("web*",), strict=False)) == (["web1", "web2", "web3"], [])
    assert names(reg, Selection(("db[12]", "web1"), strict=False)) == (["db1", "db2", "web1"], [])
    got = select(reg, Selection(("web?:9100",), strict=False)).targets
    assert {(t.name, t.port) for t in got} == {("web1", 9100), ("web2", 9100), ("web3", 9100)}
    # a glob that matches nothing is unknown, not silently empty
    assert names(reg, Selection(("mail*", "db1"), strict=False)) == (["db1"], ["mail*"])
    # overlapping globs and names: each agent once
    assert names(reg, Selection(("web1", "web*", "w*1"), strict=False)) == (
        ["web1", "web2", "web3"], [])  # fmt: skip


def test_glob_with_strict_and_no_match_refuses(reg: CountingRegistry) -> None:
    with pytest.raises(RegistryError, match=r"unknown agent\(s\): mail\*"):
        select(reg, Selection(("mail*", "web1"), strict=True))


def test_tags_filter_all_agents_or_the_named_ones(reg: CountingRegistry) -> None:
    assert names(reg, Selection(tags=(("role", "web"),), strict=False)) == (
        ["web1", "web2", "web3"], [])  # fmt: skip
    assert names(reg, Selection(tags=parse_tags("role=web,env=prod"), strict=False)) == (
        ["web1", "web3"], [])  # fmt: skip
    assert names(reg, Selection(("web2", "web3", "db1"), parse_tags("env=prod"), strict=False)) == (
        ["web3", "db1"], [])  # fmt: skip
    with pytest.raises(RegistryError, match="no registered agent matches tags role=mail"):
        select(reg, Selection(tags=parse_tags("role=mail"), strict=False))


def test_all_and_all_with_unknown_names(reg: CountingRegistry) -> None:
    assert names(reg, Selection(all=True, strict=False))[0] == [
        "db1",
        "db2",
        "web1",
        "web2",
        "web3",
    ]
    assert names(reg, Selection(("ghost",), all=True, strict=False))[1] == ["ghost"]
    assert names(reg, Selection(all=True, tags=parse_tags("role=db"), strict=False))[0] == [
        "db1", "db2"]  # fmt: skip


def test_unknown_reported_per_host_and_the_rest_kept(reg: CountingRegistry) -> None:
    assert names(reg, Selection(("web1", "nosuch", "../etc/passwd", "db2"), strict=False)) == (
        ["web1", "db2"], ["nosuch", "../etc/passwd"])  # fmt: skip


def test_nothing_known_is_an_error_even_without_strict(reg: CountingRegistry) -> None:
    with pytest.raises(RegistryError, match=r"unknown agent\(s\): a, b"):
        select(reg, Selection(("a", "b"), strict=False))
    with pytest.raises(RegistryError, match="no agents given"):
        select(reg, Selection())


def test_max_hosts_before_any_record_is_read(reg: CountingRegistry) -> None:
    many = tuple(f"h{i}" for i in range(20))
    with pytest.raises(ValueError, match=r"too many hosts \(max 10\)"):
        select(reg, Selection(many, strict=False), max_hosts=10)
    assert (reg.reads, reg.listings) == (0, 0)
    with pytest.raises(ValueError, match=r"too many hosts \(max 2\)"):
        select(reg, Selection(("web*",), strict=False), max_hosts=2)
    assert reg.reads == 0  # glob expansion uses the listing only
    with pytest.raises(ValueError, match=r"too many hosts \(max 4\)"):
        select(reg, Selection(all=True, strict=False), max_hosts=4)
    assert reg.reads == 0
    # with tags the limit applies to what the tags select
    assert names(reg, Selection(all=True, tags=parse_tags("role=db"), strict=False), 2)[0] == [
        "db1", "db2"]  # fmt: skip


def test_resolution_is_linear(tmp_path: Path) -> None:
    reg = CountingRegistry(tmp_path / "big")
    for i in range(300):
        reg.register(f"n{i:03d}", ip="10.1.0.1", tags={"rack": str(i % 3)})
    reg.reads = reg.listings = 0
    got = select(reg, Selection(tags=parse_tags("rack=1"), strict=False), 7443, 500)
    assert len(got.targets) == 100
    assert reg.listings <= 2 and reg.reads <= 300 + 100  # each record: tags, then target
    reg.reads = reg.listings = 0
    got = select(reg, Selection(("n*", *[f"x{i}" for i in range(50)]), strict=False), 7443, 500)
    assert len(got.targets) == 300 and len(got.unknown) == 50
    assert reg.listings <= 2 and reg.reads <= 300


def test_parse_tags_and_tags_of() -> None:
    assert parse_tags("role=web, env=prod") == (("role", "web"), ("env", "prod"))
    for bad in ("role", "=web", "role=", "ro le=x", "a=b,,c=d"):
        with pytest.raises(ValueError, match="bad tag"):
            parse_tags(bad)
    assert tags_of({"role": "web"}) == (("role", "web"),)
    with pytest.raises(ValueError):
        tags_of({"role": 1})
    with pytest.raises(ValueError):
        tags_of({"bad key": "x"})


def test_stdin_names() -> None:
    text = "web1 web2\n# a comment\n\n  db1   # trailing comment\n"
    assert read_stdin_names(text) == ["web1", "web2", "db1"]


def test_plain_selection_flag() -> None:
    assert Selection(("web1", "db1:7444")).plain
    assert not Selection(("web*",)).plain
    assert not Selection(("web1",), tags=(("a", "b"),)).plain
    assert not Selection(all=True).plain
