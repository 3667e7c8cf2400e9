"""Wall time of ``ced run`` and ``ced ping`` against one real local agent.

Usage: ``bench/ced_bench.py [-n 25]``

Starts one ``ctrl-exec-agent serve`` on 127.0.0.2 with a throwaway CA, registers it as
``bench1`` in a throwaway dispatcher state, then times ``n`` subprocess invocations of
each command and prints the median (and min/p90), without and with an auth hook (a
``/bin/sh`` script answering allow: the hook context carries the dispatcher serial).
Upstream 0.12.3 measured 235 ms (``run``) and 265 ms (``ping``) (186 ms side by side on
this machine kind); the target here is under 40 ms, with or without a hook.

Two ways are measured. ``served``, the default: ``ced`` hands the command to the user's
command server (:mod:`dispatcher.ced.cmdserver`, started by the first ``ced`` and warm
here: the bench waits for it; ``CED_SERVER=1``, as without a terminal only an
interactive ``ced`` starts one), whose child runs it; the figure is the wall time of the
``ced`` process, which ends when the child reported the exit status. ``direct``
(``CED_SERVER=0``, and what a first ``ced`` does): everything in the ``ced`` process.
The server runs with a throwaway ``XDG_RUNTIME_DIR`` and is stopped at the end.

Two interpreter settings are measured for ``direct``, because this machine exports
``PYTHONDONTWRITEBYTECODE=1``: ``cached`` (project bytecode in ``__pycache__``, as in an
installed package; the run writes it, it is git-ignored) and ``no-pyc`` (every project
module compiled from source on each start: a copy of the packages without
``__pycache__``, since ``PYTHONDONTWRITEBYTECODE`` only stops writing, not reading). A
bare ``python -c pass`` is the floor.
``--etcd`` adds ``ced run`` with etcd configured (a local member): the run lock is then
taken in etcd, whose client a direct ``ced`` imports on every start.
Besides wall time the child's CPU time (user+sys) is shown: on a busy 2-core machine
wall time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dispatcher.registry import Registry  # noqa: E402
from ops.lab.agentproc import make_agent  # noqa: E402
from ops.lab.cedserver import Served, ced_cmd  # noqa: E402
from ops.lab.net import wait_listening  # noqa: E402
from ops.lab.pki import TestCA  # noqa: E402


def timeit(cmd: list[str], env: dict[str, str], n: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (user+sys of the child) milliseconds of ``n`` runs."""
    subprocess.run(cmd, env=env, capture_output=True, check=True)  # warm-up (and pyc)
    wall, cpu = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert p.stderr is not None
        errtext = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((ru.ru_utime + ru.ru_stime) * 1000)
        if p.returncode != 0:
            raise SystemExit(f"{cmd} failed ({p.returncode}): {errtext.decode()}")
    return wall, cpu


TARGET_MS = 40.0


def summary(label: str, result: tuple[list[float], list[float]], target: bool = False) -> str:
    s, c = sorted(result[0]), result[1]
    p90 = s[min(len(s) - 1, int(len(s) * 0.9))]
    med = statistics.median(s)
    verdict = f"   target < {TARGET_MS:.0f} ms: {'PASS' if med < TARGET_MS else 'FAIL'}"
    return (f"{label:<28} wall median {med:6.1f} ms  min {s[0]:6.1f}  "
            f"p90 {p90:6.1f}   cpu median {statistics.median(c):6.1f} ms  (n={len(s)})"
            f"{verdict if target else ''}")  # fmt: skip


