"""The agent's side of the executor socket: send one run, wait for its result.

Any failure to reach the executor or to read its answer becomes ``exit -1`` with an
``error``, as upstream reports an unreachable executor.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent.executor import protocol
from agent.runner import RunResult


def _failed(error: str) -> RunResult:
    return RunResult(-1, "", "", error=error)


async def run_via_executor(
    socket_path: str,
    script: str,
    args: list[str],
    stdin: str,
    *,
    reqid: str = "",
    dispatcher: str = "",
    timeout: float = 3600.0,
    max_output: int = 8 * 1024 * 1024,
) -> RunResult:
    req = protocol.Request(script, args, stdin, reqid, dispatcher)
    frame = protocol.encode(protocol.request_obj(req))
    if len(frame) - protocol.HEADER.size > protocol.MAX_REQUEST:
        return _failed("request too large for the executor")
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket_path), 10)
    except (OSError, TimeoutError) as exc:
        return _failed(f"executor unreachable: {socket_path}: {exc}")
    try:
        writer.write(frame)
        await asyncio.wait_for(writer.drain(), 30)
        obj = await asyncio.wait_for(
            protocol.read_frame(reader, protocol.response_limit(max_output)), timeout
        )
        return protocol.parse_result(obj)
    except TimeoutError:
        return _failed(f"executor did not answer within {timeout:g}s")
    except (OSError, protocol.FrameError) as exc:
        return _failed(f"executor failed: {exc}")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 2)
