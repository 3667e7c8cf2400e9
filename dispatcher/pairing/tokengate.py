"""The pairing listener's use of pairing tokens (:mod:`dispatcher.pairing.tokens`).

An agent started with ``request-pairing --token-file F`` sends the token in the request
body's ``pairing_token`` field, which upstream dispatchers ignore (they read ``csr``,
``hostname`` and the hints only); an agent without a token sends no such field and pairs
exactly as upstream: a 6-digit code and an operator's decision.

Per request carrying a token, on the leader's listener (blocking calls, run off the event
loop):

1. :meth:`TokenGate.claim` before the request is queued: a valid, unused, unexpired token
   is marked used by this request id (atomic: two agents with one token, one claim wins);
2. the request is queued (with a claim, not held to ``pairing_max_queue`` and
   ``pairing_max_per_source``: the token bounds it); when it cannot be queued, or the
   agent is gone before its ``pending`` answer, the claim is
   :meth:`released <TokenGate.release>` (the token is unused again);
3. :meth:`TokenGate.settle`, once the agent has its ``pending`` answer (outside the
   listener's read deadline): with a claim, the request is approved at once (signed,
   registered with the token's tags) and logged ``ACTION=pair-auto TOKEN_ID=...``; the
   listener then delivers the approval as any other. Without one (malformed, unknown,
   forged, revoked, expired or used token; a name already registered, unless the token
   was created with ``--re-pair``) ``pair-token-refuse`` is logged with the reason and the
   request stays pending for an operator (the loser of a race for one token too).

Brute force: a client address whose tokens were refused ``FAIL_LIMIT`` times within
``FAIL_WINDOW`` seconds has its further tokens ignored without being looked at (reason
``rate-limited``) until the window passes; every refusal is counted
(:attr:`TokenGate.refused`, by reason). Guessing is hopeless anyway (256-bit secrets),
and the listener's per-address connection limit bounds the attempts before this does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from agent.common.logfmt import event
from dispatcher.config import DispatcherConfig
from dispatcher.pairing import queue as pq
from dispatcher.pairing import tokens
from dispatcher.registry import Registry
from dispatcher.statewrite import StateWriter

FIELD = "pairing_token"
NO_CAP = 1_000_000  # the queue size a token-bearing request is held to (none, in effect)
FAIL_LIMIT = 5
FAIL_WINDOW = 600.0
MAX_TRACKED = 10_000  # client addresses remembered for the failure count


@dataclass(frozen=True)
class Claimed:
    """The outcome of :meth:`TokenGate.claim`: ``ok`` with the token's id and tags, or the
    reason the token approves nothing."""

    ok: bool
    token_id: str = ""
    reason: str = ""
    source_ip: str = ""
    tags: dict[str, str] = field(default_factory=dict)


class TokenGate:
    def __init__(self, cfg: DispatcherConfig, writer: StateWriter) -> None:
        self.cfg = cfg
        self.writer = writer
        self.refused: Counter[str] = Counter()
        self.approved = 0
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _limited(self, ip: str, now: float) -> bool:
        with self._lock:
            times = self._fails.get(ip)
            if times is None:
                return False
            while times and times[0] <= now - FAIL_WINDOW:
                times.popleft()
            if not times:
                del self._fails[ip]
            return len(times) >= FAIL_LIMIT

    def _failed(self, ip: str, now: float) -> None:
        with self._lock:
            if ip not in self._fails and len(self._fails) >= MAX_TRACKED:
                self._fails.pop(next(iter(self._fails)))
            self._fails.setdefault(ip, deque(maxlen=FAIL_LIMIT)).append(now)

    def claim(self, token: Any, *, reqid: str, hostname: str, source_ip: str) -> Claimed:
        now = time.time()
        if self._limited(source_ip, now):
            return Claimed(False, reason="rate-limited", source_ip=source_ip)
        registered = pq.valid_hostname(hostname) and (
            Registry(self.cfg.registry_dir).get(hostname) is not None
        )
        try:
            got = tokens.claim(self.cfg.ca_dir, token, reqid=reqid, hostname=hostname,
                               source_ip=source_ip, registered=registered, writer=self.writer,
                               now=now)  # fmt: skip
        except tokens.TokenRefused as exc:
            if exc.reason in ("malformed", "unknown", "forged"):
                self._failed(source_ip, now)
            return Claimed(False, exc.token_id, exc.reason, source_ip)
        except tokens.TokenError as exc:  # a damaged store: nothing approves
            event("pair-token-error", logging.ERROR, reqid=reqid, reason=str(exc))
            return Claimed(False, reason="store-error", source_ip=source_ip)
        return Claimed(True, got.token_id, "", source_ip, got.tags)

    def release(self, claim: Claimed, reqid: str) -> None:
        if claim.ok:
            tokens.release(self.cfg.ca_dir, claim.token_id, reqid, writer=self.writer)

    def settle(self, claim: Claimed, record: dict[str, Any]) -> None:
        """Approve the queued ``record`` with its claim, or log why the token did not."""
        reqid = str(record.get("id", ""))
        name = str(record.get("hostname", ""))
        if not claim.ok:
            self.refused[claim.reason] += 1
            event("pair-token-refuse", logging.WARNING, agent=name, ip=claim.source_ip,
                  reqid=reqid, token_id=claim.token_id or None, reason=claim.reason,
                  status="pending")  # fmt: skip
            return
        try:
            res = pq.approve(self.cfg, reqid, writer=self.writer, tags=claim.tags or None)
        except Exception as exc:  # the request stays pending; the token stays used
            event("pair-auto-fail", logging.ERROR, agent=name, reqid=reqid,
                  token_id=claim.token_id, reason=f"{exc.__class__.__name__}: {exc}")  # fmt: skip
            return
        self.approved += 1
        event("pair-auto", agent=name, ip=res.ip, reqid=reqid, token_id=claim.token_id)
