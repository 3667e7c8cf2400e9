"""Leader failover time (kill -9 and SIGTERM) and requests lost during instance kills.

Usage: ``bench/failover_bench.py [--trials 20] [--signals kill9,sigterm] [--ttl 2] [--keep]``

Brings up the real stack under a temporary directory (``ops/lab/hacluster.py``): a
3-member etcd, three ``ctrl-exec-api`` instances with ``lease_ttl`` 2 s and shared state
paths, HAProxy configured by ``dispatcher.haproxy.render`` (TCP passthrough, PROXY v2 to
the instances' TLS API) and three real agents. A client thread sends ``POST /ping`` (all
agents) and ``POST /run`` (one agent) through HAProxy's API frontend all the time, a new
connection per attempt, one retry allowed.

Each trial signals the current leader (``--trials`` with SIGKILL, then as many with
SIGTERM; ``--signals sigterm`` for the SIGTERM trials alone), measures the time from the
signal to another instance's ``/leader`` answering 200 (polled every ~2 ms over
kept-alive connections), restarts the victim and waits until it is healthy and back in
HAProxy. Printed: median / p90 / max / min per signal, and the client's failed first
attempts and failures after the retry during the kills (requests in flight from each
signal until the victim is back), against the targets: SIGTERM handover under 250 ms
with no failed first attempt, kill -9 failover under TTL + 1 s, no request lost with one
retry.

A run in flight on a killed instance leaves its host:script lock in etcd until the
victim's session lease expires (<= TTL): its retry, and new runs of that host:script
meanwhile, get an explicit 409 ``locked``. Those are counted apart ("409 locked, explained
by a cut run"); every other failure after the retry counts as lost. Bounded by
``--max-seconds``; every process is stopped at the end; ``--keep`` keeps the logs and
``outcomes.json`` (every request and trial).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from ops.lab.etcd import ETCD  # noqa: E402
from ops.lab.hacluster import (  # noqa: E402
    Cluster,
    ClusterSpec,
    Inst,
    Load,
    LoadReport,
    Outcome,
    running_cluster,
)
from ops.lab.haproxy import HAPROXY  # noqa: E402

AGENTS = {"node1": "127.0.0.2", "node2": "127.0.0.3", "node3": "127.0.0.4"}
SCRIPT = """#!/bin/sh
echo "argc=$#"
i=1
for a in "$@"; do echo "arg$i=[$a]"; i=$((i+1)); done
"""
SIGTERM_TARGET = 0.250


@dataclass
class Trial:
    sig: str
    victim: str
    new_leader: str
    seconds: float  # signal -> another instance's /leader 200
    window: tuple[float, float]  # signal .. victim back in HAProxy (monotonic)
    ttl: float
    wall: float = 0.0  # time.time() of the signal (to read the HAProxy and instance logs)
    old_epoch: int = 0
    new_epoch: int = 0


@dataclass
class Results:
    trials: list[Trial] = field(default_factory=list)

    def of(self, sig: str) -> list[Trial]:
        return [t for t in self.trials if t.sig == sig]


def poll_new_leader(others: list[Inst], timeout: float) -> tuple[Inst, float] | None:
    """The first of ``others`` whose /leader answers 200, and when (monotonic)."""
    clients = {i.name: httpx.Client(base_url=i.health_url, trust_env=False, timeout=0.5)
               for i in others}  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for inst in others:
                try:
                    r = clients[inst.name].get("/leader")
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    return inst, time.monotonic()
            time.sleep(0.002)
        return None
    finally:
        for c in clients.values():
            c.close()


def trial(c: Cluster, sig: signal.Signals, bound: float) -> Trial:
    c.ensure_all_running()
    old = c.one_leader()
    old_epoch = int(old.status()["epoch"])
    others = [i for i in c.insts.values() if i is not old]
    wall = time.time()
    t0 = old.signal(sig)
    found = poll_new_leader(others, bound)
    if found is None:
        raise RuntimeError(f"no new leader {bound} s after {sig.name} of {old.name}")
    new, t_new = found
    assert old.proc is not None
    old.proc.wait(30)
    c.restart(old)
    t_back = time.monotonic()
    new_epoch = int(new.status()["epoch"])
    return Trial(sig.name, old.name, new.name, t_new - t0, (t0, t_back), c.ttl, wall,
                 old_epoch, new_epoch)  # fmt: skip


def stats(values: list[float]) -> dict[str, float]:
    ms = sorted(v * 1000 for v in values)
    if not ms:
        return {}
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[min(len(ms) - 1, int(0.9 * len(ms)))], 1),
        "max_ms": round(ms[-1], 1),
        "min_ms": round(ms[0], 1),
    }


def during(load: Load, trials: list[Trial]) -> tuple[LoadReport, list[Outcome]]:
    """The requests in flight while a victim was down (signal .. back in HAProxy), and
    those that failed after the retry for another reason than a cut run's lock."""
    out: list[Outcome] = []
    lost: list[Outcome] = []
    for t in trials:
        rep = load.report(t.window[0], t.window[1])
        out += rep.outcomes
        lost += rep.unexplained(t.window[0], t.ttl) if t.sig == "SIGKILL" else rep.failures
    return LoadReport(out), lost


