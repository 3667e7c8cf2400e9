"""Job history with 10,000 runs kept: ``ced history --limit 50`` latency, and what the run
path pays to record one more run.

Usage: ``bench/history_bench.py [-n 15] [--runs 10000]``

Fills a throwaway ``state_dir`` with ``--runs`` records (two hosts each, written as the
store writes them), then prints the median (min/p90) wall time of ``ced history --limit
50`` (a subprocess, as an operator runs it, byte-compiled as installed; this instance's store
alone: no etcd), of
``ced history --host`` naming a host of no run (the whole index read: the worst case),
in-process listings, and :meth:`HistoryStore.save` at that size (the cost ``ced run``
adds, retention included).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dispatcher.config import DispatcherConfig  # noqa: E402
from dispatcher.history import records as hr  # noqa: E402
from dispatcher.history.store import HistoryStore, write_json  # noqa: E402
from dispatcher.history.view import listing  # noqa: E402

T0 = 1_800_000_000.0


def record(i: int) -> dict[str, object]:
    hosts = (f"web{i % 50}", f"db{i % 7}")
    results = [{"host": h, "exit": 0, "stdout": f"run {i} on {h}\n" * 4, "stderr": ""}
               for h in hosts]  # fmt: skip
    return hr.build(
        reqid=f"{i:016x}", mode="sync", via="cli", script=f"script{i % 20}", args=["-v"],
        args_policy="keep", user=(f"user{i % 5}", "unix"), results=results,
        outcomes=dict.fromkeys(hosts, "ok"), started=T0 + i, finished=T0 + i + 1,
        instance="bench", output_max=65536,
    )  # fmt: skip


def fill(store: HistoryStore, n: int) -> None:
    for d in (store.runs, store.index):
        d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rec = record(i)
        s = hr.summary(rec)
        write_json(store.runs / f"{rec['reqid']}.json", rec)
        write_json(store.index / f"{hr.key_of(s)}.json", s)


def stats(ms: list[float]) -> str:
    ms = sorted(ms)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    return f"median {statistics.median(ms):6.1f} ms  (min {ms[0]:.1f}, p90 {p90:.1f})"


def _cpu() -> float:
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) * 1000


def timed(fn: object, n: int) -> str:
    """Wall and CPU statistics of ``n`` calls (on a busy machine the wall time mostly
    measures the neighbours; CPU time is what the command itself costs)."""
    wall, cpu = [], []
    for _ in range(n):
        t, c = time.perf_counter(), _cpu()
        fn()  # type: ignore[operator]
        wall.append((time.perf_counter() - t) * 1000)
        cpu.append(_cpu() - c)
    return f"{stats(wall)}  cpu {statistics.median(cpu):6.1f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=15)
    ap.add_argument("--runs", type=int, default=10_000)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "ctrl-exec.conf"
        conf.write_text(f"state_dir = {tmp}/state\nca_dir = {tmp}/ca\nlog_target = stderr\n"
                        f"history_max_runs = {a.runs + 1000}\n"
                        f"history_max_age = {10 * 365 * 86400}\n")  # fmt: skip
        cfg = DispatcherConfig(state_dir=f"{tmp}/state", instance_id="bench",
                               history_max_runs=a.runs + 1000).finish()  # fmt: skip
        store = HistoryStore(cfg.state_dir, max_runs=a.runs + 1000, max_age=10 * 365 * 86400)
        t = time.perf_counter()
        fill(store, a.runs)
        print(f"history bench: {a.runs} runs written in {time.perf_counter() - t:.1f} s")
        ced = [sys.executable, "-m", "dispatcher.ced", "--config", str(conf), "history", "--json"]
        first = subprocess.run([*ced, "--limit", "50"], capture_output=True, text=True, check=True)
        assert first.stdout.count('"reqid"') == 50, first.stdout[:200]

        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([*ced, "--limit", "1"], env=env, capture_output=True, check=True)

        def run(*extra: str) -> None:  # byte-compiled, as an installed package runs
            subprocess.run([*ced, *extra], env=env, capture_output=True, check=True)

        floor = timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), a.n)
        print(f"python -c pass                        {floor}")
        print(f"ced history --limit 50 ({a.runs} runs)  "
              f"{timed(lambda: run('--limit', '50'), a.n)}")  # fmt: skip
        print(f"ced history --host nowhere (all read)  "
              f"{timed(lambda: run('--host', 'nowhere'), max(3, a.n // 3))}")  # fmt: skip
        print(f"in-process listing, limit 50          "
              f"{timed(lambda: listing(cfg, hr.Filter(), 50, store=store), a.n)}")  # fmt: skip
        flt = hr.Filter(script="script7", user="user2")
        print(f"in-process listing, script+user, 50   "
              f"{timed(lambda: listing(cfg, flt, 50, store=store), a.n)}")  # fmt: skip
        i = iter(range(a.runs, a.runs + 10 * a.n))
        print(f"record one more run (ced run's cost)  "
              f"{timed(lambda: store.save(record(next(i))), a.n)}")  # fmt: skip


if __name__ == "__main__":
    main()
