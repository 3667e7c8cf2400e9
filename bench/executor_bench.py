"""Executor benchmark: the latency executor mode adds to a run, over direct mode.

Root only. Starts a real ``ctrl-exec-executor`` and two real agents on loopback, one in
direct mode and one with ``executor_socket``, and runs the same trivial script (``#!/bin/sh``,
``echo ok``) through each:

* end to end: ``POST /run`` over mTLS with a resumed TLS session, as a dispatcher sees it;
* in process: the agent's own call (:func:`agent.runner.run_script` vs the executor client),
  without TLS or HTTP;

each for the ``default`` profile (``run_as nobody``: mount namespace, credentials switched
by the spawner's child before its one exec, :mod:`agent.executor.spawner`) and a
``confined`` one (``writable``: the whole tree read-only, a private ``/tmp``, one writable
bind). Direct and executor runs alternate, so both see the same load on a shared machine;
it prints median and p99 of both series and of the per-pair difference, the latency the
executor adds (target: median < 3 ms), and the CPU time per run of every process
involved, which does not depend on the machine's load.

Usage: .venv/bin/python bench/executor_bench.py [--runs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.executor.client import run_via_executor  # noqa: E402
from agent.runner import RunResult, run_script  # noqa: E402
from bench.agent_bench import Client  # noqa: E402
from ops.lab.agentproc import AgentProc, make_agent  # noqa: E402
from ops.lab.executorproc import ExecutorProc  # noqa: E402
from ops.lab.pki import Issued, TestCA  # noqa: E402

Series = tuple[float, float]  # median, p99 in ms


def stats(samples: list[float]) -> Series:
    samples.sort()
    return statistics.median(samples), samples[max(0, int(len(samples) * 0.99) - 1)]


def paired(
    direct: Callable[[], float], via: Callable[[], float], n: int
) -> tuple[Series, Series, Series]:
    """Alternate one direct run and one executor run ``n`` times, so both see the same
    machine load: (direct, executor, per-pair difference) as (median, p99)."""
    for _ in range(5):  # warm-up: TLS sessions, caches
        direct(), via()
    ds, vs, diffs = [], [], []
    for _ in range(n):
        d, v = direct(), via()
        ds.append(d)
        vs.append(v)
        diffs.append(v - d)
    return stats(ds), stats(vs), stats(diffs)


def http_call(agent: AgentProc, who: Issued, script: str) -> Callable[[], float]:
    c = Client(agent, who, resume=True)
    body = {"script": script, "args": [], "reqid": "bench", "username": "", "token": ""}

    def one() -> float:
        t0 = time.perf_counter()
        assert c.call("POST", "/run", body) == 200
        return (time.perf_counter() - t0) * 1000

    return one


def loop_call(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[RunResult]]
              ) -> Callable[[], float]:  # fmt: skip
    def one() -> float:
        t0 = time.perf_counter()
        res = loop.run_until_complete(call())
        ms = (time.perf_counter() - t0) * 1000
        assert res.exit == 0 and res.stdout == "ok\n", res
        return ms

    return one


TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def cpu_ms(pid: int) -> float:
    """CPU time of ``pid`` and its reaped children, in ms (utime+stime+cutime+cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) * TICK_MS


