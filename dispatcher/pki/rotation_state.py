"""``rotation.json``: the dispatcher cert rotation state (spec 6.1).

Keys are upstream's: ``current_serial``, ``previous_serial`` (absent after retirement),
``rotated_at``, ``overlap_expires``, ``overlap_days`` and, after retirement,
``previous_retired``. Unknown keys are kept on a rewrite. Written 0640 through a
:class:`StateWriter`.

Ours: ``phase`` = ``announcing`` while a rotation is recorded (the new serial, its staged
key pair ``<cert>.next``/``<key>.next``, the old serial) but not yet finished (broadcast,
install); the key is absent once the new cert is installed. A new leader that finds
``announcing`` finishes the rotation or retires the orphan serial
(:mod:`dispatcher.ha.rotation_intent`). Upstream never reads the file written by us, and
our reader ignores a missing ``phase`` (an upstream file is a finished rotation).
"""

from __future__ import annotations

import calendar
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.common import logfmt
from dispatcher.statewrite import StateWriter, default_writer, write_json

STATE_MODE = 0o640
DAY = 86400
_ISO = "%Y-%m-%dT%H:%M:%SZ"
_KNOWN = (
    "current_serial",
    "previous_serial",
    "rotated_at",
    "overlap_expires",
    "overlap_days",
    "previous_retired",
    "phase",
)
ANNOUNCING = "announcing"


def format_iso(ts: float | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SSZ`` for epoch ``ts`` (default now)."""
    return time.strftime(_ISO, time.gmtime(time.time() if ts is None else ts))


def parse_iso(value: str) -> float | None:
    """Epoch seconds of an upstream ISO-8601 UTC string, None if it is not one."""
    try:
        return float(calendar.timegm(time.strptime(value, _ISO)))
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class RotationState:
    current_serial: str
    previous_serial: str | None  # None once retired (the key is then absent)
    rotated_at: str
    overlap_expires: str
    overlap_days: int
    previous_retired: str | None = None
    phase: str | None = None  # ANNOUNCING while the rotation is unfinished, else None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def new(
        cls, current_serial: str, previous_serial: str, overlap_days: int, now: float | None = None
    ) -> RotationState:
        """State written right after a rotation at ``now``."""
        now = time.time() if now is None else now
        return cls(
            current_serial=current_serial,
            previous_serial=previous_serial,
            rotated_at=format_iso(now),
            overlap_expires=format_iso(now + overlap_days * DAY),
            overlap_days=overlap_days,
        )

    @classmethod
    def from_json(cls, data: Any) -> RotationState:
        """Parse a decoded ``rotation.json``; ValueError if it is malformed."""
        if not isinstance(data, dict):
            raise ValueError("rotation state is not a JSON object")
        strings = {}
        for key in ("current_serial", "rotated_at", "overlap_expires"):
            value = data.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"{key} must be a string")
            strings[key] = value
        for key in ("previous_serial", "previous_retired", "phase"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string")
        days = data.get("overlap_days", 0)
        if isinstance(days, bool) or not isinstance(days, int | str):
            raise ValueError("overlap_days must be an integer")
        return cls(
            current_serial=strings["current_serial"],
            previous_serial=data.get("previous_serial"),
            rotated_at=strings["rotated_at"],
            overlap_expires=strings["overlap_expires"],
            overlap_days=int(days),
            previous_retired=data.get("previous_retired"),
            phase=data.get("phase"),
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )

    def to_json(self) -> dict[str, Any]:
        """Upstream's JSON object (``previous_serial`` absent once retired)."""
        out: dict[str, Any] = dict(self.extra)
        out.update(
            current_serial=self.current_serial,
            rotated_at=self.rotated_at,
            overlap_expires=self.overlap_expires,
            overlap_days=self.overlap_days,
        )
        if self.previous_serial is not None:
            out["previous_serial"] = self.previous_serial
        if self.previous_retired is not None:
            out["previous_retired"] = self.previous_retired
        if self.phase is not None:
            out["phase"] = self.phase
        return out

    @property
    def unfinished(self) -> bool:
        """A rotation recorded as intent whose new cert is not installed yet."""
        return self.phase == ANNOUNCING

    def announcing(self) -> RotationState:
        return replace(self, phase=ANNOUNCING)

    def finished(self) -> RotationState:
        return replace(self, phase=None)

    def overlap_expires_at(self) -> float | None:
        return parse_iso(self.overlap_expires)

    def overlap_over(self, now: float | None = None) -> bool:
        """True once ``now`` is past ``overlap_expires`` (False if that is unparseable)."""
        expires = self.overlap_expires_at()
        now = time.time() if now is None else now
        return expires is not None and now > expires

    def retirement_due(self, now: float | None = None) -> bool:
        """A previous serial is still trusted and the overlap window has passed."""
        return bool(self.previous_serial) and self.overlap_over(now)

    def retired(self, now: float | None = None) -> RotationState:
        """This state after retiring the previous serial at ``now``."""
        return replace(self, previous_serial=None, previous_retired=format_iso(now))


def load(path: str | Path) -> RotationState | None:
    """The state in ``path``; None if absent or corrupt (corrupt logs an ERROR)."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return RotationState.from_json(json.loads(raw))
    except ValueError as exc:  # includes JSON and UTF-8 decoding errors
        logfmt.event(
            "rotation-state-corrupt",
            logging.ERROR,
            path=str(path),
            error=exc,
            reason="JSON parse failed - rotation state unreadable",
        )
        return None


def save(state: RotationState, path: str | Path, writer: StateWriter | None = None) -> None:
    """Write ``state`` to ``path`` atomically (0640) through ``writer``."""
    write_json(
        writer if writer is not None else default_writer(), path, state.to_json(), STATE_MODE
    )
