"""The agent <-> executor wire format on the Unix socket.

One request and one response per connection. Each is a *frame*: a 4-byte big-endian
unsigned length, then that many bytes of UTF-8 JSON holding one object. A request frame
larger than :data:`MAX_REQUEST` is refused before its body is read; the agent refuses a
response frame larger than the bound it computes from ``max_output``.

Request (agent -> executor)::

    {"v": 1, "script": "<allowlist name>", "args": ["..."], "stdin": "<context JSON>",
     "reqid": "...", "dispatcher": "..."}

The executor never takes a path or a profile from the agent: it looks ``script`` up in its
own reading of ``scripts.conf`` and ``agent.conf``.

Response (executor -> agent)::

    {"exit": 0, "stdout": "...", "stderr": "...", "error": "...",
     "stdout_truncated": false, "stderr_truncated": false, "stdin_unwritten": 0}

``exit`` has the direct mode's meanings: the script's 0..255, 126 when a signal killed it
or its profile could not be applied, 127 when it could not be executed, -1 for a refusal
or failure (``error`` says which).
"""

from __future__ import annotations

import asyncio
import json
import struct
from dataclasses import dataclass
from typing import Any

from agent.allowlist import NAME_RE
from agent.runner import RunResult

VERSION = 1
HEADER = struct.Struct(">I")
MAX_REQUEST = 4 * 1024 * 1024
MAX_ARGS = 4096
MAX_ID = 256


class FrameError(Exception):
    """A frame that breaks this format (its message goes back in ``error``)."""


@dataclass(frozen=True)
class Request:
    script: str
    args: list[str]
    stdin: str
    reqid: str = ""
    dispatcher: str = ""


def encode(obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    return HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader, max_size: int) -> dict[str, Any]:
    """One frame's object; FrameError when it is too large, cut short or not an object."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError:
        raise FrameError("connection closed before a frame") from None
    (size,) = HEADER.unpack(head)
    if size > max_size:
        raise FrameError(f"frame of {size} bytes is over the {max_size}-byte limit")
    try:
        data = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError("frame cut short") from None
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("frame is not UTF-8 JSON") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    return obj


def request_obj(req: Request) -> dict[str, Any]:
    return {"v": VERSION, "script": req.script, "args": req.args, "stdin": req.stdin,
            "reqid": req.reqid, "dispatcher": req.dispatcher}  # fmt: skip


def parse_request(obj: dict[str, Any]) -> Request:
    if obj.get("v") != VERSION:
        raise FrameError(f"unsupported protocol version {obj.get('v')!r}")
    script, args, stdin = obj.get("script"), obj.get("args"), obj.get("stdin", "")
    reqid, disp = obj.get("reqid", ""), obj.get("dispatcher", "")
    if not isinstance(script, str) or not NAME_RE.match(script):
        raise FrameError("script must be an allowlist name")
    if not isinstance(args, list) or len(args) > MAX_ARGS:
        raise FrameError(f"args must be a list of at most {MAX_ARGS} strings")
    if not all(isinstance(a, str) and "\0" not in a for a in args):
        raise FrameError("args must be strings without NUL bytes")
    if not isinstance(stdin, str):
        raise FrameError("stdin must be a string")
    for what, v in (("reqid", reqid), ("dispatcher", disp)):
        if not isinstance(v, str) or len(v) > MAX_ID:
            raise FrameError(f"{what} must be a string of at most {MAX_ID} characters")
    return Request(script, list(args), stdin, reqid, disp)


def result_obj(res: RunResult) -> dict[str, Any]:
    return {"exit": res.exit, "stdout": res.stdout, "stderr": res.stderr, "error": res.error,
            "stdout_truncated": res.stdout_truncated, "stderr_truncated": res.stderr_truncated,
            "stdin_unwritten": res.stdin_unwritten}  # fmt: skip


def parse_result(obj: dict[str, Any]) -> RunResult:
    ex, out, err = obj.get("exit"), obj.get("stdout", ""), obj.get("stderr", "")
    if not isinstance(ex, int) or isinstance(ex, bool) or not -1 <= ex <= 255:
        raise FrameError("exit must be an integer -1..255")
    if not isinstance(out, str) or not isinstance(err, str):
        raise FrameError("stdout and stderr must be strings")
    error = obj.get("error", "")
    left = obj.get("stdin_unwritten", 0)
    return RunResult(
        exit=ex, stdout=out, stderr=err, error=error if isinstance(error, str) else "",
        stdout_truncated=obj.get("stdout_truncated") is True,
        stderr_truncated=obj.get("stderr_truncated") is True,
        stdin_unwritten=left if isinstance(left, int) and not isinstance(left, bool) else 0,
    )  # fmt: skip


def refusal(error: str) -> dict[str, Any]:
    """A response for a request the executor will not run."""
    return result_obj(RunResult(-1, "", "", error=error))


def response_limit(max_output: int) -> int:
    """The largest response the agent accepts: two captured streams of ``max_output``
    bytes each, JSON-escaped (at most 6 bytes per byte), plus room for the rest."""
    return 12 * max_output + 64 * 1024
