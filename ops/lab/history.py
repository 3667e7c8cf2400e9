"""A history checker for randomized fault runs against an :mod:`ops.lab.hacluster` cluster.

Pytest-free (``tests/integration/test_fault_history.py`` and benchmarks use it). Two parts:

* **recording**: :class:`History` holds every operation the workload issued (:class:`Op`:
  approve a pairing request, edit an agent, rotate the dispatcher certificate, run a
  script) with when it ended, whether it was acknowledged (HTTP 200 / ``ced`` exit 0) and
  the epoch, leader and generation the answer carried. :class:`Workload` issues them from
  client threads through HAProxy (runs, approvals) and ``ced`` (edits, rotations).
  Runs use :func:`record_script`: the agent's script appends ``reqid token pid`` (the reqid
  from the context JSON on its stdin) to a per-agent file, so executions can be counted.
* **checking**: :func:`check` (pure, over recorded data: unit-testable with planted
  faults) and :func:`observe` (reads the final state of a running cluster) give a list of
  violations, empty when the run was correct:

  1. never two epochs acting at once: :func:`ops.lab.hacluster.history_violations` over
     the effects history in etcd, with the epoch -> leader pairs the acknowledgements named
     (an epoch acknowledged by two instances is a violation too);
  2. no acknowledged change lost: every acknowledged approval's agent is in every
     instance's registry, every agent's port is its last acknowledged edit (or a later
     unacknowledged attempt's), every instance's serial is the last acknowledged rotation's
     (unless a later rotation was attempted), every acknowledged run ran;
  3. no script run twice for one reqid (lines of the agents' files); and (``honest``) no
     run answered with an explicit error (an HTTP status) that ran all the same (the
     client would retry it: twice);
  4. every instance on the published generation with the same files (sha256 of each).
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cluster.backend import EffectRecord
from dispatcher.config import load as load_config
from dispatcher.ha.manifest import Layout, Scanner
from ops.lab.hacluster import Cluster, get, history_violations
from ops.lab.pairing import pairing_request, read_framed
from ops.lab.proc import wait_until

RECORD = "record"  # the allowlisted name of the script that counts executions

_SCRIPT = """#!/bin/sh
# ctrl-exec lab: count executions. $1: the client's token, $2: the agent's name.
ctx=$(cat)
reqid=$(printf '%s' "$ctx" | sed -n 's/.*"reqid":"\\([^"]*\\)".*/\\1/p')
printf '%s %s %s\\n' "$reqid" "$1" "$$" >> "{out}/$2.runs"
echo "arg1=[$1]"
"""


def record_script(path: Path, out: Path) -> Path:
    """Write the counting script to ``path`` (executable); it appends to ``out/<agent>.runs``."""
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(_SCRIPT.format(out=out))
    path.chmod(0o755)
    return path


def executions(out: Path) -> dict[str, list[tuple[str, str]]]:
    """``{reqid: [(agent, token), ...]}`` from every agent's file under ``out``."""
    runs: dict[str, list[tuple[str, str]]] = {}
    for f in sorted(out.glob("*.runs")):
        for line in f.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3:
                runs.setdefault(parts[0], []).append((f.stem, parts[1]))
    return runs


# ----- recording ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One operation of the workload, as the client saw it."""

    n: int
    kind: str  # "run", "approve", "edit", "rotate"
    key: str  # run: the agent; approve/edit: the agent's registered name; rotate: ""
    value: str  # run: the client's token; edit: the port; rotate: the new serial
    started: float  # time.time()
    ended: float
    acked: bool
    error: str = ""
    reqid: str = ""  # run: the API's reqid; approve: the pairing request id
    epoch: int | None = None
    leader: str = ""
    generation: int | None = None


