"""Many real agents in one process: one ``agent.server.AgentServer`` per loopback address.

Usage: ``agentsim.py --config agent.conf --allowlist scripts.conf --count 500``

Every instance is a full ``AgentServer`` (trust map, allowlist, request handling, script
subprocesses) with its own ``bind`` address, 127.0.1.1 upwards, on one shared port, all
in one asyncio loop. ``serve()`` itself is not used (it installs process signal handlers
and waits on its own stop event); the listener is started the way ``serve()`` starts it.
All instances share one server ``SSLContext`` (same agent certificate).

Prints ``READY <count> <first> <last>`` once every listener is up and stops on SIGTERM,
SIGINT, EOF on stdin or after ``--lifetime`` seconds, whichever comes first.
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
import sys
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
    return p


if __name__ == "__main__":
    logging.getLogger("ctrl-exec").setLevel(logging.ERROR)
    opts = parser().parse_args()
    if opts.profile:
        import cProfile

        with cProfile.Profile() as prof:
            rc = asyncio.run(main(opts))
        prof.dump_stats(opts.profile)
        sys.exit(rc)
    sys.exit(asyncio.run(main(opts)))
