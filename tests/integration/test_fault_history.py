"""Issue 8's proof: a history checker over randomized fault runs.

Two lanes run in parallel (threads), each on its own real stack (3-member etcd, three
``ctrl-exec-api`` instances with their own state paths (``sync_mode = push``, lease TTL
2 s), HAProxy in front, two real agents, on their own loopback ports). Each lane does
runs one after another until ``CTRL_EXEC_FAULT_RUNS`` runs or the time budget
is used up. One run: the workload
(:class:`ops.lab.history.Workload`: script runs through HAProxy, pairing approvals, agent
edits from any instance's ``ced``; a certificate rotation in some runs) while 1-3 random
faults of :mod:`ops.lab.faults` are injected one after another (kill -9, SIGSTOP past the
TTL, SIGTERM of the leader, the leader partitioned from etcd, an etcd member restart, a
follower's disk read-only); then the workload stops, everything is healed (every
instance running, one leader) and :func:`ops.lab.history.check` runs over the history.

Reproducible: the seed is printed; ``CTRL_EXEC_FAULT_SEED=<seed>`` replays the same
choices (fault kinds and counts, pauses, rotation runs, victims among etcd members and
followers); which instance leads when a fault strikes, and the timing, stay the machine's.
``CTRL_EXEC_FAULT_KINDS=partition,readonly`` restricts the kinds, ``CTRL_EXEC_FAULT_RUNS``
(10 per lane) and ``CTRL_EXEC_FAULT_BUDGET`` (no run starts after 200 s) bound the work.
Each lane keeps its operations in ``history.jsonl`` next to the cluster's logs (use
``--basetemp`` to keep them: pytest keeps only its last three temp dirs). Printed at
the end even without ``-s``: runs, faults by kind, operations checked, violations. One
test per check fails on any violation of that check.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cluster.backend import EffectRecord
from ops.lab import history as hist
from ops.lab.etcd import ETCD
from ops.lab.etcd import SKIP_REASON as ETCD_SKIP
from ops.lab.faults import KINDS, Fault, Faults, partition_available, readonly_available
from ops.lab.hacluster import Cluster, ClusterSpec, running_cluster
from ops.lab.haproxy import HAPROXY
from ops.lab.haproxy import SKIP_REASON as HAPROXY_SKIP

TTL = 2
LANES = 2
BUDGET = float(os.environ.get("CTRL_EXEC_FAULT_BUDGET", "200"))  # no run starts after
RUNS = int(os.environ.get("CTRL_EXEC_FAULT_RUNS", "10"))  # per lane, at most
SEED = int(os.environ.get("CTRL_EXEC_FAULT_SEED") or secrets.randbelow(2**31))
ROTATE_P = 0.5  # the share of runs with a certificate rotation

F = TypeVar("F", bound=Callable[..., Any])

# two lanes of real clusters under faults: timing-sensitive, and loads the machine
pytestmark = pytest.mark.exclusive


def needs_stack(fn: F) -> F:
    """The marks of a test on the real stack (the checker's own tests need none)."""
    for mark in (pytest.mark.integration, pytest.mark.chaos,
                 pytest.mark.skipif(ETCD is None, reason=ETCD_SKIP),
                 pytest.mark.skipif(HAPROXY is None, reason=HAPROXY_SKIP)):  # fmt: skip
        fn = mark(fn)
    return fn


# ----- the checker finds what it must find (no cluster) ---------------------------------------


def _effect(epoch: int, inst: str, rev: int) -> EffectRecord:
    return EffectRecord(f"k{rev}", "agent-edit", epoch, inst, rev, 0.0, {})


def _obs(**kw: Any) -> hist.Observed:
    base: dict[str, Any] = dict(
        effects=[_effect(10, "inst-a", 11), _effect(20, "inst-b", 21)],
        registries={n: {"x": {"port": 10005}, "y": {"port": 7443}} for n in "abc"},
        serials=dict.fromkeys("abc", "s2"), manifests={n: {"ca/ca.crt": "h"} for n in "abc"},
        generations=dict.fromkeys("abc", 7), published=7,
        runs={"r1": [("n1", "t1")], "r2": [("n2", "t2")]},
    )  # fmt: skip
    base.update(kw)
    return hist.Observed(**base)


def _ops() -> list[hist.Op]:
    Op = hist.Op
    return [
        Op(1, "approve", "x", "", 0, 1, True, reqid="p1", epoch=10, leader="inst-a"),
        Op(2, "approve", "y", "", 0, 1, True, reqid="p2", epoch=20, leader="inst-b"),
        Op(3, "edit", "x", "10003", 0, 1, True),
        Op(4, "edit", "x", "10004", 0, 1, False, "ced exit 1"),
        Op(5, "edit", "x", "10005", 0, 1, True),
        Op(6, "rotate", "", "s2", 0, 1, True, epoch=20, leader="inst-b"),
        Op(7, "run", "n1", "t1", 0, 1, True, reqid="r1"),
        Op(8, "run", "n2", "t2", 0, 1, True, reqid="r2"),
        Op(9, "run", "n2", "t9", 0, 1, False, "ReadError", reqid=""),
    ]


def _bad(verdicts: dict[str, hist.Verdict]) -> dict[str, list[str]]:
    return {k: v.violations for k, v in verdicts.items() if v.violations}


def test_checker_passes_a_correct_history() -> None:
    verdicts = hist.check(_ops(), _obs())
    assert _bad(verdicts) == {}
    assert verdicts["changes"].checked == Counter(approvals=2, edits=2, rotations=1, runs=2)
    assert verdicts["epochs"].checked["effects"] == 2


@pytest.mark.parametrize(
    ("check", "ops", "obs", "needle"),
    [
        # an effect of epoch 10 committed after epoch 20 began
        ("epochs", None, {"effects": [_effect(10, "inst-a", 11), _effect(20, "inst-b", 21),
                                      _effect(10, "inst-a", 25)]}, "after epoch 20 began"),
        # two instances acting under one epoch
        ("epochs", None, {"effects": [_effect(10, "inst-a", 11), _effect(10, "inst-c", 12)]},
         "effects by"),
        # an acknowledgement naming another leader than the effects
        ("epochs", [hist.Op(1, "approve", "x", "", 0, 1, True, epoch=10, leader="inst-c")],
         None, "was led by inst-c"),
        ("changes", None, {"registries": {"a": {"y": {"port": 1}}, "b": {}, "c": {}}},
         "approval of x"),
        ("changes", None, {"registries": {n: {"x": {"port": 10003}, "y": {}} for n in "abc"}},
         "edit of x to port 10005"),
        ("changes", None, {"serials": {"a": "s2", "b": "s1", "c": "s2"}}, "rotation to s2"),
        ("changes", None, {"runs": {"r2": [("n2", "t2")]}}, "run r1"),
        ("runs", None, {"runs": {"r1": [("n1", "t1"), ("n1", "t1")], "r2": [("n2", "t2")]}},
         "ran 2 times"),
        ("honest", [*_ops(), hist.Op(10, "run", "n1", "t10", 0, 1, False, "HTTP 500: x")],
         {"runs": {"r1": [("n1", "t1")], "r2": [("n2", "t2")], "r10": [("n1", "t10")]}},
         "but ran"),
        ("convergence", None, {"converge_error": "timed out"}, "not converged"),
        ("convergence", None, {"manifests": {"a": {"f": "1"}, "b": {"f": "1"}, "c": {"f": "2"}}},
         "files differ"),
    ],
)  # fmt: skip
def test_checker_finds_a_planted_violation(
    check: str, ops: list[hist.Op] | None, obs: dict[str, Any] | None, needle: str
) -> None:
    verdicts = hist.check(_ops() if ops is None else ops, _obs(**(obs or {})))
    assert any(needle in v for v in verdicts[check].violations), verdicts[check].violations
    assert set(_bad(verdicts)) == {check}


def test_an_edit_lost_to_a_later_unacknowledged_attempt_is_allowed() -> None:
    ops = [*_ops(), hist.Op(10, "edit", "x", "10010", 0, 1, False, "timeout")]
    obs = _obs(registries={n: {"x": {"port": 10010}, "y": {}} for n in "abc"})
    assert hist.check(ops, obs)["changes"].violations == []


# ----- randomized fault runs on the real stack ------------------------------------------------


@dataclass
class RunRecord:
    lane: int
    n: int
    seed: int
    faults: list[Fault]
    verdicts: dict[str, hist.Verdict]
    ops: dict[str, dict[str, int]]
    failed: dict[str, int]
    seconds: float
    converge_s: float
    rotated: bool
    errors: list[str]


@dataclass
class Results:
    seed: int
    runs: list[RunRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    skipped_kinds: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def violations(self, check: str) -> list[str]:
        return [f"lane {r.lane} run {r.n} (seed {r.seed}, faults "
                f"{[f.kind + ':' + f.target for f in r.faults]}): {v}"
                for r in self.runs for v in r.verdicts[check].violations]  # fmt: skip


def _spec(script: Path, lane: int) -> ClusterSpec:
    return ClusterSpec(
        agents={f"n{lane}a": f"127.0.{lane + 10}.2", f"n{lane}b": f"127.0.{lane + 10}.3"},
        scripts={hist.RECORD: str(script)}, ttl=TTL, etcd_size=3, sync_mode="push",
        tls=True, haproxy=True,
        extra={"pairing_rate_limit_disable": "1", "pairing_max_queue": "1000",
               "pairing_max_per_source": "0", "drain_wait": "1"},
    )  # fmt: skip


def _heal(c: Cluster, faults: Faults) -> None:
    faults.close()
    for m in range(len(c.etcd.members)):
        if c.etcd.members[m].proc is None:
            c.etcd.start_member(m, timeout=30)
    for inst in c.insts.values():
        if not inst.alive and inst.proc is not None:
            inst.proc.wait(5)
    c.ensure_all_running()
    c.one_leader(30)


def _one_run(c: Cluster, lane: int, n: int, seed: int, kinds: list[str], runs_dir: Path,
             history: hist.History) -> RunRecord:  # fmt: skip
    rng = random.Random(seed)
    t0 = time.monotonic()
    c.ensure_all_running()
    c.one_leader(30)
    chosen = [rng.choice(kinds) for _ in range(rng.randint(1, 3))]
    rotate = rng.random() < ROTATE_P
    rotation: threading.Thread | None = None
    errors: list[str] = []
    with Faults(c, rng) as faults:
        try:
            with hist.Workload(c, history, f"l{lane}r{n}", seed=seed, max_seconds=150) as w:
                time.sleep(2.0)
                if rotate:
                    rotation = threading.Thread(target=hist.rotate, args=(c, history),
                                                daemon=True)  # fmt: skip
                    rotation.start()
                    time.sleep(rng.uniform(0.0, 3.0))
                for kind in chosen:
                    try:
                        faults.inject(kind)
                    except Exception as exc:  # healed below; the history is checked anyway
                        errors.append(f"fault {kind}: {type(exc).__name__}: {exc}"[:500])
                    time.sleep(rng.uniform(0.2, 1.5))
                if rotation is not None:
                    rotation.join(170)
                time.sleep(1.0)
            if w.crashed:
                raise RuntimeError(f"the workload crashed: {w.crashed!r}")
        finally:
            _heal(c, faults)
    obs = hist.observe(c, runs_dir, converge_within=40)
    verdicts = hist.check(history.ops, obs)
    # a fault whose victim never came back (or no successor came) is a convergence failure
    verdicts["convergence"].violations += errors
    hist.dump(runs_dir.parent / "history.jsonl", history.ops)
    return RunRecord(lane, n, seed, list(faults.done), verdicts, history.counts(),
                     history.failures(), round(time.monotonic() - t0, 1), obs.converge_seconds,
                     rotate, errors)  # fmt: skip


def _lane(res: Results, lane: int, tmp: Path, kinds: list[str], deadline: float) -> None:
    """The runs of one lane. A stack that fails to come up (on a busy machine a free port
    can be taken before the process binds it) is brought up once more in a fresh dir."""
    runs_dir = tmp / "runs"
    script = hist.record_script(tmp / "record.sh", runs_dir)
    for attempt in (1, 2):
        up = False
        try:
            with running_cluster(tmp / f"cluster{attempt}", _spec(script, lane)) as c:
                c.one_leader(30)
                c.converged(40)
                up = True
                _runs(res, c, lane, kinds, runs_dir, deadline)
            return
        except BaseException as exc:
            if up or attempt == 2:
                with res.lock:
                    res.errors.append(f"lane {lane}: {type(exc).__name__}: {exc}"[:3000])
                return


def _runs(res: Results, c: Cluster, lane: int, kinds: list[str], runs_dir: Path,
          deadline: float) -> None:  # fmt: skip
    history = hist.History()  # one history per lane: every check covers all its runs
    for n in range(1, RUNS + 1):
        if time.monotonic() > deadline:
            break
        rec = _one_run(c, lane, n, res.seed + 1000 * lane + n, kinds, runs_dir, history)
        with res.lock:
            res.runs.append(rec)
        print(f"[faults] lane {lane} run {n} seed {rec.seed}: "
              f"{[f.kind + ':' + f.target for f in rec.faults]} in {rec.seconds} s, converged "
              f"in {rec.converge_s} s, ops {rec.ops}, failed {rec.failed}, violations "
              f"{ {k: len(v.violations) for k, v in rec.verdicts.items()} }", flush=True)  # fmt: skip


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Results:
    res = Results(SEED)
    only = os.environ.get("CTRL_EXEC_FAULT_KINDS")  # e.g. "partition,readonly" to focus
    kinds = [k for k in KINDS if not only or k in only.split(",")]
    for kind, why in (("partition", partition_available()), ("readonly", readonly_available())):
        if why:
            if kind in kinds:
                kinds.remove(kind)
            res.skipped_kinds[kind] = why
    deadline = time.monotonic() + BUDGET
    lanes = [threading.Thread(target=_lane, daemon=True, name=f"lane-{i}",
                              args=(res, i, tmp_path_factory.mktemp(f"faults{i}"), kinds,
                                    deadline)) for i in range(LANES)]  # fmt: skip
    for t in lanes:
        t.start()
    for t in lanes:
        t.join(BUDGET + 240)
    return res


def _report(res: Results) -> dict[str, Any]:
    faults = Counter(f.kind for r in res.runs for f in r.faults)
    checked: Counter[str] = Counter()
    lanes = {r.lane for r in res.runs}
    for lane in lanes:  # the checks of a lane's last run cover every op of that lane
        last = max((r for r in res.runs if r.lane == lane), key=lambda r: r.n)
        for v in last.verdicts.values():
            checked.update(v.checked)
    return {
        "seed": res.seed, "runs": len(res.runs), "faults": sum(faults.values()),
        "faults_by_kind": dict(sorted(faults.items())), "skipped_kinds": res.skipped_kinds,
        "rotation_runs": sum(r.rotated for r in res.runs),
        "operations_checked": dict(sorted(checked.items())),
        "violations": {k: res.violations(k) for k in hist.CHECKS},
        "lane_errors": res.errors,
        "fault_errors": [f"lane {r.lane} run {r.n}: {e}" for r in res.runs for e in r.errors],
        "seconds_per_run": [r.seconds for r in res.runs],
    }  # fmt: skip


@needs_stack
@pytest.mark.timeout(BUDGET + 300)
def test_randomized_fault_runs(results: Results, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _report(results)
    with capsys.disabled():
        print(f"\n[faults] seed {SEED} (replay: CTRL_EXEC_FAULT_SEED={SEED})")
        print(f"[faults] {json.dumps(doc, indent=1)}", flush=True)
    assert not results.errors, results.errors  # fault errors count under convergence
    assert len(results.runs) >= LANES, doc


def _no_violations(results: Results, check: str) -> None:
    assert results.runs, "no fault run completed"
    bad = results.violations(check)
    assert not bad, f"{len(bad)} violation(s) (seed {SEED}): " + "\n".join(bad[:20])


@needs_stack
@pytest.mark.timeout(60)
def test_never_two_epochs_acting_at_once(results: Results) -> None:
    _no_violations(results, "epochs")


@needs_stack
@pytest.mark.timeout(60)
def test_no_acknowledged_change_lost(results: Results) -> None:
    _no_violations(results, "changes")


@needs_stack
@pytest.mark.timeout(60)
def test_no_script_run_twice_for_one_request(results: Results) -> None:
    _no_violations(results, "runs")


@needs_stack
@pytest.mark.timeout(60)
def test_no_run_reported_failed_that_ran(results: Results) -> None:
    _no_violations(results, "honest")


@needs_stack
@pytest.mark.timeout(60)
def test_every_instance_converged_on_one_generation(results: Results) -> None:
    _no_violations(results, "convergence")


# ----- the lost edit, made deterministic -------------------------------------------------------


@needs_stack
@pytest.mark.timeout(60)
def test_every_agent_answers_after_the_faults_healed(results: Results) -> None:
    _no_violations(results, "liveness")


@needs_stack
@pytest.mark.timeout(240)
def test_an_acknowledged_edit_survives_the_loss_of_both_members_that_applied_it(
    tmp_path: Path,
) -> None:
    """Follower S cannot apply (read-only disk); ``ced edit-agent`` is acknowledged by the
    leader and the other follower A (sync_ack majority); then the leader and A are
    killed; S alone remains. The edit must not be lost: S must not publish files without
    it (whether it then leads or waits for a member that has it)."""
    script = hist.record_script(tmp_path / "record.sh", tmp_path / "runs")
    spec = ClusterSpec(agents={"lost1": "127.0.0.31"}, scripts={hist.RECORD: str(script)},
                       ttl=TTL, etcd_size=3, sync_mode="push", tls=True, haproxy=True,
                       extra={"drain_wait": "1"})  # fmt: skip
    with running_cluster(tmp_path / "cluster", spec) as c, Faults(c) as faults:
        leader = c.one_leader(30)
        c.converged(40)
        stale, acker = [i for i in c.insts.values() if i is not leader]
        before = json.loads((stale.registry_dir / "lost1.json").read_text())["port"]
        with faults.read_only(stale):
            p = c.ced(acker, "edit-agent", "lost1", "--agent-port", "12345", "--json")
            assert p.returncode == 0, p.stdout + p.stderr
            for inst in (acker, leader):
                inst.signal(signal.SIGKILL)
                assert inst.proc is not None
                inst.proc.wait(10)
        time.sleep(5 * TTL)  # past the new leader's catch-up limit (3 TTLs)
        for inst in (acker, leader):
            c.restart(inst)
        c.one_leader(30)
        c.converged(40)
        ports = {i.name: json.loads((i.registry_dir / "lost1.json").read_text())["port"]
                 for i in c.insts.values()}  # fmt: skip
        diverged = "ACTION=sync-diverged" in stale.logtext()
        print(f"\n[faults] edit 12345 (was {before}) after losing both holders: ports {ports}, "
              f"sync-diverged logged: {diverged}")  # fmt: skip
        assert set(ports.values()) == {12345}, (ports, diverged)
