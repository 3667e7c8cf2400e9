"""Run one allowlisted script: argv only (never a shell), context JSON on stdin,
sanitised environment, bounded output capture, a timeout, upstream's exit codes.

Exit codes: the script's own 0..255; 126 when a signal killed it; 127 when it could not
be executed; -1 for an agent-side failure (timeout included, with ``error`` set).

:func:`run_allowed` is the agent's entry point: it runs the script here (direct mode) or
hands it to the privileged executor (``executor_socket``), which runs it with
:func:`run_script` too, under the script's profile.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PASSED_ENV = ("HOME", "LANG", "LC_ALL", "TZ", "TERM", "USER", "LOGNAME")


@dataclass
class RunResult:
    exit: int
    stdout: str
    stderr: str
    error: str = ""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdin_unwritten: int = 0


def script_env(base: dict[str, str] | None = None) -> dict[str, str]:
    src = os.environ if base is None else base
    env = {"PATH": SAFE_PATH}
    for k in PASSED_ENV:
        if k in src:
            env[k] = src[k]
    return env


async def _capture(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Read to EOF, keeping at most ``limit`` bytes (the rest is drained and dropped)."""
    buf = bytearray()
    truncated = False
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        room = limit - len(buf)
        if room > 0:
            buf += chunk[:room]
        if len(chunk) > room:
            truncated = True
    return bytes(buf), truncated


async def _feed(stdin: asyncio.StreamWriter | None, data: bytes, timeout: float) -> int:
    """Write ``data`` within ``timeout``; returns the number of bytes left unwritten."""
    if stdin is None:
        return 0
    left = 0
    try:
        stdin.write(data)
        await asyncio.wait_for(stdin.drain(), timeout)
    except TimeoutError:
        transport = stdin.transport
        left = transport.get_write_buffer_size() if transport else len(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with contextlib.suppress(Exception):
            stdin.close()
    return left


class Child(Protocol):
    """What :func:`run_script` needs of a started process (asyncio's ``Process`` has it)."""

    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...


Spawner = Callable[[list[str], dict[str, str]], Awaitable[Child]]


async def _spawn(argv: list[str], env: dict[str, str]) -> Child:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd="/",
        start_new_session=True,
        close_fds=True,
    )


async def run_script(
    path: str,
    args: list[str],
    stdin_data: bytes,
    *,
    timeout: float = 3600.0,
    stdin_timeout: float = 10.0,
    max_output: int = 8 * 1024 * 1024,
    env: dict[str, str] | None = None,
    command: Sequence[str] | None = None,
    spawn: Spawner | None = None,
) -> RunResult:
    """Run ``path args`` (or ``command``, the full argv, when given), started by
    ``spawn`` (the executor's starts it through the profile's spawner, in the profile's
    mount namespace and with its credentials) or as a plain child in its own session."""
    argv = list(command) if command is not None else [path, *args]
    try:
        proc = await (spawn or _spawn)(argv, script_env() if env is None else env)
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return RunResult(127, "", f"exec failed: {path}: {why}\n")
    assert proc.stdout is not None and proc.stderr is not None
    feed = asyncio.ensure_future(_feed(proc.stdin, stdin_data, stdin_timeout))
    out = asyncio.ensure_future(_capture(proc.stdout, max_output))
    err = asyncio.ensure_future(_capture(proc.stderr, max_output))
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.gather(out, err, proc.wait())), timeout)
    except TimeoutError:
        timed_out = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        # Children that escaped the process group may hold the pipes: stop waiting soon.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 5)
        for t in (out, err):
            if not t.done():
                t.cancel()
    left = await feed
    sout, strunc = out.result() if out.done() and not out.cancelled() else (b"", True)
    serr, etrunc = err.result() if err.done() and not err.cancelled() else (b"", True)
    rc = proc.returncode
    res = RunResult(
        exit=126 if rc is None or rc < 0 else rc,
        stdout=sout.decode("utf-8", "replace"),
        stderr=serr.decode("utf-8", "replace"),
        stdout_truncated=strunc,
        stderr_truncated=etrunc,
        stdin_unwritten=left,
    )
    if timed_out:
        res.exit = -1
        res.error = f"script timed out after {timeout:g}s"
    return res


async def run_allowed(
    path: str,
    script: str,
    args: list[str],
    stdin_data: bytes,
    *,
    executor_socket: str = "",
    timeout: float = 3600.0,
    stdin_timeout: float = 10.0,
    max_output: int = 8 * 1024 * 1024,
    reqid: str = "",
    dispatcher: str = "",
) -> RunResult:
    """Run the allowlisted ``script`` (at ``path``): directly, or through the executor
    when ``executor_socket`` is set (the executor finds the path and the profile in its
    own reading of the config; it applies the same limits, read from the same file)."""
    if not executor_socket:
        return await run_script(path, args, stdin_data, timeout=timeout,
                                stdin_timeout=stdin_timeout, max_output=max_output)  # fmt: skip
    from agent.executor.client import run_via_executor

    return await run_via_executor(
        executor_socket, script, args, stdin_data.decode("utf-8", "replace"),
        reqid=reqid, dispatcher=dispatcher, timeout=timeout + stdin_timeout + 30,
        max_output=max_output,
    )  # fmt: skip
