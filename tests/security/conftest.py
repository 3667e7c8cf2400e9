"""The pairing fixtures of the integration tests (a CA, a dispatcher config, a listener in
a background event loop, captured log events), shared with the attack tests."""

from tests.integration.test_pairing import cfg, events, listen

__all__ = ["cfg", "events", "listen"]
