"""Exceptions shared by the agent and the dispatcher.

CtrlExecError
+-- ConfigError          a config, allowlist or map file is wrong (names file:line)
+-- ProtocolError        a peer sent something the wire protocol does not allow
"""

from __future__ import annotations


class CtrlExecError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(CtrlExecError):
    """A configuration problem; ``str()`` names the file and line where known."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(f"{where}{message}")


class ProtocolError(CtrlExecError):
    """The peer broke the wire protocol."""
