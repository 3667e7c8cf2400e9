"""``ops/lab`` is the one home of the fixtures: benches and the lab never import ``tests``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def top_level_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_benches_and_the_lab_do_not_import_tests() -> None:
    files = sorted(ROOT.glob("bench/*.py")) + sorted(ROOT.glob("ops/**/*.py"))
    assert files
    for path in files:
        assert "tests" not in top_level_imports(path), path


def test_tests_support_holds_only_pytest_glue() -> None:
    for path in sorted((ROOT / "tests" / "support").glob("*.py")):
        if path.name != "__init__.py":
            assert "pytest" in top_level_imports(path), path
