"""What every verb of ``ced`` gets: the :class:`Invocation` (options, script args, the
lazily opened dispatcher) and the two ways to run async code from a one-shot command."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from dispatcher.ced.output import PROG, err
from dispatcher.errors import Fail, UsageError

if TYPE_CHECKING:
    from dispatcher.client.io import AgentIO
    from dispatcher.config import DispatcherConfig
    from dispatcher.core import Dispatcher
    from dispatcher.ha.actions import ActionResult
    from dispatcher.operations import Caller

DEFAULT_CONFIG = "/etc/ctrl-exec/ctrl-exec.conf"
T = TypeVar("T")


class Invocation:
    """One ``ced`` invocation: parsed options, script args, the lazily opened dispatcher."""

    def __init__(self, ns: argparse.Namespace, script_args: list[str]) -> None:
        self.ns = ns
        self.script_args = script_args
        self.json: bool = bool(ns.json)
        self.words: list[str] = list(ns.words[1:])  # after the verb
        self._d: Dispatcher | None = None
        self.leader: tuple[str, int] = ("", 0)  # who carried out a leader-only verb

    @property
    def d(self) -> Dispatcher:
        if self._d is None:
            verb = self.ns.words[0] if self.ns.words else ""
            self._d = open_dispatcher(self.ns.config, as_service_user=verb not in KEEP_ROOT)
        return self._d

    @property
    def in_cluster(self) -> bool:
        return bool(self.d.cfg.etcd_endpoints)

    @property
    def default_port(self) -> int:
        port = self.ns.port
        return int(port) if port else 7443

    def caller(self) -> Caller:
        from dispatcher.operations import Caller

        user = self.ns.username if self.ns.username is not None else os.environ.get("USER", "")
        token = self.ns.token if self.ns.token is not None else os.environ.get("ENVEXEC_TOKEN", "")
        who = local_user()
        return Caller("cli", username=user, token=token, source_ip="127.0.0.1",
                      identity=who["unix_user"], sudo_user=who.get("sudo_user", ""))  # fmt: skip

    def leader_action(
        self, name: str, args: dict[str, Any], timeout: float = 120.0, failed: str = ""
    ) -> ActionResult:
        """Carry out a leader-only action (:mod:`dispatcher.ha.actions`): here without etcd,
        by the cluster leader with it (recorded in :attr:`leader`). Failure: Fail (exit 1)
        with ``failed`` + the reason."""
        from dispatcher.ha import actions

        user = self.ns.username or ""
        try:
            res = actions.request(self.d, name, args, requested_by=actions.requested_by(user),
                                  timeout=timeout)  # fmt: skip
        except actions.ActionFailed as exc:
            cause = exc.__cause__
            local = cause is not None and not self.d.cfg.etcd_endpoints
            raise Fail(f"{failed}{cause if local else exc}") from None
        self.leader = (res.leader, res.epoch or 0)
        return res

    def by_leader(self) -> dict[str, Any]:
        """``leader``/``epoch`` for a JSON answer, when a cluster leader carried it out."""
        leader, epoch = self.leader
        return {"leader": leader, "epoch": epoch} if leader and self.in_cluster else {}

    def need(self, n: int, usage: str) -> None:
        """At least ``n`` words after the verb, else a usage error naming ``usage``."""
        if len(self.words) < n:
            raise UsageError(f"Usage: ced {usage}")

    def confirm(self, question: str) -> bool:
        """``--yes``, or the operator's ``y`` on stdin."""
        if self.ns.yes:
            return True
        sys.stdout.write(f"{question} [y/N]: ")
        sys.stdout.flush()
        answer = sys.stdin.readline().strip().lower()
        return answer == "y"


#: verbs that keep root: they write where the operator says (``issue-operator --out``)
KEEP_ROOT = frozenset({"issue-operator"})
_who: dict[str, str] | None = None


def local_user() -> dict[str, str]:
    """``unix_user`` (the real user who ran ``ced``, not ``$USER``; remembered before
    :func:`become_service_user`) and ``sudo_user`` (``$SUDO_USER``, when set): what a
    local run records and logs."""
    global _who
    if _who is None:
        _who = _local_user()
    return dict(_who)


def _local_user() -> dict[str, str]:
    import pwd

    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    out = {"unix_user": user}
    if os.environ.get("SUDO_USER"):
        out["sudo_user"] = os.environ["SUDO_USER"]
    return out


def become_service_user(cfg: DispatcherConfig) -> bool:
    """As root, act as ``service_user`` when it owns ``state_dir`` (upstream gives it the
    keys; the instance daemon runs as it): every file ``ced`` creates (locks, run records,
    certificates, the registry) is then the daemon's to use. True when switched."""
    if os.geteuid() != 0 or not cfg.service_user:
        return False
    import pwd

    try:
        pw = pwd.getpwnam(cfg.service_user)
        owner = os.stat(cfg.state_dir).st_uid
    except (KeyError, OSError):
        return False  # no such user, or no state yet: stay as we are
    if owner != pw.pw_uid or pw.pw_uid == 0:
        return False
    local_user()  # who ran ced, remembered before the switch
    os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    return True


def open_dispatcher(path: str | None, as_service_user: bool = True) -> Dispatcher:
    """Load the config (defaults when the default file is absent), act as the service
    user when root (:func:`become_service_user`) and start logging."""
    from agent.common import logfmt
    from dispatcher.config import CONFIG_ENV, load
    from dispatcher.core import Dispatcher

    explicit = path or os.environ.get(CONFIG_ENV)
    cfg = load(explicit or DEFAULT_CONFIG, required=bool(explicit))
    if as_service_user:
        become_service_user(cfg)
    target = cfg.log_target
    syslog = target == "syslog" or (target == "auto" and os.path.exists("/dev/log"))
    level = 20 if syslog or target == "stderr" else 30  # INFO / WARNING
    logfmt.setup(PROG, "syslog" if syslog else "stderr", level, queued=False, fmt=cfg.log_format)
    for w in cfg.warnings:
        err(f"Warning: {w}")
    d = Dispatcher(cfg)
    if cfg.etcd_endpoints:  # in a cluster only the leader signs (renewals included)
        d.sign_guard = _leader_signs
    return d


def _leader_signs() -> str:
    return "in a cluster only the leader signs (its maintenance renews agent certificates)"


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion (the verbs that need asyncio: pairing-mode)."""
    import asyncio

    return asyncio.run(coro)


def dispatch(op: Callable[[AgentIO], Coroutine[Any, Any, T]]) -> T:
    """Run an operation over the blocking client: no asyncio for one host.

    The operation code is the API daemon's; a fan-out of more than one host runs on the
    daemon's asyncio engine, on a loop of its own, at most ``max_parallel`` in flight
    (``import asyncio`` alone costs more than a run to one host).
    """
    from dispatcher.client.blocking import BLOCKING
    from dispatcher.client.io import run_blocking

    return run_blocking(op(BLOCKING))
