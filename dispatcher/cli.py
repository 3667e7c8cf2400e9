"""``ctrl-exec-dispatcher`` / ``ced``: the dispatcher's operator CLI (spec 1.2).

Options may stand anywhere before ``--``; everything after ``--`` is passed to the
script verbatim. Output: results on stdout, diagnostics on stderr; with ``--json``
stdout holds exactly one JSON document (upstream's ``"ok":1`` integers).

Exit codes: 0 success; 1 a host failed, the auth hook denied, a lock conflict, or a
failed operation; 2 invocation or configuration error (including unknown agents, where
upstream's ``die`` gives 255); ``wait`` gives 2 when it timed out with hosts pending;
130 interrupted.

The module imports only the standard library at start; each verb imports what it needs
(never FastAPI, uvicorn or the etcd client). ``run``, ``ping``, ``status`` and ``wait``
run the shared operations over the blocking client (:func:`dispatch`): no asyncio, no
``cryptography`` (unless an agent certificate is due for renewal), no ``dataclasses``
and no ``logging`` module, for a fast start (``bench/ced_bench.py``).
Logs go to syslog (ident ``ctrl-exec-dispatcher``); without a syslog socket they go to
stderr, warnings and errors only unless ``log_target = stderr`` asks for everything.
Each line is written at once (``logfmt.setup(queued=False)``): no logging thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    from dispatcher.client.io import AgentIO
    from dispatcher.core import Dispatcher
    from dispatcher.ha.actions import ActionResult
    from dispatcher.operations import Caller

PROG = "ctrl-exec-dispatcher"
DEFAULT_CONFIG = "/etc/ctrl-exec/ctrl-exec.conf"
T = TypeVar("T")

USAGE = """\
Usage: ced [options] <mode> [args] [-- script-args...]

Modes:
  run <host>[:<port>] [<host>...] <script> [-- <arg>...]
                             run a script on one or more agents
                             [--async] submit detached; poll with status/wait
  status <reqid>             show the state of an async run
  wait <reqid> [--timeout n] poll an async run until complete (default 300 s);
                             exit 0 all ok, 1 some failed, 2 timed out
  ping <host>[:<port>] [<host>...]
                             check mTLS connectivity (renews agent certs when due)
  pairing-mode [start|stop]  accept agent pairing requests on port 7444
                             [--timeout 1..600] [--port n]
  list-requests              show pending pairing requests
  approve <reqid>            approve a pairing request
                             [--lookup-by ip|hostname] [--ip addr] [--agent-port n]
  deny <reqid>               deny a pairing request
  setup-ca                   one-time CA initialisation
  setup-ctrl-exec            generate the dispatcher key and certificate [--yes]
  list-agents [--tags k=v,...]
                             list registered agents
  edit-agent <name>          [--rename new] [--ip addr] [--agent-port n]
                             [--lookup-by ip|hostname]
  unpair <name>              remove an agent from the registry [--yes]
  list-locks                 show held host:script locks
  rotate-cert                rotate the dispatcher certificate and broadcast it
  serial-status              show the dispatcher serial and per-agent state
  maintain                   ping all agents (renewals), rotation checks, purge
  cluster status [--json]    members, leader, epoch, generation, cert serial of each
  cluster switchover         the leader resigns; a peer takes over
  cluster haproxy-config     print a TCP-passthrough HAProxy config for the members

Options:
  --config <path>            ctrl-exec.conf (default /etc/ctrl-exec/ctrl-exec.conf)
  --json                     one JSON document on stdout
  --port <n>                 default agent port (7443; pairing port for pairing-mode)
  --username <name>          user for the auth hook (default $USER)
  --token <token>            token for the auth hook (default $ENVEXEC_TOKEN)
  --version                  print the version

Examples:
  ced run web1 web2 check-disk -- /var
  ced --json ping web1
  ced run --async db1 backup && ced wait <reqid> --timeout 600
"""

MODES = (
    "run", "status", "wait", "ping", "pairing-mode", "list-requests", "approve", "deny",
    "setup-ca", "setup-ctrl-exec", "list-agents", "edit-agent", "list-locks", "rotate-cert",
    "serial-status", "unpair", "maintain", "cluster",
)  # fmt: skip


class UsageError(Exception):
    """Bad invocation: message to stderr, exit 2."""


class Fail(Exception):
    """An operation failed: message to stderr, exit ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# ----- argument parsing ------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _Formatter(argparse.HelpFormatter):
    """Never printed (``USAGE`` is); a fixed width spares the terminal probe (``shutil``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ced", add_help=False, allow_abbrev=False, formatter_class=_Formatter)
    p.add_argument("words", nargs="*")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--port", type=int)
    p.add_argument("--username")
    p.add_argument("--token")
    p.add_argument("--lookup-by", choices=("ip", "hostname"))
    p.add_argument("--agent-port", type=int)
    p.add_argument("--ip")
    p.add_argument("--rename")
    p.add_argument("--tags")
    p.add_argument("--async", dest="async_", action="store_true")
    p.add_argument("--timeout", type=int)
    p.add_argument("--yes", "-y", action="store_true")
    p.add_argument("--version", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    return p


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Options (anywhere before ``--``) and the script args after ``--``."""
    if "--" in argv:
        i = argv.index("--")
        pre, post = argv[:i], argv[i + 1 :]
    else:
        pre, post = argv, []
    ns = _parser().parse_intermixed_args(pre)
    return ns, post


# ----- output helpers --------------------------------------------------------------------


