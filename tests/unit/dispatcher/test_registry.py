from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispatcher.registry import FIELDS, PIN_FIELDS, Registry, RegistryError, Target, resolve
from dispatcher.statewrite import LocalWriter

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


@pytest.fixture
def reg(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "agents", LocalWriter())


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class _H(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    log = logging.getLogger("ctrl-exec")
    h, old = _H(), log.level
    log.addHandler(h)
    log.setLevel(logging.DEBUG)
    yield records
    log.removeHandler(h)
    log.setLevel(old)


class RecordingWriter(LocalWriter):
    def __init__(self) -> None:
        self.writes: list[Path] = []
        self.deletes: list[Path] = []

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        self.writes.append(Path(path))
        super().write(path, data, mode)

    def delete(self, path: str | Path) -> bool:
        self.deletes.append(Path(path))
        return super().delete(path)


class FencedWriter(LocalWriter):
    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        raise RuntimeError("fenced")

    def delete(self, path: str | Path) -> bool:
        raise RuntimeError("fenced")


def _files(d: Path) -> list[str]:
    return sorted(os.listdir(d))


# --- register / get ---------------------------------------------------------------


def test_register_writes_upstream_record(reg: Registry) -> None:
    rec = reg.register(
        "web1",
        ip="10.0.0.5",
        reqid="abc",
        expiry="Jan  1 00:00:00 2030 GMT",
        dispatcher_serial="1a2b",
        tags={"env": "prod"},
    )
    on_disk = json.loads(reg.path_of("web1").read_text())
    assert on_disk == rec
    assert set(on_disk) == set(FIELDS) - set(PIN_FIELDS)  # no pins given
    assert on_disk["hostname"] == "web1"
    assert on_disk["port"] == 7443 and on_disk["lookup_by"] == "hostname"
    assert on_disk["serial_status"] == "current"
    assert ISO.match(on_disk["paired"]) and on_disk["serial_confirmed"] == on_disk["paired"]
    assert on_disk["serial_broadcast"] == ""
    assert on_disk["tags"] == {"env": "prod"}
    assert stat.S_IMODE(reg.path_of("web1").stat().st_mode) == 0o644


def test_register_without_serial_is_unknown(reg: Registry) -> None:
    rec = reg.register("web1", ip="10.0.0.5")
    assert rec["serial_status"] == "unknown"
    assert rec["serial_confirmed"] == "" and rec["dispatcher_serial"] == ""
    assert rec["tags"] == {}


@pytest.mark.parametrize(
    "kwargs", [{"port": 0}, {"port": 70000}, {"port": True}, {"lookup_by": "dns"}]
)
def test_register_rejects_bad_values(reg: Registry, kwargs: dict[str, Any]) -> None:
    with pytest.raises(RegistryError):
        reg.register("web1", ip="10.0.0.5", **kwargs)
    assert reg.get("web1") is None


@pytest.mark.parametrize(
    "name", ["", "../x", "a/b", ".hidden", "-x", "x\n", "a b", "..", "x/../../etc"]
)
def test_bad_names_rejected(reg: Registry, name: str) -> None:
    with pytest.raises(RegistryError):
        reg.path_of(name)
    with pytest.raises(RegistryError):
        reg.register(name, ip="1.2.3.4")
    with pytest.raises(RegistryError):
        reg.get(name)
    assert not reg.dir.exists() or all(f.endswith(".lock") for f in _files(reg.dir))


def test_get_missing_and_missing_dir(reg: Registry) -> None:
    assert reg.get("nope") is None
    assert reg.names() == []
    assert reg.all() == []


def test_corrupt_record_skipped_with_warning(
    reg: Registry, logged: list[logging.LogRecord]
) -> None:
    reg.register("b", ip="1.1.1.2")
    reg.register("a", ip="1.1.1.1")
    reg.path_of("c").write_text("{not json")
    reg.path_of("d").write_text("[1, 2]")
    assert reg.get("c") is None
    assert [r["hostname"] for r in reg.all()] == ["a", "b"]
    assert any(r.levelno == logging.WARNING and "c" in r.getMessage() for r in logged)
    assert reg.names() == ["a", "b", "c", "d"]


def test_names_ignore_lock_temp_and_foreign_files(reg: Registry) -> None:
    reg.register("zeta", ip="1.1.1.1")
    reg.register("alpha.example.com", ip="1.1.1.2")
    (reg.dir / ".zeta.json.abc.tmp").write_text("x")
    (reg.dir / ".evil.json").write_text("{}")
    (reg.dir / "notes.txt").write_text("x")
    assert reg.names() == ["alpha.example.com", "zeta"]


def test_all_sorted_by_hostname(reg: Registry) -> None:
    for n in ["m", "B", "a"]:
        reg.register(n, ip="1.1.1.1")
    assert [r["hostname"] for r in reg.all()] == ["B", "a", "m"]


# --- update / update_many ---------------------------------------------------------


def test_update_merges_fields(reg: Registry) -> None:
    reg.register("web1", ip="10.0.0.5", dispatcher_serial="aa")
    rec = reg.update("web1", serial_status="pending", serial_broadcast="2030-01-01T00:00:00Z")
    assert rec["serial_status"] == "pending" and rec["ip"] == "10.0.0.5"
    assert reg.get("web1") == rec


def test_update_absent_raises(reg: Registry) -> None:
    with pytest.raises(RegistryError, match="no registry entry"):
        reg.update("ghost", ip="1.1.1.1")
    assert reg.get("ghost") is None


@pytest.mark.parametrize(
    "fields",
    [
        {"hostname": "x"},
        {"bogus": "1"},
        {"serial_status": "confirmed"},
        {"port": "7443"},
        {"tags": {"a": 1}},
        {"ip": 5},
    ],
)
def test_update_rejects_bad_fields(reg: Registry, fields: dict[str, Any]) -> None:
    reg.register("web1", ip="10.0.0.5")
    before = reg.path_of("web1").read_bytes()
    with pytest.raises(RegistryError):
        reg.update("web1", **fields)
    assert reg.path_of("web1").read_bytes() == before


def test_update_corrupt_raises(reg: Registry) -> None:
    reg.dir.mkdir(parents=True)
    reg.path_of("bad").write_text("{")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.update("bad", ip="1.1.1.1")


def test_update_many(reg: Registry) -> None:
    for n in ["a", "b", "c"]:
        reg.register(n, ip="1.1.1.1")
    reg.path_of("d").write_text("garbage")
    assert reg.update_many(["a", "c", "d", "missing"], serial_status="stale") == 2
    assert [r["serial_status"] for r in reg.all()] == ["stale", "unknown", "stale"]


def test_update_many_validates_all_names_first(reg: Registry) -> None:
    reg.register("a", ip="1.1.1.1")
    with pytest.raises(RegistryError):
        reg.update_many(["a", "../x"], serial_status="stale")
    assert reg.get("a")["serial_status"] == "unknown"  # type: ignore[index]


# --- delete / rename --------------------------------------------------------------


def test_delete(reg: Registry) -> None:
    reg.register("a", ip="1.1.1.1")
    assert reg.delete("a") is True
    assert reg.delete("a") is False
    assert reg.get("a") is None


def test_rename(reg: Registry) -> None:
    reg.register("old", ip="1.1.1.1", reqid="r1")
    rec = reg.rename("old", "new.example")
    assert rec["hostname"] == "new.example" and rec["reqid"] == "r1"
    assert reg.names() == ["new.example"]
    assert reg.get("new.example") == rec


def test_rename_refuses_existing_and_absent(reg: Registry) -> None:
    reg.register("a", ip="1.1.1.1")
    reg.register("b", ip="2.2.2.2")
    with pytest.raises(RegistryError, match="already exists"):
        reg.rename("a", "b")
    assert reg.get("b")["ip"] == "2.2.2.2"  # type: ignore[index]
    assert reg.get("a") is not None
    with pytest.raises(RegistryError):
        reg.rename("ghost", "c")
    with pytest.raises(RegistryError):
        reg.rename("a", "../c")
    assert reg.names() == ["a", "b"]


# --- writer seam and atomicity ----------------------------------------------------


def test_every_write_goes_through_writer(tmp_path: Path) -> None:
    w = RecordingWriter()
    reg = Registry(tmp_path, w)
    reg.register("a", ip="1.1.1.1")
    reg.update("a", ip="1.1.1.2")
    reg.update_many(["a"], serial_status="pending")
    reg.rename("a", "b")
    reg.delete("b")
    assert w.writes == [tmp_path / "a.json"] * 3 + [tmp_path / "b.json"]
    assert w.deletes == [tmp_path / "a.json", tmp_path / "b.json"]


def test_fenced_writer_blocks_changes(tmp_path: Path) -> None:
    Registry(tmp_path).register("a", ip="1.1.1.1")
    before = (tmp_path / "a.json").read_bytes()
    fenced = Registry(tmp_path, FencedWriter())
    for call in (
        lambda: fenced.update("a", ip="9.9.9.9"),
        lambda: fenced.register("a", ip="9.9.9.9"),
        lambda: fenced.delete("a"),
        lambda: fenced.rename("a", "b"),
    ):
        with pytest.raises(RuntimeError, match="fenced"):
            call()
    assert (tmp_path / "a.json").read_bytes() == before
    assert _files(tmp_path) == [".registry.lock", "a.json"]


def test_no_temp_files_left(reg: Registry) -> None:
    for i in range(5):
        reg.register(f"h{i}", ip="1.1.1.1")
        reg.update(f"h{i}", ip="1.1.1.2")
    reg.rename("h0", "x")
    assert _files(reg.dir) == [
        ".registry.lock",
        "h1.json",
        "h2.json",
        "h3.json",
        "h4.json",
        "x.json",
    ]


# --- locking ----------------------------------------------------------------------


def test_lock_is_reentrant(reg: Registry) -> None:
    reg.register("a", ip="1.1.1.1")
    with reg.locked(), reg.locked():
        reg.update("a", ip="2.2.2.2")
    assert reg.get("a")["ip"] == "2.2.2.2"  # type: ignore[index]


HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o660)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
    """
)


def test_update_waits_for_lock_held_by_other_process(reg: Registry) -> None:
    reg.register("a", ip="1.1.1.1")
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(reg.dir / ".registry.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "locked"
        t = threading.Thread(target=reg.update, args=("a",), kwargs={"ip": "3.3.3.3"})
        t.start()
        t.join(0.3)
        assert t.is_alive(), "update did not wait for the registry lock"
        assert reg.get("a")["ip"] == "1.1.1.1"  # type: ignore[index]
        child.stdin.write("go\n")
        child.stdin.flush()
        t.join(5)
        assert not t.is_alive()
        assert reg.get("a")["ip"] == "3.3.3.3"  # type: ignore[index]
    finally:
        child.kill()
        child.wait()


INCREMENTER = textwrap.dedent(
    """
    import sys
    from dispatcher.registry import Registry
    reg = Registry(sys.argv[1])
    for _ in range(int(sys.argv[2])):
        with reg.locked():
            n = int(reg.get("c")["reqid"])
            reg.update("c", reqid=str(n + 1))
    """
)


def test_no_lost_updates_across_processes(reg: Registry) -> None:
    reg.register("c", ip="1.1.1.1", reqid="0")
    root = Path(__file__).resolve().parents[3]
    procs = [
        subprocess.Popen([sys.executable, "-c", INCREMENTER, str(reg.dir), "25"], cwd=root)
        for _ in range(4)
    ]
    assert [p.wait(30) for p in procs] == [0, 0, 0, 0]
    assert reg.get("c")["reqid"] == "100"  # type: ignore[index]


# --- resolve ----------------------------------------------------------------------


def test_resolve_addresses_and_ports(reg: Registry) -> None:
    reg.register("web1", ip="10.0.0.1")
    reg.register("db1", ip="10.0.0.2", lookup_by="ip", port=9443)
    reg.register("noip", ip="", lookup_by="ip")
    got = resolve(reg, ["web1", "db1", "db1:7000", "noip"], default_port=8000)
    assert got == [
        Target("web1", "web1", 7443),
        Target("db1", "10.0.0.2", 9443),
        Target("db1", "10.0.0.2", 7000),
        Target("noip", "noip", 7443),
    ]


def test_resolve_default_port_when_record_has_none(reg: Registry) -> None:
    reg.register("web1", ip="10.0.0.1")
    rec = json.loads(reg.path_of("web1").read_text())
    del rec["port"]
    reg.path_of("web1").write_text(json.dumps(rec))
    assert resolve(reg, ["web1"], default_port=8000) == [Target("web1", "web1", 8000)]


def test_resolve_unknown_lists_all(reg: Registry) -> None:
    reg.register("web1", ip="10.0.0.1")
    with pytest.raises(RegistryError) as ei:
        resolve(reg, ["a", "web1", "../etc/passwd", "b:7443", "a"])
    assert str(ei.value) == "unknown agent(s): a, ../etc/passwd, b:7443"


def test_resolve_bad_port_and_duplicates(reg: Registry) -> None:
    reg.register("web1", ip="10.0.0.1")
    with pytest.raises(RegistryError, match="invalid port"):
        resolve(reg, ["web1:0"])
    with pytest.raises(RegistryError, match="invalid port"):
        resolve(reg, ["web1:65536"])
    assert resolve(reg, ["web1", "web1:7443", "web1"]) == [Target("web1", "web1", 7443)]
    assert resolve(reg, []) == []