def load_numbers(rep: LoadReport, lost: list[Outcome]) -> dict[str, Any]:
    doc = rep.summary()
    doc["first_attempt_failures_by_kind"] = dict(Counter(o.kind for o in rep.first_failures))
    doc["lost_after_retry"] = len(lost)
    doc["locked_explained_by_a_cut_run"] = len(rep.failures) - len(lost)
    if rep.failures:
        doc["failed_after_retry"] = rep.describe(20)
    return doc


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    script = work / "echo-args.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    spec = ClusterSpec(agents=AGENTS, scripts={"echo-args": str(script)}, ttl=args.ttl,
                       etcd_size=3, tls=True, haproxy=True)  # fmt: skip
    deadline = time.monotonic() + args.max_seconds
    res = Results()
    t_start = time.monotonic()
    with running_cluster(work / "cluster", spec) as c:
        print(f"stack up in {time.monotonic() - t_start:.1f} s: etcd x3, instances "
              f"{', '.join(i.id for i in c.insts.values())}, HAProxy API {c.api_url}, "
              f"agents {', '.join(AGENTS)}", flush=True)  # fmt: skip
        with c.load(interval=args.interval, max_seconds=args.max_seconds,
                    max_requests=1_000_000) as load:  # fmt: skip
            load.wait_requests(20, 30)
            plan = (
                [(signal.SIGKILL, args.ttl + 3.0)] * args.trials if "kill9" in args.signals else []
            )
            plan += [(signal.SIGTERM, 5.0)] * args.trials if "sigterm" in args.signals else []
            for n, (sig, bound) in enumerate(plan, 1):
                if time.monotonic() > deadline:
                    print(f"stopping early: --max-seconds {args.max_seconds} reached", flush=True)
                    break
                t = trial(c, sig, bound)
                res.trials.append(t)
                w, lost = during(load, [t])
                print(f"  {n:3d} {sig.name:7s} {t.victim} -> {t.new_leader}: "
                      f"{t.seconds * 1000:7.1f} ms  epoch {t.old_epoch} -> {t.new_epoch}  "
                      f"load: {w.requests} requests, {len(w.first_failures)} failed first "
                      f"attempts, {len(w.failures)} failed after retry ({len(lost)} lost)",
                      flush=True)  # fmt: skip
        whole = load.report()
    kill, term = res.of("SIGKILL"), res.of("SIGTERM")
    k_stats, t_stats = stats([t.seconds for t in kill]), stats([t.seconds for t in term])
    (d_kill, l_kill), (d_term, l_term) = during(load, kill), during(load, term)
    windows = [(t.window[0], t.window[1]) for t in res.trials]
    outside = LoadReport([o for o in whole.outcomes
                          if not any(o.ended >= a and o.started < b for a, b in windows)])  # fmt: skip
    if args.keep:
        dump = {"trials": [asdict(t) for t in res.trials],
                "outcomes": [asdict(o) for o in whole.outcomes]}  # fmt: skip
        (work / "outcomes.json").write_text(json.dumps(dump, indent=1))
    return {
        "ttl_s": args.ttl,
        "kill9_failover": k_stats,
        "sigterm_handover": t_stats,
        "load_during_kill9": load_numbers(d_kill, l_kill),
        "load_during_sigterm": load_numbers(d_term, l_term),
        "load_outside_the_trials": load_numbers(outside, outside.failures),
        "targets": targets(args, kill, term, d_term, not (l_kill or l_term or outside.failures)),
        "seconds": round(time.monotonic() - t_start, 1),
    }


