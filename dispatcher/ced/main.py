"""``ced``'s entry point: argv, the verb table, and the one map from errors to exit codes.

Options may stand anywhere before ``--``; everything after ``--`` is passed to the
script verbatim. The verb table names the module of each verb; only the chosen one is
imported, so ``ced run`` loads neither asyncio nor ``cryptography`` (nor FastAPI, uvicorn
or the etcd client, which no verb loads).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from agent.common import logfmt
from cluster.errors import ClusterError
from dispatcher.ced.invocation import Invocation, local_user
from dispatcher.ced.output import PROG, err, out, out_json
from dispatcher.errors import ConfigError, CtrlExecError, ExitCode, Fail, UsageError
from dispatcher.reqid import new_reqid

USAGE = """\
Usage: ced [options] <mode> [args] [-- script-args...]

Modes:
  run <target>... <script> [-- <arg>...]
                             run a script on one or more agents
                             [--async] submit detached; poll with status/wait
  status <reqid>             show the state of an async run
  wait <reqid> [--timeout n] poll an async run until complete (default 300 s);
                             exit 0 all ok, 1 some failed, 2 timed out
  ping <target>...           check mTLS connectivity (renews agent certs when due)
  pairing-mode [start|stop]  accept agent pairing requests on port 7444
                             [--timeout 1..600] [--port n]
  list-requests              show pending pairing requests
  approve <reqid>            approve a pairing request
                             [--lookup-by ip|hostname] [--ip addr] [--agent-port n]
  deny <reqid>               deny a pairing request
  pairing-token create --count N --expires T[s|m|h|d] [--tags k=v,...] [--re-pair]
                             tokens that approve pairing requests, each once (printed once)
  pairing-token list         the tokens (no secrets): unused, used, expired, revoked
  pairing-token revoke ID[,ID...]|--all
                             revoke tokens (--all: every unused one)
  setup-ca                   one-time CA initialisation
  setup-operator-ca          one-time operator CA initialisation (the API trusts it)
                             [--replace] a new one: every operator cert is revoked
  issue-operator <name>      client certificate for an operator or automation account
                             [--days n] [--out dir] (writes dir/name.crt, dir/name.key)
  setup-ctrl-exec            generate the dispatcher key and certificate [--yes]
  list-agents [--tags k=v,...]
                             list registered agents
  edit-agent <name>          [--rename new] [--ip addr] [--agent-port n]
                             [--lookup-by ip|hostname]
  unpair <name>              remove an agent from the registry [--yes]
  list-locks                 show held host:script locks
  rotate-cert                rotate the dispatcher certificate and broadcast it
  serial-status              show the dispatcher serial and per-agent state
  rotate-ca [--status|--finish]
                             start or resume a CA rotation; --finish drops the old CA
  maintain                   ping all agents (renewals), rotation checks, purge
  history                    runs of every instance, newest first [--host H] [--script S]
                             [--since 2h|ISO] [--user U] [--limit N (20)] [--json]
  show <reqid>               one run: each host's outcome, exit, stdout and stderr
                             (from the instance that ran it)
  check-config               check ctrl-exec.conf as an instance reads it (exit 0 or 78)
  completion bash|zsh        print the shell completion script (eval "$(ced completion bash)")
  server [status|stop]       this user's command server (see CED_SERVER below)
  cluster status [--json]    members, leader, epoch, generation, cert serial of each
  cluster switchover [--to MEMBER]
                             the leader resigns; a peer (or MEMBER) takes over
  cluster history [--json]   every change of leader: term, epoch, time, from, to, why
  cluster pause [--reason T] maintenance: no automatic restarts or maintenance
  cluster resume             end maintenance
  cluster haproxy-config     print HAProxy sections (TCP passthrough) for every instance
                             [--full] whole file  [--bind ADDR,...] listen addresses
  cluster forget <id>        take a removed instance out of the roster
  cluster adopt-local <id> --yes
                             let a leader lacking the published generation publish its own
  cluster keepalived-config --vip IP[/LEN] --interface IF --address OWN_IP --peer PEER_IP
                             [--priority N] [--router-id N]
                             print keepalived (VRRP) config for one of two load balancers

