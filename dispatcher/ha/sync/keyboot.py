"""A follower without the cluster key fetches it once, from a verified peer.

An instance started from a copy of the CA directory made before the cluster key existed
cannot verify any generation (it refuses them all: fail closed). It may take the key
from the generation's publisher, or a member that applied it, only when:

* the peer's TLS certificate carries a dispatcher serial of the cluster (the fetcher's
  check: an agent certificate or a forged member record gets nothing);
* the file matches the size and sha256 the (still unverified) generation lists for
  ``ca/cluster.key``; and
* the fetched key verifies that generation's MAC (it is the key the leader sealed with).

Only then is the key written (atomically, 0600) and the generation applied as usual.
"""

from __future__ import annotations

import contextlib
import json
import logging

from agent.common import logfmt
from cluster.signing import KEY_FILE, RecordRejected, RecordSigner, parse_key, write_key
from dispatcher.ha.manifest import Layout, ManifestError, decode_generation
from dispatcher.ha.records import GENERATION, Records
from dispatcher.ha.sync.fetcher import Conns, Fetcher
from dispatcher.ha.sync.state import SyncError
from dispatcher.ha.sync.store import GenerationStore

ev = logfmt.event
LOGICAL = f"ca/{KEY_FILE}"


def bootstrap_key(records: Records, fetcher: Fetcher, layout: Layout, store_key: str,
                  raw: bytes, store: GenerationStore) -> bool:  # fmt: skip
    """True when the key was fetched, verified against ``raw`` and written."""
    if records.signer.available:
        return False
    try:
        doc = json.loads(raw)
        g = decode_generation(json.dumps(doc["body"]), store.chunks)  # not verified yet
    except (ValueError, KeyError, TypeError, ManifestError):
        return False
    e = g.files.get(LOGICAL)
    if e is None:
        return False
    conns: Conns = {}
    try:
        data, source = fetcher.fetch(fetcher.sources(g), conns, e, g.number)
    except SyncError as exc:
        ev("cluster-key", logging.WARNING, instance=fetcher.me, result="bootstrap-failed",
           error=exc)  # fmt: skip
        return False
    finally:
        for conn in conns.values():
            with contextlib.suppress(OSError):
                conn.close()
    try:
        key = parse_key(data, LOGICAL)
        RecordSigner(key).open(GENERATION, store_key, raw)
    except (ValueError, RecordRejected) as exc:
        ev("cluster-key", logging.WARNING, instance=fetcher.me, result="bootstrap-refused",
           source=source, reason=f"the fetched key does not seal the generation: {exc}")  # fmt: skip
        return False
    path = layout.local(LOGICAL)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_key(path, key)
    ev("cluster-key", instance=fetcher.me, result="bootstrapped", source=source,
       generation=g.number, path=str(path))  # fmt: skip
    return True
