"""The auth hook contract shared by agent and dispatcher (spec 8.1).

The hook runs with no arguments, the context as JSON on stdin, ``ENVEXEC_*`` variables
added to the caller's environment, stdout/stderr to /dev/null. Exit 0 allows; 1, 2, 3 deny
with fixed reasons; anything else denies as ``hook exited N``; a timeout kills it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import TYPE_CHECKING, Any

from agent.common.records import record

if TYPE_CHECKING:
    import subprocess

REASONS = {1: "denied", 2: "bad credentials", 3: "insufficient privilege"}


@record(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    code: int = 0


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def build_context(
    action: str,
    script: str = "",
    hosts: list[str] | None = None,
    args: list[str] | None = None,
    username: str = "",
    token: str = "",
    source_ip: str = "",
    dispatcher: str = "",
    dispatcher_serial: str = "",
    reqid: str = "",
    submitter: dict[str, str] | None = None,
    identity: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The hook's stdin document: upstream's keys, plus ``identity`` (ours): the caller's
    certificate ``{cn, serial, issuer_fingerprint}`` (API), the Unix user as ``cn`` (local
    ``ced``), or null."""
    return {
        "action": action,
        "script": script,
        "hosts": list(hosts or []),
        "args": list(args or []),
        "username": username,
        "token": token,
        "source_ip": source_ip,
        "dispatcher": dispatcher,
        "dispatcher_serial": dispatcher_serial,
        "reqid": reqid,
        "submitter": submitter,
        "timestamp": utc_now(),
        "identity": dict(identity) if identity else None,
    }


BAD_CONTEXT = "auth hook context holds a character the environment cannot carry"


def build_env(ctx: dict[str, Any], base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    sub = ctx.get("submitter") or {}
    ident = ctx.get("identity") or {}
    env.update(
        {
            "ENVEXEC_ACTION": ctx["action"],
            "ENVEXEC_SCRIPT": ctx["script"],
            "ENVEXEC_HOSTS": ",".join(ctx["hosts"]),
            "ENVEXEC_ARGS": " ".join(ctx["args"]),
            "ENVEXEC_ARGS_JSON": json.dumps(ctx["args"]),
            "ENVEXEC_USERNAME": ctx["username"],
            "ENVEXEC_TOKEN": ctx["token"],
            "ENVEXEC_SOURCE_IP": ctx["source_ip"],
            "ENVEXEC_DISPATCHER": ctx["dispatcher"],
            "ENVEXEC_DISPATCHER_SERIAL": ctx["dispatcher_serial"],
            "ENVEXEC_REQID": ctx["reqid"],
            "ENVEXEC_SUBMITTER": sub.get("username", ""),
            "ENVEXEC_SUBMITTER_IP": sub.get("source_ip", ""),
            "ENVEXEC_TIMESTAMP": ctx["timestamp"],
            "ENVEXEC_IDENTITY": str(ident.get("cn", "")),
        }
    )
    return env


def decide(returncode: int | None) -> Decision:
    if returncode == 0:
        return Decision(True)
    if returncode is None:
        return Decision(False, "denied", 1)
    if returncode in REASONS:
        return Decision(False, REASONS[returncode], returncode)
    return Decision(False, f"hook exited {returncode}", 1)


def _not_runnable(hook: str) -> Decision | None:
    if not (os.path.isfile(hook) and os.access(hook, os.X_OK)):
        return Decision(False, f"auth hook not found or not executable: {hook}", 1)
    return None


async def call(hook: str, ctx: dict[str, Any], timeout: float = 10.0) -> Decision:
    """Run ``hook``; a missing/non-executable hook, exec failure or timeout denies."""
    import asyncio  # here, not at the top: ``call_sync`` users must not pay for asyncio

    if (refused := _not_runnable(hook)) is not None:
        return refused
    data = json.dumps(ctx).encode()
    try:
        proc = await asyncio.create_subprocess_exec(
            hook,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=build_env(ctx),
            start_new_session=True,
        )
    except OSError:
        return Decision(False, "denied", 1)
    except ValueError:  # a NUL or lone surrogate no environment can carry: fail closed
        return Decision(False, BAD_CONTEXT, 1)
    try:
        async with asyncio.timeout(timeout):
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(data)
                await proc.stdin.drain()
                proc.stdin.close()
            rc = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        return Decision(False, "auth hook timed out", 1)
    return decide(rc)


#: context this small goes into the (empty, 64 KiB) pipe without blocking
_PIPE_SAFE = 32 << 10


def _feed_and_wait(proc: subprocess.Popen[bytes], data: bytes, timeout: float) -> None:
    """Give the hook its context and wait for it to exit (TimeoutExpired after
    ``timeout``). Waits on a pidfd: ``Popen.wait(timeout)`` polls with growing sleeps, which
    added up to 4 ms to a hook that exits at once."""
    import select
    import subprocess

    try:
        pidfd = os.pidfd_open(proc.pid) if len(data) < _PIPE_SAFE else -1
    except (AttributeError, OSError):  # before Linux 5.3
        pidfd = -1
    if pidfd < 0:
        proc.communicate(data, timeout=timeout)
        return
    try:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(data)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            raise subprocess.TimeoutExpired(proc.args, timeout)
        proc.wait()
    finally:
        os.close(pidfd)


def call_sync(hook: str, ctx: dict[str, Any], timeout: float = 10.0) -> Decision:
    """:func:`call` without an event loop (blocks the calling thread)."""
    import subprocess

    if (refused := _not_runnable(hook)) is not None:
        return refused
    data = json.dumps(ctx).encode()
    try:
        proc = subprocess.Popen(
            [hook],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=build_env(ctx),
            start_new_session=True,
        )
    except OSError:
        return Decision(False, "denied", 1)
    except ValueError:  # a NUL or lone surrogate no environment can carry: fail closed
        return Decision(False, BAD_CONTEXT, 1)
    try:
        _feed_and_wait(proc, data, timeout)  # a hook that ignores stdin is fine
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        return Decision(False, "auth hook timed out", 1)
    finally:
        if proc.stdin is not None and not proc.stdin.closed:
            with contextlib.suppress(OSError):
                proc.stdin.close()
    return decide(proc.returncode)
