"""Request ids: 16 lowercase hex characters from 8 random bytes (upstream's gen_reqid)."""

from __future__ import annotations

import os


def new_reqid() -> str:
    return os.urandom(8).hex()
