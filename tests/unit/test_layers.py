"""What may import what (ARCHITECTURE.md): checked on the source, so a wrong arrow fails CI.

* ``agent`` imports neither ``dispatcher`` nor ``cluster`` (it installs alone on every host);
* ``agent.common`` (the runtime the dispatcher shares) imports nothing else of ``agent``;
* ``cluster`` imports neither ``agent`` nor ``dispatcher`` (tests/unit/cluster too);
* ``dispatcher.client`` (the wire to agents) and ``dispatcher.ha`` never import the HTTP
  layer ``dispatcher.api``, nor the CLI ``dispatcher.ced``;
* only ``dispatcher.api`` imports FastAPI, uvicorn, pydantic or starlette;
* only ``cluster/etcd.py`` imports the etcd client (and ``requests``);
* ``ops/lab`` is the one home of the fixtures: benches and the lab never import ``tests``,
  and ``tests/support`` holds only pytest glue.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (function-level imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((ROOT / package.replace(".", "/")).rglob("*.py")):
        for name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    return bad


def test_agent_stands_alone() -> None:
    assert offenders("agent", ("dispatcher", "cluster")) == []


def test_shared_runtime_depends_on_no_part_of_the_daemon() -> None:
    daemon = (*(f"agent.{p.stem}" for p in (ROOT / "agent").glob("*.py")
                if p.stem not in ("__init__", "version")), "agent.handlers")  # fmt: skip
    assert offenders("agent.common", daemon) == []


def test_cluster_is_a_coordination_library() -> None:
    assert offenders("cluster", ("agent", "dispatcher")) == []


def test_the_client_and_the_ha_layer_do_not_reach_up() -> None:
    for package in ("dispatcher.client", "dispatcher.ha", "dispatcher.pki", "dispatcher.pairing"):
        assert offenders(package, ("dispatcher.api", "dispatcher.ced")) == [], package


def test_only_the_api_layer_imports_the_web_framework() -> None:
    web = ("fastapi", "uvicorn", "pydantic", "starlette")
    for package in ("agent", "cluster", "dispatcher.client", "dispatcher.ha", "dispatcher.ced",
                    "dispatcher.pki", "dispatcher.pairing"):  # fmt: skip
        assert offenders(package, web) == [], package


def test_one_adapter_talks_to_etcd() -> None:
    for path in sorted((ROOT / "cluster").glob("*.py")):
        if path.name != "etcd.py":
            assert not {n.split(".")[0] for n in imports(path)} & {"etcd3gw", "requests"}, path


def test_benches_and_the_lab_do_not_import_tests() -> None:
    files = sorted(ROOT.glob("bench/*.py")) + sorted(ROOT.glob("ops/**/*.py"))
    assert files
    for path in files:
        assert not any(n.split(".")[0] == "tests" for n in imports(path)), path


def test_tests_support_holds_only_pytest_glue() -> None:
    for path in sorted((ROOT / "tests" / "support").glob("*.py")):
        if path.name != "__init__.py":
            assert any(n.split(".")[0] == "pytest" for n in imports(path)), path
