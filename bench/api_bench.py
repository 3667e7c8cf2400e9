"""Per-request cost of the API app: ``POST /run`` in-process, through httpx's ASGI transport.

Usage: ``bench/api_bench.py [-n 200] [--rounds 5]``

A throwaway dispatcher (``api_auth_default = allow``, no hook) with one real agent
(``web1``, script ``true``). Two cases, each ``rounds`` x ``n`` requests:

* ``unknown host``: answered 404 after the gate, validation, routing and the registry
  lookup, so it measures the API layer alone;
* ``real agent``: a synchronous run on the agent (one TLS connection per request).

Prints the median wall time per request and the dispatcher's CPU time per request (the
agent runs in its own process); on a busy machine the CPU figure is the steadier one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from dispatcher.api.app import create_app  # noqa: E402
from ops.lab.dispatcherenv import make_env  # noqa: E402

TARGET_MS = 10.0  # issue 12 item 6 (21 ms measured before)


async def block(
    c: httpx.AsyncClient, body: dict[str, Any], n: int, want: int
) -> tuple[float, float]:
    """Median wall ms per request and CPU ms per request over ``n`` requests."""
    wall = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        r = await c.post("/run", json=body)
        wall.append((time.perf_counter() - t0) * 1000)
        if r.status_code != want:
            raise SystemExit(f"POST /run answered {r.status_code}: {r.text}")
    return statistics.median(wall), (time.process_time() - c0) * 1000 / n


async def bench(n: int, rounds: int) -> None:
    cases = {
        "unknown host (404)": ({"hosts": ["nope"], "script": "true"}, 404),
        "real agent (200)": ({"hosts": ["web1"], "script": "true"}, 200),
    }
    with tempfile.TemporaryDirectory(prefix="api-bench-") as tmp:
        env = make_env(Path(tmp), api_auth_default="allow")
        env.add_agent("web1")
        try:
            transport = httpx.ASGITransport(app=create_app(env.d), client=("127.0.0.1", 5555))
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
                for body, want in cases.values():
                    await block(c, body, 10, want)  # warm-up
                for label, (body, want) in cases.items():
                    runs = [await block(c, body, n, want) for _ in range(rounds)]
                    wall = statistics.median(r[0] for r in runs)
                    cpu = statistics.median(r[1] for r in runs)
                    verdict = "PASS" if wall < TARGET_MS else "FAIL"
                    print(f"POST /run {label:<20} wall median {wall:7.3f} ms   "
                          f"CPU {cpu:7.3f} ms/request   ({rounds} x {n}, load "
                          f"{os.getloadavg()[0]:.1f})   target < {TARGET_MS:.0f} ms: {verdict}")  # fmt: skip
        finally:
            env.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    opts = ap.parse_args()
    logging.disable(logging.CRITICAL)  # one api-request line per request otherwise
    asyncio.run(bench(opts.n, opts.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