class History:
    """Every operation issued, thread-safe."""

    def __init__(self) -> None:
        self._ops: list[Op] = []
        self._lock = threading.Lock()
        self._n = itertools.count(1)

    def next(self) -> int:
        with self._lock:
            return next(self._n)

    def add(self, op: Op) -> Op:
        with self._lock:
            self._ops.append(op)
        return op

    @property
    def ops(self) -> list[Op]:
        with self._lock:
            return sorted(self._ops, key=lambda o: o.n)

    def acked(self, kind: str | None = None) -> list[Op]:
        return [o for o in self.ops if o.acked and (kind is None or o.kind == kind)]

    def failures(self) -> dict[str, int]:
        """Unacknowledged operations by ``kind: error class``."""
        return dict(Counter(f"{o.kind}: {_error_class(o.error)}" for o in self.ops
                            if not o.acked))  # fmt: skip

    def counts(self) -> dict[str, dict[str, int]]:
        """``{kind: {"issued": n, "acked": n}}``."""
        out: dict[str, dict[str, int]] = {}
        for o in self.ops:
            c = out.setdefault(o.kind, {"issued": 0, "acked": 0})
            c["issued"] += 1
            c["acked"] += int(o.acked)
        return out


class Workload:
    """Client threads issuing operations until stopped (bounded by ``max_seconds``):

    * runs of :data:`RECORD` on the agents through HAProxy's API frontend, one new
      connection each, no retry (every attempt is one operation);
    * approvals: a pairing request through HAProxy's pairing frontend (the leader queues
      it), then ``POST /pairing/<id>/approve`` through the API frontend (forwarded to the
      leader); then edits of the approved agents' port with ``ced edit-agent`` run from
      a random instance's configuration.
    """

    def __init__(self, c: Cluster, history: History, tag: str, *, seed: int,
                 run_interval: float = 0.05, change_interval: float = 0.3,
                 max_seconds: float = 120.0) -> None:  # fmt: skip
        assert c.haproxy is not None, "the workload goes through HAProxy"
        self.c = c
        self.h = history
        self.tag = tag
        self.rng = random.Random(seed)
        self.run_interval = run_interval
        self.change_interval = change_interval
        self.max_seconds = max_seconds
        self.approved: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._guard, args=(f, ), daemon=True,
                                          name=f"workload-{tag}-{f.__name__}")
                         for f in (self._runs, self._changes)]  # fmt: skip
        self.crashed: list[BaseException] = []

    def __enter__(self) -> Workload:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(90)

    def _guard(self, fn: Any) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
                fn()
        except BaseException as exc:  # reported by the test
            self.crashed.append(exc)

    # -- runs ---------------------------------------------------------------------------------

    def _api(self, timeout: float) -> httpx.Client:
        client = self.c.api_client(timeout)
        client.headers["Connection"] = "close"
        return client

    def _runs(self) -> None:
        agent = self.rng.choice(sorted(self.c.agents))
        n = self.h.next()
        token = f"{self.tag}-{n}"
        t0 = time.time()
        body = {"hosts": [agent], "script": RECORD, "args": [token, agent]}
        acked, error, reqid = False, "", ""
        try:
            with self._api(15) as client:
                r = client.post("/run", json=body)
            if r.status_code == 200:
                doc = r.json()
                reqid = str(doc.get("reqid") or "")
                res = doc["results"][0]
                acked = res.get("exit") == 0 and f"arg1=[{token}]" in str(res.get("stdout"))
                error = "" if acked else f"run: {res}"[:200]
            else:
                error = f"HTTP {r.status_code}: {r.text[:200]}"
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        self.h.add(Op(n, "run", agent, token, t0, time.time(), acked, error, reqid))
        self._stop.wait(self.run_interval)

    # -- approvals and edits --------------------------------------------------------------------

    def _changes(self) -> None:
        if not self.approved or self.rng.random() < 0.5:
            self._approve()
        else:
            self._edit(self.rng.choice(self.approved))
        self._stop.wait(self.change_interval)

    def _approve(self) -> None:
        assert self.c.haproxy is not None
        n = self.h.next()
        name = f"{self.tag}-a{n}"
        t0 = time.time()
        acked, error, reqid, epoch, leader = False, "", "", None, ""
        try:
            with pairing_request(self.c.haproxy.pairing_port, self.c.ca_cert, name,
                                 timeout=15) as (first, fh):  # fmt: skip
                reqid = str(first.get("reqid") or "")
                if first.get("status") != "pending" or not reqid:
                    raise ValueError(f"pairing answered {first}")
                with self._api(20) as client:
                    r = client.post(f"/pairing/{reqid}/approve", json={"lookup_by": "ip"})
                if r.status_code == 200:
                    doc = r.json()
                    acked = doc.get("status") == "approved" and doc.get("agent") == name
                    epoch, leader = doc.get("epoch"), str(doc.get("leader") or "")
                    error = "" if acked else f"approve: {doc}"[:200]
                    if acked:  # the agent's side: the decision arrives on the connection
                        read_framed(fh)
                else:
                    error = f"HTTP {r.status_code}: {r.text[:200]}"
        except (OSError, AssertionError, ValueError, httpx.HTTPError) as exc:
            error = error or f"{type(exc).__name__}: {exc}"[:200]
        self.h.add(Op(n, "approve", name, "", t0, time.time(), acked, error, reqid,
                      int(epoch) if epoch is not None else None, leader))  # fmt: skip
        if acked:
            self.approved.append(name)

    def _edit(self, name: str) -> None:
        n = self.h.next()
        port = str(10000 + n)
        inst = self.rng.choice(list(self.c.insts.values()))
        t0 = time.time()
        try:
            p = self.c.ced(inst, "edit-agent", name, "--agent-port", port, "--json", timeout=60)
            acked = p.returncode == 0
            error = "" if acked else f"ced exit {p.returncode}: {(p.stdout + p.stderr)[-200:]}"
        except OSError as exc:
            acked, error = False, f"{type(exc).__name__}: {exc}"[:200]
        except Exception as exc:  # subprocess.TimeoutExpired
            acked, error = False, f"{type(exc).__name__}"
        self.h.add(Op(n, "edit", name, port, t0, time.time(), acked, error))


