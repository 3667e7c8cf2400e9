"""The instance's side of signed store records (:mod:`cluster.signing`).

:class:`Records` seals what this instance writes for its peers and opens what it reads
before acting: a record that fails verification or does not parse is logged once per
store key (``record-rejected``), counted per kind (``ctrl_exec_records_rejected_total``)
and ignored; the caller decides whether to delete it. The key is ``<ca_dir>/cluster.key``
(:data:`cluster.signing.KEY_FILE`), read again when the file changes (a generation may
carry a new one). Without it the instance refuses every record (fail closed) and says so
(:attr:`Records.problem`, shown by ``/status``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agent.common import logfmt
from cluster.signing import (
    KEY_FILE,
    KeyFile,
    RecordRejected,
    RecordSigner,
    Rejections,
    ensure_key,
)
from dispatcher.ha.leader_requests import REQUEST, RESULT
from dispatcher.ha.manifest import (
    ChunkGetter,
    Generation,
    ManifestError,
    decode_generation,
    encode_generation,
)

ev = logfmt.event
__all__ = ["GENERATION", "ORDER", "PAUSED", "REQUEST", "RESULT", "SWITCHOVER", "Records",
           "key_path"]  # fmt: skip

# record kinds (the MAC binds the kind and the store key)
GENERATION = "generation"
ORDER = "order"
SWITCHOVER = "switchover"
PAUSED = "paused"


def key_path(ca_dir: str | Path) -> Path:
    return Path(ca_dir) / KEY_FILE


class Records:
    def __init__(self, signer: RecordSigner, instance_id: str = "",
                 keyfile: KeyFile | None = None) -> None:  # fmt: skip
        self.signer = signer
        self.instance_id = instance_id
        self.keyfile = keyfile
        self.rejections = Rejections()
        self._warned_nokey = False

    @classmethod
    def for_ca_dir(cls, ca_dir: str | Path, instance_id: str = "") -> Records:
        kf = KeyFile(key_path(ca_dir))
        return cls(RecordSigner(kf), instance_id, kf)

    @property
    def problem(self) -> str | None:
        """Why this instance cannot verify records (None: it can)."""
        if self.signer.available:
            return None
        where = self.keyfile.error if self.keyfile is not None else ""
        return f"no cluster key ({where or 'none configured'}): every store record is refused"

    def create_key(self) -> bool:
        """Create the key file when there is none (the leader of a cluster that has
        published nothing yet); True when this call created it."""
        if self.keyfile is None or self.signer.available:
            return False
        try:
            _, created = ensure_key(self.keyfile.path)
        except (OSError, ValueError) as exc:
            ev("cluster-key", logging.ERROR, instance=self.instance_id,
               path=str(self.keyfile.path), error=exc)  # fmt: skip
            return False
        if created:
            ev("cluster-key", instance=self.instance_id, path=str(self.keyfile.path),
               result="created", reason="the cluster has published nothing yet")  # fmt: skip
        return created

    def seal(self, kind: str, key: str, payload: Any) -> str:
        return self.signer.seal(kind, key, payload)

    def open(self, kind: str, key: str, raw: bytes | str | None, tag: str = "") -> Any | None:
        """The verified payload, or None (logged once per ``key`` + ``tag``, counted)."""
        try:
            return self.signer.open(kind, key, raw)
        except RecordRejected as exc:
            self.reject(exc, tag)
            return None

    def open_dict(self, kind: str, key: str, raw: bytes | str | None,
                  tag: str = "") -> dict[str, Any] | None:  # fmt: skip
        body = self.open(kind, key, raw, tag)
        if body is not None and not isinstance(body, dict):
            self.reject(RecordRejected(kind, key, "payload is not an object"), tag)
            return None
        return body

    def reject(self, exc: RecordRejected, tag: str = "") -> None:
        if tag:
            exc = RecordRejected(exc.kind, f"{exc.key}{tag}", exc.reason)
        self.rejections.note(exc, self._log)

    def _log(self, exc: RecordRejected) -> None:
        ev("record-rejected", logging.WARNING, instance=self.instance_id, kind=exc.kind,
           key=exc.key, reason=exc.reason)  # fmt: skip

    # -- generations ----------------------------------------------------------------------

    def seal_generation(self, key: str, g: Generation) -> tuple[str, dict[str, bytes]]:
        """The sealed head and its chunks (:func:`~dispatcher.ha.manifest.encode_generation`):
        the chunks need no seal, the sealed head names each by its sha256."""
        head, chunks = encode_generation(g)
        return self.seal(GENERATION, key, json.loads(head)), chunks

    def open_generation(
        self,
        key: str,
        raw: bytes | str | None,
        rev: int = 0,
        get_chunks: ChunkGetter | None = None,
    ) -> Generation | None:
        """The verified generation (its chunks read with ``get_chunks``; without it the
        head alone), or None (rejected: logged once per revision)."""
        body = self.open(GENERATION, key, raw, f"@{rev}")
        if body is None:
            return None
        try:
            return decode_generation(json.dumps(body), get_chunks)
        except ManifestError as exc:
            self.reject(RecordRejected(GENERATION, key, f"malformed: {exc}"), f"@{rev}")
            return None
