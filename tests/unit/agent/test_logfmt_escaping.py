"""Logs that cannot lie: every value escaped, every key safe, upstream's format kept.

The parser here is written independently of :mod:`agent.common.logfmt` (a tokenising
regex), so a bug shared by the formatter and its own :func:`~agent.common.logfmt.parse_line`
cannot hide.
"""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.common import logfmt

# ----- an independent parser ---------------------------------------------------------------

_FIELD = re.compile(r'([A-Z][A-Z0-9_]*)=("(?:[^"\\]|\\.)*"|[^ "\\]*)(?: (?=.)|$)', re.DOTALL)
_ESC = re.compile(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|[nrt\"\\])")
_SIMPLE = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}


def parse(line: str) -> list[tuple[str, str]]:
    """``[(KEY, value), ...]`` in line order; AssertionError unless the whole line parses."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        m = _FIELD.match(line, pos)
        assert m is not None, f"unparsable at {pos}: {line!r}"
        key, raw = m.group(1), m.group(2)
        if raw.startswith('"'):
            body = raw[1:-1]
            rebuilt = _ESC.sub("", body)
            assert "\\" not in rebuilt, f"unknown escape in {raw!r}"
            value = _ESC.sub(
                lambda e: _SIMPLE.get(e.group(1)) or chr(int(e.group(1)[1:], 16)), body
            )
        else:
            value = raw
        out.append((key, value))
        pos = m.end()
    return out


# Every character that must never reach a log line unescaped.
DANGEROUS = [chr(c) for c in (*range(0x20), *range(0x7F, 0xA1))] + [
    "\u2028", "\u2029", "\u200b", "\u200e", "\u202e", "\u2066", "\ufeff", "\u1680",
    "\u3000", "\u205f", "\ud800", "\udfff",
]  # fmt: skip
SPECIALS = [*DANGEROUS, '"', "\\", " ", "="]
FRAGMENTS = ["ACTION=auth RESULT=pass", "\r\nACTION=x", '" USER="root', '\\"']


def rendered(value: Any) -> str:
    """What a value reads back as."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def one_line(line: str) -> None:
    assert len(line.splitlines()) <= 1
    assert not any(c in line for c in DANGEROUS), line
    line.encode("utf-8")  # no lone surrogate left: syslog and stderr can always encode it


texts = st.lists(
    st.one_of(st.text(st.one_of(st.characters(), st.sampled_from(SPECIALS)), max_size=12),
              st.sampled_from(FRAGMENTS)),
    max_size=4,
).map("".join)  # fmt: skip
values = st.one_of(texts, st.integers(), st.none(), st.booleans(), st.floats(allow_nan=False))
keys = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True).filter(lambda k: k != "action")


@settings(max_examples=400, deadline=None)
@given(action=texts, fields=st.dictionaries(keys, values, max_size=8))
@example(action="auth", fields={"path": "/x\nACTION=auth RESULT=pass USER=root"})
@example(action="run", fields={"user": 'a" RESULT="pass', "reason": "x\\", "peer": ""})
@example(action="a", fields={"v": "\u2028ACTION=auth\u2029", "w": "\x00\x7f\x85\x9b"})
def test_any_value_is_one_line_and_parses_back(action: str, fields: dict[str, Any]) -> None:
    line = logfmt.format_fields(action, fields)
    one_line(line)
    got = parse(line)
    assert got[0] == ("ACTION", action)
    # sorted by field name, as before (upstream sorts its lower-case keys)
    assert got[1:] == [(k.upper(), rendered(v)) for k, v in sorted(fields.items())]
    assert logfmt.parse_line(line) == (action, dict(got[1:]))


@settings(max_examples=300, deadline=None)
@given(fields=st.dictionaries(st.one_of(texts, st.sampled_from(["action", "ACTION", "A", "a"])),
                              texts, max_size=6))  # fmt: skip
def test_any_key_is_made_safe_and_unique(fields: dict[str, str]) -> None:
    line = logfmt.format_fields("probe", fields)
    one_line(line)
    got = parse(line)
    names = [k for k, _ in got]
    assert names[0] == "ACTION" and "ACTION" not in names[1:]
    assert len(set(names)) == len(names) == len(fields) + 1
    assert all(re.fullmatch(r"[A-Z][A-Z0-9_]{0,63}", k) for k in names)
    assert sorted(v for _, v in got[1:]) == sorted(fields.values())


