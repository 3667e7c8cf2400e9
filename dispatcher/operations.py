"""Operations shared by ``ced`` and the HTTP API: authorise, run, ping, status, discovery.

Every operation takes the :class:`~dispatcher.core.Dispatcher` and a :class:`Caller`
(who asks, from where). Errors propagate as exceptions the front-ends map to their own
output: :class:`~dispatcher.registry.RegistryError` (unknown agents), :class:`Denied`
(auth hook), :class:`~cluster.locks.LockConflict` (host:script already running).

Unlike upstream, which only probes the per host:script locks, :func:`do_run` holds them
for the whole synchronous run (or for the whole submission of an async run).

Every operation talks to agents (and runs the auth hook) through ``io``, an
:class:`~dispatcher.client.io.AgentIO`: asyncio when None, or
:data:`dispatcher.client.blocking.BLOCKING` for the one-shot ``ced``, which then runs the
coroutine with :func:`dispatcher.client.io.run_blocking` and never imports asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.common.errors import CtrlExecError
from agent.common.records import record
from cluster.locks import LockConflict
from dispatcher.client import fanout
from dispatcher.client.io import AgentIO, resolve_io
from dispatcher.core import Dispatcher
from dispatcher.errors import LeaderOnlyRefused
from dispatcher.registry import DEFAULT_PORT, RegistryError, Target, resolve
from dispatcher.reqid import request_reqid as new_reqid  # the current request's, if any
from dispatcher.rolling import OnWave, Rolling, in_waves
from dispatcher.runoutcome import report, report_all
from dispatcher.targets import Selection, select

if TYPE_CHECKING:
    from dispatcher.runstore import FetchOutcome

Result = dict[str, Any]


@record
class Caller:
    """Who asks: ``kind`` is ``cli`` or ``api``."""

    kind: str
    username: str = ""
    token: str = ""
    source_ip: str = "127.0.0.1"
    identity: str = ""  # API: the operator certificate's CN; CLI: the Unix user
    cert_serial: str = ""  # API: the operator certificate's serial (hex)
    issuer_fingerprint: str = ""  # API: SHA256:<hex> of the CA that issued it
    sudo_user: str = ""  # CLI: $SUDO_USER when set

    @property
    def submitter(self) -> dict[str, str]:
        return {"username": self.username, "source_ip": self.source_ip}

    def identity_doc(self) -> dict[str, str] | None:
        """The auth hook's ``identity`` object (None without an identity)."""
        if not self.identity:
            return None
        doc = {"cn": self.identity, "serial": self.cert_serial,
               "issuer_fingerprint": self.issuer_fingerprint}  # fmt: skip
        if self.sudo_user:
            doc["sudo_user"] = self.sudo_user
        return doc

    def attribution(self) -> dict[str, Any]:
        """What a run record says about who asked, besides upstream's ``submitter``."""
        if self.kind == "cli":
            out: dict[str, Any] = {"unix_user": self.identity} if self.identity else {}
            if self.sudo_user:
                out["sudo_user"] = self.sudo_user
            return out
        doc = self.identity_doc()
        return {"identity": doc} if doc else {}


