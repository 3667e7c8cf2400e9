"""Attacks on the metrics (dispatcher.api.opsmetrics): each must fail to act and leave
nothing changed.

A caller of the API tries to blow up the label cardinality of ``/metrics`` (so the
monitoring falls over, or the real scripts end up lumped as ``other``): with script names
no agent allows, and with host names the registry does not know. The API app runs in
process over a real agent (TLS, its own allowlist); the registry and the CA directory are
hashed before and after (run records are written for every run, by design). Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.api.app import create_app
from dispatcher.api.opsmetrics import MAX_SCRIPTS, OTHER
from ops.lab.dispatcherenv import DispatcherEnv, make_env

pytestmark = pytest.mark.integration


@pytest.fixture
def env(tmp_path: Path) -> Iterator[DispatcherEnv]:
    e = make_env(tmp_path, api_auth_default="allow")
    e.add_agent("web1")  # allowlist: "true" only
    try:
        yield e
    finally:
        e.stop_all()


def _tree_hash(*roots: str) -> str:
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p}:{st.st_mode}:{st.st_mtime_ns}:".encode() + p.read_bytes())
    return h.hexdigest()


def _series(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _labels(text: str, name: str, key: str) -> set[str]:
    return {dict(labels)[key] for n, labels in _series(text) if n == name}


async def _flood(env: DispatcherEnv) -> tuple[str, str, str, list[int], str]:
    app = create_app(env.d)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=30) as c:
        assert (await c.post("/run", json={"hosts": ["web1"], "script": "true"})).status_code == 200
        before = (await c.get("/metrics")).text
        state = _tree_hash(env.d.cfg.registry_dir, env.d.cfg.ca_dir)
        codes = []
        for i in range(MAX_SCRIPTS + 50):  # more made-up names than the label cap
            r = await c.post("/run", json={"hosts": ["web1"], "script": f"made-up-{i}"})
            codes.append(r.status_code)
            assert r.json()["results"][0]["error"] == "script not permitted"
        middle = (await c.get("/metrics")).text
        for i in range(50):  # host names the registry does not know
            r = await c.post("/ping", json={"hosts": [f"ghost-{i}"]})
            codes.append(r.status_code)
            r = await c.post("/run", json={"hosts": [f"ghost-{i}"], "script": "true"})
            codes.append(r.status_code)
        after = (await c.get("/metrics")).text
    return before, middle, after, codes, state


def test_label_flood_through_the_api_is_refused(env: DispatcherEnv) -> None:
    cfg = env.d.cfg
    before, middle, after, codes, state_before = asyncio.run(_flood(env))
    assert codes[: MAX_SCRIPTS + 50] == [200] * (MAX_SCRIPTS + 50)
    assert set(codes[MAX_SCRIPTS + 50 :]) == {404}, set(codes[MAX_SCRIPTS + 50 :])

    # made-up script names: no new label, one "other" series per family at most
    scripts = _labels(middle, "ctrl_exec_runs_total", "script")
    assert scripts == {"true", OTHER}, scripts
    runs = [s for s in _series(middle) if s[0] == "ctrl_exec_runs_total"]
    assert len(runs) == 2, runs
    denied = {"script": OTHER, "outcome": "denied"}
    for fam in text_string_to_metric_families(middle):
        for s in fam.samples:
            if s.name == "ctrl_exec_runs_total" and s.labels == denied:
                assert s.value == MAX_SCRIPTS + 50
    print(f"[attack] script-label flood: refused ({MAX_SCRIPTS + 50} made-up names, "
          f"labels stay {sorted(scripts)})")  # fmt: skip

    # unknown hosts: 404 before any agent call; no series names them, nothing counted
    assert not any("ghost" in str(labels) for _, labels in _series(after))

    def ours(text: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
        # the API's own request counter gains its bounded route x "not_found" series
        return {s for s in _series(text) if not s[0].startswith("ctrl_exec_api_requests")}

    assert ours(after) == ours(middle)
    assert _labels(after, "ctrl_exec_agent_last_contact_timestamp_seconds", "host") == {"web1"}
    print("[attack] host-label flood: refused (50 unknown hosts answered 404, no new series)")

    # the registry and the CA are untouched (the API records every run it made, by design)
    assert _tree_hash(cfg.registry_dir, cfg.ca_dir) == state_before
    assert _labels(before, "ctrl_exec_runs_total", "script") == {"true"}
