"""What ``ced history``/``ced show`` and ``GET /runs`` see: this instance's store, plus
(with etcd) every instance's summaries, newest first, each run once."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from agent.common.records import field, record
from dispatcher.history import records as hr
from dispatcher.history.store import HistoryStore, for_config

if TYPE_CHECKING:  # the etcd side is imported only with etcd configured
    from cluster.backend import KVBackend
    from dispatcher.config import DispatcherConfig

MAX_LIMIT = 1000


@record
class Page:
    runs: list[dict[str, Any]]
    next: str | None = None  # the cursor of the next page (a run key), None at the end
    warnings: list[str] = field(default_factory=list)


@contextlib.contextmanager
def cluster_of(cfg: DispatcherConfig) -> Iterator[tuple[KVBackend, Any] | None]:
    """The etcd backend and the record checker of ``cfg`` (None without etcd)."""
    if not cfg.etcd_endpoints:
        yield None
        return
    from dispatcher.ha.coordination import backend_from_config
    from dispatcher.ha.records import Records

    backend = backend_from_config(cfg, timeout=2.0)
    try:
        yield backend, Records.for_ca_dir(cfg.ca_dir, cfg.instance_id)
    finally:
        backend.close()


def listing(cfg: DispatcherConfig, flt: hr.Filter, limit: int, before: str | None = None,
            store: HistoryStore | None = None) -> Page:  # fmt: skip
    """Up to ``limit`` runs matching ``flt`` (keys below ``before``), newest first."""
    limit = max(1, min(limit, MAX_LIMIT))
    store = store or for_config(cfg)
    mine = list(itertools.islice(store.entries(flt, before), limit + 1))
    merged: dict[str, tuple[str, dict[str, Any]]] = {}
    warnings: list[str] = []
    with cluster_of(cfg) as cl:
        if cl is not None:
            from cluster.errors import BackendUnavailable

            try:
                for key, s in _shared(cl, flt, before):
                    merged.setdefault(str(s["reqid"]), (key, s))
            except BackendUnavailable as exc:
                warnings.append(f"etcd unreachable ({exc}): only this instance's runs are listed")
    for key, s in mine:  # this instance's own copy wins
        merged[str(s["reqid"])] = (key, s)
    ordered = sorted(merged.values(), key=lambda e: e[0], reverse=True)
    page = ordered[:limit]
    nxt = page[-1][0] if len(ordered) > limit else None
    return Page([s for _, s in page], nxt, warnings)


def _shared(cl: tuple[KVBackend, Any], flt: hr.Filter,
            before: str | None) -> Iterator[tuple[str, dict[str, Any]]]:  # fmt: skip
    from dispatcher.history import shared

    for key, s in shared.read(*cl):
        if (before is None or key < before) and flt.matches(s, key):
            yield key, s


def show(cfg: DispatcherConfig, reqid: str, store: HistoryStore | None = None) -> dict[str, Any]:
    """The full record of ``reqid``: from this instance, or fetched from its owner.

    Raises :class:`LookupError` (no such run), or the owner's
    :class:`~dispatcher.history.owner.OwnerUnreachable` / ``RecordGone``."""
    store = store or for_config(cfg)
    rec = store.load(reqid)
    if rec is not None:
        return rec
    with cluster_of(cfg) as cl:
        if cl is None:
            raise LookupError(f"no run {reqid} in this instance's history")
        from dispatcher.history import owner, shared

        s = shared.find(cl[0], cl[1], reqid)
        if s is None:
            raise LookupError(f"no run {reqid} in the cluster's history")
        if s.get("instance") == cfg.instance_id:
            raise LookupError(f"run {reqid} was made here, but its record is gone (retention)")
        return owner.fetch(cfg, cl[0], cl[1], s)