Targets (run, ping):
  <host>[:<port>]            a registered agent name
  'web*', 'db[12]'           a glob over the registered names (quote it)
  -                          names on stdin (whitespace-separated, # comments)
  --tags k=v[,k=v...]        agents whose registry tags (from discovery, the agents'
                             [tags]) have every pair; filters the names when given
  --all                      every registered agent
  --strict                   any unknown name refuses the whole run (nothing runs);
                             by default unknown names are reported and the rest run
  --dry-run                  print the resolved targets and exit (nothing runs)

Rolling (run; ping takes --batch):
  --batch N|N%               waves of N hosts (N% of the targets, rounded up); the next
                             wave starts when every host of the current one has finished
  --max-fail N|N%            stop starting hosts once N (N%) failed or were unreachable;
                             running ones finish, the rest come back "skipped"
  --fail-fast                the same as --max-fail 1

Output (run, ping):
  results print as each host finishes; a progress line (done/total, ok, failed,
  unreachable, elapsed) shows on stderr when it is a terminal (CED_PROGRESS=1 forces
  it, 0 hides it); a recap (counts, hosts not ok, slowest) ends on stderr
  --order host               print every result at the end, in target order
  --json                     one JSON document: results plus "counts" (ok, failed,
                             unreachable, denied, locked, unknown)
  --stream                   one JSON object per host as it finishes (NDJSON), with
                             its "outcome"
  -o, --output-dir <dir>     run: write <dir>/<host>.stdout, .stderr and .exit

Exit status (run):
  0 every host ran the script and it exited 0
  1 any host failed, was unreachable, denied, locked, unknown or skipped (a run
    stopped by --max-fail); denied by the auth hook; a host:script lock already held
  2 usage or config error; unknown names with --strict (or nothing known at all)
  ping exits 0 once every known host was asked (1 with unknown names, 2 as above);
  wait: 0 all ok, 1 some failed, 2 timed out; 130 when interrupted

Options:
  --config <path>            ctrl-exec.conf (default /etc/ctrl-exec/ctrl-exec.conf)
  --json                     one JSON document on stdout
  --port <n>                 default agent port (7443; pairing port for pairing-mode)
  --username <name>          user for the auth hook (default $USER)
  --token <token>            token for the auth hook (default $ENVEXEC_TOKEN)
  --version                  print the version
  -h, --help                 this text; 'ced <mode> --help': the mode's options, examples

Environment:
  CTRL_EXEC_CONFIG           the config file when --config is not given
  CED_SERVER                 auto (default): hand commands to this user's command server,
                             started by a ced on a terminal; 1: start one without a
                             terminal too; 0: never (CED_SERVER_IDLE: its idle seconds, 900)

Examples:
  ced run web1 web2 check-disk -- /var
  ced --json ping web1
  ced run --tags role=web,env=prod restart-nginx
  ced run 'web*' --dry-run uptime
  grep -v '^#' hosts.txt | ced run --stream - check-disk | jq -c 'select(.outcome != "ok")'
  ced run --async db1 backup && ced wait <reqid> --timeout 600
  ced history --since 2h --script restart-nginx
  ced show <reqid> --json
"""

Verb = Callable[[Invocation], int]

#: verb -> (module under dispatcher.ced, function); only the chosen module is imported
VERBS: dict[str, tuple[str, str]] = {
    "run": ("run", "cmd_run"),
    "status": ("run", "cmd_status"),
    "wait": ("run", "cmd_wait"),
    "ping": ("run", "cmd_ping"),
    "pairing-mode": ("pairing", "cmd_pairing_mode"),
    "list-requests": ("pairing", "cmd_list_requests"),
    "approve": ("pairing", "cmd_approve"),
    "deny": ("pairing", "cmd_deny"),
    "pairing-token": ("pairingtoken", "cmd_pairing_token"),
    "setup-ca": ("pki", "cmd_setup_ca"),
    "setup-operator-ca": ("pki", "cmd_setup_operator_ca"),
    "issue-operator": ("pki", "cmd_issue_operator"),
    "setup-ctrl-exec": ("pki", "cmd_setup_dispatcher"),
    "list-agents": ("agents", "cmd_list_agents"),
    "edit-agent": ("agents", "cmd_edit_agent"),
    "list-locks": ("agents", "cmd_list_locks"),
    "rotate-cert": ("pki", "cmd_rotate_cert"),
    "serial-status": ("pki", "cmd_serial_status"),
    "rotate-ca": ("pki", "cmd_rotate_ca"),
    "unpair": ("agents", "cmd_unpair"),
    "maintain": ("pki", "cmd_maintain"),
    "cluster": ("cluster", "cmd_cluster"),
    "check-config": ("checks", "cmd_check_config"),
    "history": ("history", "cmd_history"),
    "show": ("history", "cmd_show"),
    "completion": ("completion", "cmd_completion"),
    "server": ("cmdserverctl", "cmd_server"),
    "__complete": ("completion", "cmd_candidates"),  # for the completion scripts (hidden)
}


def verb(name: str) -> Verb:
    """The function of verb ``name`` (its module imported now)."""
    module, function = VERBS[name]
    fn: Verb = getattr(importlib.import_module(f"dispatcher.ced.{module}"), function)
    return fn


# ----- argument parsing ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class _Formatter(argparse.HelpFormatter):
    """Never printed (``USAGE`` is); a fixed width spares the terminal probe (``shutil``)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


@functools.cache  # built once (in the command server: once for every command)
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
    p.add_argument("--to")
    p.add_argument("--reason")
    p.add_argument("--full", action="store_true")  # cluster haproxy-config
    p.add_argument("--bind")
    p.add_argument("--vip")  # cluster keepalived-config
    p.add_argument("--interface")
    p.add_argument("--address")
    p.add_argument("--peer", action="append")
    p.add_argument("--priority", type=int)
    p.add_argument("--router-id", type=int)
    p.add_argument("--tags")
    p.add_argument("--all", action="store_true")  # run, ping: targets
    p.add_argument("--strict", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--stream", action="store_true")  # run, ping: output
    p.add_argument("--order", choices=("host", "done"), default="done")
    p.add_argument("--batch")  # run, ping: rolling (dispatcher.rolling)
    p.add_argument("--max-fail")
    p.add_argument("--fail-fast", action="store_true")
    p.add_argument("-o", "--output-dir")
    p.add_argument("--async", dest="async_", action="store_true")
    p.add_argument("--timeout", type=int)
    p.add_argument("--count", type=int)  # pairing-token create
    p.add_argument("--expires")
    p.add_argument("--re-pair", action="store_true")
    p.add_argument("--days", type=int)
    p.add_argument("--out")
    p.add_argument("--yes", "-y", action="store_true")
    p.add_argument("--status", action="store_true")
    p.add_argument("--finish", action="store_true")
    p.add_argument("--replace", action="store_true")  # setup-operator-ca
    p.add_argument("--version", action="store_true")
    p.add_argument("--host")  # history: filters
    p.add_argument("--script")
    p.add_argument("--since")
    p.add_argument("--user")
    p.add_argument("--limit", type=int)
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


# ----- errors -> exit codes --------------------------------------------------------------------

#: renders an error (stderr, and the JSON document with --json) and gives the exit status
OnError = Callable[["Invocation | None", BaseException], ExitCode]


def _as_json(inv: Invocation | None) -> bool:
    return inv is not None and inv.json


def _usage(_inv: Invocation | None, exc: BaseException) -> ExitCode:
    err(str(exc) if str(exc).startswith("Usage:") else f"Error: {exc}")
    err("Run 'ced --help' for usage.")
    return ExitCode.USAGE


def _failed(_inv: Invocation | None, exc: BaseException) -> ExitCode:
    err(str(exc))
    return exc.code if isinstance(exc, Fail) else ExitCode.FAILURE


def _config(_inv: Invocation | None, exc: BaseException) -> ExitCode:
    err(f"Error: {exc}")
    return ExitCode.USAGE  # upstream dies (non-zero); exit 2 since the first release


def _denied(inv: Invocation | None, exc: BaseException) -> ExitCode:
    from dispatcher.operations import Denied

    assert isinstance(exc, Denied)
    if _as_json(inv):
        out_json({"ok": 0, "error": exc.reason, "code": exc.code})
    else:
        err(f"Denied: {exc.reason}")
    return ExitCode.FAILURE


def _locked(inv: Invocation | None, exc: BaseException) -> ExitCode:
    from dispatcher.runlocks import LockConflict

    assert isinstance(exc, LockConflict)
    if _as_json(inv):
        out_json({"ok": 0, "error": "locked", "code": 4, "conflicts": exc.conflicts})
    else:
        err(f"Locked: already running: {', '.join(exc.conflicts)}")
    return ExitCode.FAILURE


def _registry(inv: Invocation | None, exc: BaseException) -> ExitCode:
    if _as_json(inv):
        out_json({"ok": 0, "error": str(exc), "code": 2})
    err(f"Error: {exc}")
    if str(exc).startswith("unknown agent"):
        err(f"Hosts must be registered agent names (see '{PROG} list-agents').")
    return ExitCode.USAGE


def _other(inv: Invocation | None, exc: BaseException) -> ExitCode:
    if _as_json(inv):
        out_json({"ok": 0, "error": str(exc)})
    err(f"Error: {exc}")
    return ExitCode.FAILURE


def _interrupted(_inv: Invocation | None, _exc: BaseException) -> ExitCode:
    err("Interrupted.")
    return ExitCode.INTERRUPTED


def _missing_module(_inv: Invocation | None, exc: BaseException) -> ExitCode:
    from dispatcher.api.entry import EXTRA_MODULES

    assert isinstance(exc, ModuleNotFoundError)
    top = (exc.name or "").split(".", 1)[0]
    if top not in EXTRA_MODULES:
        raise exc  # a bug or a broken install: keep the traceback
    err(f"Error: this needs the dispatcher extra (module '{top}' is missing): "
        "pip install 'ctrl-exec[dispatcher]'")  # fmt: skip
    return ExitCode.FAILURE


def _broken_pipe(_inv: Invocation | None, _exc: BaseException) -> ExitCode:
    return ExitCode.FAILURE  # the reader went away: nothing to say, nowhere to say it


def error_table() -> dict[type[BaseException], OnError]:
    """Every error ``ced`` reports, by class; the most specific class of an error wins.

    Anything else is a bug and keeps its traceback.
    """
    from dispatcher.operations import Denied
    from dispatcher.registry import RegistryError
    from dispatcher.runlocks import LockConflict

    return {
        UsageError: _usage,  # exit 2
        Fail: _failed,  # its code (1)
        ConfigError: _config,  # exit 2
        Denied: _denied,  # exit 1
        LockConflict: _locked,  # exit 1 (JSON "code":4)
        RegistryError: _registry,  # exit 2 (unknown agents: upstream dies)
        CtrlExecError: _other,  # exit 1
        ClusterError: _other,  # exit 1 (the coordination store: unreachable, fenced, ...)
        KeyboardInterrupt: _interrupted,  # exit 130
        BrokenPipeError: _broken_pipe,  # exit 1
        ModuleNotFoundError: _missing_module,  # exit 1 (the dispatcher extra is missing)
    }


def on_error(inv: Invocation | None, exc: BaseException) -> ExitCode:
    """Report ``exc`` as :func:`error_table` says; its exit status (re-raises the unknown)."""
    table = error_table()
    for cls in type(exc).__mro__:
        handler = table.get(cls)
        if handler is not None:
            return handler(inv, exc)
    raise exc


# ----- main ----------------------------------------------------------------------------------


def _version() -> None:
    import ssl

    from agent.version import __version__

    out(f"{PROG} {__version__}")
    out(f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}")


def _run(argv: list[str]) -> int:
    ns, script_args = parse(argv)
    if ns.version:
        _version()
        return ExitCode.OK
    if ns.help:
        mode = ns.words[0] if ns.words else ""
        if mode in VERBS and not mode.startswith("_"):
            from dispatcher.ced.verbhelp import help_text

            sys.stdout.write(help_text(mode))  # ced <verb> --help: usage, options, examples
        else:
            sys.stdout.write(USAGE)
        return ExitCode.OK
    if not ns.words:
        raise UsageError("no mode given")
    mode = ns.words[0]
    if mode not in VERBS:
        err(f"Unknown mode '{mode}'")
        sys.stderr.write(USAGE)
        return ExitCode.USAGE
    inv = Invocation(ns, script_args)
    try:
        # every line names who ran ced, and (but for the listener, which serves many
        # agents' requests, each logged with its own reqid) the reqid of what it starts
        rid = {} if mode == "pairing-mode" else {"reqid": new_reqid()}
        with logfmt.context(**rid, **local_user()):
            return verb(mode)(inv)
    except (CtrlExecError, ClusterError, KeyboardInterrupt, BrokenPipeError,
            ModuleNotFoundError) as exc:  # fmt: skip
        return on_error(inv, exc)


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")
    code: int = ExitCode.FAILURE
    try:
        code = _run(sys.argv[1:] if argv is None else argv)
    except (CtrlExecError, ClusterError, KeyboardInterrupt, BrokenPipeError,
            ModuleNotFoundError) as exc:  # fmt: skip
        code = on_error(None, exc)  # before the verb ran: a usage error, or ^C
    finally:
        try:
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        if "agent.common.logfmt" in sys.modules:
            sys.modules["agent.common.logfmt"].shutdown()
    return code
