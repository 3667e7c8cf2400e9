"""Upstream's HTTP/1.0 framing: one request per connection, JSON bodies, exact headers.

Server side: :func:`read_request` (limits: 32 header lines, 1 MiB body, JSON nested at
most :data:`MAX_JSON_DEPTH` deep) and :func:`response_bytes`. Client side: :func:`request_bytes` and :func:`parse_response`.
"""

from __future__ import annotations

import json
import re
from array import array
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from agent.common.records import field, record

if TYPE_CHECKING:
    import asyncio

MAX_HEADERS = 32
MAX_BODY = 1_048_576
MAX_LINE = 16_384
#: Deepest JSON nesting any body may have (ours are 3 deep). Deeper bodies are refused with
#: a 400 before they are parsed: Python's parser raises RecursionError near 1000.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # signed bytes: +1, -1

PHRASES = {
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when the JSON text ``data`` nests arrays/objects more than ``limit`` deep.

    Without parsing, in linear time at C speed (about 30 ms per MiB of brackets): strings
    are dropped, each remaining bracket becomes +1 or -1, and the deepest running sum is
    the depth. A body with at most ``limit`` brackets in all is answered at once.
    """
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    steps = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS).translate(_STEP)
    return max(accumulate(array("b", steps)), default=0) > limit


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as upstream's encoder writes it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def response_bytes(code: int, obj: Any) -> bytes:
    body = dumps(obj)
    head = (
        f"HTTP/1.0 {code} {PHRASES.get(code, 'Unknown')}\r\n"
        f"Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


@record
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


class RequestError(Exception):
    """The request cannot be served; answer ``code`` with ``body`` and close."""

    def __init__(self, code: int, body: dict[str, Any]):
        super().__init__(f"{code} {body}")
        self.code = code
        self.body = body


async def _readline(reader: asyncio.StreamReader) -> bytes:
    import asyncio  # not at module level: the dispatcher's blocking client imports this module

    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        return exc.partial
    except asyncio.LimitOverrunError:
        raise RequestError(431, {"error": "header line too long"}) from None


async def read_request(
    reader: asyncio.StreamReader, max_headers: int = MAX_HEADERS, max_body: int = MAX_BODY
) -> Request:
    """Read one request; raises :class:`RequestError` for anything upstream refuses."""
    line = await _readline(reader)
    if not line.strip():
        raise RequestError(400, {"error": "empty request"})
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise RequestError(400, {"error": "bad request"})
    method, path, version = parts
    headers: dict[str, str] = {}
    count = 0
    while True:
        hl = await _readline(reader)
        if hl in (b"\r\n", b"\n", b""):
            break
        count += 1
        if count > max_headers:
            raise RequestError(431, {"error": "too many headers"})
        name, sep, value = hl.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = 0
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise RequestError(400, {"error": "bad content-length"}) from None
        if length < 0:
            raise RequestError(400, {"error": "bad content-length"})
    if length > max_body:
        raise RequestError(413, {"error": "request too large"})
    body = b""
    if length:
        import asyncio

        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise RequestError(400, {"error": "incomplete body"}) from None
        if json_too_deep(body):
            raise RequestError(400, {"error": f"JSON nested deeper than {MAX_JSON_DEPTH}"})
    return Request(method, path, version, headers, body)


def request_bytes(method: str, path: str, obj: Any | None, host: str = "") -> bytes:
    """A request as our dispatcher sends it: HTTP/1.1 line, ``Connection: close``."""
    body = b"" if obj is None else dumps(obj)
    lines = [f"{method} {path} HTTP/1.1"]
    if host:
        lines.append(f"Host: {host}")
    lines.append("Connection: close")
    if obj is not None:
        lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@record
class Response:
    code: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("HTTP/"):
        raise ValueError(f"bad status line: {lines[0]!r}")
    headers = {}
    for hl in lines[1:]:
        name, sep, value = hl.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return int(status[1]), headers


def parse_response(data: bytes) -> Response:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("truncated response head")
    code, headers = parse_head(head)
    if "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return Response(code, headers, body)
