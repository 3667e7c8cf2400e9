"""The alert rules and the dashboard against a live ``ctrl-exec-api``.

* ``promtool check rules ops/monitoring/alerts.yml`` passes, and every ``runbook_url``
  names a runbook that exists;
* a real daemon (subprocess, embedded backend) in front of a real agent and one agent
  that does not answer serves ``/metrics`` on the API port and on the health port; after
  runs and pings through the API ``promtool check metrics`` finds no error in that text;
* every metric name the rules and the dashboard use is served (so they cannot silently
  refer to nothing);
* in a real cluster (etcd, two instances) the follower reports the published generation
  and no lag, one leader in all;
* the run outcome counters move: a run to a live agent counts ``ok``, a script exiting 3
  counts ``failed``, a script not in the allowlist ``denied``, a run to the agent that
  does not answer ``unreachable`` (and ``ctrl_exec_agents_unreachable`` counts it).

Skipped (with the reason) only when ``promtool`` (Debian ``prometheus``) is absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.certinfo import not_after
from dispatcher.pki import ca as dpki
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.apidaemon import Daemon, PairingCA, make_daemon
from ops.lab.etcd import ETCD
from ops.lab.etcd import SKIP_REASON as ETCD_SKIP
from ops.lab.hacluster import ClusterSpec, Inst, running_cluster
from ops.lab.net import free_port
from ops.lab.pki import Issued
from ops.lab.proc import ROOT, wait_until

pytestmark = pytest.mark.integration

MONITORING = ROOT / "ops" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus, ops/setup.sh)"
)
NAME_RE = re.compile(r"\bctrl_exec_[a-z0-9_]+")


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


@needs_promtool
def test_alert_rules_pass_promtool() -> None:
    p = _promtool("check", "rules", str(RULES))
    print(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SUCCESS" in p.stdout


def test_runbook_urls_name_runbooks() -> None:
    urls = re.findall(r"runbook_url:\s*(\S+)", RULES.read_text())
    assert len(urls) >= 12, urls
    for url in urls:
        path = url.split("#", 1)[0]
        assert path.startswith("ops/runbooks/") and (ROOT / path).is_file(), url


def _used_names() -> dict[str, set[str]]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, object]]) -> None:
        for p in panels:
            for t in p.get("targets") or []:  # type: ignore[attr-defined]
                exprs.append(str(t["expr"]))
            walk(p.get("panels") or [])  # type: ignore[arg-type]

    walk(dash["panels"])
    assert len(exprs) >= 20
    return {
        "alerts.yml": set(NAME_RE.findall(RULES.read_text())),
        "grafana-dashboard.json": set(NAME_RE.findall("\n".join(exprs))),
    }


# ----- a live daemon ---------------------------------------------------------------------


@dataclass
class Lab:
    daemon: Daemon
    agent: AgentProc
    api: httpx.Client
    health: httpx.Client


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("monitoring")
    ca_dir = tmp / "ca"
    ca = PairingCA(ca_dir)
    dcert = dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    dispatcher = Issued(ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key", dcert.serial_number)
    scripts = {n: str(script_dir / f"{n}.sh") for n in ("echo-args", "exit3")}
    agent = make_agent(tmp / "web1", ca, {"disp": dispatcher}, scripts, host="127.0.0.2")
    registry_dir = tmp / "agents"
    reg = Registry(registry_dir)
    expiry = not_after(agent.agent_cert.cert).strftime("%b %d %H:%M:%S %Y GMT")
    reg.register("web1", ip="127.0.0.2", port=agent.port, lookup_by="ip", expiry=expiry)
    # nothing listens there: every run and ping to it finds it unreachable
    reg.register("gone1", ip="127.0.0.1", port=free_port(), lookup_by="ip")
    daemon = make_daemon(tmp, "mon", ca_dir, registry_dir,
                         {"api_auth_default": "allow", "read_timeout": "5"})  # fmt: skip
    try:
        agent.start()
        daemon.start()
        daemon.wait_healthy()
        with (
            httpx.Client(base_url=daemon.url, trust_env=False, timeout=30) as api,
            httpx.Client(base_url=f"http://127.0.0.1:{daemon.health_port}", trust_env=False,
                         timeout=30) as health,
        ):  # fmt: skip
            yield Lab(daemon, agent, api, health)
    finally:
        code = daemon.stop()
        agent.stop()
        assert code == 0, daemon.log.read_text()[-3000:]


def _scrape(c: httpx.Client) -> str:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def _value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    want = labels or {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return float(s.value)
    return 0.0


def _run(lab: Lab, hosts: list[str], script: str) -> list[dict[str, object]]:
    r = lab.api.post("/run", json={"hosts": hosts, "script": script, "args": []})
    assert r.status_code == 200, r.text
    results: list[dict[str, object]] = r.json()["results"]
    return results


def test_run_outcomes_move_the_counters(lab: Lab) -> None:
    before = _scrape(lab.api)

    def delta(after: str, script: str, outcome: str) -> float:
        labels = {"script": script, "outcome": outcome}
        return _value(after, "ctrl_exec_runs_total", labels) - _value(
            before, "ctrl_exec_runs_total", labels
        )

    assert _run(lab, ["web1"], "echo-args")[0]["exit"] == 0
    assert _run(lab, ["web1"], "exit3")[0]["exit"] == 3
    assert _run(lab, ["web1"], "no-such-script")[0]["error"] == "script not permitted"
    down = _run(lab, ["gone1"], "echo-args")[0]
    assert down["exit"] == -1 and "connection refused" in str(down["error"]), down
    assert lab.api.post("/ping", json={"hosts": ["web1", "gone1"]}).status_code == 200
    after = _scrape(lab.api)
    assert delta(after, "echo-args", "ok") == 1
    assert delta(after, "exit3", "failed") == 1
    assert delta(after, "other", "denied") == 1  # a refused name never becomes a label
    assert delta(after, "echo-args", "unreachable") == 1
    hist = {"script": "echo-args", "outcome": "ok"}
    assert _value(after, "ctrl_exec_run_duration_seconds_count", hist) >= 1
    assert _value(after, "ctrl_exec_pings_total", {"outcome": "ok"}) >= 1
    assert _value(after, "ctrl_exec_pings_total", {"outcome": "unreachable"}) >= 1
    assert _value(after, "ctrl_exec_agents_unreachable") == 1
    last = _value(after, "ctrl_exec_agent_last_contact_timestamp_seconds", {"host": "web1"})
    assert last > 0
    expiry = _value(after, "ctrl_exec_cert_expiry_timestamp_seconds",
                    {"kind": "agent", "name": "web1"})  # fmt: skip
    assert expiry == not_after(lab.agent.agent_cert.cert).replace(microsecond=0).timestamp()
    assert _value(after, "ctrl_exec_cert_expiry_timestamp_seconds", {"kind": "ca"}) > last
    assert _value(after, "ctrl_exec_build_info") == 1
    print(
        f"runs ok/failed/denied/unreachable moved by 1 each; agents unreachable = 1; "
        f"agent expiry {expiry:.0f}"
    )


@needs_promtool
def test_live_metrics_pass_promtool_on_both_ports(lab: Lab) -> None:
    _run(lab, ["web1"], "echo-args")  # the labelled families have samples
    texts = {"api": _scrape(lab.api), "health": _scrape(lab.health)}
    for port, text in texts.items():
        p = _promtool("check", "metrics", stdin=text)
        lint = (p.stdout + p.stderr).strip()
        print(f"promtool check metrics ({port} port): rc={p.returncode} {lint or 'clean'}")
        assert "error while linting" not in lint and "parse" not in lint.lower(), lint
        assert p.returncode == 0 or lint, lint  # a non-zero status only with lint findings
    # the same registry on both ports
    health_families = {f.name for f in text_string_to_metric_families(texts["health"])}
    api_families = {f.name for f in text_string_to_metric_families(texts["api"])}
    assert health_families == api_families
    assert "ctrl_exec_runs" in health_families


def _served(text: str) -> set[str]:
    """Every series name a query can use: the families and their samples' names."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                "_created"), "gauge": ("",), "info": ("_info",), "summary": ("_sum", "_count")}  # fmt: skip
    out: set[str] = set()
    for fam in text_string_to_metric_families(text):
        out.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        out.update(s.name for s in fam.samples)
    return out


