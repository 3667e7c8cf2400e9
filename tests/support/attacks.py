"""The ``[attack] <name>: refused (<detail>)`` lines of the attack suite (pytest glue).

``attack()`` prints one; the ``show_attacks`` fixture (autouse where a module imports it)
replays a test's lines past pytest's capture, so they show in every run's output and the
root plugin (:mod:`tests.support.attack_summary`) counts them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")
