"""``ctrl-exec-executor``: the privileged executor (root) for an agent in executor mode.

    ctrl-exec-executor [--config /etc/ctrl-exec-agent/agent.conf]
                       [--allowlist /etc/ctrl-exec-agent/scripts.conf]
                       [--socket PATH] [--agent-user ctrl-exec-agent] [--version]

The socket defaults to ``executor_socket`` of ``agent.conf``, else
``/run/ctrl-exec-agent/exec.sock``. Exit 78 on a configuration error, 77 when not root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pwd
import sys

from agent.common import logfmt
from agent.common.errors import ConfigError
from agent.config import DEFAULT_ALLOWLIST, DEFAULT_CONFIG, DEFAULT_EXECUTOR_SOCKET
from agent.version import __version__

EX_NOPERM, EX_CONFIG = 77, 78
DEFAULT_AGENT_USER = "ctrl-exec-agent"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctrl-exec-executor",
                                description="privileged executor for ctrl-exec-agent")  # fmt: skip
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--allowlist", default=DEFAULT_ALLOWLIST)
    p.add_argument("--socket", default="", help="default: executor_socket of agent.conf")
    p.add_argument("--agent-user", default=DEFAULT_AGENT_USER,
                   help="the only user allowed to connect (owner of the socket)")  # fmt: skip
    p.add_argument("--version", action="store_true")
    return p


def _fail(headline: str, detail: str, code: int) -> int:
    bar = "-" * 64
    print(bar, f"ctrl-exec-executor: {headline}", detail, bar, sep="\n", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print(f"ctrl-exec-executor {__version__}")
        return 0
    if os.geteuid() != 0:
        return _fail("cannot start - must run as root.", "profiles need root", EX_NOPERM)
    from agent.executor.server import ExecutorServer

    try:
        pw = pwd.getpwnam(args.agent_user)
    except KeyError:
        return _fail("cannot start - configuration error.",
                     f"unknown agent user '{args.agent_user}'", EX_CONFIG)  # fmt: skip
    # Absolute paths: entering a profile's mount namespace and back resets the cwd.
    config, allow = os.path.abspath(args.config), os.path.abspath(args.allowlist)
    server = ExecutorServer(config, allow, "", pw.pw_uid, pw.pw_gid)
    try:
        cfg = server.load().cfg
    except ConfigError as exc:
        return _fail("cannot start - configuration error.", str(exc), EX_CONFIG)
    server.socket_path = os.path.abspath(
        args.socket or cfg.executor_socket or DEFAULT_EXECUTOR_SOCKET
    )
    logfmt.setup("ctrl-exec-executor", cfg.log_target, queued=False, fmt=cfg.log_format)
    try:
        asyncio.run(server.serve())
    except OSError as exc:
        return _fail("cannot start - cannot listen.", f"{server.socket_path}: {exc}", EX_CONFIG)
    finally:
        logfmt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
