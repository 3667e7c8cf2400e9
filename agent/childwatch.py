"""Reap script processes with a pidfd on Python 3.11, as 3.12+ does by default.

3.11's default child watcher starts one thread per running child; with many concurrent
runs that costs memory and CPU. The pidfd watcher needs Linux 5.3+; without it the
default stays.
"""

from __future__ import annotations

import asyncio
import os
import sys
import warnings


def use_pidfd_watcher() -> None:
    """Call from inside the running loop, before the first subprocess starts."""
    if sys.version_info >= (3, 12) or not hasattr(asyncio, "PidfdChildWatcher"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = asyncio.PidfdChildWatcher()
        watcher.attach_loop(asyncio.get_running_loop())
        asyncio.set_child_watcher(watcher)