def rotate(c: Cluster, history: History, timeout: float = 150) -> Op:
    """``ced rotate-cert --json --yes`` from a random instance's configuration."""
    n = history.next()
    inst = random.choice([i for i in c.insts.values() if i.alive] or list(c.insts.values()))
    t0 = time.time()
    serial, epoch, leader, gen, error = "", None, "", None, ""
    try:
        p = c.ced(inst, "rotate-cert", "--json", "--yes", "--timeout", "90", timeout=timeout)
        acked = p.returncode == 0
        try:
            doc = json.loads(p.stdout)
            serial = str(doc.get("new_serial") or "")
            epoch, leader, gen = (
                doc.get("epoch"),
                str(doc.get("leader") or ""),
                doc.get("generation"),
            )
        except ValueError:
            pass
        if not acked:
            error = f"ced exit {p.returncode}: {(p.stdout + p.stderr)[-300:]}"
    except Exception as exc:  # subprocess.TimeoutExpired: not acknowledged
        acked, error = False, f"{type(exc).__name__}"
    return history.add(Op(n, "rotate", "", serial, t0, time.time(), acked and bool(serial),
                          error, "", int(epoch) if epoch is not None else None, leader,
                          int(gen) if gen is not None else None))  # fmt: skip


def _error_class(error: str) -> str:
    head = error.split(":", 1)[0]
    if head.startswith("HTTP ") or head.startswith("ced exit"):
        return error[:60]
    return head


# ----- the final state of a cluster -------------------------------------------------------


