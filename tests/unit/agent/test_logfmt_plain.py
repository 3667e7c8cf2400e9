"""logfmt's fast path for plain ASCII values renders exactly what the regular expressions do."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common import logfmt


def _by_regex(s: str) -> str:
    if re.search(logfmt._NEEDS_QUOTES, s) is None:
        return s
    if re.search(logfmt._NEEDS_ESCAPES, s) is None:
        return f'"{s}"'
    return '"' + re.sub(logfmt._NEEDS_ESCAPES, logfmt._escape_char, s) + '"'


@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.text(), st.text(st.characters(max_codepoint=0x7F))))
def test_plain_fast_path_agrees_with_the_regex(s: str) -> None:
    assert logfmt._quote(s) == _by_regex(s)


def test_plain_cases() -> None:
    for s, want in (("web1", "web1"), ("a b", '"a b"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'),
                    ("tab\there", '"tab\\there"'), ("\x7f", '"\\x7f"'), ("", "")):  # fmt: skip
        assert logfmt._quote(s) == want, s