def test_every_metric_the_rules_and_dashboard_use_is_served(lab: Lab) -> None:
    served = _served(_scrape(lab.health))
    used = _used_names()
    for where, names in used.items():
        missing = sorted(names - served)
        print(f"{where}: {len(names)} metric names, all served" if not missing else "")
        assert not missing, f"{where} uses metrics no instance serves: {missing}"
    assert {"ctrl_exec_runs_total", "ctrl_exec_cert_expiry_timestamp_seconds",
            "ctrl_exec_sync_lag_generations"} <= used["alerts.yml"]  # fmt: skip


# ----- a real cluster on etcd ----------------------------------------------------------------


def test_cluster_instances_report_one_leader_and_the_published_generation(
    tmp_path_factory: pytest.TempPathFactory, script_dir: Path
) -> None:
    """Two instances on a real etcd: each health port serves the cluster view; the follower
    reports the generation the leader published and no lag; promtool finds no error, and
    the rules' and the dashboard's names are served by cluster members too."""
    if ETCD is None:
        pytest.skip(ETCD_SKIP)
    spec = ClusterSpec(agents={"web1": "127.0.0.2"}, scripts={"echo-args": str(script_dir /
                       "echo-args.sh")}, ttl=2, names=("a", "b"))  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("mon-ha"), spec) as c:
        leader = c.one_leader()
        follower = c.followers()[0]
        g = c.converged()

        def scrape(inst: Inst) -> str:
            with httpx.Client(base_url=inst.health_url, trust_env=False, timeout=10) as h:
                return _scrape(h)

        def follower_caught_up() -> str | None:
            text = scrape(follower)
            published = _value(text, "ctrl_exec_sync_published_generation")
            return text if published == g.number else None

        t0 = time.monotonic()
        text = wait_until(follower_caught_up, 30, "the follower sees the published generation")
        print(f"follower reported published generation {g.number} after "
              f"{time.monotonic() - t0:.1f} s")  # fmt: skip
        assert _value(text, "ctrl_exec_sync_lag_generations") == 0
        assert _value(text, "ctrl_exec_sync_generation") == g.number
        assert _value(text, "ctrl_exec_cluster_is_leader") == 0
        assert _value(text, "ctrl_exec_restart_pending") == 0
        lead = scrape(leader)
        assert _value(lead, "ctrl_exec_cluster_is_leader") == 1
        assert _value(lead, "ctrl_exec_sync_published_generation") == g.number
        assert _value(lead, "ctrl_exec_cluster_store_up") == 1
        for name, names in _used_names().items():
            missing = sorted(names - _served(text))
            assert not missing, f"{name}: not served by a cluster follower: {missing}"
        if PROMTOOL is not None:
            p = _promtool("check", "metrics", stdin=text)
            lint = (p.stdout + p.stderr).strip()
            print(f"promtool check metrics (cluster follower): rc={p.returncode} {lint or 'clean'}")
            assert "error while linting" not in lint, lint
