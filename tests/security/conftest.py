"""The attack suite's shared parts: the pairing fixtures of the integration tests (a CA, a
dispatcher config, a listener in a background event loop, captured log events). The
suite's report (every ``[attack]`` line, counted per file) is
:mod:`tests.support.attack_summary`, loaded by ``tests/conftest.py`` so that it also runs in
the controller of a parallel (``-n 2``) run."""

from __future__ import annotations

from tests.integration.test_pairing import cfg, events, listen

__all__ = ["cfg", "events", "listen"]