class Denied(CtrlExecError):
    """The auth hook (or the API default without a hook) refused the request."""

    def __init__(self, reason: str, code: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# ----- authorisation ---------------------------------------------------------------------


def _dispatcher_serial(d: Dispatcher) -> str:
    """Serial of the dispatcher cert for the hook context; "" when unreadable."""
    try:
        from agent.certinfo import serial_hex  # a stdlib DER walk, no cryptography

        return serial_hex(d.cfg.cert)
    except Exception:
        return ""


async def authorise(
    d: Dispatcher,
    caller: Caller,
    action: str,
    *,
    script: str = "",
    hosts: list[str] | None = None,
    args: list[str] | None = None,
    reqid: str = "",
    submitter: dict[str, Any] | None = None,
    io: AgentIO | None = None,
) -> None:
    """Spec 8.1/8.2: ask the auth hook; raise :class:`Denied` when it refuses.

    Without a hook the CLI passes and the API follows ``api_auth_default``.
    """
    user = caller.username or "(none)"
    log: dict[str, Any] = {"authaction": action, "user": user, "ip": caller.source_ip}
    if caller.identity and caller.kind == "api":
        log["identity"] = caller.identity
        log["cert_serial"] = caller.cert_serial
    hook = d.cfg.auth_hook
    if not hook:
        if caller.kind == "cli":
            logfmt.event("auth", result="pass", reason="no-hook-cli", **log)
            return
        if d.cfg.api_auth_default == "allow":
            logfmt.event("auth", result="pass", reason="no-hook-allow", **log)
            return
        logfmt.event("auth", logfmt.WARNING, result="deny", reason="no-hook-deny", **log)
        raise Denied("no auth hook configured", 1)
    from agent.common import authhook

    ctx = authhook.build_context(
        action, script=script, hosts=hosts, args=args, username=caller.username,
        token=caller.token, source_ip=caller.source_ip, dispatcher=d.cfg.dispatcher_id,
        dispatcher_serial=_dispatcher_serial(d), reqid=reqid,
        submitter=dict(submitter) if submitter else None, identity=caller.identity_doc(),
    )  # fmt: skip
    decision = await resolve_io(io).hook(hook, ctx, d.cfg.auth_hook_timeout)
    if decision.allowed:
        logfmt.event("auth", result="pass", **log)
        return
    if decision.reason == "auth hook timed out":
        logfmt.event("auth-hook-timeout", logfmt.WARNING, hook=hook,
                     timeout=d.cfg.auth_hook_timeout)  # fmt: skip
    result = "error" if decision.reason.startswith("auth hook not found") else "deny"
    logfmt.event("auth", logfmt.WARNING, result=result, reason=decision.reason, **log)
    raise Denied(decision.reason, decision.code or 1)


# ----- helpers ---------------------------------------------------------------------------


def _reach(d: Dispatcher, io: AgentIO | None) -> fanout.Reach:
    """The dispatcher's client context, ``read_timeout`` per host and fan-out limits."""
    return fanout.Reach(d.client_ctx(), float(d.cfg.read_timeout), d.cfg.max_parallel,
                        d.cfg.max_hosts, io=io, max_output=d.cfg.max_result_output)  # fmt: skip


async def _resolve(
    d: Dispatcher,
    hosts: Sequence[str],
    default_port: int,
    io: AgentIO | None,
    limited: bool = True,
) -> list[Target]:
    """``max_hosts`` first (ValueError, before any per-host work), then the registry
    lookup (linear) off the event loop."""
    limit = d.cfg.max_hosts
    if limited and len(hosts) > limit and len(set(hosts)) > limit:
        raise ValueError(f"too many hosts (max {limit})")
    refs = list(hosts)
    return await resolve_io(io).offload(lambda: resolve(d.registry, refs, default_port))


async def _select(
    d: Dispatcher, sel: Selection, default_port: int, io: AgentIO | None
) -> tuple[list[Target], list[str]]:
    """:func:`dispatcher.targets.select` off the event loop: the targets and the unknown
    references (``max_hosts`` checked before any per-host work)."""
    limit = d.cfg.max_hosts
    if len(sel.refs) > limit and len(set(sel.refs)) > limit:
        raise ValueError(f"too many hosts (max {limit})")
    got = await resolve_io(io).offload(lambda: select(d.registry, sel, default_port, limit))
    return got.targets, got.unknown


def unknown_result(ref: str, script: str | None, reqid: str, async_: bool = False) -> Result:
    """A reference that named no agent, as a per-host result (``status: unknown``)."""
    res: Result = {"host": ref}
    if script is not None:
        res["script"] = script
        if not async_:
            res["exit"] = -1
    res.update({"status": "unknown", "error": "unknown agent", "rtt": "0ms", "reqid": reqid})
    return res


def count_outcomes(outcomes: Sequence[str], rolling: bool = False) -> dict[str, int]:
    """``counts``: how many hosts came to each outcome (every key present; ``skipped``
    too when the run was rolling)."""
    counts = dict.fromkeys((*fanout.OUTCOMES, fanout.SKIPPED) if rolling else fanout.OUTCOMES, 0)
    for o in outcomes:
        counts[o] = counts.get(o, 0) + 1
    return counts


class _Tally:
    """Collects every host's outcome and passes each result on to ``on_result``."""

    def __init__(self, on_result: fanout.OnResult | None) -> None:
        self.outcomes: list[str] = []
        self.by_host: dict[str, str] = {}
        self.on_result = on_result

    def __call__(self, res: Result, outcome: str) -> None:
        self.outcomes.append(outcome)  # list.append is atomic: fan-out threads call this
        self.by_host[str(res.get("host", ""))] = outcome
        if self.on_result is not None:
            self.on_result(res, outcome)


def _started(results: list[Result]) -> list[Result]:
    """The results of hosts that were asked (not those a rolling run skipped)."""
    return [r for r in results if r.get("status") != fanout.SKIPPED]


def _names(targets: Sequence[Target]) -> list[str]:
    return list(dict.fromkeys(t.name for t in targets))  # linear: 10,000 targets


# ----- run -------------------------------------------------------------------------------


async def do_run(
    d: Dispatcher,
    caller: Caller,
    hosts: list[str],
    script: str,
    args: list[str],
    *,
    async_: bool = False,
    reqid: str | None = None,
    record_sync: bool = False,
    default_port: int = DEFAULT_PORT,
    io: AgentIO | None = None,
    select_: Selection | None = None,
    on_result: fanout.OnResult | None = None,
    on_targets: Callable[[int], None] | None = None,
    rolling: Rolling | None = None,
    on_wave: OnWave | None = None,
) -> dict[str, Any]:
    """Run ``script`` on ``hosts``; returns ``{"reqid", "results", "counts"}``.

    ``rolling`` (:mod:`dispatcher.rolling`, sync runs only) runs the hosts in waves
    (``on_wave`` hears of each) and stops starting hosts once the failure budget is spent;
    the answer then has ``rolling`` and ``counts`` a ``skipped`` key.

    ``select_`` (default: ``hosts`` as plain names, strict) may add globs, tags, all and
    non-strict resolution: unknown references then come back as per-host results with
    ``status: unknown`` (after the others, reported to ``on_result`` first) and count as
    ``unknown``. ``on_targets`` hears how many hosts there are once resolved (unknown
    ones included); ``on_result`` hears of every host as soon as it finishes.

    Order: ``max_hosts`` (ValueError), resolve (RegistryError), authorise ``run`` (Denied), take every host:script
    lock (LockConflict), fan out. The locks are held until the run returns (sync) or
    until every agent has answered the submission (async). An async run is recorded in
    the run store; a sync run only with ``record_sync`` (the API records, the CLI not).
    """
    if rolling is not None and async_:
        raise ValueError("--batch/--max-fail need a synchronous run (an async submission "
                         "finishes at once, so there is no wave to wait for)")  # fmt: skip
    sel = select_ if select_ is not None else Selection(tuple(hosts))
    targets, unknown = await _select(d, sel, default_port, io)
    rid = reqid or new_reqid()
    t0, names, started = time.monotonic(), _names(targets), time.time()
    asked = list(hosts) if sel.plain else names
    try:
        await authorise(d, caller, "run", script=script, hosts=asked, args=list(args),
                        reqid=rid, io=io)  # fmt: skip
    except Denied:
        report_all(d.observer, "run", script, names, "denied", time.monotonic() - t0)
        raise
    missing = [unknown_result(ref, script, rid, async_) for ref in unknown]
    if on_targets is not None:
        on_targets(len(targets) + len(missing))
    tally = _Tally(on_result)
    for res in missing:
        tally(res, fanout.UNKNOWN)
    pairs = [(name, script) for name in names]
    reach, offload = _reach(d, io), resolve_io(io).offload
    try:
        held = await offload(lambda: d.locks.acquire_all(pairs), undo=lambda h: h.release())
    except LockConflict:
        report_all(d.observer, "run", script, names, "locked", time.monotonic() - t0)
        raise

    def wave(
        part: Sequence[Target], gate: fanout.Gate, told: fanout.OnResult
    ) -> Awaitable[list[Result]]:
        return fanout.run_all(part, script, args, rid, caller.username, caller.token, reach,
                              async_=async_, on_result=told, gate=gate)  # fmt: skip

    try:
        rolled = await in_waves(targets, rolling, wave, partial(fanout.run_skipped, script, rid),
                                tally, on_wave)  # fmt: skip
    finally:
        await offload(held.release)
    results = rolled.results
    report(d.observer, "run", script, _started(results), time.monotonic() - t0)
    submitter = caller.submitter if caller.kind == "api" else None
    rec: dict[str, Any] | None = None
    if async_:
        from dispatcher.runstore import async_record

        rec = async_record(rid, script, results, submitter, attribution=caller.attribution())
    elif record_sync:
        from dispatcher.runstore import sync_record

        rec = sync_record(rid, script, _names(targets), results, submitter,
                          attribution=caller.attribution())  # fmt: skip
    counts = count_outcomes(tally.outcomes, rolling is not None)
    extra = {"rolling": rolled.summary(rolling)} if rolling is not None else {}
    from dispatcher.history.hook import record_run

    refused = await offload(lambda: record_run(
        d, caller, reqid=rid, script=script, args=args, async_=async_, results=results + missing,
        outcomes=tally.by_host, started=started))  # fmt: skip
    if rec is not None and not refused:  # refused everywhere: counted, not kept
        saved = rec
        try:
            await offload(lambda: d.runstore.save(saved))
        except OSError as exc:
            # the scripts ran: answering an error now would invite a retry that runs them
            # twice. The results go back; the missing record is logged (and a status query
            # for this reqid answers "not found").
            from agent.common import logfmt

            logfmt.event("run-record-failed", logfmt.ERROR, reqid=rid, script=script,
                         error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return {"reqid": rid, "results": results + missing, "counts": counts,
                    "record": "not saved", **extra}  # fmt: skip
    return {"reqid": rid, "results": results + missing, "counts": counts, **extra}


# ----- ping ------------------------------------------------------------------------------


def _may_need_renewal(res: Result, cert_days: int, now: float) -> bool:
    """Cheap pre-check of spec 4.5's trigger, so a ping loads no crypto when none is due.

    Anything unparsable is left to ``dispatcher.pki.renewal`` to judge.
    """
    if res.get("status") != "ok":
        return False
    staged = res.get("staged")
    if staged is True or (isinstance(staged, str) and staged.strip().lower() in ("1", "true")):
        return False
    expiry = res.get("expiry")
    if not isinstance(expiry, str) or not expiry.strip():
        return False
    from agent.common.datefmt import parse_openssl_date

    try:
        left = parse_openssl_date(expiry).timestamp() - now
    except ValueError:
        return True
    return left < (cert_days / 2) * 86400


async def _maybe_renew(
    d: Dispatcher, targets: Sequence[Target], results: list[Result], io: AgentIO | None
) -> None:
    now = time.time()
    due = [r for r in results if _may_need_renewal(r, d.cfg.cert_days, now)]
    if not due:
        return
    from dispatcher.pki import renewal

    by_name = {t.name: t for t in targets}
    for res in due:
        t = by_name.get(str(res.get("host")))
        if t is None:
            continue
        try:
            await renewal.maybe_renew(d, t, res, io=io)
        except Exception as exc:  # renewal never changes the ping result
            logfmt.event("renew", logfmt.ERROR, agent=t.name, error=exc)


async def do_ping(
    d: Dispatcher,
    caller: Caller,
    hosts: list[str],
    *,
    renew: bool = False,
    default_port: int = DEFAULT_PORT,
    io: AgentIO | None = None,
    select_: Selection | None = None,
    on_result: fanout.OnResult | None = None,
    on_targets: Callable[[int], None] | None = None,
    rolling: Rolling | None = None,
    on_wave: OnWave | None = None,
) -> dict[str, Any]:
    """``POST /ping`` on every host; returns ``{"reqid", "results", "counts"}``.

    With ``renew`` each ``ok`` result is handed to ``dispatcher.pki.renewal.maybe_renew``.
    ``select_``, ``on_result``, ``on_targets``, ``rolling`` and ``on_wave`` as for
    :func:`do_run`.
    """
    sel = select_ if select_ is not None else Selection(tuple(hosts))
    targets, unknown = await _select(d, sel, default_port, io)
    rid = new_reqid()
    t0 = time.monotonic()
    asked = list(hosts) if sel.plain else _names(targets)
    try:
        await authorise(d, caller, "ping", hosts=asked, reqid=rid, io=io)
    except Denied:
        report_all(d.observer, "ping", "", _names(targets), "denied", time.monotonic() - t0)
        raise
    missing = [unknown_result(ref, None, rid) for ref in unknown]
    if on_targets is not None:
        on_targets(len(targets) + len(missing))
    tally = _Tally(on_result)
    for res in missing:
        tally(res, fanout.UNKNOWN)
    reach = _reach(d, io)

    def wave(
        part: Sequence[Target], gate: fanout.Gate, told: fanout.OnResult
    ) -> Awaitable[list[Result]]:
        return fanout.ping_all(part, rid, reach, on_result=told, gate=gate)

    rolled = await in_waves(targets, rolling, wave, fanout.ping_skipped, tally, on_wave)
    results = rolled.results
    report(d.observer, "ping", "", _started(results), time.monotonic() - t0)
    if renew:
        await _maybe_renew(d, targets, results, io)
    extra = {"rolling": rolled.summary(rolling)} if rolling is not None else {}
    return {"reqid": rid, "results": results + missing,
            "counts": count_outcomes(tally.outcomes, rolling is not None), **extra}  # fmt: skip


# ----- async status ----------------------------------------------------------------------


def _outcome(res: Result) -> FetchOutcome:
    from dispatcher.runstore import FetchOutcome

    status = res.get("status")
    if status == "done":
        code = res.get("exit")
        return FetchOutcome.done(code if isinstance(code, int) else None,
                                 str(res.get("stdout") or ""), str(res.get("stderr") or ""))  # fmt: skip
    if status == "running":
        return FetchOutcome.running()
    if status == "unknown":
        return FetchOutcome.not_found()
    return FetchOutcome.failed(str(res.get("error") or f"unexpected status {status!r}"))


async def _refresh(
    d: Dispatcher, reqid: str, default_port: int, io: AgentIO | None
) -> dict[str, Any] | None:
    from dispatcher.runstore import FetchOutcome, aggregate, pending_hosts

    offload = resolve_io(io).offload
    record = await offload(lambda: d.runstore.load(reqid))
    if record is None:
        return None
    pending = pending_hosts(record)
    if not pending:
        return record
    fetched: dict[str, FetchOutcome] = {}
    targets: list[Target] = []
    for name in pending:
        try:
            targets.extend(resolve(d.registry, [name], default_port))
        except RegistryError:
            fetched[name] = FetchOutcome.failed(f"unknown agent: {name}")
    if targets:
        results = await fanout.result_all(targets, reqid, _reach(d, io))
        for t, res in zip(targets, results, strict=True):
            fetched[t.name] = _outcome(res)
    new = aggregate(record, fetched)
    await offload(lambda: d.runstore.save(new))
    return new


async def do_status(
    d: Dispatcher,
    caller: Caller,
    reqid: str,
    *,
    default_port: int = DEFAULT_PORT,
    io: AgentIO | None = None,
) -> dict[str, Any] | None:
    """The run record of ``reqid`` with pending async hosts fetched; None if unknown.

    API callers are authorised with action ``status`` (reqid and the record's submitter).
    """
    if caller.kind == "api":
        known = d.runstore.load(reqid)
        if known is None:
            return None
        await authorise(d, caller, "status", reqid=reqid, submitter=known.get("submitter"),
                        io=io)  # fmt: skip
    return await _refresh(d, reqid, default_port, io)


async def do_wait(
    d: Dispatcher,
    caller: Caller,
    reqid: str,
    timeout: float = 300,
    interval: float = 2.0,
    *,
    default_port: int = DEFAULT_PORT,
    io: AgentIO | None = None,
) -> tuple[dict[str, Any] | None, bool]:
    """Poll :func:`do_status` until complete; returns ``(record, timed_out)``."""
    deadline = time.monotonic() + timeout
    record = await do_status(d, caller, reqid, default_port=default_port, io=io)
    while record is not None and not record.get("complete"):
        left = deadline - time.monotonic()
        if left <= 0:
            return record, True
        await resolve_io(io).sleep(min(interval, left))
        record = await _refresh(d, reqid, default_port, io)
    return record, False


# ----- discovery -------------------------------------------------------------------------


async def do_discovery(
    d: Dispatcher,
    caller: Caller,
    hosts: list[str] | None,
    *,
    default_port: int = DEFAULT_PORT,
    io: AgentIO | None = None,
) -> dict[str, Any]:
    """``GET /capabilities`` on ``hosts`` (all registered agents if None).

    Returns ``{"hosts": {name: result}}``; each result is the agent's body plus ``rtt``
    (and ``reported_hostname`` when it differs) or ``{"host","status":"error","error",
    "rtt"}``. Tags from successful answers are cached in the registry.
    """
    names = list(hosts) if hosts is not None else d.registry.names()
    if not names:
        return {"hosts": {}}
    targets = await _resolve(d, names, default_port, io, limited=hosts is not None)
    rid = new_reqid()
    await authorise(d, caller, "ping", hosts=names, reqid=rid, io=io)
    reach = _reach(d, io)

    async def one(t: fanout.TargetLike) -> Result:
        r = await reach.call(t, "GET", "/capabilities", None)
        if r.error or r.body is None:
            err = r.error or "invalid JSON"
            logfmt.event("discovery", logfmt.ERROR, agent=t.name, error=err, rtt=r.rtt)
            return fanout.host_error(t.name, err, r.rtt)
        res: Result = dict(r.body)
        reported = res.get("host")
        res["rtt"] = r.rtt
        if reported:
            res["reported_hostname"] = reported
        logfmt.event("discovery", agent=t.name, rtt=r.rtt)
        return fanout.canonicalise(res, t.name)

    results = await fanout.fan_out_results(targets, one, fanout.host_error, reach)
    out: dict[str, Result] = {}
    for res in results:
        name = str(res["host"])
        out[name] = res
        tags = res.get("tags")
        if res.get("status") == "ok" and isinstance(tags, dict):
            clean = {str(k): str(v) for k, v in tags.items()}
            try:
                d.registry.update(name, tags=clean)
            except (RegistryError, LeaderOnlyRefused) as exc:
                logfmt.event("discovery-tags", logfmt.WARNING, agent=name, error=exc)
    return {"hosts": out}