def out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def err(text: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def out_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")


def _has_text(value: object) -> bool:
    return isinstance(value, str) and not value.isspace() and value != ""


def _exit_of(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _host_label(r: dict[str, Any]) -> str:
    host = str(r.get("host", "?"))
    if r.get("reported_hostname") is not None:
        host += f" ({r['reported_hostname']})"
    return host


def _stdout_block(text: object) -> None:
    if _has_text(text):
        assert isinstance(text, str)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _stderr_block(text: object) -> None:
    if _has_text(text):
        out(f"    STDERR: {text}")


def format_run(results: list[dict[str, Any]]) -> None:
    for r in results:
        code = _exit_of(r.get("exit"))
        status = "OK" if code == 0 else "FAIL"
        out(f"==> {_host_label(r)}  [{status}  exit:{code}  {r.get('rtt', '')}  "
            f"req:{r.get('reqid', '')}]")  # fmt: skip
        if r.get("error"):
            out(f"    ERROR: {r['error']}")
        _stdout_block(r.get("stdout"))
        _stderr_block(r.get("stderr"))


def format_async_submit(reqid: str, results: list[dict[str, Any]]) -> None:
    out(f"Submitted async run  req:{reqid}")
    for r in results:
        status = r.get("status") or "error"
        if status == "accepted":
            out(f"==> {_host_label(r)}  [accepted  {r.get('rtt', '')}]")
        elif status == "busy":
            out(f"==> {_host_label(r)}  [BUSY: {r.get('error') or 'already running'}]")
        else:
            out(f"==> {_host_label(r)}  [ERROR: {r.get('error') or 'submit failed'}]")
    out(f"Check progress with: {PROG} status {reqid}")


def format_status(record: dict[str, Any]) -> None:
    state = "COMPLETE" if record.get("complete") else "PENDING"
    out(f"Request {record.get('reqid', '?')}  (script: {record.get('script', '?')})  [{state}]")
    if record.get("mode") == "sync" and isinstance(record.get("results"), list):
        format_run(record["results"])
        return
    hosts = record.get("hosts")
    if not isinstance(hosts, dict):
        return
    for host in sorted(hosts):
        h = hosts[host] if isinstance(hosts[host], dict) else {}
        status = str(h.get("status") or "unknown")
        if status == "done":
            out(f"==> {host}  [done  exit:{_exit_of(h.get('exit'))}]")
            _stdout_block(h.get("stdout"))
            _stderr_block(h.get("stderr"))
        elif status in ("accepted", "running"):
            out(f"==> {host}  [{status}]")
            if h.get("fetch_error") is not None:
                out(f"    (fetch pending: {h['fetch_error']})")
        else:
            out(f"==> {host}  [{status.upper()}]")
            if h.get("error") is not None:
                out(f"    {h['error']}")


def host_failed(h: object) -> bool:
    """For ``wait``: busy, error, expired or a non-zero exit count as failed."""
    if not isinstance(h, dict):
        return True
    s = h.get("status")
    if s in ("busy", "error", "expired"):
        return True
    return s == "done" and _exit_of(h.get("exit")) != 0


def format_ping(results: list[dict[str, Any]]) -> None:
    fmt = "{:<30}  {:<8}  {:<8}  {:<28}  {}"
    out(fmt.format("HOST", "STATUS", "RTT", "CERT EXPIRY", "VERSION"))
    out("-" * 85)
    for r in results:
        out(fmt.format(_host_label(r), str(r.get("status") or "error"), str(r.get("rtt") or "?"),
                       str(r.get("expiry") or "?"), str(r.get("version") or "?")))  # fmt: skip


def days_left(expiry: object, now: float | None = None) -> str:
    """Whole days until an openssl-format date (``Mon DD HH:MM:SS YYYY GMT``), else ``?``."""
    import calendar
    import time

    if not isinstance(expiry, str) or not expiry:
        return "?"
    try:
        t = calendar.timegm(time.strptime(expiry.strip(), "%b %d %H:%M:%S %Y GMT"))
    except ValueError:
        return "?"
    left = (t - (time.time() if now is None else now)) // 86400
    return str(int(left)) if left >= 0 else "expired"


# ----- setup -----------------------------------------------------------------------------


class Ctx:
    """What the verbs share: parsed options, script args, the lazily opened dispatcher."""

    def __init__(self, ns: argparse.Namespace, script_args: list[str]) -> None:
        self.ns = ns
        self.script_args = script_args
        self.json: bool = bool(ns.json)
        self.words: list[str] = list(ns.words[1:])
        self._d: Dispatcher | None = None
        self.leader: tuple[str, int] = ("", 0)  # who carried out a leader-only verb

    @property
    def d(self) -> Dispatcher:
        if self._d is None:
            self._d = open_dispatcher(self.ns.config)
        return self._d

    @property
    def default_port(self) -> int:
        port = self.ns.port
        return int(port) if port else 7443

    def caller(self) -> Caller:
        from dispatcher.operations import Caller

        user = self.ns.username if self.ns.username is not None else os.environ.get("USER", "")
        token = self.ns.token if self.ns.token is not None else os.environ.get("ENVEXEC_TOKEN", "")
        return Caller("cli", username=user, token=token, source_ip="127.0.0.1")


def open_dispatcher(path: str | None) -> Dispatcher:
    """Load the config (defaults when the default file is absent) and start logging."""
    from agent.common import logfmt
    from dispatcher.config import load
    from dispatcher.core import Dispatcher

    cfg = load(path or DEFAULT_CONFIG, required=path is not None)
    target = cfg.log_target
    syslog = target == "syslog" or (target == "auto" and os.path.exists("/dev/log"))
    level = 20 if syslog or target == "stderr" else 30  # INFO / WARNING
    logfmt.setup(PROG, "syslog" if syslog else "stderr", level, queued=False)
    for w in cfg.warnings:
        err(f"Warning: {w}")
    d = Dispatcher(cfg)
    if cfg.etcd_endpoints:  # in a cluster only the leader signs (renewals included)
        d.sign_guard = _leader_signs
    return d


def _leader_signs() -> str:
    return "in a cluster only the leader signs (its maintenance renews agent certificates)"


def arun(coro: Coroutine[Any, Any, T]) -> T:
    import asyncio

    return asyncio.run(coro)


def dispatch(op: Callable[[AgentIO], Coroutine[Any, Any, T]]) -> T:
    """Run an operation over the blocking client: no asyncio in a one-shot ``ced``.

    The operation code is the API daemon's; requests run on at most ``max_parallel``
    threads (as fast as asyncio up to hundreds of hosts, and ``import asyncio`` alone
    costs more than a small run).
    """
    from dispatcher.client.blocking import BLOCKING
    from dispatcher.client.io import run_blocking

    return run_blocking(op(BLOCKING))


def _need(ctx: Ctx, n: int, usage: str) -> None:
    if len(ctx.words) < n:
        raise UsageError(f"Usage: ced {usage}")


def _confirm(question: str, ctx: Ctx) -> bool:
    if ctx.ns.yes:
        return True
    sys.stdout.write(f"{question} [y/N]: ")
    sys.stdout.flush()
    answer = sys.stdin.readline().strip().lower()
    return answer == "y"


# ----- verbs: dispatch -------------------------------------------------------------------


def cmd_run(ctx: Ctx) -> int:
    from dispatcher.operations import do_run

    _need(ctx, 2, "run <host>[:<port>] [<host>...] <script> [-- <arg>...]")
    hosts, script = ctx.words[:-1], ctx.words[-1]
    d, caller = ctx.d, ctx.caller()
    res = dispatch(lambda io: do_run(d, caller, hosts, script, ctx.script_args,
                                     async_=ctx.ns.async_, default_port=ctx.default_port, io=io))  # fmt: skip
    results: list[dict[str, Any]] = res["results"]
    if ctx.ns.async_:
        if ctx.json:
            out_json({"ok": 1, "reqid": res["reqid"], "results": results})
        else:
            format_async_submit(res["reqid"], results)
        return 0 if any(r.get("status") == "accepted" for r in results) else 1
    if ctx.json:
        out_json({"ok": 1, "results": results})
    else:
        format_run(results)
    return 0 if all(_exit_of(r.get("exit")) == 0 for r in results) else 1


def cmd_ping(ctx: Ctx) -> int:
    from dispatcher.operations import do_ping

    _need(ctx, 1, "ping <host>[:<port>] [<host>...]")
    d, caller = ctx.d, ctx.caller()
    res = dispatch(lambda io: do_ping(d, caller, ctx.words, renew=True,
                                      default_port=ctx.default_port, io=io))  # fmt: skip
    if ctx.json:
        out_json({"ok": 1, "results": res["results"]})
    else:
        format_ping(res["results"])
    return 0


def _not_found(ctx: Ctx, reqid: str) -> int:
    if ctx.json:
        out_json({"ok": 0, "error": "not found", "reqid": reqid})
    else:
        err(f"No such request: {reqid}")
    return 1


def _show_record(ctx: Ctx, record: dict[str, Any]) -> None:
    if ctx.json:
        out_json({"ok": 1, **record})
    else:
        format_status(record)


def cmd_status(ctx: Ctx) -> int:
    from dispatcher.operations import do_status

    _need(ctx, 1, "status <reqid>")
    reqid = ctx.words[0]
    d, caller = ctx.d, ctx.caller()
    record = dispatch(lambda io: do_status(d, caller, reqid, default_port=ctx.default_port,
                                           io=io))  # fmt: skip
    if record is None:
        return _not_found(ctx, reqid)
    _show_record(ctx, record)
    return 0


def cmd_wait(ctx: Ctx) -> int:
    from dispatcher.operations import do_wait

    _need(ctx, 1, "wait <reqid> [--timeout <seconds>]")
    reqid = ctx.words[0]
    timeout = ctx.ns.timeout if ctx.ns.timeout is not None else 300
    interval = float(os.environ.get("CED_WAIT_INTERVAL", "2") or 2)
    d, caller = ctx.d, ctx.caller()
    record, timed_out = dispatch(lambda io: do_wait(d, caller, reqid, timeout, interval,
                                                    default_port=ctx.default_port, io=io))  # fmt: skip
    if record is None:
        return _not_found(ctx, reqid)
    _show_record(ctx, record)
    if timed_out or not record.get("complete"):
        return 2
    hosts = record.get("hosts")
    if isinstance(hosts, dict):
        return 1 if any(host_failed(h) for h in hosts.values()) else 0
    results = record.get("results")  # a sync record
    if isinstance(results, list):
        return 0 if all(_exit_of(r.get("exit")) == 0 for r in results) else 1
    return 0


# ----- verbs: registry and locks ---------------------------------------------------------


def _parse_tags(spec: str) -> dict[str, str]:
    want: dict[str, str] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"Invalid --tags filter: expected key=value, got '{part}'")
        want[key.strip()] = value.strip()
    if not want:
        raise UsageError("Invalid --tags filter: empty")
    return want


def cmd_list_agents(ctx: Ctx) -> int:
    want = _parse_tags(ctx.ns.tags) if ctx.ns.tags is not None else None
    agents = ctx.d.registry.all()
    if want is not None:
        agents = [
            a for a in agents
            if isinstance(a.get("tags"), dict)
            and all(a["tags"].get(k) == v for k, v in want.items())
        ]  # fmt: skip
    if ctx.json:
        out_json(agents)
        return 0
    if not agents:
        out("No agents match the tag filter." if want is not None else "No registered agents.")
        return 0
    fmt = "{:<30}  {:<16}  {:<5}  {:<8}  {:<22}  {:<24}  {}"
    out(fmt.format("HOSTNAME", "IP", "PORT", "LOOKUP", "PAIRED", "CERT EXPIRY", "DAYS LEFT"))
    out("-" * 125)
    for a in agents:
        out(fmt.format(str(a.get("hostname", "?")), str(a.get("ip") or "?"),
                       str(a.get("port") or 7443), str(a.get("lookup_by") or "hostname"),
                       str(a.get("paired") or "?"), str(a.get("expiry") or "?"),
                       days_left(a.get("expiry"))))  # fmt: skip
    return 0


def cmd_edit_agent(ctx: Ctx) -> int:
    _need(ctx, 1, "edit-agent <name> [--rename <new>] [--ip <addr>] [--agent-port <n>] "
                  "[--lookup-by ip|hostname]")  # fmt: skip
    name, ns = ctx.words[0], ctx.ns
    if ns.ip is not None and not ns.ip:
        raise UsageError("--ip must not be empty")
    if ns.agent_port is not None and not 1 <= ns.agent_port <= 65535:
        raise UsageError("--agent-port must be a port number (1-65535)")
    if ns.rename is None and ns.ip is None and ns.agent_port is None and ns.lookup_by is None:
        raise UsageError("Nothing to change. Pass at least one of --rename, --ip, "
                         "--agent-port, --lookup-by.")  # fmt: skip
    args = {"name": name, "rename": ns.rename, "ip": ns.ip, "port": ns.agent_port,
            "lookup_by": ns.lookup_by}  # fmt: skip
    record = _leader_action(ctx, "edit-agent", args, failed="Edit failed: ").data
    if ctx.json:
        out_json(record)
        return 0
    out(f"Updated agent '{record.get('hostname')}'.")
    if ns.rename is not None:
        out(f"  renamed from: {name}")
    out(f"  ip:        {record.get('ip') or ''}")
    out(f"  port:      {record.get('port') or 7443}")
    out(f"  lookup_by: {record.get('lookup_by') or 'hostname'}")
    return 0


def cmd_unpair(ctx: Ctx) -> int:
    from dispatcher.registry import RegistryError

    _need(ctx, 1, "unpair <hostname>")
    name = ctx.words[0]
    try:
        if ctx.d.registry.get(name) is None:
            raise RegistryError(f"no registry entry for '{name}'")
    except RegistryError as exc:
        raise Fail(f"Unpair failed: {exc}") from None
    if sys.stdin.isatty() and not ctx.ns.yes and not _confirm(f"Unpair '{name}'?", ctx):
        out("Aborted.")
        return 0
    doc = _leader_action(ctx, "unpair", {"name": name}, failed="Unpair failed: ").data
    expiry = doc["expiry"]
    if ctx.json:
        out_json({"ok": 1, "hostname": name, "expiry": expiry})
        return 0
    out(f"Unregistered '{name}'.")
    out(f"WARNING: Agent certificate remains valid until: {expiry}")
    out("Decommission the agent promptly or add its serial to the revocation list.")
    return 0


def cmd_list_locks(ctx: Ctx) -> int:
    held = ctx.d.locks.list_held()
    if ctx.json:
        out_json({"ok": 1, "locks": [{"host": h, "script": s} for h, s in held]})
        return 0
    if not held:
        out("No locks currently held.")
        return 0
    out(f"{'HOST':<30}  SCRIPT")
    out("-" * 50)
    for h, s in held:
        out(f"{h:<30}  {s}")
    return 0


# ----- verbs: PKI ------------------------------------------------------------------------


def cmd_setup_ca(ctx: Ctx) -> int:
    out("Setting up dispatcher CA...")
    doc = _leader_action(ctx, "setup-ca", {}, failed="Error: ").data
    out("CA created:")
    out(f"  Key:  {doc['key']}")
    out(f"  Cert: {doc['cert']}")
    out("Keep ca.key secure - it never leaves this host.")
    return 0


def cmd_setup_dispatcher(ctx: Ctx) -> int:
    from pathlib import Path

    cfg = ctx.d.cfg
    if Path(cfg.cert).exists():
        count = len(ctx.d.registry.names())
        if count:
            out("WARNING: Existing dispatcher cert found.")
            out(f"  {count} registered agent{'' if count == 1 else 's'} will require "
                "re-pairing after this operation.")  # fmt: skip
            out("  Operations (run/ping) continue to work until agent certs expire.")
            out("  /capabilities will be rejected by agents until re-paired.")
            out()
            if not _confirm("Proceed?", ctx):
                out("Aborted.")
                return 0
        else:
            out("Existing dispatcher cert found. No registered agents - replacing.")
    out("Generating dispatcher certificate...")
    doc = _leader_action(ctx, "setup-ctrl-exec", {}, failed="Error: ").data
    out("Dispatcher cert created:")
    out(f"  Key:    {doc['key']}")
    out(f"  Cert:   {doc['cert']}")
    out(f"  Serial: {doc['serial']}")
    out(f"Run '{PROG} pairing-mode' to re-pair agents as needed.")
    return 0


# ----- verbs: pairing --------------------------------------------------------------------


# ----- cluster: leader-only verbs go to the leader through the store ---------------------


def _in_cluster(ctx: Ctx) -> bool:
    return bool(ctx.d.cfg.etcd_endpoints)


def _leader_action(
    ctx: Ctx, name: str, args: dict[str, Any], timeout: float = 120.0, failed: str = ""
) -> ActionResult:
    """Carry out a leader-only action (:mod:`dispatcher.ha.actions`): here without etcd,
    by the cluster leader with it. Failure: exit status 1 with ``failed`` + the reason."""
    from dispatcher.ha import actions

    user = ctx.ns.username or ""
    try:
        res = actions.request(ctx.d, name, args, requested_by=actions.requested_by(user),
                              timeout=timeout)  # fmt: skip
    except actions.ActionFailed as exc:
        cause = exc.__cause__
        local = cause is not None and not ctx.d.cfg.etcd_endpoints
        raise Fail(f"{failed}{cause if local else exc}") from None
    ctx.leader = (res.leader, res.epoch or 0)
    return res


def _members(ctx: Ctx) -> list[str]:
    """The instance ids registered in the cluster right now ([] when unreachable)."""
    from cluster.errors import BackendUnavailable
    from dispatcher.ha.coordination import backend_from_config

    backend = backend_from_config(ctx.d.cfg, timeout=2.0)
    try:
        return sorted(m.instance_id for m in backend.members())
    except BackendUnavailable:
        return []
    finally:
        backend.close()


def _wait_converged(
    ctx: Ctx, serial: str, generation: int, timeout: float, expected: list[str]
) -> dict[str, Any]:
    """Wait until every member (at least the ``expected`` ones, which were there when the
    rotation began) presents ``serial`` (restarted) on ``generation`` or later."""
    import time

    from agent.common.serial import serial_to_hex
    from cluster.errors import BackendUnavailable
    from dispatcher.ha.coordination import backend_from_config

    want = serial_to_hex(serial)
    t0 = time.monotonic()
    last = ""
    backend = backend_from_config(ctx.d.cfg, timeout=2.0)
    try:
        while True:
            try:
                members = backend.members()
            except BackendUnavailable:
                members = []
            behind = sorted(m.instance_id for m in members
                            if serial_to_hex(m.cert_serial) != want or m.restart_pending
                            or m.generation < generation or m.state != "serving")  # fmt: skip
            present = {m.instance_id for m in members}
            behind += sorted(f"{i} (absent)" for i in expected if i not in present)
            if members and not behind:
                return {"converged": True, "seconds": round(time.monotonic() - t0, 2),
                        "members": sorted(m.instance_id for m in members)}  # fmt: skip
            text = f"waiting for {', '.join(behind) or 'the members'} to present {serial}"
            if text != last and not ctx.json:
                err(f"  {text}")
                last = text
            if time.monotonic() - t0 > timeout:
                return {"converged": False, "seconds": round(time.monotonic() - t0, 2),
                        "waiting": behind}  # fmt: skip
            time.sleep(0.2)
    finally:
        backend.close()


def cmd_list_requests(ctx: Ctx) -> int:
    from dispatcher.pairing import prompt as pairing_prompt

    records = _leader_action(ctx, "list-requests", {}).data or []
    if ctx.json:
        out_json({"ok": 1, "requests": [{k: v for k, v in r.items() if k != "csr"}
                                        for r in records]})  # fmt: skip
        return 0
    for line in pairing_prompt.format_table(records):
        out(line)
    return 0


def _print_approval(doc: dict[str, Any]) -> None:
    name, lookup_by = doc["hostname"], doc["lookup_by"]
    out(f"Approved '{name}' ({doc['reqid']}). Cert delivered on next poll.")
    out(f"  Registered:  {name}   lookup_by={lookup_by}   addr={doc['addr']}:{doc['port']}")
    for w in doc["warnings"]:
        out(f"  {w}")
    if lookup_by == "hostname":
        out(f"  If '{name}' does not resolve from here: "
            f"{PROG} edit-agent {name} --lookup-by ip")  # fmt: skip


def _by_leader(ctx: Ctx) -> dict[str, Any]:
    """``leader``/``epoch`` for a JSON answer, when a cluster leader carried it out."""
    leader, epoch = ctx.leader
    return {"leader": leader, "epoch": epoch} if leader and ctx.d.cfg.etcd_endpoints else {}


def cmd_approve(ctx: Ctx) -> int:
    _need(ctx, 1, "approve <reqid> [--lookup-by ip|hostname] [--ip addr] [--agent-port n]")
    ns = ctx.ns
    args = {"reqid": ctx.words[0], "lookup_by": ns.lookup_by, "ip": ns.ip,
            "agent_port": ns.agent_port}  # fmt: skip
    doc = _leader_action(ctx, "approve", args).data
    if ctx.json:
        out_json({"ok": 1, "reqid": doc["reqid"], "hostname": doc["hostname"],
                  "record": doc["record"], "warnings": doc["warnings"], **_by_leader(ctx)})  # fmt: skip
        return 0
    _print_approval(doc)
    if _by_leader(ctx):
        out(f"  (carried out by the cluster leader {ctx.leader[0]}, epoch {ctx.leader[1]})")
    return 0


def cmd_deny(ctx: Ctx) -> int:
    _need(ctx, 1, "deny <reqid>")
    reqid = ctx.words[0]
    _leader_action(ctx, "deny", {"reqid": reqid})
    if ctx.json:
        out_json({"ok": 1, "reqid": reqid, **_by_leader(ctx)})
    elif _by_leader(ctx):
        out(f"Denied request '{reqid}' (by the cluster leader {ctx.leader[0]}).")
    else:
        out(f"Denied request '{reqid}'.")
    return 0


def _pairing_timeout(ctx: Ctx) -> int:
    t = ctx.ns.timeout if ctx.ns.timeout is not None else (ctx.d.cfg.pairing_timeout or 600)
    if not 1 <= t <= 600:
        raise UsageError("--timeout must be between 1 and 600 seconds")
    return int(t)


def cmd_pairing_mode(ctx: Ctx) -> int:
    sub = ctx.words[0] if ctx.words else ""
    if sub not in ("", "start", "stop"):
        raise UsageError("Usage: ced pairing-mode [start|stop] [--timeout 1..600] [--port n]")
    if sub == "stop":
        return _pairing_stop(ctx)
    timeout = _pairing_timeout(ctx)
    port = ctx.ns.port if ctx.ns.port else ctx.d.cfg.pairing_port
    if sub == "start":
        return _pairing_start(ctx, port, timeout)
    return arun(_pairing_interactive(ctx, port, timeout))


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _pairing_stop(ctx: Ctx) -> int:
    import signal

    pidfile = ctx.d.cfg.pairing_pidfile
    try:
        pid = _read_pid(pidfile)
    except (OSError, ValueError, IndexError):
        raise Fail("Pairing mode is not running (no pidfile).") from None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        os.unlink(pidfile)
        raise Fail(f"Pairing mode is not running (stale pidfile, pid {pid}).") from None
    out(f"Pairing mode stopped (pid {pid}).")
    return 0


def _pairing_start(ctx: Ctx, port: int, timeout: int) -> int:
    """Daemonise a non-interactive listener; the parent waits until it listens."""
    from agent.common import logfmt

    pidfile = ctx.d.cfg.pairing_pidfile
    try:
        old = _read_pid(pidfile)
        os.kill(old, 0)
        raise Fail(f"Pairing mode already running (pid {old}).")
    except (OSError, ValueError, IndexError):
        pass
    rfd, wfd = os.pipe()
    logfmt.shutdown()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # child: detach, fork again, run
        os.close(rfd)
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        code = 1
        try:
            code = _pairing_daemon(ctx, port, timeout, wfd)
        finally:
            os._exit(code)
    os.close(wfd)
    os.waitpid(pid, 0)
    with os.fdopen(rfd, "rb") as f:
        msg = f.read().decode(errors="replace")
    if not msg.startswith("ok "):
        raise Fail(f"Pairing mode failed to start: {msg or 'daemon exited'}")
    out(f"Pairing mode started in the background (pid {msg.split()[1]}) on port {port} "
        f"(auto-stops in {timeout}s).")  # fmt: skip
    out(f"Approve with: {PROG} list-requests / approve <ID>; stop with: {PROG} pairing-mode stop")
    return 0


def _pairing_daemon(ctx: Ctx, port: int, timeout: int, wfd: int) -> int:
    import asyncio
    import signal

    from agent.common import logfmt
    from agent.common.fsutil import atomic_write
    from dispatcher.pairing.server import PairingServer

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    cfg = ctx.d.cfg
    logfmt.setup(PROG, cfg.log_target if cfg.log_target != "stderr" else "auto")

    async def main() -> int:
        server = PairingServer(cfg, port=port, writer=ctx.d.writer)
        try:
            await server.start()
        except Exception as exc:
            os.write(wfd, str(exc).encode())
            os.close(wfd)
            return 1
        atomic_write(cfg.pairing_pidfile, f"{os.getpid()}\n".encode(), 0o644)
        os.write(wfd, f"ok {os.getpid()}".encode())
        os.close(wfd)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), timeout)
        except TimeoutError:
            pass
        await server.stop()
        try:
            if _read_pid(cfg.pairing_pidfile) == os.getpid():
                os.unlink(cfg.pairing_pidfile)
        except (OSError, ValueError, IndexError):
            pass
        return 0

    try:
        return asyncio.run(main())
    finally:
        logfmt.shutdown()


