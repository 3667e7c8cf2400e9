"""Scale benchmark: ``ced ping`` and ``ced run`` of a 1 s script to 2,000 and 10,000 agents.

The agents are ``bench/agentsim.py`` (real ``AgentServer`` instances, ``--per-process``
of them in each of its worker processes, 127.0.1.1 upwards, one port); the dispatcher is
the real ``ced`` in a child process with ``max_parallel = --parallel`` and a registry of
``--count`` records (tags ``role=web`` on every agent, ``shard=<i mod 10>``, each pinning
the agents' certificate as approval does), run once per case, so its CPU (user+sys) and
peak RSS come from ``wait4``. Each case prints wall time, the dispatcher's CPU and peak
RSS, the simulator's CPU (all its processes, and the scripts they ran), the counts, the
agents' round-trip times, the target beside it, and the CPU floor: (dispatcher +
simulator CPU) / cores, the wall time no scheduling can beat while both share this
machine's cores:

* ``ping --all`` to 10,000 agents: under 15 s;
* ``run --tags role=web sleep1`` (``exec sleep 1``) to 2,000 agents: under 4 s;
* dispatcher peak RSS under 300 MB in every case;

and the selection alone (``ced run --dry-run --tags shard=3``, through the registry's tag
index) to show that choosing a tenth of 10,000 agents reads a tenth of the records.

The machine's load average is printed with every figure: the simulator and the
dispatcher share the cores with whatever else runs. Bounded (``--max-seconds``); it
cleans up after itself. Run: ``.venv/bin/python bench/scale_bench.py [--count 10000]``
(``--only LABEL`` for some cases; ``--profile DIR`` cProfiles ``ced`` in CPU time,
``--wrap 'perf record -o F --'`` runs it under another tool, ``--sim-profile F`` the
simulator; ``--trees ,DIR`` runs every case with this tree's ``ced`` and with the one of
another checkout in ``DIR``, each first in turn, for a side-by-side comparison under the
same load; ``--opening N,M`` likewise with other caps on handshakes at once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agentsim import addresses, tree_cpu  # noqa: E402
from fanout_bench import Setup, prepare, start_sim  # noqa: E402

from agent.certinfo import identity_der  # noqa: E402
from dispatcher.registry import Registry  # noqa: E402
from ops.lab.proc import terminate  # noqa: E402

RSS_TARGET_MB = 300.0


class BenchWriter:
    """Set-up only: temp file and rename without fsync (10,000 fsyncs take minutes here)."""

    def write(self, path: str | Path, data: bytes | str, mode: int = 0o644) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.chmod(mode)
        tmp.rename(p)

    def delete(self, path: str | Path) -> bool:
        try:
            Path(path).unlink()
        except FileNotFoundError:
            return False
        return True


#: ``ced`` with another cap on the requests being opened at once (``--opening N``)
OPENING = (
    "import runpy, sys\n"
    "import dispatcher.client.aio as m\n"
    "m.OPENING = N\n"
    "sys.argv[0] = 'ced'\n"
    "runpy.run_module('dispatcher.ced', run_name='__main__')\n"
)


def ced_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "ced"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dispatcher.ced"]


def agent_identity(s: Setup) -> tuple[str, str]:
    """The simulated agents' certificate serial and key hash: each record pins them, as
    approval does, so every connection is checked against the registry."""
    conf = dict(line.split(" = ", 1) for line in s.config.read_text().splitlines() if " = " in line)
    der = ssl.PEM_cert_to_DER_cert(Path(conf["cert"]).read_text())
    return identity_der(der)


def dispatcher_state(tmp: Path, s: Setup, count: int, group: int, port: int, parallel: int) -> Path:
    """A ca_dir + state_dir with ``count`` registered agents; returns the config path."""
    ca_dir = tmp / "ca"
    ca_dir.mkdir()
    for src, name in ((s.cert, "dispatcher.crt"), (s.key, "dispatcher.key"), (s.ca, "ca.crt")):
        shutil.copy(src, ca_dir / name)
    reg = Registry(tmp / "state" / "agents", BenchWriter())
    serial, pubkey = agent_identity(s)
    t0 = time.monotonic()
    for i, addr in enumerate(addresses(count)):
        reg.register(f"sim-{i:05d}", ip=addr, port=port, lookup_by="ip",
                     tags={"role": "web", "shard": str(i % 10), "group": f"g{i // group}"},
                     cert_serial=serial, pubkey_sha256=pubkey)  # fmt: skip
    print(f"registry: {count} records written in {time.monotonic() - t0:.1f} s")
    conf = tmp / "ctrl-exec.conf"
    conf.write_text(
        f"ca_dir = {ca_dir}\nstate_dir = {tmp / 'state'}\nmax_hosts = {max(count, 500)}\n"
        f"max_parallel = {parallel}\nread_timeout = 30\nlog_target = stderr\n"
        f"run_lock_without_etcd = local\nmax_result_output = 65536\n"
    )
    return conf


PROFILE: Path | None = None
#: ``ced`` under cProfile timed in CPU seconds (wall time would count the time the
#: process waited for a core on a busy machine); the file is argv[1]
PROFILED = (
    "import cProfile, runpy, sys, time\n"
    "out = sys.argv.pop(1)\n"
    "sys.argv[0] = 'ced'\n"
    "prof = cProfile.Profile(time.process_time)\n"
    "try:\n"
    "    prof.runcall(runpy.run_module, 'dispatcher.ced', run_name='__main__')\n"
    "finally:\n"
    "    prof.dump_stats(out)\n"
)
WRAP: list[str] = []


def ced(conf: Path, words: list[str], sim_pid: int, target: float | None, label: str,
        opening: int = 0, tree: str = "") -> dict:  # fmt: skip
    """One ``ced --json`` in a child process; prints its wall, CPU, peak RSS and counts."""
    cmd = [*WRAP, *ced_cmd()]
    if opening:
        cmd = [*WRAP, sys.executable, "-c", OPENING.replace("N", str(opening))]
        label = f"{label} (opening={opening})"
    env = None
    if tree:  # another checkout's ced (its packages first on the path), for a comparison
        env = dict(os.environ, PYTHONPATH=tree)
        label = f"{label} ({Path(tree).name})"
    if PROFILE is not None:
        out = PROFILE / ("-".join(w.replace("=", "") for w in words if w[0] != "-") + ".prof")
        cmd = [sys.executable, "-c", PROFILED, str(out)]
    load = os.getloadavg()[0]
    s0 = tree_cpu(sim_pid)
    t0 = time.perf_counter()
    with open(os.devnull, "wb") as devnull:
        p = subprocess.Popen([*cmd, "--config", str(conf), "--json", *words],
                             stdout=subprocess.PIPE, stderr=devnull, env=env)  # fmt: skip
        assert p.stdout is not None
        try:
            data = p.stdout.read()
        except BaseException:  # stopped (SIGTERM, --max-seconds): do not leave ced running
            p.kill()
            p.wait()
            raise
        _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    sim = tree_cpu(sim_pid) - s0
    rc = os.waitstatus_to_exitcode(status)
    try:
        doc = json.loads(data)
    except ValueError:
        doc = {"error": data[-300:].decode(errors="replace")}
    counts = doc.get("counts") or {}
    shown = ", ".join(f"{k} {v}" for k, v in counts.items() if v) or doc.get("error", "")
    rss = ru.ru_maxrss / 1024
    rtts = sorted(int(str(r.get("rtt", "0ms")).removesuffix("ms") or 0)
                  for r in doc.get("results") or [] if isinstance(r, dict))  # fmt: skip
    errors: dict[str, int] = {}
    for r in doc.get("results") or []:
        if isinstance(r, dict) and r.get("error"):
            e = re.sub(r"'[\d.]+'", "'<ip>'", str(r["error"]))[:90]  # grouped whatever the host
            errors[e] = errors.get(e, 0) + 1
    if errors:
        shown += "; errors: " + ", ".join(f"{n} x {e!r}" for e, n in
                                          sorted(errors.items(), key=lambda x: -x[1])[:3])  # fmt: skip
    if rtts:
        shown += (f"; rtt p50 {rtts[len(rtts) // 2]} ms, p90 {rtts[len(rtts) * 9 // 10]} ms, "
                  f"max {rtts[-1]} ms")  # fmt: skip
    verdict = ""
    if target is not None:
        verdict = f"   target < {target:.0f} s: {'PASS' if wall < target else 'FAIL'}"
    print(f"  {label:<34} wall {wall:6.2f} s{verdict}\n"
          f"  {'':<34} dispatcher CPU {ru.ru_utime + ru.ru_stime:5.2f} s, peak RSS "
          f"{rss:6.1f} MB (target < {RSS_TARGET_MB:.0f} MB: "
          f"{'PASS' if rss < RSS_TARGET_MB else 'FAIL'}); simulator CPU {sim:5.2f} s; "
          f"exit {rc}; {shown}; load average {load:.2f}", flush=True)  # fmt: skip
    cores = os.cpu_count() or 1
    cpu = ru.ru_utime + ru.ru_stime
    print(f"  {'':<34} CPU floor on {cores} cores: (dispatcher {cpu:.2f} + simulator {sim:.2f}) "
          f"/ {cores} = {(cpu + sim) / cores:.2f} s; simulator alone {sim / cores:.2f} s",
          flush=True)  # fmt: skip
    return doc


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=10000, help="agents simulated and registered")
    p.add_argument("--run-count", type=int, default=2000, help="agents the 1 s script runs on")
    p.add_argument("--port", type=int, default=17643)
    p.add_argument("--parallel", type=int, default=2000, help="the dispatcher's max_parallel")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-seconds", type=int, default=900)
    p.add_argument("--profile", type=Path, help="cProfile every ced run into this directory")
    p.add_argument(
        "--wrap", default="", help="a command ced runs under (e.g. 'perf record -o F --')"
    )
    p.add_argument(
        "--per-process",
        type=int,
        default=250,
        help="agents per simulator process (0: all in one, as before)",
    )
    p.add_argument(
        "--sim-nice",
        type=int,
        default=0,
        help="the simulator's niceness (10: the dispatcher keeps its core, as "
        "on a real fleet whose agents run elsewhere)",
    )
    p.add_argument("--sim-profile", default="", help="cProfile the simulator into this file")
    p.add_argument("--opening", default="",
                   help="comma-separated caps on requests being opened at once (each case "
                   "runs with each in turn; default: aio.OPENING)")  # fmt: skip
    p.add_argument("--trees", default="",
                   help="comma-separated source trees whose ced runs each case in turn (an "
                   "empty entry: this one), e.g. ',/tmp/old' to compare with another checkout")  # fmt: skip
    p.add_argument("--only", default="", help="run only the cases whose label contains this")
    args = p.parse_args()
    global PROFILE
    PROFILE = args.profile
    WRAP[:] = shlex.split(args.wrap)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def overrun(signum: int, frame: object) -> None:
        raise SystemExit(f"benchmark exceeded {args.max_seconds} s; aborted")

    signal.signal(signal.SIGALRM, overrun)
    signal.signal(signal.SIGTERM, lambda n, f: sys.exit("stopped (SIGTERM)"))  # clean up
    signal.alarm(args.max_seconds)
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    proc = None
    try:
        t0 = time.monotonic()
        s = prepare(tmp, args.port, "ec-p256")
        proc = start_sim(s, args.count, args.port, tmp / "agentsim.log", 600,
                         ("--lifetime", str(args.max_seconds + 60),
                          "--per-process", str(args.per_process), "--nice", str(args.sim_nice),
                          *(("--profile", args.sim_profile) if args.sim_profile else ())))  # fmt: skip
        print(f"agentsim up in {time.monotonic() - t0:.1f} s ({args.per_process or args.count} "
              f"agents per process, nice {args.sim_nice}); {os.cpu_count()} CPUs; max_parallel "
              f"{args.parallel}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip
        conf = dispatcher_state(tmp, s, args.count, args.run_count, args.port, args.parallel)
        small = min(args.run_count, args.count)
        cases = [  # (label, words, target seconds)
            (f"select --tags shard=3 of {args.count}", ["run", "--dry-run", "--tags", "shard=3",
                                                       "ok"], None),
            (f"ping x{small}", ["ping", "--tags", "group=g0"], None),
            (f"run sleep1 x{small}", ["run", "--tags", "group=g0", "sleep1"], 4.0),
        ]  # fmt: skip
        if args.count > small:
            cases += [(f"ping x{args.count}", ["ping", "--all"], 15.0),
                      (f"run sleep1 x{args.count}", ["run", "--all", "sleep1"], None)]  # fmt: skip
        for r in range(args.rounds):
            print(f"round {r + 1}:")
            for label, words, target in cases:
                if args.only not in label:
                    continue
                caps = [int(c) for c in args.opening.split(",") if c] or [0]
                variants = [(c, t) for c in caps for t in args.trees.split(",")]
                turn = r % len(variants)  # each variant goes first in turn: no order bias
                for cap, tree in (*variants[turn:], *variants[:turn]):
                    ced(conf, words, proc.pid, target, label, cap, tree)
                    time.sleep(1.0)  # let the simulator close its connections
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
