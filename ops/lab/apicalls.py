"""API calls that several tests make the same way, against any ``ctrl-exec-api``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

# what every instance's health port answers on GET /status (at least)
STATUS_KEYS = {"instance_id", "role", "leader_id", "epoch", "lease_ttl", "lease_time_left",
               "generation", "cert_serial", "etcd", "last_tick_at"}  # fmt: skip


def overlapping_runs(
    first: Callable[[], httpx.Client], second: Callable[[], httpx.Client]
) -> tuple[httpx.Response | None, httpx.Response]:
    """``sleep1`` on web2 through a client of ``first`` and, 0.4 s into it, ``sleep1`` on
    web1 and web2 through a client of ``second``: both answers (the first one None if it
    never came). The second run meets the first one's web2:sleep1 lock."""
    got: dict[str, httpx.Response] = {}

    def slow() -> None:
        with first() as c:
            got["r"] = c.post("/run", json={"hosts": ["web2"], "script": "sleep1"})

    t = threading.Thread(target=slow)
    t.start()
    try:
        time.sleep(0.4)
        with second() as c:
            r = c.post("/run", json={"hosts": ["web1", "web2"], "script": "sleep1"})
    finally:
        t.join(15)
    return got.get("r"), r
