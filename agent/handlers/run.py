"""``POST /run``: validate the request, check the allowlist and the auth hook, run.

The script gets the request context as JSON on stdin. ``"async": true`` hands the run to
:mod:`agent.handlers.asyncrun`; otherwise the reply carries the exit code and the output.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from agent import allowlist
from agent.common import authhook, logfmt
from agent.handlers import asyncrun
from agent.handlers.base import AgentState, Peer, Reply, gate, hook, parse_json, reqid_of
from agent.runner import run_allowed

ev = logfmt.event


@dataclass
class RunRequest:
    script: Any  # echoed back as sent, even when it is not a string
    reqid: str
    argv: list[str]
    username: str
    token: str


def _parse(obj: Any) -> RunRequest | Reply:
    """The checked fields of a ``/run`` body, or the error reply (200, upstream's way)."""
    if not isinstance(obj, dict):
        return 200, {"exit": -1, "error": "invalid JSON"}
    script = obj.get("script", "")
    reqid = obj.get("reqid", "")
    args = obj.get("args", [])
    username = obj.get("username", "")
    token = obj.get("token", "")
    if not isinstance(reqid, str):
        return 200, {"exit": -1, "error": "reqid must be a string"}
    if not isinstance(args, list):
        return 200, {"exit": -1, "error": "args must be an array", "reqid": reqid}
    if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in args):
        return 200, {"exit": -1, "error": "args must be strings", "reqid": reqid}
    argv = [str(a) for a in args]
    if any("\0" in a for a in argv):
        return 200, {"exit": -1, "error": "args must not contain NUL bytes", "reqid": reqid}
    if not isinstance(username, str) or not isinstance(token, str):
        return 200, {"exit": -1, "error": "username and token must be strings", "reqid": reqid}
    return RunRequest(script, reqid, argv, username, token)


def _allowed(agent: AgentState, script: Any) -> allowlist.Script | None:
    if not isinstance(script, str) or not allowlist.NAME_RE.match(script):
        return None
    entry = agent.scripts.get(script)
    if entry is not None and not allowlist.within_dirs(entry.path, agent.cfg.script_dirs):
        return None
    return entry


async def run(agent: AgentState, peer: Peer, body: bytes, arg: str) -> Reply:
    obj = parse_json(body)
    if (denied := gate(peer, reqid_of(obj))) is not None:
        return denied
    req = _parse(obj)
    if not isinstance(req, RunRequest):
        return req
    script, reqid, argv = req.script, req.reqid, req.argv
    entry = _allowed(agent, script)
    if entry is None:
        ev("deny", logging.WARNING, script=str(script), peer=peer.ip, reqid=reqid)
        return 200, {"script": script, "exit": -1, "reqid": reqid,
                     "error": "script not permitted"}  # fmt: skip
    if agent.cfg.auth_hook:
        d = await hook(agent, "run", peer, script=script, args=argv, username=req.username,
                       token=req.token, reqid=reqid)  # fmt: skip
        if not d.allowed:
            ev("deny", logging.WARNING, script=script, peer=peer.ip, reqid=reqid,
               reason=d.reason, dispatcher=peer.dispatcher)  # fmt: skip
            return 200, {"script": script, "exit": -1, "reqid": reqid,
                         "error": f"not authorised: {d.reason}"}  # fmt: skip
    context = {
        "script": script, "args": argv, "reqid": reqid, "peer_ip": peer.ip,
        "username": req.username, "token": req.token, "dispatcher": peer.dispatcher,
        "timestamp": authhook.utc_now(),
    }  # fmt: skip
    stdin = json.dumps(context, separators=(",", ":")).encode()
    if obj.get("async") is True:
        return await asyncrun.start(agent, entry, argv, stdin, reqid, peer)
    return await _run_now(agent, entry, argv, stdin, reqid, peer)


async def _run_now(
    agent: AgentState, entry: allowlist.Script, argv: list[str], stdin: bytes, reqid: str,
    peer: Peer,
) -> Reply:  # fmt: skip
    script, cfg = entry.name, agent.cfg
    res = await run_allowed(
        entry.path, script, argv, stdin, executor_socket=cfg.executor_socket,
        timeout=cfg.script_timeout, stdin_timeout=cfg.stdin_timeout,
        max_output=cfg.max_output, reqid=reqid, dispatcher=peer.dispatcher or "",
    )  # fmt: skip
    if res.stdin_unwritten:
        ev("stdin-timeout", logging.WARNING, script=script, reqid=reqid,
           bytes=res.stdin_unwritten)  # fmt: skip
    ev("run", script=script, exit=res.exit, peer=peer.ip, dispatcher=peer.dispatcher,
       reqid=reqid)  # fmt: skip
    out: dict[str, Any] = {"script": script, "exit": res.exit, "stdout": res.stdout,
                           "stderr": res.stderr, "reqid": reqid}  # fmt: skip
    if res.error:
        out["error"] = res.error
    if res.stdout_truncated:
        out["stdout_truncated"] = True
    if res.stderr_truncated:
        out["stderr_truncated"] = True
    return 200, out
