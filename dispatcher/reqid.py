"""Request ids: 16 lowercase hex characters from 8 random bytes (upstream's gen_reqid).

:func:`request_reqid` is the id of the request being handled (set where it entered the
process: the API gate, ``ced``, a forwarded request; see ``agent.common.logfmt.request``),
so the run or ping it starts, and every log line of it, carries the same id.
"""

from __future__ import annotations

import os
import re

from agent.common import logfmt

REQID_RE = re.compile(r"[0-9a-f]{16}")


def new_reqid() -> str:
    return os.urandom(8).hex()


def request_reqid() -> str:
    """The current request's reqid, else a new one."""
    return logfmt.current_reqid() or new_reqid()