def etcd_case(tmp: Path, conf: Path, ced: list[str], served: dict[str, str],
              direct: dict[str, str], n: int) -> None:  # fmt: skip
    """``ced run`` with ``etcd_endpoints`` set: every run takes the host:script lock in etcd
    (its client imported by a direct ``ced``, already loaded in the server)."""
    from ops.lab.etcd import EtcdCluster

    etcd = EtcdCluster(tmp / "etcd").start()
    try:
        ha = tmp / "ctrl-exec-etcd.conf"
        ha.write_text(conf.read_text() + f"etcd_endpoints = {etcd.endpoints[0]}\n"
                      "cluster_name = bench\n")  # fmt: skip
        verb = [*ced, "--config", str(ha), "run", "bench1", "hello"]
        print(summary("ced run, etcd (served)", timeit(verb, served, n), True))
        print(summary("ced run, etcd (direct)", timeit(verb, direct, n)))
    finally:
        etcd.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=25)
    ap.add_argument("--importtime", action="store_true", help="show what one `ced run` imports")
    ap.add_argument("--hold", action="store_true", help="keep the agent up; print the config")
    ap.add_argument("--etcd", action="store_true",
                    help="also with etcd configured (one local member): the cluster run lock")  # fmt: skip
    opts = ap.parse_args()
    n = opts.n
    with tempfile.TemporaryDirectory(prefix="ced-bench-") as t:
        tmp = Path(t)
        ca = TestCA(tmp / "pki")
        disp = ca.issue("dispatcher", cn="ctrl-exec-dispatcher")
        script = tmp / "hello.sh"
        script.write_text("#!/bin/sh\necho hello\n")
        script.chmod(0o755)
        agent = make_agent(tmp / "agent", ca, {"bench": disp}, {"hello": str(script)},
                           host="127.0.0.2")  # fmt: skip
        state = tmp / "state"
        Registry(state / "agents").register("bench1", ip=agent.host, port=agent.port,
                                            lookup_by="ip")  # fmt: skip
        conf = tmp / "ctrl-exec.conf"
        conf.write_text(f"ca_dir = {ca.dir}\nstate_dir = {state}\n")
        hook = tmp / "allow-hook.sh"
        hook.write_text("#!/bin/sh\nexit 0\n")
        hook.chmod(0o755)
        hooked = tmp / "ctrl-exec-hook.conf"
        hooked.write_text(conf.read_text() + f"auth_hook = {hook}\n")
        server = Served(tmp / "run")  # the bench's own command server
        agent.start(wait=False)
        try:
            wait_listening(agent.host, agent.port, agent.proc)
            served = server.env()  # CED_SERVER=1: no terminal here, so ask for the server
            cached = server.env(CED_SERVER="0")
            src = tmp / "src"  # no __pycache__: compiled on every start
            for pkg in ("agent", "dispatcher", "cluster"):
                shutil.copytree(ROOT / pkg, src / pkg,
                                ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
            nopyc = dict(cached, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(src))
            cmd = [*ced_cmd(), "--config", str(conf)]
            if opts.hold:
                print(f"config: {conf}  (ced --config {conf} run bench1 hello); Ctrl-C ends")
                sys.stdout.flush()
                try:
                    time.sleep(3600)
                except KeyboardInterrupt:
                    return 0
            if opts.importtime:
                for verb in (["run", "bench1", "hello"], ["ping", "bench1"]):
                    p = subprocess.run([sys.executable, "-X", "importtime", *cmd, *verb],
                                       env=cached, capture_output=True, text=True)  # fmt: skip
                    rows = [r.split("|") for r in p.stderr.splitlines() if "|" in r]
                    rows = [r for r in rows if r[1].strip().isdigit()]
                    rows.sort(key=lambda r: -int(r[1]))
                    print(f"--- ced {verb[0]}: top cumulative imports (us)")
                    for r in rows[:15]:
                        print(f"{int(r[1]):>8}  {r[2].rstrip()}")
            print(f"ced: {' '.join(cmd[:1])}; agent 127.0.0.2:{agent.port}; {os.cpu_count()} CPUs")
            print(summary("python -c pass", timeit([sys.executable, "-c", "pass"], cached, n)))
            print(summary("ced --version (direct)", timeit([*cmd, "--version"], cached, n)))
            print(f"load average {os.getloadavg()[0]:.2f} (1 min)")
            hcmd = [*ced_cmd(), "--config", str(hooked)]
            print(f"command server: pid {server.start()}")
            if opts.etcd:
                etcd_case(tmp, conf, cmd[:1], served, cached, n)
            for label, env in (("served", served), ("direct", cached), ("direct no-pyc", nopyc)):
                for verb in (["run", "bench1", "hello"], ["ping", "bench1"]):
                    print(summary(f"ced {verb[0]} ({label})", timeit([*cmd, *verb], env, n),
                                  label == "served"))  # fmt: skip
                    print(summary(f"ced {verb[0]} +hook ({label})", timeit([*hcmd, *verb], env, n),
                                  label == "served"))  # fmt: skip
        finally:
            agent.stop()
            server.stop()
    print("upstream 0.12.3: run 235 ms, ping 265 ms; target < 40 ms with or without a hook")
    return 0


if __name__ == "__main__":
    sys.exit(main())
