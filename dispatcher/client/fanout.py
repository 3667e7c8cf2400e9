"""Parallel fan-out of one operation to many agents (upstream's engine).

At most ``max_parallel`` requests are in flight; every host has its own deadline that
starts when its request starts, so a dead or slow agent costs only its own timeout.
Results come back in target order, each keyed by the registry name, with upstream's
per-host result objects (spec 3.4).

How an operation reaches its agents is one :class:`Reach` (client context, per-host
timeout, ``max_parallel``, ``max_hosts``, session cache, I/O). The I/O is an
:class:`~dispatcher.client.io.AgentIO`: asyncio by default, or the blocking client of the
one-shot ``ced``; the result objects are built here for both. This module imports neither.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agent.common import logfmt
from agent.common.records import record
from dispatcher.client.io import AgentIO, resolve_io
from dispatcher.client.pins import COUNTERS
from dispatcher.client.wire import AgentRequest, TargetLike

if TYPE_CHECKING:
    import ssl

    from dispatcher.client.wire import AgentReply, SessionCache

MAX_HOSTS = 500
DEFAULT_MAX_PARALLEL = 64

Result = dict[str, Any]
R = TypeVar("R")
ev = logfmt.event

#: the outcome of one host (``counts`` keys); ``unknown`` is the resolver's, never the fan-out's
OK, FAILED, UNREACHABLE, DENIED, LOCKED, UNKNOWN = (
    "ok", "failed", "unreachable", "denied", "locked", "unknown")  # fmt: skip
OUTCOMES = (OK, FAILED, UNREACHABLE, DENIED, LOCKED, UNKNOWN)

#: called once per host as soon as its result is known (on a fan-out thread with the
#: blocking client): the result and its outcome
OnResult = Callable[[Result, str], None]

#: a host the failure budget kept from starting (dispatcher.rolling); not in OUTCOMES: only
#: a rolling run counts it
SKIPPED = "skipped"


class Gate(Protocol):
    """Asked before each host starts (:class:`dispatcher.rolling.Gate`)."""

    def admit(self) -> bool: ...

    def reason(self) -> str: ...


@record(frozen=True)
class Reach:
    """How one operation reaches its agents (the same for every host).

    ``ctx`` and ``timeout`` (per host, from the start of its request) go into every
    :class:`~dispatcher.client.wire.AgentRequest`; at most ``max_parallel`` requests are in
    flight; run, ping and result refuse more than ``max_hosts`` targets; ``sessions`` is the
    TLS session cache (None: the context's own); ``io`` the client (None: asyncio);
    ``max_output`` (0: no limit) the characters of each host's stdout and of its stderr
    kept in the results (the rest is dropped, ``stdout_truncated``/``stderr_truncated``).
    """

    ctx: ssl.SSLContext
    timeout: float
    max_parallel: int = DEFAULT_MAX_PARALLEL
    max_hosts: int = MAX_HOSTS
    sessions: SessionCache | None = None
    io: AgentIO | None = None
    observed: dict[str, tuple[str, str]] | None = None
    max_output: int = 0

    async def call(
        self, t: TargetLike, method: str, path: str, body: dict[str, Any] | None
    ) -> AgentReply:
        """One request to ``t``; never raises for transport or HTTP failures.

        The agent's certificate is checked against the target's pins (if it has any);
        with ``observed``, the ``(serial, pubkey_sha256)`` of every agent that answered
        is kept there by registry name (for the leader to pin or promote).
        """
        req = AgentRequest.to(t, method, path, body, self.ctx, self.timeout, self.sessions)
        reply = await resolve_io(self.io).call(req)
        if reply.code is not None and reply.peer is not None:
            if self.observed is not None:
                self.observed[t.name] = reply.peer
            if req.pins is None and hasattr(t, "pins"):
                COUNTERS.accepted_unpinned(t.name)
        return reply

    def check_hosts(self, targets: Sequence[TargetLike]) -> None:
        if len(targets) > self.max_hosts:
            raise ValueError(f"too many hosts (max {self.max_hosts})")


async def fan_out(
    targets: Sequence[TargetLike],
    fn: Callable[[TargetLike], Awaitable[R]],
    max_parallel: int,
    on_error: Callable[[TargetLike, Exception], R] | None = None,
    *,
    io: AgentIO | None = None,
) -> list[R]:
    """``fn`` for every target, ``max_parallel`` at a time; results in target order.

    An exception from ``fn`` becomes ``on_error(target, exc)``; without ``on_error`` the
    first one is raised once every target has finished.
    """
    done = await resolve_io(io).gather([partial(fn, t) for t in targets], max(1, int(max_parallel)))
    out: list[R] = []
    for t, r in zip(targets, done, strict=True):
        if isinstance(r, BaseException):
            if on_error is None or not isinstance(r, Exception):
                raise r
            out.append(on_error(t, r))
        else:
            out.append(r)
    return out


def canonicalise(result: Result, name: str) -> Result:
    """Key the result by the registry name; keep ``reported_hostname`` only if it differs."""
    result["host"] = name
    reported = result.get("reported_hostname")
    if reported is not None and (reported == "" or reported == name):
        del result["reported_hostname"]
    return result


def _from_body(name: str, reply: AgentReply, fallback: Result) -> Result:
    res: Result = {"host": name}
    res.update(reply.body if reply.body is not None else fallback)
    return res


def _reported(res: Result, reply: AgentReply) -> None:
    if reply.body is not None:
        h = reply.body.get("host")
        if h is not None and h != "":
            res["reported_hostname"] = h


def _target(t: TargetLike) -> str:
    return f"{t.address}:{t.port}"


async def fan_out_results(
    targets: Sequence[TargetLike],
    one: Callable[[TargetLike], Awaitable[Result]],
    failed: Callable[[str, str, str], Result],
    reach: Reach,
) -> list[Result]:
    """The fan-out of one operation: ``one(target)`` for every target, in target order.

    ``reach`` gives ``max_parallel`` and the I/O (``max_hosts`` is the caller's to check).

    ``failed(name, error, rtt)`` is what the operation answers when an agent could not;
    an exception from ``one`` becomes ``failed(name, "internal error: <exc>", "0ms")``.
    """

    def internal(t: TargetLike, exc: Exception) -> Result:
        return failed(t.name, f"internal error: {exc}", "0ms")

    return await fan_out(targets, one, reach.max_parallel, internal, io=reach.io)


def _watched(
    one: Callable[[TargetLike], Awaitable[tuple[Result, str]]],
    failed: Callable[[str, str, str], Result],
    on_result: OnResult | None,
    gate: Gate | None = None,
    skipped: Callable[[str, str], Result] | None = None,
) -> Callable[[TargetLike], Awaitable[Result]]:
    """``one`` that reports each result and its outcome to ``on_result`` as it finishes
    (an exception from ``one`` is the ``failed`` result, outcome ``failed``); a host the
    ``gate`` does not admit is ``skipped(name, reason)``, outcome ``skipped``."""

    async def watched(t: TargetLike) -> Result:
        try:
            if gate is not None and skipped is not None and not gate.admit():
                res, outcome = skipped(t.name, gate.reason()), SKIPPED
            else:
                res, outcome = await one(t)
        except Exception as exc:
            res, outcome = failed(t.name, f"internal error: {exc}", "0ms"), FAILED
        if on_result is not None:
            on_result(res, outcome)
        return res

    return watched


_DENIED_ERRORS = ("script not permitted", "not authorised", "forbidden")


def run_outcome(res: Result, reply: AgentReply | None, async_: bool) -> str:
    """What one ``/run`` came to: no answer is ``unreachable``; the agent refusing the
    script or the dispatcher is ``denied``; a busy script is ``locked``."""
    if reply is None or reply.code is None:
        return UNREACHABLE
    error = res.get("error")
    if async_:
        status = res.get("status")
        if status == "accepted":
            return OK
        if status == "busy" or reply.code == 409:
            return LOCKED
    elif res.get("exit") == 0 and not isinstance(res.get("exit"), bool):
        return OK
    if reply.code == 403 or (isinstance(error, str) and error.startswith(_DENIED_ERRORS)):
        return DENIED
    return FAILED


def host_error(name: str, error: str, rtt: str) -> Result:
    """A ping (or discovery) without an agent's answer."""
    return {"host": name, "status": "error", "error": error, "rtt": rtt}


# ----- /run ------------------------------------------------------------------------------


def _run_failed(
    script: str, reqid: str, async_: bool, name: str, error: str, rtt: str, status: str = "error"
) -> Result:
    """A run without an agent's answer: ``status`` when async, else exit -1."""
    res: Result = {"host": name, "script": script}
    if async_:
        res["status"] = status
    else:
        res["exit"] = -1
    res.update({"error": error, "rtt": rtt, "reqid": reqid})
    return res


def run_skipped(script: str, reqid: str, name: str, reason: str) -> Result:
    """A host of a rolling run that was never started (``status: skipped``)."""
    return {"host": name, "script": script, "exit": -1, "status": SKIPPED, "error": reason,
            "rtt": "0ms", "reqid": reqid}  # fmt: skip


async def run_one(
    t: TargetLike,
    script: str,
    args: Sequence[str],
    reqid: str,
    username: str,
    token: str,
    reach: Reach,
    async_: bool = False,
) -> Result:
    res, _ = await _run_one(t, script, args, reqid, username, token, reach, async_)
    return res


async def _run_one(
    t: TargetLike,
    script: str,
    args: Sequence[str],
    reqid: str,
    username: str,
    token: str,
    reach: Reach,
    async_: bool = False,
) -> tuple[Result, str]:
    body: dict[str, Any] = {
        "script": script, "args": list(args), "reqid": reqid, "username": username,
        "token": token,
    }  # fmt: skip
    if async_:
        body["async"] = True
    r = await reach.call(t, "POST", "/run", body)
    action = "run-async" if async_ else "run"
    if async_ and r.code == 409:
        err = r.body.get("error") if r.body is not None else None
        ev(action, logfmt.WARNING, script=script, target=_target(t), status="busy", rtt=r.rtt,
           reqid=reqid)  # fmt: skip
        busy = err if err is not None else "script already running"
        return _run_failed(script, reqid, async_, t.name, busy, r.rtt, "busy"), LOCKED
    if r.error:
        ev(action, logfmt.ERROR, script=script, target=_target(t), error=r.error, rtt=r.rtt,
           reqid=reqid)  # fmt: skip
        res = _run_failed(script, reqid, async_, t.name, r.error, r.rtt)
        return res, run_outcome(res, r, async_)
    if async_:
        res = _from_body(t.name, r, {"status": "error", "error": "invalid JSON response"})
        ev(action, script=script, target=_target(t), status=res.get("status", "accepted"),
           rtt=r.rtt, reqid=reqid)  # fmt: skip
    else:
        res = _from_body(t.name, r, {"exit": -1, "error": "invalid JSON response"})
        _reported(res, r)
        ev(action, script=script, target=_target(t), exit=res.get("exit"), rtt=r.rtt,
           reqid=reqid)  # fmt: skip
    res["rtt"] = r.rtt
    if res.get("reqid") is None:
        res["reqid"] = reqid
    if reach.max_output > 0:
        cap_output(res, reach.max_output)
    return canonicalise(res, t.name), run_outcome(res, r, async_)


def cap_output(res: Result, limit: int) -> None:
    """Keep at most ``limit`` characters of ``stdout`` and of ``stderr`` (memory per host
    stays bounded however many hosts a run has); flag what was cut as the agent does."""
    for key in ("stdout", "stderr"):
        text = res.get(key)
        if isinstance(text, str) and len(text) > limit:
            res[key] = text[:limit]
            res[f"{key}_truncated"] = True


async def run_all(
    targets: Sequence[TargetLike],
    script: str,
    args: Sequence[str],
    reqid: str,
    username: str,
    token: str,
    reach: Reach,
    async_: bool = False,
    on_result: OnResult | None = None,
    gate: Gate | None = None,
) -> list[Result]:
    """``POST /run`` on every target (``async_``: submit detached, collect acceptance);
    ``on_result`` hears of each host as it finishes; ``gate`` may keep hosts from starting."""
    reach.check_hosts(targets)
    ev("dispatch", script=script, hosts=",".join(t.name for t in targets), reqid=reqid,
       mode="async" if async_ else "sync")  # fmt: skip
    failed = partial(_run_failed, script, reqid, async_)
    one = _watched(lambda t: _run_one(t, script, args, reqid, username, token, reach, async_),
                   failed, on_result, gate, partial(run_skipped, script, reqid))  # fmt: skip
    return await fan_out_results(targets, one, failed, reach)


# ----- /ping -----------------------------------------------------------------------------


async def ping_one(t: TargetLike, reqid: str, reach: Reach) -> Result:
    res, _ = await _ping_one(t, reqid, reach)
    return res


def _ping_outcome(res: Result, r: AgentReply) -> str:
    if r.code is None:
        return UNREACHABLE
    if res.get("status") == "ok":
        return OK
    return DENIED if r.code == 403 else FAILED


async def _ping_one(t: TargetLike, reqid: str, reach: Reach) -> tuple[Result, str]:
    r = await reach.call(t, "POST", "/ping", {"reqid": reqid})
    if r.error:
        ev("ping", logfmt.ERROR, target=_target(t), error=r.error, rtt=r.rtt, reqid=reqid)
        return host_error(t.name, r.error, r.rtt), _ping_outcome({}, r)
    res = _from_body(t.name, r, {"status": "error", "error": "invalid JSON"})
    _reported(res, r)
    res["rtt"] = r.rtt
    ev("ping", target=_target(t), result="ok", rtt=r.rtt, reqid=reqid)
    return canonicalise(res, t.name), _ping_outcome(res, r)


def ping_skipped(name: str, reason: str) -> Result:
    """A host of a rolling ping that was never asked (``status: skipped``)."""
    return {"host": name, "status": SKIPPED, "error": reason, "rtt": "0ms"}


async def ping_all(
    targets: Sequence[TargetLike],
    reqid: str,
    reach: Reach,
    on_result: OnResult | None = None,
    gate: Gate | None = None,
) -> list[Result]:
    """``POST /ping`` on every target; ``on_result`` hears of each host as it finishes."""
    reach.check_hosts(targets)
    one = _watched(lambda t: _ping_one(t, reqid, reach), host_error, on_result, gate,
                   ping_skipped)  # fmt: skip
    return await fan_out_results(targets, one, host_error, reach)


# ----- GET /result/<reqid> -----------------------------------------------------------------


def _result_failed(reqid: str, name: str, error: str, rtt: str) -> Result:
    return {"host": name, "status": "error", "error": error, "reqid": reqid, "rtt": rtt}


async def result_one(t: TargetLike, reqid: str, reach: Reach) -> Result:
    r = await reach.call(t, "GET", f"/result/{reqid}", None)
    if r.code == 404:
        return {"host": t.name, "status": "unknown", "reqid": reqid, "rtt": r.rtt}
    if r.error:
        ev("result", logfmt.ERROR, target=_target(t), error=r.error, rtt=r.rtt, reqid=reqid)
        return _result_failed(reqid, t.name, r.error, r.rtt)
    res = _from_body(t.name, r, {"status": "error", "error": "invalid JSON"})
    res["rtt"] = r.rtt
    if res.get("reqid") is None:
        res["reqid"] = reqid
    ev("result", target=_target(t), status=res.get("status", "unknown"), rtt=r.rtt, reqid=reqid)
    return canonicalise(res, t.name)


async def result_all(targets: Sequence[TargetLike], reqid: str, reach: Reach) -> list[Result]:
    """``GET /result/<reqid>`` on every target (async run progress)."""
    reach.check_hosts(targets)
    return await fan_out_results(targets, lambda t: result_one(t, reqid, reach),
                                 partial(_result_failed, reqid), reach)  # fmt: skip
