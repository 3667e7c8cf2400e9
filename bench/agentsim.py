"""Many real agents in one process: one ``agent.server.AgentServer`` per loopback address.

Usage: ``agentsim.py --config agent.conf --allowlist scripts.conf --count 500``

Every instance is a full ``AgentServer`` (trust map, allowlist, request handling, script
subprocesses) with its own ``bind`` address, 127.0.1.1 upwards, on one shared port, all
in one asyncio loop. ``serve()`` itself is not used (it installs process signal handlers
and waits on its own stop event); the listener is started the way ``serve()`` starts it.
All instances share one server ``SSLContext`` (same agent certificate).

Prints ``READY <count> <first> <last>`` once every listener is up and stops on SIGTERM,
SIGINT, EOF on stdin or after ``--lifetime`` seconds, whichever comes first.

``--per-process N`` spreads the agents over worker processes of at most N agents each
(this process then only starts and stops them): a real agent is a small process of its
own, and one process holding thousands of agents makes every script's ``fork`` copy the
page tables of all of them (about 3-10 ms per ``sleep 1`` with 2,000 agents, against
under 1 ms with 250), which a fleet of real hosts never pays. The simulator's CPU is the
workers' (``tree_cpu``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import config as agent_config
from agent.childwatch import use_pidfd_watcher
from agent.common.tlsconf import server_context
from agent.server import AgentServer

FIRST = "127.0.1.1"


def addresses(count: int, first: str = FIRST) -> list[str]:
    base = ipaddress.IPv4Address(first)
    return [str(base + i) for i in range(count)]


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def main(args: argparse.Namespace) -> int:
    raise_nofile()
    if not args.thread_watcher:
        use_pidfd_watcher()
    base = agent_config.load(args.config)
    shared = server_context(base.cert, base.key, base.ca)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    listeners: list[asyncio.Server] = []
    addrs = addresses(args.count, args.first)
    for i, addr in enumerate(addrs):
        cfg = dataclasses.replace(base, bind=addr, hostname=f"sim-{i:03d}", port=args.port)
        srv = AgentServer(cfg, args.allowlist)
        srv.ssl_ctx = shared  # _load_cert keeps an existing context
        srv.load_all()
        listeners.append(
            await asyncio.start_server(
                srv._on_connect, host=addr, port=args.port, backlog=512, limit=64 * 1024
            )
        )
    print(f"READY {len(listeners)} {addrs[0]} {addrs[-1]}", flush=True)

    fd = sys.stdin.fileno()

    def on_stdin() -> None:  # the parent holds our stdin open; EOF means it went away
        if not os.read(fd, 4096):
            loop.remove_reader(fd)
            stop.set()

    loop.add_reader(fd, on_stdin)
    try:
        await asyncio.wait_for(stop.wait(), args.lifetime)
    except TimeoutError:
        print("agentsim: lifetime reached, stopping", file=sys.stderr)
    for s in listeners:
        s.close()
    return 0


def tree_cpu(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and of its live descendants (the workers),
    with the CPU of the children they have reaped (the scripts they ran: ``sh`` and
    ``sleep`` exec'd 2,000 times are seconds of CPU)."""
    total = 0.0
    todo = [pid]
    for _ in range(10_000):  # bounded: a process tree of the simulator is small
        if not todo:
            break
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        todo += [int(k) for k in kids]
    return total


def spread(args: argparse.Namespace) -> int:
    """Start workers of at most ``--per-process`` agents; READY once all are; stop them."""
    raise_nofile()
    addrs = addresses(args.count, args.first)
    n = args.per_process
    workers: list[subprocess.Popen[bytes]] = []
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for i in range(0, len(addrs), n):
            part = addrs[i : i + n]
            cmd = [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--allowlist",
                args.allowlist,
                "--count",
                str(len(part)),
                "--first",
                part[0],
                "--port",
                str(args.port),
                "--lifetime",
                str(args.lifetime),
                "--per-process",
                "0",
            ]
            if args.thread_watcher:
                cmd.append("--thread-watcher")
            workers.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline().decode()
            if not line.startswith("READY"):
                print(f"agentsim: a worker failed to start ({line.strip()!r})", file=sys.stderr)
                return 1
        print(f"READY {len(addrs)} {addrs[0]} {addrs[-1]}", flush=True)
        deadline = time.monotonic() + args.lifetime
        fd = sys.stdin.fileno()
        while not stop and time.monotonic() < deadline:
            import select

            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready and not os.read(fd, 4096):
                break  # the parent went away
            if any(w.poll() is not None for w in workers):
                print("agentsim: a worker exited", file=sys.stderr)
                break
    finally:
        for w in workers:
            if w.poll() is None:
                w.terminate()
        deadline = time.monotonic() + 5  # the caller may kill this process soon after
        for w in workers:
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.kill()  # a worker with runs in flight may linger in its loop's shutdown
                w.wait()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="agent.conf template (bind/port overridden)")
    p.add_argument("--allowlist", required=True)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--first", default=FIRST)
    p.add_argument("--port", type=int, default=17443)
    p.add_argument("--lifetime", type=float, default=600.0)
    p.add_argument("--thread-watcher", action="store_true",
                   help="keep Python 3.11's thread-per-child watcher")  # fmt: skip
    p.add_argument("--profile", help="write cProfile stats of the whole run to this file")
    p.add_argument(
        "--per-process",
        type=int,
        default=0,
        help="at most this many agents per worker process (0: all in this one)",
    )
    p.add_argument("--nice", type=int, default=0,
                   help="run the simulator (and its workers) at this niceness: a real fleet's "
                   "agents do not take the dispatcher's cores")  # fmt: skip
    return p


if __name__ == "__main__":
    logging.getLogger("ctrl-exec").setLevel(logging.ERROR)
    opts = parser().parse_args()
    if opts.nice:
        os.nice(opts.nice)
    if 0 < opts.per_process < opts.count:
        sys.exit(spread(opts))
    if opts.profile:
        import cProfile

        with cProfile.Profile() as prof:
            rc = asyncio.run(main(opts))
        prof.dump_stats(opts.profile)
        sys.exit(rc)
    sys.exit(asyncio.run(main(opts)))
