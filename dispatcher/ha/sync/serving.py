"""Any member: serve the files of the generation it runs to peers that fetch them.

``GET /cluster/files/<path>?generation=N`` (:mod:`dispatcher.api.cluster_routes`) asks
:meth:`PeerFiles.peer_serials` who may fetch and :meth:`PeerFiles.serve` for the content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from agent.common.serial import serial_to_hex
from dispatcher.config import DispatcherConfig
from dispatcher.ha.manifest import Entry, Layout, ManifestError
from dispatcher.ha.sync.state import AppliedState


def cert_serial(path: str) -> str:
    try:
        from dispatcher.pki.ca import cert_serial_hex

        return cert_serial_hex(path)
    except (OSError, ValueError):
        return ""


class PeerFiles:
    SERIALS_TTL = 1.0  # peer_serials reads the certificates at most this often

    def __init__(
        self,
        cfg: DispatcherConfig,
        layout: Layout,
        state: AppliedState,
        clock: Callable[[], float],
    ) -> None:
        self.cfg = cfg
        self.layout = layout
        self.state = state
        self._clock = clock
        self._serials: tuple[float, set[str]] = (0.0, set())

    def peer_serials(self) -> set[str]:
        """Serials a peer may present to fetch files: the cluster's current and previous
        dispatcher certificate (the previous one while a rotation's overlap runs)."""
        now = self._clock()
        at, cached = self._serials
        if cached and now - at < self.SERIALS_TTL:
            return cached
        out: set[str] = set()
        for path in (self.cfg.cert, f"{self.cfg.cert}.prev"):
            s = serial_to_hex(cert_serial(path))
            if s:
                out.add(s)
        try:
            from dispatcher.pki import rotation_state as rs

            state = rs.load(self.cfg.rotation_file)
        except Exception:
            state = None
        if state is not None:
            for value in (state.current_serial, state.previous_serial):
                if value and serial_to_hex(value):
                    out.add(serial_to_hex(value))
        self._serials = (now, out)
        return out

    def server_serials(self) -> set[str]:
        """Serials a peer's API may present when this instance fetches from it or forwards
        to it: :meth:`peer_serials`, plus this instance's own API certificate (instances
        that serve their API with a certificate other than the dispatcher's share one)."""
        out = set(self.peer_serials())
        if self.cfg.api_cert:
            s = serial_to_hex(cert_serial(self.cfg.api_cert))
            if s:
                out.add(s)
        return out

    def serve(self, logical: str, number: int) -> tuple[int, bytes | str, Entry | None]:
        """``(200, bytes, entry)`` for a file of generation ``number``, else an error."""
        g = self.state.applied
        pending = self.state.pending
        if pending is not None and pending.number == number:
            g = pending
        if g is None or g.number != number:
            have = g.number if g is not None else 0
            return 409, f"generation {number} is not served here (this instance runs {have})", None
        e = g.files.get(logical)
        if e is None:
            return 404, f"{logical} is not part of generation {number}", None
        try:
            data = self.layout.local(logical).read_bytes()
        except (OSError, ManifestError) as exc:
            return 409, f"cannot read {logical}: {exc}", None
        if len(data) != e.size or hashlib.sha256(data).hexdigest() != e.sha256:
            return 409, f"{logical} changed since generation {number}", None
        return 200, data, e
