"""The wheel ships typed packages: a ``py.typed`` marker in each (PEP 561)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_package_is_marked_typed() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert sorted(wheel["packages"]) == ["agent", "cluster", "dispatcher"]
    for pkg in wheel["packages"]:
        assert (ROOT / pkg / "py.typed").is_file(), pkg
    # hatch ships every file of a listed package unless excluded
    assert not any("py.typed" in x for x in wheel.get("exclude", []))
