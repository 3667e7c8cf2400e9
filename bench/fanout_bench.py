"""Fan-out benchmark: dispatcher.client.fanout against many real AgentServer instances.

Starts ``bench/agentsim.py`` (500 agents in one process, 127.0.1.1 .. 127.0.2.244, one
port), then measures and prints:

* one ``/ping`` and one ``/run`` (a script that prints ``ok``) to one agent through
  ``dispatcher.client.fanout``: fresh handshake and resumed TLS session, median and p90;
* the wall time of a 1-second script (``exec sleep 1``) fanned out to 100 and to 500
  agents (``max_parallel`` = number of agents), fresh and resumed;
* a ``/ping`` fan-out to 500 agents, fresh and resumed.

The dispatcher certificate is EC P-256; the agents' key type is ``--agent-key``. The
run is bounded (``--max-seconds``) and cleans up after itself.
Run: ``.venv/bin/python bench/fanout_bench.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import resource
import select
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.common.tlsconf import client_context  # noqa: E402
from dispatcher.client import fanout  # noqa: E402
from dispatcher.client.aio import SessionCache  # noqa: E402
from dispatcher.registry import Target  # noqa: E402
from dispatcher.reqid import new_reqid  # noqa: E402
from ops.lab.pki import TestCA  # noqa: E402
from ops.lab.proc import terminate  # noqa: E402

FIRST = "127.0.1.1"
KEY_BITS = {"ec-p256": 0, "rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}


@dataclass
class Setup:
    ca: Path
    cert: Path
    key: Path
    config: Path
    allowlist: Path


def prepare(tmp: Path, port: int, agent_key: str) -> Setup:
    ca = TestCA(tmp / "pki")
    disp = ca.issue("dispatcher", cn="ctrl-exec-dispatcher")  # EC P-256
    agent = ca.issue("agent", cn="sim-agent", rsa_bits=KEY_BITS[agent_key])
    state = tmp / "state"
    state.mkdir()
    (state / "ctrl-exec-dispatchers").write_text(f"{disp.serial_hex} bench\n")
    scripts = tmp / "scripts"
    scripts.mkdir()
    for name, text in {"sleep1": "exec sleep 1\n", "ok": "echo ok\n"}.items():
        p = scripts / f"{name}.sh"
        p.write_text("#!/bin/sh\n" + text)
        p.chmod(0o755)
    conf = {
        "port": str(port), "bind": FIRST, "cert": str(agent.cert), "key": str(agent.key),
        "ca": str(ca.cert_path), "state_dir": str(state), "revoked_serials": str(tmp / "revoked"),
        "rate_limit_disable": "1", "log_target": "stderr", "hostname": "sim",
    }  # fmt: skip
    config = tmp / "agent.conf"
    config.write_text("".join(f"{k} = {v}\n" for k, v in conf.items()))
    allow = tmp / "scripts.conf"
    allow.write_text(f"sleep1 = {scripts / 'sleep1.sh'}\nok = {scripts / 'ok.sh'}\n")
    return Setup(ca.cert_path, disp.cert, disp.key, config, allow)


def start_sim(s: Setup, count: int, port: int, log: Path, wait: float,
              extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "agentsim.py"), "--config", str(s.config),
         "--allowlist", str(s.allowlist), "--count", str(count), "--port", str(port),
         "--lifetime", "900", *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),  # noqa: SIM115
    )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agentsim exited {proc.returncode}: {log.read_text()[-2000:]}")
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline().decode().strip()
            if line.startswith("READY"):
                print(f"agentsim: {line}")
                return proc
    proc.kill()
    raise TimeoutError("agentsim did not become ready")


def proc_cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid`` (its own, not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


Op = Callable[[SessionCache], Awaitable[list[dict[str, Any]]]]


async def single(label: str, op: Op, reps: int) -> list[str]:
    lines = []
    fresh: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = await op(SessionCache())
        fresh.append((time.perf_counter() - t0) * 1000)
        assert not res[0].get("error"), res
    cache = SessionCache()
    await op(cache)
    resumed: list[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        res = await op(cache)
        resumed.append((time.perf_counter() - t0) * 1000)
        assert not res[0].get("error"), res
    for kind, vals in (("fresh", fresh), ("resumed", resumed)):
        lines.append(f"  {label:<22} {kind:<8} median {statistics.median(vals):6.1f} ms   "
                     f"p90 {pct(vals, 0.9):6.1f} ms   (n={reps})")  # fmt: skip
    lines.append(f"  {'':<22} sessions resumed: {cache.resumed}/{cache.offered}")
    return lines


async def fan(label: str, op: Op, n: int, sim_pid: int, target: float | None,
              ok: Callable[[dict[str, Any]], bool], rounds: int) -> list[str]:  # fmt: skip
    """``rounds`` x (fresh pass with a new session cache, then a resumed pass)."""
    lines = []
    walls: dict[str, list[float]] = {"fresh": [], "resumed": []}
    for _ in range(rounds):
        cache = SessionCache()
        for kind in ("fresh", "resumed"):
            c0, s0 = time.process_time(), proc_cpu(sim_pid)
            t0 = time.perf_counter()
            res = await op(cache)
            wall = time.perf_counter() - t0
            c1, s1 = time.process_time(), proc_cpu(sim_pid)
            walls[kind].append(wall)
            good = sum(1 for r in res if ok(r))
            rtts = [int(str(r.get("rtt", "0ms")).removesuffix("ms")) for r in res]
            lines.append(
                f"  {label:<18} {kind:<8} wall {wall:6.3f} s  ok {good}/{n}  "
                f"rtt max {max(rtts):5d} ms  CPU dispatcher {c1 - c0:4.2f} s, "
                f"agents {s1 - s0:4.2f} s"
            )
            if good != n:
                errors = sorted({str(r.get("error")) for r in res if not ok(r)})
                lines.append(f"  {'':<18} errors: {errors[:3]}")
            await asyncio.sleep(0.5)  # let the agents finish closing before the next pass
        if cache.resumed != n:
            lines.append(f"  {'':<18} sessions resumed: {cache.resumed}/{cache.offered}")
    for kind, vals in walls.items():
        med = statistics.median(vals)
        verdict = ""
        if target is not None:
            verdict = f"  target < {target:.1f} s: {'PASS' if med < target else 'FAIL'}"
        lines.append(f"  {label:<18} {kind:<8} median of {rounds}: {med:6.3f} s "
                     f"(best {min(vals):.3f} s){verdict}")  # fmt: skip
    return lines


async def bench(s: Setup, port: int, count: int, reps: int, rounds: int, sim_pid: int) -> None:
    ctx: ssl.SSLContext = client_context(str(s.ca), str(s.cert), str(s.key))
    base = ipaddress.IPv4Address(FIRST)
    targets = [Target(f"sim-{i:03d}", str(base + i), port) for i in range(count)]
    one = targets[:1]

    def ping(ts: list[Target], mp: int) -> Op:
        return lambda cache: fanout.ping_all(ts, new_reqid(), ctx, 30, mp, sessions=cache)

    def run(ts: list[Target], script: str, mp: int) -> Op:
        return lambda cache: fanout.run_all(ts, script, [], new_reqid(), "", "", ctx, 30, mp,
                                            sessions=cache)  # fmt: skip

    await ping(one, 1)(SessionCache())  # warm-up

    def emit(lines: list[str]) -> None:
        print("\n".join(lines), flush=True)

    emit(["", "single agent through dispatcher.client.fanout:"])
    emit(await single("ping", ping(one, 1), reps))
    emit(await single("run (echo ok)", run(one, "ok", 1), reps))
    emit(["", "fan-out (max_parallel = number of agents):"])
    targets_for = {100: 1.5, 500: 2.5}
    for n in (100, count):
        if n > count:
            continue
        emit(await fan(f"run sleep1 x{n}", run(targets[:n], "sleep1", n), n, sim_pid,
                       targets_for.get(n), lambda r: r.get("exit") == 0, rounds))  # fmt: skip
    emit(await fan(f"ping x{count}", ping(targets, count), count, sim_pid, None,
                   lambda r: r.get("status") == "ok", rounds))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--port", type=int, default=17443)
    p.add_argument("--reps", type=int, default=20, help="single-agent repetitions")
    p.add_argument("--rounds", type=int, default=3, help="fan-out rounds (fresh + resumed)")
    p.add_argument("--agent-key", choices=sorted(KEY_BITS), default="ec-p256")
    p.add_argument("--max-seconds", type=int, default=300)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def overrun(signum: int, frame: object) -> None:
        raise SystemExit(f"benchmark exceeded {args.max_seconds} s; aborted")

    signal.signal(signal.SIGALRM, overrun)
    signal.alarm(args.max_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="fanout-bench-"))
    proc = None
    try:
        t0 = time.monotonic()
        s = prepare(tmp, args.port, args.agent_key)
        proc = start_sim(s, args.count, args.port, tmp / "agentsim.log", 120)
        print(f"agentsim up in {time.monotonic() - t0:.1f} s; dispatcher cert EC P-256, "
              f"agent cert {args.agent_key}; {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.2f}")  # fmt: skip
        asyncio.run(bench(s, args.port, args.count, args.reps, args.rounds, proc.pid))
    finally:
        signal.alarm(0)
        if proc is not None:
            terminate(proc, 15)
            errs = (tmp / "agentsim.log").read_text(errors="replace").strip().splitlines()
            if errs:
                print(f"agentsim log ({len(errs)} lines), last: {errs[-3:]}")
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
