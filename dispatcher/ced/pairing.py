"""``ced pairing-mode [start|stop]``, ``list-requests``, ``approve`` and ``deny``.

``pairing-mode`` runs the pairing listener (:class:`dispatcher.pairing.server.PairingServer`)
in the foreground with the operator console (spec 5.4), or, with ``start``, as a
double-forked daemon with a pidfile that ``stop`` signals. ``list-requests``, ``approve``
and ``deny`` are leader-only actions (:mod:`dispatcher.ha.actions`): carried out here
without etcd, by the cluster leader with it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from dispatcher.ced.invocation import Invocation, arun
from dispatcher.ced.output import PROG, err, out, out_json
from dispatcher.errors import ExitCode, Fail, UsageError

# ----- the queue ---------------------------------------------------------------------------


def cmd_list_requests(inv: Invocation) -> ExitCode:
    from dispatcher.pairing import prompt as pairing_prompt

    records = inv.leader_action("list-requests", {}).data or []
    if inv.json:
        out_json({"ok": 1, "requests": [{k: v for k, v in r.items() if k != "csr"}
                                        for r in records]})  # fmt: skip
        return ExitCode.OK
    for line in pairing_prompt.format_table(records):
        out(line)
    return ExitCode.OK


def _print_approval(doc: dict[str, Any]) -> None:
    name, lookup_by = doc["hostname"], doc["lookup_by"]
    out(f"Approved '{name}' ({doc['reqid']}). Cert delivered on next poll.")
    out(f"  Registered:  {name}   lookup_by={lookup_by}   addr={doc['addr']}:{doc['port']}")
    for w in doc["warnings"]:
        out(f"  {w}")
    if lookup_by == "hostname":
        out(f"  If '{name}' does not resolve from here: "
            f"{PROG} edit-agent {name} --lookup-by ip")  # fmt: skip


def cmd_approve(inv: Invocation) -> ExitCode:
    inv.need(1, "approve <reqid> [--lookup-by ip|hostname] [--ip addr] [--agent-port n]")
    ns = inv.ns
    args = {"reqid": inv.words[0], "lookup_by": ns.lookup_by, "ip": ns.ip,
            "agent_port": ns.agent_port}  # fmt: skip
    doc = inv.leader_action("approve", args).data
    if inv.json:
        out_json({"ok": 1, "reqid": doc["reqid"], "hostname": doc["hostname"],
                  "record": doc["record"], "warnings": doc["warnings"], **inv.by_leader()})  # fmt: skip
        return ExitCode.OK
    _print_approval(doc)
    if inv.by_leader():
        out(f"  (carried out by the cluster leader {inv.leader[0]}, epoch {inv.leader[1]})")
    return ExitCode.OK


def cmd_deny(inv: Invocation) -> ExitCode:
    inv.need(1, "deny <reqid>")
    reqid = inv.words[0]
    inv.leader_action("deny", {"reqid": reqid})
    if inv.json:
        out_json({"ok": 1, "reqid": reqid, **inv.by_leader()})
    elif inv.by_leader():
        out(f"Denied request '{reqid}' (by the cluster leader {inv.leader[0]}).")
    else:
        out(f"Denied request '{reqid}'.")
    return ExitCode.OK


# ----- pairing-mode ------------------------------------------------------------------------


def _pairing_timeout(inv: Invocation) -> int:
    t = inv.ns.timeout if inv.ns.timeout is not None else (inv.d.cfg.pairing_timeout or 600)
    if not 1 <= t <= 600:
        raise UsageError("--timeout must be between 1 and 600 seconds")
    return int(t)


def cmd_pairing_mode(inv: Invocation) -> ExitCode:
    sub = inv.words[0] if inv.words else ""
    if sub not in ("", "start", "stop"):
        raise UsageError("Usage: ced pairing-mode [start|stop] [--timeout 1..600] [--port n]")
    if sub == "stop":
        return _pairing_stop(inv)
    timeout = _pairing_timeout(inv)
    port = inv.ns.port if inv.ns.port else inv.d.cfg.pairing_port
    if sub == "start":
        return _pairing_start(inv, port, timeout)
    return arun(_pairing_interactive(inv, port, timeout))


def _read_pid(path: str) -> int:
    with open(path) as f:
        return int(f.read().split()[0])


def _pairing_stop(inv: Invocation) -> ExitCode:
    pidfile = inv.d.cfg.pairing_pidfile
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
    return ExitCode.OK


# ----- pairing-mode start: the daemon ------------------------------------------------------


def _pairing_start(inv: Invocation, port: int, timeout: int) -> ExitCode:
    """Daemonise a non-interactive listener; the parent waits until it listens."""
    from agent.common import logfmt

    pidfile = inv.d.cfg.pairing_pidfile
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
            code = _pairing_daemon(inv, port, timeout, wfd)
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
    _print_pin(inv)
    return ExitCode.OK


def _print_pin(inv: Invocation) -> None:
    """The CA fingerprint agents pin with ``request-pairing --ca-fingerprint``."""
    from agent.common.certs import ca_fingerprint

    try:
        fp = ca_fingerprint(inv.d.cfg.ca)
    except (OSError, ValueError) as exc:
        err(f"Warning: cannot read the CA certificate {inv.d.cfg.ca}: {exc}")
        return
    out(f"CA fingerprint: {fp}")
    out(f"  agents pin it: ctrl-exec-agent request-pairing --dispatcher <host> "
        f"--ca-fingerprint {fp}")  # fmt: skip


def _pairing_daemon(inv: Invocation, port: int, timeout: int, wfd: int) -> int:
    """The daemon (grandchild): no terminal, logs to syslog; its exit status."""
    from agent.common import logfmt

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    cfg = inv.d.cfg
    logfmt.setup(PROG, cfg.log_target if cfg.log_target != "stderr" else "auto", fmt=cfg.log_format)
    try:
        return asyncio.run(_daemon_main(inv, port, timeout, wfd))
    finally:
        logfmt.shutdown()


async def _daemon_main(inv: Invocation, port: int, timeout: int, wfd: int) -> int:
    """Listen, tell the parent (``ok <pid>`` or the error on ``wfd``), serve until timeout
    or a signal, then remove the pidfile if it is still ours."""
    from agent.common.fsutil import atomic_write
    from dispatcher.pairing.server import PairingServer

    cfg = inv.d.cfg
    server = PairingServer(cfg, port=port, writer=inv.d.writer)
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


# ----- pairing-mode in the foreground: the operator console --------------------------------


class _Console:
    """The foreground listener's operator side (spec 5.4): each new request is shown with
    a prompt; lines from stdin approve, deny or list the pending requests."""

    def __init__(self, inv: Invocation) -> None:
        self.inv = inv
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()

    def pending(self) -> list[dict[str, Any]]:
        from dispatcher.pairing import queue as pq

        return pq.list_pending(self.inv.d.cfg.pairing_dir, writer=self.inv.d.writer)

    def show_prompt(self) -> None:
        from dispatcher.pairing import prompt as pp

        n = len(self.pending())
        if n:
            sys.stdout.write(pp.prompt(n))
            sys.stdout.flush()

    def on_request(self, record: dict[str, Any]) -> None:
        from dispatcher.pairing import prompt as pp

        out()
        for line in pp.format_request(record):
            out(line)
        self.show_prompt()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Queue stdin's lines (None at end of input)."""

        def readable() -> None:
            line = sys.stdin.readline()
            self.lines.put_nowait(line if line else None)
            if not line:
                loop.remove_reader(sys.stdin.fileno())

        loop.add_reader(sys.stdin.fileno(), readable)

    async def serve(self, stop: asyncio.Event, deadline: float) -> None:
        """Answer the operator's lines until ``stop``, ``deadline`` (loop time) or ``q``."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            left = deadline - loop.time()
            if left <= 0:
                out("Pairing mode timed out.")
                break
            getter = asyncio.ensure_future(self.lines.get())
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
            self.command(line, self.pending())
            if line.strip().lower() in ("q", "quit"):
                break
            self.show_prompt()

    def command(self, line: str, records: list[dict[str, Any]]) -> None:
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
                res = actions.perform(self.inv.d, cmd.action, {"reqid": str(rec.get("id"))})
                if cmd.action == "approve":
                    _print_approval(res.data)
                else:
                    out(f"Denied request '{rec.get('id')}'.")
            except (pq.PairingQueueError, actions.ActionFailed) as exc:
                out(f"  Error: {exc}")


async def _pairing_interactive(inv: Invocation, port: int, timeout: int) -> ExitCode:
    """Foreground listener with the operator console."""
    from dispatcher.pairing.server import PairingServer

    console = _Console(inv)
    server = PairingServer(inv.d.cfg, port=port, on_request=console.on_request,
                           writer=inv.d.writer)  # fmt: skip
    try:
        await server.start()
    except Exception as exc:
        raise Fail(f"Cannot start pairing mode on port {port}: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    interactive = sys.stdin.isatty() or os.environ.get("CED_PAIRING_STDIN") == "1"
    if interactive:
        console.attach(loop)
    out(f"Pairing mode active on port {server.port} (auto-stops in {timeout}s). "
        "Waiting for agents... (Ctrl-C to stop)")  # fmt: skip
    _print_pin(inv)
    sys.stdout.flush()
    try:
        await console.serve(stop, loop.time() + timeout)
    finally:
        if interactive:
            loop.remove_reader(sys.stdin.fileno())
        await server.stop()
    out("Pairing mode stopped.")
    return ExitCode.OK