def targets(args: argparse.Namespace, kill: list[Trial], term: list[Trial], during_term: LoadReport,
            none_lost: bool) -> dict[str, bool]:  # fmt: skip
    """The targets of the trials that ran: SIGTERM handover under 250 ms with no failed
    first attempt (issue 6: "0 failed first attempts over 20 SIGTERMs under load"),
    kill -9 failover under TTL + 1 s, nothing lost with one retry."""
    out: dict[str, bool] = {}
    if "sigterm" in args.signals:
        out["sigterm_under_250ms"] = bool(term) and max(t.seconds for t in term) < SIGTERM_TARGET
        out["sigterm_zero_failed_first_attempts"] = bool(term) and not during_term.first_failures
    if "kill9" in args.signals:
        out["kill9_under_ttl_plus_1s"] = bool(kill) and max(t.seconds for t in kill) < args.ttl + 1
    out["zero_lost_with_one_retry"] = none_lost
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--trials", type=int, default=20, help="trials per signal (default 20)")
    p.add_argument(
        "--signals",
        default="kill9,sigterm",
        type=lambda v: set(v.split(",")) - {""},
        help="which trials: kill9, sigterm or both (default kill9,sigterm)",
    )
    p.add_argument("--ttl", type=int, default=2, help="lease_ttl of the instances (s)")
    p.add_argument("--interval", type=float, default=0.02, help="client pause between requests")
    p.add_argument("--max-seconds", type=float, default=900, help="stop starting trials after")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    p.add_argument("--json", action="store_true", help="print only the JSON summary")
    p.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args()
    if ETCD is None or HAPROXY is None:
        print("needs etcd and haproxy (apt-get install etcd-server haproxy)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    try:
        if args.json:
            with open(os.devnull, "w") as null:
                stdout, sys.stdout = sys.stdout, null
                try:
                    doc = run(args, work)
                finally:
                    sys.stdout = stdout
        else:
            doc = run(args, work)
    finally:
        if args.keep:
            print(f"work dir kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(doc))
    else:
        print_summary(doc)
    return 1 if args.check and not all(doc["targets"].values()) else 0


def print_summary(doc: dict[str, Any]) -> None:
    def line(name: str, s: dict[str, float]) -> str:
        if not s:
            return f"{name}: no trials"
        return (f"{name} (n={s['n']:.0f}): median {s['median_ms']:.0f} ms, p90 "
                f"{s['p90_ms']:.0f} ms, max {s['max_ms']:.0f} ms, min {s['min_ms']:.0f} ms")  # fmt: skip

    print()
    print(f"lease_ttl {doc['ttl_s']} s; {doc['seconds']} s in all")
    print(line("kill -9 of the leader -> new leader", doc["kill9_failover"]))
    print(line("SIGTERM of the leader -> new leader", doc["sigterm_handover"]))
    for key, what in (("load_during_kill9", "client load during the kill -9 trials"),
                      ("load_during_sigterm", "client load during the SIGTERM trials"),
                      ("load_outside_the_trials", "client load between the trials")):  # fmt: skip
        d = doc[key]
        if not d["requests"] and key != "load_outside_the_trials":
            continue  # a signal whose trials did not run (--signals)
        print(f"{what}: {d['requests']} requests, {d['first_attempt_failures']} failed first "
              f"attempts {d['first_attempt_errors'] or ''}, {d['failures_after_retry']} failed "
              f"after one retry ({d['locked_explained_by_a_cut_run']} of them 409 locked by a "
              f"run the kill cut, {d['lost_after_retry']} lost); latency p50 "
              f"{d['latency_p50_ms']} ms, max {d['latency_max_ms']} ms")  # fmt: skip
        if d.get("failed_after_retry"):
            print(f"    failed after retry: {d['failed_after_retry']}")
    for name, ok in doc["targets"].items():
        print(f"target {name}: {'met' if ok else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