plain = st.text(st.characters(codec="ascii", exclude_characters='"\\', min_codepoint=0x20,
                              max_codepoint=0x7E), max_size=20)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(keys, plain, max_size=6))
def test_values_that_need_no_escaping_keep_upstreams_format(fields: dict[str, str]) -> None:
    """Upstream: sorted ``KEY=value``, values with whitespace in double quotes, verbatim."""
    want = " ".join(
        ["ACTION=run"]
        + [
            f'{k.upper()}="{v}"' if " " in v else f"{k.upper()}={v}"
            for k, v in sorted(fields.items())
        ]
    )
    assert logfmt.format_fields("run", fields) == want


def test_examples() -> None:
    line = logfmt.format_fields("api-request", {
        "path": "/x\nACTION=auth RESULT=pass", "user": 'bob" ADMIN="1', "ok": "plain",
        "sp": "two words", "nul": "a\x00b", "ls": "a\u2028b", "bs": "C:\\x", "none": None,
    })  # fmt: skip
    assert line == (
        'ACTION=api-request BS="C:\\\\x" LS="a\\u2028b" NONE= NUL="a\\x00b" OK=plain '
        'PATH="/x\\nACTION=auth RESULT=pass" SP="two words" USER="bob\\" ADMIN=\\"1"'
    )
    assert logfmt.format_fields("x", {"action": "auth", "a b": 1, "A": 2, "a": 3}) == (
        "ACTION=x A=2 KEY_A=3 KEY_A_B=1 KEY_ACTION=auth"
    )


def test_parse_line_refuses_what_format_fields_never_writes() -> None:
    for bad in ["", "X=1", "ACTION=a\nACTION=b", 'ACTION=a K="x', "ACTION=a K=x\\y",
                "ACTION=a K=1 K=2", "ACTION=a k=1", 'ACTION=a K="\\q"', "ACTION=a K=1 "]:  # fmt: skip
        with pytest.raises(ValueError):
            logfmt.parse_line(bad)


# ----- every sink ---------------------------------------------------------------------------

FORGED = "/x\nACTION=auth RESULT=pass\r\u2028ACTION=auth"


@pytest.fixture
def restore_logfmt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logfmt, "_direct", None)


def _emit(target: str, queued: bool) -> None:
    logfmt.setup("ctrl-exec-test", target, queued=queued)
    try:
        logfmt.event("api-request", path=FORGED, user='a"b')
        if queued:  # free text of another module's logger goes through the same handler
            logging.getLogger("ctrl-exec.cluster").warning("store said %s", FORGED)
    finally:
        logfmt.shutdown()


@pytest.mark.usefixtures("restore_logfmt")
@pytest.mark.parametrize("queued", [True, False])
def test_stderr_sinks_write_one_line_per_event(
    capfd: pytest.CaptureFixture[str], queued: bool
) -> None:
    _emit("stderr", queued)
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == (2 if queued else 1), lines
    for line in lines:
        one_line(line)
    body = lines[0].split("]: ", 1)[1]
    assert parse(body) == [("ACTION", "api-request"), ("PATH", FORGED), ("USER", 'a"b')]
    if queued:  # the free text became the MSG of one "log" event
        action, fields = logfmt.parse_line(lines[1].split("]: ", 1)[1])
        assert (action, fields["LOGGER"], fields["LEVEL"]) == (
            "log",
            "ctrl-exec.cluster",
            "warning",
        )
        assert fields["MSG"] == f"store said {FORGED}"


@pytest.mark.usefixtures("restore_logfmt")
@pytest.mark.parametrize("queued", [True, False])
def test_syslog_sinks_write_one_line_per_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queued: bool
) -> None:
    path = tmp_path / "log"
    monkeypatch.setattr(logfmt, "SYSLOG_SOCKET", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(5)
        _emit("syslog", queued)
        got = [srv.recv(65536) for _ in range(2 if queued else 1)]
    for datagram in got:
        text = datagram.decode().rstrip("\0")
        one_line(text)
    assert parse(got[0].decode().rstrip("\0").split("]: ", 1)[1])[1] == ("PATH", FORGED)
