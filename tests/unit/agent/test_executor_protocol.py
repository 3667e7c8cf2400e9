"""The executor's framing and request checks, and the command a profile turns into."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.executor import protocol
from agent.executor.sandbox import ENV, SETPRIV, Plan
from agent.profiles import Profile, RunAs
from agent.runner import RunResult


def _read(data: bytes, limit: int = protocol.MAX_REQUEST) -> dict[str, object]:
    async def go() -> dict[str, object]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await protocol.read_frame(reader, limit)

    return asyncio.run(go())


def test_round_trip_of_a_request() -> None:
    req = protocol.Request("ident", ["a b", "ü", ""], '{"k":"v"}', "r1", "disp")
    frame = protocol.encode(protocol.request_obj(req))
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert protocol.parse_request(_read(frame)) == req


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (struct.pack(">I", 11), "over the 10-byte limit"),
        (struct.pack(">I", 5) + b"{}", "cut short"),
        (b"\x00", "closed before a frame"),
        (struct.pack(">I", 3) + b"\xff{}", "not UTF-8 JSON"),
        (struct.pack(">I", 2) + b"[]", "not a JSON object"),
    ],
)
def test_bad_frames(data: bytes, why: str) -> None:
    with pytest.raises(protocol.FrameError, match=why):
        _read(data, limit=10)


def _req(**kw: object) -> dict[str, object]:
    return {**protocol.request_obj(protocol.Request("ident", [], "")), **kw}


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (_req(v=2), "unsupported protocol version"),
        (_req(script="../x"), "allowlist name"),
        (_req(script=1), "allowlist name"),
        (_req(args="x"), "args must be a list"),
        (_req(args=["x"] * (protocol.MAX_ARGS + 1)), "args must be a list"),
        (_req(args=[1]), "without NUL"),
        (_req(args=["a\0"]), "without NUL"),
        (_req(stdin=None), "stdin must be a string"),
        (_req(reqid="r" * 257), "reqid must be"),
        (_req(dispatcher=[]), "dispatcher must be"),
    ],
)
def test_bad_requests(obj: dict[str, object], why: str) -> None:
    with pytest.raises(protocol.FrameError, match=why):
        protocol.parse_request(obj)


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=10), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)))  # fmt: skip
def test_any_object_is_a_request_or_a_frame_error(obj: dict[str, object]) -> None:
    try:
        req = protocol.parse_request(obj)
    except protocol.FrameError:
        return
    assert protocol.parse_request(protocol.request_obj(req)) == req


def test_result_round_trip_and_checks() -> None:
    res = RunResult(3, "out", "err", "", True, False, 7)
    assert protocol.parse_result(json.loads(protocol.encode(protocol.result_obj(res))[4:])) == res
    for bad in ({"exit": 256}, {"exit": True}, {"exit": "0"}, {"exit": 0, "stdout": 1}):
        with pytest.raises(protocol.FrameError):
            protocol.parse_result(bad)
    assert protocol.refusal("no")["exit"] == -1


def test_plan_command_and_environment() -> None:
    user = RunAs("svc", 1001, 1002, (1002, 27), "/home/svc")
    plan = Plan(Profile("p", "svc", ("CAP_NET_BIND_SERVICE", "CAP_KILL")), user)
    assert plan.command("/opt/s", ["-x", "y"]) == [
        SETPRIV, "--reuid=1001", "--regid=1002", "--groups=1002,27",
        "--bounding-set=-all,+net_bind_service,+kill", "--inh-caps=-all,+net_bind_service,+kill",
        "--ambient-caps=-all,+net_bind_service,+kill", "--no-new-privs", "--", ENV, "--",
        "/opt/s", "-x", "y",
    ]  # fmt: skip
    loose = Plan(Profile("q", no_new_privileges=False), RunAs("root", 0, 0))
    cmd = loose.command("/opt/s", [])
    assert "--no-new-privs" not in cmd and "--clear-groups" in cmd
    assert "--bounding-set=-all" in cmd
    env = plan.env()
    assert {k: env[k] for k in ("PATH", "HOME", "USER", "LOGNAME")} == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/home/svc", "USER": "svc", "LOGNAME": "svc",
    }  # fmt: skip
    assert set(env) <= {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ"}


def test_response_limit_covers_escaped_output() -> None:
    worst = RunResult(0, "\x01" * 1000, "\x01" * 1000)
    assert len(protocol.encode(protocol.result_obj(worst))) <= protocol.response_limit(1000)
