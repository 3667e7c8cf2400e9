"""One elector in its own process, for the election tests (``python -m ops.lab.elector_proc``).

It campaigns on etcd and, while it leads, commits a fenced ``tick`` effect every 100 ms.
Events go to stdout as JSON lines with ``time.monotonic()`` (system-wide on Linux, so
comparable with the test process). SIGTERM resigns and exits. On SIGCONT it makes one
deliberately stale attempt: it commits under the epoch it last led with, bypassing the
``is_leader()`` check, as a worker paused in the middle of an effect would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from cluster.backend import EtcdBackend
from cluster.election import Elector
from cluster.errors import BackendUnavailable, Fenced, NotLeader

_out = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    with _out:
        sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--id", required=True)
    ap.add_argument("--endpoints", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--ttl", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"{args.id} %(message)s")

    backend = EtcdBackend(args.endpoints.split(","), cluster_name=args.cluster, timeout=0.5)
    last_epoch = [0]
    resumed = threading.Event()

    def elected(epoch: int) -> None:
        last_epoch[0] = epoch
        emit("elected", epoch=epoch)

    elector = Elector(
        backend, args.id, ttl=args.ttl, on_elected=elected, on_demoted=lambda: emit("demoted")
    )

    def on_term(_sig: int, _frame: FrameType | None) -> None:
        elector.stop(resign=True)
        emit("resigned")
        os._exit(0)

    def on_cont(_sig: int, _frame: FrameType | None) -> None:
        resumed.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGCONT, on_cont)

    def work() -> None:
        n = 0
        while True:
            if resumed.is_set():
                resumed.clear()
                rec = backend.record_effect(last_epoch[0], "stale-attempt", args.id)
                emit("stale_attempt", epoch=last_epoch[0], ok=rec is not None)
            if elector.is_leader():
                n += 1
                try:
                    rec2 = elector.commit("tick", detail={"n": n})
                    emit("tick", epoch=rec2.epoch, revision=rec2.revision)
                except (NotLeader, Fenced) as exc:
                    emit("refused", error=type(exc).__name__)
                except BackendUnavailable as exc:
                    emit("unavailable", error=str(exc))
            time.sleep(0.1)

    threading.Thread(target=work, daemon=True).start()
    elector.start()
    emit("started")
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
