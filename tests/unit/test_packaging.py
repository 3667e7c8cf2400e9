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


def test_the_wheel_ships_what_an_installed_system_needs() -> None:
    """Units, runbooks, docs and example configs go to ``<prefix>/share/ctrl-exec/``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    shared = project["tool"]["hatch"]["build"]["targets"]["wheel"]["shared-data"]
    assert set(shared.values()) >= {
        "share/ctrl-exec/systemd", "share/ctrl-exec/runbooks", "share/ctrl-exec/docs",
        "share/ctrl-exec/examples"}  # fmt: skip
    for source in shared:
        assert (ROOT / source).is_dir() and any((ROOT / source).iterdir()), source
    units = {p.name for p in (ROOT / "ops/systemd").glob("*.service")}
    assert units >= {"ctrl-exec-agent.service", "ctrl-exec-api.service",
                     "ctrl-exec-executor.service"}  # fmt: skip
    scripts = project["project"]["scripts"]
    assert scripts["ctrl-exec-api"] == "dispatcher.api.entry:main"
