"""Detached async run (``python -m agent.asyncjob LOCK_FD``), spawned by the agent.

Reads the job as JSON on stdin, forks once more so the agent's child exits at once, and
in the grandchild (its own session, so it survives an agent restart) runs the script
(directly, or through the executor when the job names ``executor_socket``) and
replaces the ``running`` record with the ``done`` record. The per-script lock arrives as an
inherited, already-locked file descriptor and is released when this process exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from agent.common.fsutil import atomic_write_json
from agent.runner import run_allowed


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    lock_fd = int(argv[0])
    job = json.loads(sys.stdin.buffer.read())
    if os.fork() != 0:
        return 0
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    record = {
        "reqid": job["reqid"],
        "script": job["script"],
        "owner": job["owner"],
        "started": job["started"],
    }
    try:
        res = asyncio.run(
            run_allowed(
                job["path"],
                job["script"],
                job["args"],
                job["stdin"].encode(),
                executor_socket=job.get("executor_socket", ""),
                timeout=job["timeout"],
                stdin_timeout=job["stdin_timeout"],
                max_output=job["max_output"],
                reqid=job["reqid"],
                dispatcher=job["owner"],
            )
        )
        record.update(exit=res.exit, stdout=res.stdout, stderr=res.stderr)
        if res.error:
            record["error"] = res.error
    except Exception as exc:  # the record must always be completed
        record.update(exit=-1, stdout="", stderr="", error=f"async job failed: {exc}")
    record.update(status="done", finished=_utc())
    atomic_write_json(job["record"], record, 0o640)
    os.close(lock_fd)
    return 0


if __name__ == "__main__":
    os._exit(main())