def tree_cpu_ms(pid: int) -> float:
    """CPU time of ``pid``, its reaped children and its live ones (the executor's
    spawner, which forks every script), in ms."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = cpu_ms(pid)
    for kid in kids:
        try:
            total += cpu_ms(int(kid))
        except FileNotFoundError:
            pass
    return total


def cpu_per_run(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[RunResult]],
                n: int, executor_pid: int | None) -> float:  # fmt: skip
    """CPU ms per run of this process, its children and (when given) the executor's
    with its spawner: a cost that does not depend on how loaded the machine is."""
    before = cpu_ms(os.getpid()) + (tree_cpu_ms(executor_pid) if executor_pid else 0)
    for _ in range(n):
        assert loop.run_until_complete(call()).exit == 0
    after = cpu_ms(os.getpid()) + (tree_cpu_ms(executor_pid) if executor_pid else 0)
    return (after - before) / n


def executor_run(sock: Path, name: str) -> Callable[[], Awaitable[RunResult]]:
    return lambda: run_via_executor(str(sock), name, [], "{}")


def show(label: str, direct: Series, via: Series, diff: Series) -> None:
    verdict = "OK" if diff[0] < 3 else "OVER"
    print(f"  {label}")
    print(f"    direct mode     median {direct[0]:6.2f} ms   p99 {direct[1]:6.2f} ms")
    print(f"    executor mode   median {via[0]:6.2f} ms   p99 {via[1]:6.2f} ms")
    print(f"    added per run   median {diff[0]:+6.2f} ms   p99 {diff[1]:+6.2f} ms"
          f"   (target median < 3 ms: {verdict})")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=300)
    n = ap.parse_args().runs
    if os.geteuid() != 0:
        print("executor_bench needs root (the executor applies profiles)", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="cexec-bench-", dir="/var/tmp"))
    base.chmod(0o755)
    ex: ExecutorProc | None = None
    agents: list[AgentProc] = []
    try:
        for d in ("scripts", "rw", "run", "pki"):
            (base / d).mkdir(mode=0o755)
        script = base / "scripts" / "ok"
        script.write_text("#!/bin/sh\necho ok\n")
        script.chmod(0o755)
        ca = TestCA(base / "pki")
        disp = ca.issue("dispatcher")
        sock = base / "run" / "exec.sock"
        scripts = {"ok": str(script), "ok-confined": str(script)}
        profiles = (f"[profile default]\nrun_as = nobody\n[profile confined]\nrun_as = nobody\n"
                    f"writable = {base}/rw\n")  # fmt: skip
        for name, extra in (("direct", {}), ("executor", {"executor_socket": str(sock)})):
            a = make_agent(base / name, ca, {"bench": disp}, scripts,
                           extra={**extra, "log_target": "stderr"})  # fmt: skip
            a.allowlist.write_text(f"ok = {script}\nok-confined = {script} profile=confined\n")
            with open(a.config, "a") as fh:
                fh.write(profiles)
            agents.append(a)
        direct_agent, exec_agent = agents
        # The agents run as root here, so the executor accepts root as the agent's user.
        ex = ExecutorProc(exec_agent.config, exec_agent.allowlist, sock, "root",
                          base / "executor.log")  # fmt: skip
        ex.start()
        for a in agents:
            a.start()

        print(f"executor_bench: {n} pairs of sequential runs (direct, executor) of a trivial "
              f"/bin/sh script; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")  # fmt: skip
        print("end to end (POST /run over mTLS, resumed TLS session):")
        for name, label in (("ok", "default profile"), ("ok-confined", "confined profile")):
            show(label, *paired(http_call(direct_agent, disp, "ok"),
                                http_call(exec_agent, disp, name), n))  # fmt: skip
        print("in process (the agent's call alone, without TLS and HTTP):")
        loop = asyncio.new_event_loop()
        try:
            direct = loop_call(loop, lambda: run_script(str(script), [], b"{}"))
            for name, label in (("ok", "default profile"), ("ok-confined", "confined profile")):
                show(label, *paired(direct, loop_call(loop, executor_run(sock, name)), n))
            assert ex.proc is not None
            print("CPU time per run (all processes involved; independent of the machine's load):")
            d_cpu = cpu_per_run(loop, lambda: run_script(str(script), [], b"{}"), n, None)
            print(f"    direct mode     {d_cpu:6.2f} ms")
            for name, label in (("ok", "default profile"), ("ok-confined", "confined profile")):
                e_cpu = cpu_per_run(loop, executor_run(sock, name), n, ex.proc.pid)
                print(
                    f"    executor mode, {label}: {e_cpu:6.2f} ms (added {e_cpu - d_cpu:+.2f} ms)"
                )
        finally:
            loop.close()
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    finally:
        for a in agents:
            a.stop()
        if ex is not None:
            ex.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
