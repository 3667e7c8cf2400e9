"""agent.common.records behaves as the dataclasses it replaces on the CLI's start-up path."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Any

import pytest

from agent.common.records import FrozenInstanceError, field, fields, record
from ops.lab.proc import ROOT


@record
class Mutable:
    code: int | None
    body: dict[str, Any] | None
    error: str = ""
    tags: list[str] = field(default_factory=list)


@dataclasses.dataclass
class MutableDC:
    code: int | None
    body: dict[str, Any] | None
    error: str = ""
    tags: list[str] = dataclasses.field(default_factory=list)


@record(frozen=True)
class Frozen:
    name: str
    port: int = 7443

    @property
    def label(self) -> str:
        return f"{self.name}:{self.port}"


def test_init_defaults_and_factory() -> None:
    a = Mutable(200, None)
    assert (a.code, a.body, a.error, a.tags) == (200, None, "", [])
    assert Mutable(1, {}).tags is not Mutable(1, {}).tags  # a fresh list each time
    b = Mutable(1, {"x": 1}, tags=["t"], error="e")
    assert (b.error, b.tags) == ("e", ["t"])
    assert Mutable.error == ""  # the class attribute is the default, as in dataclasses
    assert not hasattr(Mutable, "tags")


def test_repr_and_eq_match_dataclasses() -> None:
    a, d = Mutable(1, None, "e", ["t"]), MutableDC(1, None, "e", ["t"])
    assert repr(a).removeprefix("Mutable") == repr(d).removeprefix("MutableDC")
    assert Mutable(1, None) == Mutable(1, None)
    assert Mutable(1, None) != Mutable(2, None)
    assert Mutable(1, None) != MutableDC(1, None)
    nan = float("nan")
    assert Mutable(1, {"n": nan}) != Mutable(1, {"n": float("nan")})
    box = {"n": nan}
    assert Mutable(1, box) == Mutable(1, box)  # identical values compare equal, as in tuples


def test_mutable_is_unhashable_frozen_is_hashable_and_immutable() -> None:
    with pytest.raises(TypeError):
        hash(Mutable(1, None))
    f = Frozen("a")
    assert f == Frozen("a", 7443) and hash(f) == hash(Frozen("a"))
    assert f in {Frozen("a")} and f.label == "a:7443"
    with pytest.raises(FrozenInstanceError):
        f.port = 1  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del f.name  # type: ignore[misc]
    assert isinstance(FrozenInstanceError(), AttributeError)


def test_init_errors() -> None:
    with pytest.raises(TypeError, match="missing required argument: 'body'"):
        Mutable(1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        Mutable(1, None, nope=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="multiple values for argument 'code'"):
        Mutable(1, None, code=2)  # type: ignore[misc]
    with pytest.raises(TypeError, match="takes 4 positional arguments but 5"):
        Mutable(1, None, "", [], 5)  # type: ignore[call-arg]


def test_fields() -> None:
    fs = fields(Mutable)
    assert [f.name for f in fs] == ["code", "body", "error", "tags"]
    assert [f.name for f in fields(Mutable(1, None))] == ["code", "body", "error", "tags"]
    assert fs[0].type == "int | None" and fs[2].default == "" and fs[3].default_factory is list
    with pytest.raises(TypeError):
        fields(object())


def test_declaration_errors() -> None:
    with pytest.raises(ValueError, match="mutable default"):

        @record
        class Bad:
            items: list[str] = []

    with pytest.raises(TypeError, match="non-default argument 'b' follows default"):

        @record
        class Order:
            a: int = 1
            b: int  # type: ignore[misc]

    with pytest.raises(ValueError, match="both default and default_factory"):
        field(default=1, default_factory=list)  # type: ignore[call-overload]


def test_inherited_fields() -> None:
    @record
    class Child(Mutable):
        extra: int = 0

    c = Child(1, None, extra=3)
    assert [f.name for f in fields(Child)] == ["code", "body", "error", "tags", "extra"]
    assert (c.code, c.extra) == (1, 3)


def test_importing_records_does_not_import_dataclasses() -> None:
    code = "import sys, agent.common.records; print('dataclasses' in sys.modules, 'inspect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout  # fmt: skip
    assert out.split() == ["False", "False"]
