"""Latency of an acknowledged leader-only change, by ``sync_ack`` mode.

Usage: ``bench/ack_bench.py [-n 30] [--modes none,one,majority] [--sync-mode push]``

For each mode, brings up the real stack under a temporary directory
(``ops/lab/hacluster.py``): a 1-member etcd and three ``ctrl-exec-api`` instances, and
then approves ``n`` queued pairing requests through the leader's API
(``POST /pairing/{reqid}/approve``: the leader signs, registers the agent and answers).
An approval writes the registry, so the answer waits for the generation carrying it to
be applied by the members the mode asks for (:mod:`dispatcher.ha.replication`). Printed
per mode: median / p90 / max of the approval's wall time as the client sees it, and
after each answer how many members already ran the new generation (read from etcd at
once): with ``majority`` at least 2 of 3, every time. Target: majority under 50 ms on
loopback. Every process is stopped at the end.

Then, read from the instances' logs (millisecond timestamps), the median of each serial
step of an approval: the operation until its effects commit (signing, one fenced
transaction), the local writes, the generation publish, the followers' apply (push:
the leader's push; fetch: watch, fetch, stage, swap, member record), and the rest until
the answer (the leader reads the member records, records the acknowledged generation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.common import certs, logfmt  # noqa: E402
from dispatcher.pairing import queue as pq  # noqa: E402
from dispatcher.statewrite import LocalWriter  # noqa: E402
from ops.lab.etcd import ETCD  # noqa: E402
from ops.lab.hacluster import ClusterSpec, running_cluster  # noqa: E402


def _events(log: Path) -> list[tuple[float, str, dict[str, str]]]:
    """``(time, action, fields)`` of every line of an instance's log."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
            action, fields = logfmt.parse_line(rest.partition(": ")[2])
        except ValueError:
            continue
        out.append((t, action, fields))
    return out


STEPS = ("request to effects committed", "local writes", "publish", "first follower applied",
         "majority to answer")  # fmt: skip


def steps(logs: dict[str, Path], leader: str) -> dict[str, float]:
    """The median of each serial step of the approvals (ms), from the instances' logs."""
    evs = {name: _events(p) for name, p in logs.items()}
    lead = evs[leader]
    applied = sorted(t for name, e in evs.items() if name != leader
                     for t, a, _f in e if a == "sync-applied")  # fmt: skip
    got: dict[str, list[float]] = {k: [] for k in STEPS}
    begin = committed = end = None
    for i, (t, a, f) in enumerate(lead):
        if a == "api-request" and f.get("PATH", "").endswith("/approve"):
            begin, committed, end = t, None, None
        elif a == "log" and "pairing-approve committed" in f.get("MSG", "") and begin:
            committed = committed or t
        elif a == "leader-op" and f.get("PHASE") == "end" and begin and committed:
            end = t
        elif a == "pair-approve-api" and begin and committed and end:
            pub = next(((x, ff) for x, aa, ff in lead[i::-1]  # the publish before the answer
                        if aa == "log" and "generation-publish committed" in ff.get("MSG", "")),
                       None)  # fmt: skip
            first = next((x for x in applied if x >= end), None)
            if pub is None or first is None or pub[0] < end:
                continue
            for k, v in zip(STEPS, (committed - begin, end - committed, pub[0] - end,
                                    first - pub[0], t - first), strict=True):  # fmt: skip
                got[k].append(v * 1000)
            begin = None
    return {k: round(statistics.median(v), 1) for k, v in got.items() if v}


def one_mode(
    mode: str, n: int, sync_mode: str, tmp: Path
) -> tuple[dict[str, float | int], dict[str, float]]:
    spec = ClusterSpec(agents={}, scripts={}, ttl=2, etcd_size=1, sync_mode=sync_mode,
                       tls=sync_mode == "push", extra={"sync_ack": mode})  # fmt: skip
    times: list[float] = []
    applied: list[int] = []
    with running_cluster(tmp / mode, spec) as cluster:
        leader = cluster.one_leader()
        cluster.converged()
        backend = cluster.backend()
        try:
            with cluster.client(leader) as c:
                for i in range(n):
                    name = f"bench-{mode}-{i}.example"
                    csr = certs.make_csr(certs.new_key("ec-p256"), name)
                    rec = pq.submit(leader.state / "pairing", hostname=name, csr=csr,
                                    nonce=f"{i:032x}", source_ip=f"127.0.1.{i % 250 + 1}",
                                    writer=LocalWriter())  # fmt: skip
                    t0 = time.perf_counter()
                    r = c.post(f"/pairing/{rec['id']}/approve", json={"lookup_by": "ip"})
                    times.append(time.perf_counter() - t0)
                    if r.status_code != 200:
                        raise SystemExit(f"approve failed: {r.status_code} {r.text}")
                    for suffix in (".json", ".approved"):  # as if the agent collected it
                        (leader.state / "pairing" / f"{rec['id']}{suffix}").unlink(missing_ok=True)
                    g = leader.status()["generation"]
                    applied.append(sum(1 for m in backend.members() if m.generation >= g))
        finally:
            backend.close()
        breakdown = steps({i.name: i.log for i in cluster.insts.values()}, leader.name)
    times.sort()
    return {
        "median_ms": round(statistics.median(times) * 1000, 1),
        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 1),
        "max_ms": round(times[-1] * 1000, 1),
        "min_members_applied": min(applied),
    }, breakdown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=30, help="approvals per mode")
    ap.add_argument("--modes", default="none,one,majority")
    ap.add_argument("--sync-mode", default="push", choices=("push", "shared-fs"))
    ap.add_argument("--keep", default="", help="keep the clusters (logs) under this dir")
    ns = ap.parse_args()
    if ETCD is None:
        print("etcd is not installed (apt-get install etcd-server)", file=sys.stderr)
        return 2
    print(f"acknowledged-change latency: {ns.n} approvals per mode, 3 instances, "
          f"sync_mode = {ns.sync_mode}; load average {_load()}")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ctrl-exec-ack-bench-") as tmp:
        for mode in ns.modes.split(","):
            top = Path(ns.keep) if ns.keep else Path(tmp)
            res, breakdown = one_mode(mode, ns.n, ns.sync_mode, top)
            target = " (target < 50 ms)" if mode == "majority" else ""
            print(f"  sync_ack = {mode:<8} approve median {res['median_ms']} ms, "
                  f"p90 {res['p90_ms']} ms, max {res['max_ms']} ms; members on the new "
                  f"generation at the answer: >= {res['min_members_applied']} of 3{target}; "
                  f"load average {_load()}")  # fmt: skip
            print(
                "    serial steps, median ms: "
                + "; ".join(f"{k} {v}" for k, v in breakdown.items())
            )
    return 0


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