@dataclass
class Observed:
    """What a healed cluster holds, read after the faults stopped."""

    effects: list[EffectRecord]
    registries: dict[str, dict[str, dict[str, Any]]]  # instance -> agent name -> record
    serials: dict[str, str]  # instance -> the serial its rotation state names current
    manifests: dict[str, dict[str, str]]  # instance -> logical path -> sha256
    generations: dict[str, int | None]  # instance -> generation it runs
    published: int | None
    runs: dict[str, list[tuple[str, str]]]  # reqid -> [(agent, token)]
    converge_error: str = ""
    converge_seconds: float = 0.0
    unreachable: dict[str, str] = field(default_factory=dict)  # agent -> last ping error


def manifest(config: Path) -> dict[str, str]:
    """``{logical path: sha256}`` of every synced file of the instance of ``config``."""
    layout = Layout(load_config(str(config)))
    return {p: e.sha256 for p, e in Scanner(layout).scan().items()}


def _registry(d: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(d.glob("*.json")):
        try:
            out[f.stem] = json.loads(f.read_text())
        except (OSError, ValueError):
            out[f.stem] = {"unreadable": True}
    return out


def _serial(state: Path) -> str:
    try:
        return str(json.loads((state / "rotation.json").read_text()).get("current_serial") or "")
    except (OSError, ValueError):
        return ""


def observe(c: Cluster, runs_dir: Path, converge_within: float = 30.0) -> Observed:
    """Wait (at most ``converge_within`` s) until every instance runs the published
    generation with the same files, then read the state every check needs."""
    t0 = time.monotonic()
    error = ""

    def same() -> bool:
        g = c._generation()
        if g is None:
            return False
        for i in c.insts.values():
            code, st = get(f"{i.health_url}/status", 2)
            if code != 200 or not isinstance(st, dict) or st.get("generation") != g.number:
                return False
        hashes = {json.dumps(manifest(i.config), sort_keys=True) for i in c.insts.values()}
        return len(hashes) == 1

    try:
        wait_until(same, converge_within, "every instance on the published generation", 0.2)
    except AssertionError as exc:
        error = str(exc)
    took = time.monotonic() - t0
    unreachable = _unreachable_agents(c, within=30.0)
    gens: dict[str, int | None] = {}
    for i in c.insts.values():
        code, st = get(f"{i.health_url}/status", 2)
        gens[i.name] = st.get("generation") if code == 200 and isinstance(st, dict) else None
    g = c._generation()
    return Observed(
        effects=c.effects(),
        registries={i.name: _registry(i.registry_dir) for i in c.insts.values()},
        serials={i.name: _serial(_rotation_dir(c, i.state)) for i in c.insts.values()},
        manifests={i.name: manifest(i.config) for i in c.insts.values()},
        generations=gens, published=None if g is None else g.number,
        runs=executions(runs_dir), converge_error=error, converge_seconds=round(took, 2),
        unreachable=unreachable,
    )  # fmt: skip


def _unreachable_agents(c: Cluster, within: float) -> dict[str, str]:
    """The real agents a ping through the load balancer still cannot reach after ``within``
    s of trying (an agent that missed a rotation's broadcast answers 'serial mismatch')."""
    names = sorted(c.agents)
    deadline = time.monotonic() + within
    errors: dict[str, str] = {}
    while True:
        errors = {}
        try:
            with c.api_client(10) as client:
                r = client.post("/ping", json={"hosts": names})
            results = r.json().get("results", []) if r.status_code == 200 else []
            for res in results:
                if res.get("status") != "ok":
                    errors[str(res.get("host"))] = str(res.get("error", res.get("status")))[:120]
            if r.status_code != 200:
                errors = {n: f"HTTP {r.status_code}" for n in names}
        except (httpx.HTTPError, ValueError) as exc:
            errors = {n: f"{type(exc).__name__}: {exc}"[:120] for n in names}
        if not errors or time.monotonic() > deadline:
            return errors
        time.sleep(1.0)


def _rotation_dir(c: Cluster, state: Path) -> Path:
    """Where an instance keeps ``rotation.json``: its state dir (push), else shared."""
    shared = c.tmp / "rotation.json"
    return c.tmp if shared.exists() else state


# ----- the checks ---------------------------------------------------------------------------


@dataclass
class Verdict:
    violations: list[str] = field(default_factory=list)
    checked: Counter[str] = field(default_factory=Counter)  # what was checked, by kind

    def extend(self, other: Verdict) -> None:
        self.violations += other.violations
        self.checked.update(other.checked)


def acked_leaders(ops: Iterable[Op]) -> tuple[dict[int, str], list[str]]:
    """epoch -> the leader acknowledgements named; and the epochs two leaders claimed."""
    leaders: dict[int, str] = {}
    problems: list[str] = []
    for o in ops:
        if not (o.acked and o.epoch is not None and o.leader):
            continue
        seen = leaders.setdefault(o.epoch, o.leader)
        if seen != o.leader:
            problems.append(f"epoch {o.epoch} acknowledged by {seen} and by {o.leader} (op {o.n})")
    return leaders, problems


def check_epochs(ops: Sequence[Op], effects: Sequence[EffectRecord]) -> Verdict:
    """(1) never two epochs acting at once."""
    v = Verdict()
    leaders, v.violations = acked_leaders(ops)
    v.violations += history_violations(effects, leaders)
    v.checked["effects"] = len(effects)
    v.checked["epochs"] = len({e.epoch for e in effects} | set(leaders))
    return v


def check_changes(ops: Sequence[Op], obs: Observed) -> Verdict:
    """(2) no acknowledged change lost."""
    v = Verdict()
    for o in ops:
        if o.kind == "approve" and o.acked:
            v.checked["approvals"] += 1
            v.violations += [f"approval of {o.key} (op {o.n}, epoch {o.epoch}) lost on {inst}"
                             for inst, reg in sorted(obs.registries.items())
                             if o.key not in reg]  # fmt: skip
    edits: dict[str, list[Op]] = {}
    for o in ops:
        if o.kind == "edit":
            edits.setdefault(o.key, []).append(o)
    for name, seq in sorted(edits.items()):
        acked = [i for i, o in enumerate(seq) if o.acked]
        if not acked:
            continue
        last = acked[-1]
        allowed = {seq[last].value} | {o.value for o in seq[last + 1 :]}
        v.checked["edits"] += len(acked)
        for inst, reg in sorted(obs.registries.items()):
            got = str(reg.get(name, {}).get("port"))
            if got not in allowed:
                v.violations.append(f"edit of {name} to port {seq[last].value} (op "
                                    f"{seq[last].n}) lost on {inst}: port {got}; "
                                    f"{_writes(obs.effects, name, inst)}")  # fmt: skip
    rotations = [o for o in ops if o.kind == "rotate"]
    done = [i for i, o in enumerate(rotations) if o.acked]
    if done:
        last_rot = rotations[done[-1]]
        later = rotations[done[-1] + 1 :]
        v.checked["rotations"] += len(done)
        for inst, serial in sorted(obs.serials.items()):
            if serial != last_rot.value and not later:
                v.violations.append(f"rotation to {last_rot.value} (op {last_rot.n}) lost on "
                                    f"{inst}: current serial {serial or '(none)'}")  # fmt: skip
        if len(set(obs.serials.values())) > 1:
            v.violations.append(f"instances disagree on the current serial: {obs.serials}")
    for o in ops:
        if o.kind == "run" and o.acked:
            v.checked["runs"] += 1
            if o.reqid not in obs.runs:
                v.violations.append(f"run {o.reqid} ({o.key}, token {o.value}, op {o.n}) "
                                    f"acknowledged but never ran")  # fmt: skip
    return v


def _writes(effects: Sequence[EffectRecord], name: str, inst: str, last: int = 6) -> str:
    """The last effects recorded on the registry file of ``name`` (in ``inst``'s dir when
    paths are per instance): which epoch wrote it, and how."""
    mine = [e for e in effects
            if str(e.detail.get("path", "")).endswith(f"/{name}.json")]  # fmt: skip
    own = [e for e in mine if f"-{inst}/" in str(e.detail.get("path", ""))] or mine
    return "its last writes: " + ", ".join(
        f"{e.effect}/{e.detail.get('op', '?')} by {e.instance_id} epoch {e.epoch} rev "
        f"{e.revision} sha {str(e.detail.get('sha256', ''))[:8]}" for e in own[-last:]
    )  # fmt: skip


def check_runs(obs: Observed) -> Verdict:
    """(3) no script run twice for one reqid."""
    v = Verdict()
    v.checked["executions"] = sum(len(x) for x in obs.runs.values())
    for reqid, lines in sorted(obs.runs.items()):
        if len(lines) > 1:
            v.violations.append(f"reqid {reqid or '(none)'} ran {len(lines)} times: {lines}")
    return v


def check_honest(ops: Sequence[Op], obs: Observed) -> Verdict:
    """(3b) no run answered with an explicit error (an HTTP status) that ran all the same:
    the client would retry it, and it would run twice. A run whose connection was cut may
    have run or not: counted (``ambiguous_runs_that_ran``), no violation."""
    v = Verdict()
    ran = Counter(token for lines in obs.runs.values() for _agent, token in lines)
    for o in ops:
        if o.kind != "run" or o.acked:
            continue
        v.checked["failed_runs"] += 1
        if o.error.startswith("HTTP ") and ran[o.value]:
            v.violations.append(f"run {o.value} (op {o.n}) answered {o.error[:80]!r} but ran")
        elif ran[o.value]:
            v.checked["ambiguous_runs_that_ran"] += 1
    return v


def check_convergence(obs: Observed) -> Verdict:
    """(4) every instance converged on the same generation and files."""
    v = Verdict()
    v.checked["instances"] = len(obs.generations)
    if obs.converge_error:
        v.violations.append(f"not converged: {obs.converge_error}; generations "
                            f"{obs.generations}, published {obs.published}")  # fmt: skip
    hashes = {n: json.dumps(m, sort_keys=True) for n, m in obs.manifests.items()}
    if len(set(hashes.values())) > 1:
        names = sorted(obs.manifests)
        ref = obs.manifests[names[0]]
        diff = {n: sorted(p for p in set(ref) | set(m) if ref.get(p) != m.get(p))[:5]
                for n, m in obs.manifests.items() if m != ref}  # fmt: skip
        v.violations.append(f"files differ from {names[0]}'s: {diff}")
    return v


def check_liveness(obs: Observed) -> Verdict:
    """(5) once the faults are healed, every agent answers through the load balancer."""
    v = Verdict()
    v.checked["agents"] = len(obs.unreachable) if obs.unreachable else 0
    for agent, error in sorted(obs.unreachable.items()):
        v.violations.append(f"agent {agent} unreachable after the faults healed: {error}")
    return v


CHECKS = ("epochs", "changes", "runs", "honest", "convergence", "liveness")


def check(ops: Sequence[Op], obs: Observed) -> dict[str, Verdict]:
    """Every check over one recorded history and the observed final state."""
    return {
        "epochs": check_epochs(ops, obs.effects),
        "changes": check_changes(ops, obs),
        "runs": check_runs(obs),
        "honest": check_honest(ops, obs),
        "convergence": check_convergence(obs),
        "liveness": check_liveness(obs),
    }


def token() -> str:
    return secrets.token_hex(3)


def dump(path: Path, ops: Sequence[Op]) -> None:
    """Every operation as JSON lines (kept next to the lane's logs for a post-mortem)."""
    from dataclasses import asdict

    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(o)) + "\n" for o in ops))
    tmp.replace(path)


def summary(verdicts: Mapping[str, Verdict]) -> dict[str, Any]:
    return {k: {"checked": dict(v.checked), "violations": len(v.violations)}
            for k, v in verdicts.items()}  # fmt: skip
