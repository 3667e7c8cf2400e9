"""Detached runs: ``POST /run`` with ``"async": true`` and ``GET /result/<reqid>``.

The run is handed to ``python -m agent.asyncjob`` (its own session, holding the script's
lock), which writes the record ``<async_runs_dir>/<dispatcher>/<reqid>.json``; only the
dispatcher that started a run can read its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent import allowlist
from agent.common import authhook, logfmt
from agent.common.fsutil import atomic_write_json
from agent.handlers.base import REQID_RE, AgentState, Peer, Reply, gate

ev = logfmt.event
PKG_ROOT = str(Path(__file__).resolve().parents[2])  # the job imports the agent from here


def _sweep(root: Path, ttl: float) -> None:
    cutoff = time.time() - ttl
    for rec in root.glob("*/*.json"):
        with contextlib.suppress(OSError):
            if rec.stat().st_mtime < cutoff:
                rec.unlink()


def _job_env() -> dict[str, str]:
    env = dict(os.environ)
    # The job imports this package the way the agent did.
    env["PYTHONPATH"] = PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _failed(script: str, reqid: str) -> Reply:
    return 200, {"script": script, "exit": -1, "reqid": reqid,
                 "error": "could not start async job"}  # fmt: skip


async def start(
    agent: AgentState, entry: allowlist.Script, argv: list[str], stdin: bytes, reqid: str,
    peer: Peer,
) -> Reply:  # fmt: skip
    """Start ``entry`` detached (409 while the same script still runs)."""
    script = entry.name
    if not REQID_RE.match(reqid):
        return 200, {"script": script, "exit": -1, "reqid": reqid,
                     "error": "async run requires a valid reqid"}  # fmt: skip
    assert peer.dispatcher is not None
    root = Path(agent.cfg.async_runs_dir)
    owner_dir = root / peer.dispatcher
    lock_dir = root / ".locks"
    try:
        owner_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        _sweep(root, agent.cfg.async_ttl)
        fd = os.open(lock_dir / f"{script}.lock", os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as exc:
        ev("async-store-fail", logging.ERROR, script=script, reqid=reqid, reason=str(exc))
        return _failed(script, reqid)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            ev("run-async-busy", script=script, peer=peer.ip, reqid=reqid,
               dispatcher=peer.dispatcher)  # fmt: skip
            return 409, {"script": script, "status": "busy", "reqid": reqid,
                         "error": "script already running"}  # fmt: skip
        if not await _launch(agent, entry, argv, stdin, reqid, peer.dispatcher, owner_dir, fd):
            return _failed(script, reqid)
    finally:
        os.close(fd)
    ev("run-async", script=script, peer=peer.ip, dispatcher=peer.dispatcher, reqid=reqid)
    return 202, {"script": script, "status": "accepted", "reqid": reqid}


async def _launch(
    agent: AgentState, entry: allowlist.Script, argv: list[str], stdin: bytes, reqid: str,
    owner: str, owner_dir: Path, fd: int,
) -> bool:  # fmt: skip
    """Write the "running" record and hand the job (and the locked ``fd``) to the launcher."""
    script, cfg = entry.name, agent.cfg
    record_path = owner_dir / f"{reqid}.json"
    started = authhook.utc_now()
    atomic_write_json(record_path, {"reqid": reqid, "status": "running", "script": script,
                                    "owner": owner, "started": started}, 0o640)  # fmt: skip
    job: dict[str, Any] = {
        "path": entry.path, "args": argv, "stdin": stdin.decode(), "reqid": reqid,
        "script": script, "owner": owner, "started": started,
        "record": str(record_path), "timeout": cfg.script_timeout,
        "stdin_timeout": cfg.stdin_timeout, "max_output": cfg.max_output,
        "executor_socket": cfg.executor_socket,
    }  # fmt: skip
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.asyncjob", str(fd),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, pass_fds=(fd,),
            start_new_session=True, env=_job_env(),
        )  # fmt: skip
        await proc.communicate(json.dumps(job).encode())
        if proc.returncode != 0:
            raise OSError(f"job launcher exited {proc.returncode}")
    except OSError as exc:
        ev("async-store-fail", logging.ERROR, script=script, reqid=reqid, reason=str(exc))
        with contextlib.suppress(OSError):
            record_path.unlink()
        return False
    return True


async def result(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    """``GET /result/<reqid>``: the record of a detached run, to the dispatcher that owns it."""
    reqid = arg
    if (denied := gate(peer, reqid)) is not None:
        return denied
    unknown = 404, {"status": "unknown", "reqid": reqid}
    if not REQID_RE.match(reqid):
        return unknown
    assert peer.dispatcher is not None
    path = Path(agent.cfg.async_runs_dir) / peer.dispatcher / f"{reqid}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        ev("result-miss", peer=peer.ip, reqid=reqid, dispatcher=peer.dispatcher)
        return unknown
    if not isinstance(record, dict) or record.get("owner") != peer.dispatcher:
        ev("result-deny", logging.WARNING, peer=peer.ip, reqid=reqid, reason="not-owner")
        return unknown
    ev("result", peer=peer.ip, reqid=reqid, dispatcher=peer.dispatcher,
       status=record.get("status"))  # fmt: skip
    return 200, record