async def _pairing_interactive(ctx: Ctx, port: int, timeout: int) -> int:
    """Foreground listener with the operator prompt (spec 5.4)."""
    import asyncio
    import signal

    from dispatcher.pairing import prompt as pp
    from dispatcher.pairing import queue as pq
    from dispatcher.pairing.server import PairingServer

    cfg = ctx.d.cfg
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pending() -> list[dict[str, Any]]:
        return pq.list_pending(cfg.pairing_dir, writer=ctx.d.writer)

    def show_prompt() -> None:
        n = len(pending())
        if n:
            sys.stdout.write(pp.prompt(n))
            sys.stdout.flush()

    def on_request(record: dict[str, Any]) -> None:
        out()
        for line in pp.format_request(record):
            out(line)
        show_prompt()

    server = PairingServer(cfg, port=port, on_request=on_request, writer=ctx.d.writer)
    try:
        await server.start()
    except Exception as exc:
        raise Fail(f"Cannot start pairing mode on port {port}: {exc}") from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    interactive = sys.stdin.isatty() or os.environ.get("CED_PAIRING_STDIN") == "1"
    if interactive:

        def readable() -> None:
            line = sys.stdin.readline()
            lines.put_nowait(line if line else None)
            if not line:
                loop.remove_reader(sys.stdin.fileno())

        loop.add_reader(sys.stdin.fileno(), readable)
    out(f"Pairing mode active on port {server.port} (auto-stops in {timeout}s). "
        "Waiting for agents... (Ctrl-C to stop)")  # fmt: skip
    sys.stdout.flush()
    deadline = loop.time() + timeout
    try:
        while not stop.is_set():
            left = deadline - loop.time()
            if left <= 0:
                out("Pairing mode timed out.")
                break
            getter = asyncio.ensure_future(lines.get())
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({getter, stopper}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            for f in (getter, stopper):
                if not f.done():
                    f.cancel()
            if getter not in done:
                continue
            line = getter.result()
            if line is None:
                continue  # stdin closed: keep listening until timeout or signal
            _pairing_command(ctx, line, pending())
            if line.strip().lower() in ("q", "quit"):
                break
            show_prompt()
    finally:
        if interactive:
            loop.remove_reader(sys.stdin.fileno())
        await server.stop()
    out("Pairing mode stopped.")
    return 0


def _pairing_command(ctx: Ctx, line: str, records: list[dict[str, Any]]) -> None:
    from dispatcher.ha import actions
    from dispatcher.pairing import prompt as pp
    from dispatcher.pairing import queue as pq

    cmd = pp.parse_command(line, len(records))
    if cmd.action == "invalid":
        out(f"  {cmd.error}")
    elif cmd.action == "list":
        for text in pp.format_list(records):
            out(text)
    elif cmd.action in ("approve", "deny") and cmd.index is not None:
        rec = records[cmd.index]
        try:
            res = actions.perform(ctx.d, cmd.action, {"reqid": str(rec.get("id"))})
            if cmd.action == "approve":
                _print_approval(res.data)
            else:
                out(f"Denied request '{rec.get('id')}'.")
        except (pq.PairingQueueError, actions.ActionFailed) as exc:
            out(f"  Error: {exc}")


# ----- verbs: rotation and maintenance (dispatcher.pki.rotation) -----------------------------


def cmd_rotate_cert(ctx: Ctx) -> int:
    from dispatcher.ha import actions

    if (
        sys.stdin.isatty()
        and not ctx.json
        and not _confirm("Rotate the dispatcher certificate?", ctx)
    ):
        out("Aborted.")
        return 0
    if _in_cluster(ctx):
        return _rotate_in_cluster(ctx)
    if not ctx.json:
        out("Rotating dispatcher certificate...")
    try:
        res = actions.request(ctx.d, "rotate-cert").data
    except actions.ActionFailed as exc:
        reason = exc.__cause__ or exc
        if ctx.json:
            out_json({"ok": 0, "error": str(reason)})
            return 1
        raise Fail(f"Rotation failed: {reason}") from None
    if not isinstance(res, dict) or not res.get("rotated", True):
        error = res.get("error") if isinstance(res, dict) else None
        raise Fail(f"Rotation failed: {error or 'unknown error'}")
    if ctx.json:
        out_json({"ok": 1, **res})
        return 0
    updated = res.get("updated") or []
    failed = res.get("failed") or []
    out(f"New serial:      {res.get('new_serial') or res.get('serial') or '?'}")
    out(f"Old serial:      {res.get('old_serial') or '(none)'}")
    out(f"Overlap expires: {res.get('overlap_expires') or '?'}")
    out(f"Agents pending:  {res.get('agents_pending') or 0}")
    if res.get("agents_pending"):
        out()
        out(f"  Updated: {len(updated) if isinstance(updated, list) else updated}")
        out(f"  Failed:  {len(failed) if isinstance(failed, list) else failed}")
        if isinstance(failed, list) and failed:
            out()
            out("Agents requiring attention:")
            for f in failed:
                host = f.get("host") or f.get("hostname") or "?" if isinstance(f, dict) else f
                error = f.get("error") or "failed" if isinstance(f, dict) else "failed"
                out(f"  {host!s:<30}  {error}")
            out()
            out("Failed agents are retried by the maintenance run (ced maintain).")
            out("Agents offline longer than the overlap window will require re-pairing.")
    return 0


def _rotate_in_cluster(ctx: Ctx) -> int:
    """The leader rotates, publishes the generation and restarts every member in turn;
    wait (``--timeout``, default 300 s) until every member presents the new serial."""
    if not ctx.json:
        out("Rotating dispatcher certificate (carried out by the cluster leader)...")
    expected = _members(ctx)
    done = _leader_action(ctx, "rotate-cert", {}, timeout=180.0)
    res: dict[str, Any] = {**done.data, "generation": done.generation}
    leader, epoch = ctx.leader
    serial = str(res.get("new_serial") or "")
    if not ctx.json:
        out(f"New serial:      {serial}")
        out(f"Old serial:      {res.get('old_serial') or '(none)'}")
        out(f"Overlap expires: {res.get('overlap_expires') or '?'}")
        out(f"Agents updated:  {len(res.get('updated') or [])}, "
            f"failed: {len(res.get('failed') or [])}")  # fmt: skip
        out(f"Leader:          {leader} (epoch {epoch}), generation {res.get('generation')}")
        out("Rolling restart: every member restarts in turn to present the new serial...")
    timeout = float(ctx.ns.timeout) if ctx.ns.timeout else 300.0
    conv = _wait_converged(ctx, serial, int(res.get("generation") or 0), timeout, expected)
    if ctx.json:
        out_json({"ok": 1 if conv["converged"] else 0, **res, "leader": leader, "epoch": epoch,
                  "cluster": conv})  # fmt: skip
    elif conv["converged"]:
        out(f"Every member presents {serial} ({', '.join(conv['members'])}) "
            f"after {conv['seconds']} s.")  # fmt: skip
        out("The old serial is retired once every agent acknowledged the new one.")
    else:
        err(f"Not converged after {conv['seconds']} s: {', '.join(conv['waiting'])}")
    return 0 if conv["converged"] else 1


def cmd_serial_status(ctx: Ctx) -> int:
    from dispatcher.pki import rotation

    res = rotation.serial_status(ctx.d)
    if ctx.json:  # one JSON document: no header lines before it (upstream prints them)
        out_json(res)
        return 0
    state = res.get("state")
    if isinstance(state, dict) and state:
        out(f"Current serial:  {state.get('current_serial') or '?'}")
        out(f"Previous serial: {state.get('previous_serial') or '(none)'}")
        out(f"Rotated at:      {state.get('rotated_at') or '?'}")
        out(f"Overlap expires: {state.get('overlap_expires') or '?'}")
        out()
    else:
        out("No rotation has been performed.")
        out()
    agents = res.get("agents") or []
    if not agents:
        out("No registered agents.")
        return 0
    out(f"{'HOSTNAME':<30}  {'STATUS':<10}  {'CONFIRMED':<24}  SERIAL")
    out("-" * 85)
    for a in agents:
        serial = str(a.get("dispatcher_serial") or "-")
        short = serial[:16] + ("..." if len(serial) > 16 else "")
        out(f"{a.get('hostname', '?')!s:<30}  {a.get('serial_status') or 'unknown'!s:<10}  "
            f"{a.get('serial_confirmed') or '-'!s:<24}  {short}")  # fmt: skip
    return 0


def cmd_maintain(ctx: Ctx) -> int:
    res = _leader_action(ctx, "maintain", {}, timeout=600.0).data or {}
    if ctx.json:
        out_json({"ok": 1, **res} if "ok" not in res else res)
        return 0
    out(f"Maintenance run: {res.get('pinged', 0)}/{res.get('agents', 0)} agents pinged, "
        "dispatcher cert checked.")  # fmt: skip
    return 0


def cmd_cluster(ctx: Ctx) -> int:
    """``ced cluster status [--json] | switchover | haproxy-config``."""
    from dispatcher import cluster_cli

    verb = ctx.words[0] if ctx.words else ""
    cfg = ctx.d.cfg
    if verb == "status":
        return cluster_cli.cluster_status(cfg, ctx.json)
    if verb == "switchover":
        return cluster_cli.cluster_switchover(cfg, ctx.json)
    if verb == "haproxy-config":
        return cluster_cli.cluster_haproxy_config(cfg)
    raise UsageError("usage: ced cluster status [--json] | switchover | haproxy-config")


# ----- main ------------------------------------------------------------------------------

HANDLERS: dict[str, Callable[[Ctx], int]] = {
    "run": cmd_run, "status": cmd_status, "wait": cmd_wait, "ping": cmd_ping,
    "pairing-mode": cmd_pairing_mode, "list-requests": cmd_list_requests,
    "approve": cmd_approve, "deny": cmd_deny, "setup-ca": cmd_setup_ca,
    "setup-ctrl-exec": cmd_setup_dispatcher, "list-agents": cmd_list_agents,
    "edit-agent": cmd_edit_agent, "list-locks": cmd_list_locks,
    "rotate-cert": cmd_rotate_cert, "serial-status": cmd_serial_status,
    "unpair": cmd_unpair, "maintain": cmd_maintain, "cluster": cmd_cluster,
}  # fmt: skip


def _version() -> None:
    import ssl

    from agent.version import __version__

    out(f"{PROG} {__version__}")
    out(f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}")


def _dispatch(argv: list[str]) -> int:
    from agent.common.errors import ConfigError, CtrlExecError

    ns, script_args = parse(argv)
    if ns.version:
        _version()
        return 0
    if ns.help:
        sys.stdout.write(USAGE)
        return 0
    if not ns.words:
        raise UsageError("no mode given")
    mode = ns.words[0]
    handler = HANDLERS.get(mode)
    if handler is None:
        err(f"Unknown mode '{mode}'")
        sys.stderr.write(USAGE)
        return 2
    ctx = Ctx(ns, script_args)
    try:
        return handler(ctx)
    except ConfigError as exc:
        err(f"Error: {exc}")
        return 2
    except CtrlExecError as exc:
        return _ctrl_error(ctx, exc)


def _ctrl_error(ctx: Ctx, exc: Exception) -> int:
    from dispatcher.operations import Denied
    from dispatcher.registry import RegistryError
    from dispatcher.runlocks import LockConflict

    if isinstance(exc, Denied):
        if ctx.json:
            out_json({"ok": 0, "error": exc.reason, "code": exc.code})
        else:
            err(f"Denied: {exc.reason}")
        return 1
    if isinstance(exc, LockConflict):
        if ctx.json:
            out_json({"ok": 0, "error": "locked", "code": 4, "conflicts": exc.conflicts})
        else:
            err(f"Locked: already running: {', '.join(exc.conflicts)}")
        return 1
    if isinstance(exc, RegistryError):
        if ctx.json:
            out_json({"ok": 0, "error": str(exc), "code": 2})
        err(f"Error: {exc}")
        if str(exc).startswith("unknown agent"):
            err(f"Hosts must be registered agent names (see '{PROG} list-agents').")
        return 2
    if ctx.json:
        out_json({"ok": 0, "error": str(exc)})
    err(f"Error: {exc}")
    return 1


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    code = 1
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        err(str(exc) if str(exc).startswith("Usage:") else f"Error: {exc}")
        err("Run 'ced --help' for usage.")
        code = 2
    except Fail as exc:
        err(str(exc))
        code = exc.code
    except KeyboardInterrupt:
        err("Interrupted.")
        code = 130
    except BrokenPipeError:
        code = 1
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        if "agent.common.logfmt" in sys.modules:
            sys.modules["agent.common.logfmt"].shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
