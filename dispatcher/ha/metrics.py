"""Prometheus view of an instance's cluster state, read at scrape time.

* ``ctrl_exec_cluster_is_leader`` (gauge): 1 while this instance leads with time to spare;
* ``ctrl_exec_leader_changes_total`` (counter): new epochs this instance has seen;
* ``ctrl_exec_lease_time_left_seconds`` (gauge): 0 when not leading;
* ``ctrl_exec_sync_generation`` (gauge): the config generation this instance runs;
* ``ctrl_exec_sync_published_generation`` (gauge): the generation published in the store
  (the sealed record the follower read, ``Syncer.sync_view``; without a syncer, the
  leader's member record, or this instance's own while it leads), absent while unknown;
  ``ctrl_exec_sync_lag_generations`` (gauge): how many generations this instance is behind
  it (0 when not behind or unknown); ``ctrl_exec_sync_diverged`` (gauge): 1 while the
  syncer says ``diverged`` (it cannot apply the published generation);
* ``ctrl_exec_cluster_epoch`` (gauge) and ``ctrl_exec_cluster_store_up`` (gauge: 1 while
  etcd, or the local store, answers);
* ``ctrl_exec_records_rejected_total{kind}`` (counter): store records this instance
  refused to act on (not sealed with the cluster key, or malformed; :mod:`cluster.signing`).

Requests by route and outcome are ``ctrl_exec_api_requests_total`` of the API app.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.backend import MemberInfo
from dispatcher.ha.role import RoleSnapshot

SyncView = Mapping[str, object]


def published_generation(
    snap: RoleSnapshot, members: Iterable[MemberInfo], view: SyncView | None = None
) -> int | None:
    """The published generation: the syncer's (``view``, the sealed record it read; None
    before its first read), else this instance's own while it leads, else the leader's
    member record (None while no leader is known)."""
    if view is not None:
        published = view.get("published")
        if view.get("state") == "unknown" or not isinstance(published, int):
            return None
        return published
    if snap.role == "leader":
        return snap.generation
    if snap.leader_id is None:
        return None
    for m in members:
        if m.instance_id == snap.leader_id:
            return m.generation
    return None


class ClusterCollector(Collector):
    def __init__(self, snapshot: Callable[[], RoleSnapshot], changes: Callable[[], int],
                 rejected: Callable[[], dict[str, int]] = dict,
                 members: Callable[[], Iterable[MemberInfo]] = tuple,
                 sync_view: Callable[[], SyncView] | None = None) -> None:  # fmt: skip
        self._snapshot = snapshot
        self._members = members
        self._sync_view = sync_view
        self._changes = changes
        self._rejected = rejected

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield GaugeMetricFamily(
            "ctrl_exec_cluster_is_leader",
            "1 while this instance leads the cluster with time to spare on its lease",
            value=1 if snap.role == "leader" else 0,
        )
        yield CounterMetricFamily(
            "ctrl_exec_leader_changes",
            "Leadership changes (new epochs) this instance has seen",
            value=self._changes(),
        )
        yield GaugeMetricFamily(
            "ctrl_exec_lease_time_left_seconds",
            "Seconds until the leader lease can expire (0 when not leading)",
            value=snap.lease_time_left or 0.0,
        )
        yield GaugeMetricFamily(
            "ctrl_exec_sync_generation",
            "Config generation this instance has applied",
            value=snap.generation,
        )
        view = self._sync_view() if self._sync_view is not None else None
        published = published_generation(snap, self._members(), view)
        pub = GaugeMetricFamily(
            "ctrl_exec_sync_published_generation",
            "Config generation the leader runs (absent while no leader is known)",
        )
        if published is not None:
            pub.add_metric([], published)
        yield pub
        yield GaugeMetricFamily(
            "ctrl_exec_sync_lag_generations",
            "Generations this instance is behind the leader (0 when not behind or unknown)",
            value=max(0, published - snap.generation) if published is not None else 0,
        )
        yield GaugeMetricFamily(
            "ctrl_exec_sync_diverged",
            "1 while this instance cannot apply the published generation (sync diverged)",
            value=1 if view is not None and view.get("state") == "diverged" else 0,
        )
        yield GaugeMetricFamily(
            "ctrl_exec_cluster_epoch", "Newest epoch this instance has seen", value=snap.epoch or 0
        )
        yield GaugeMetricFamily(
            "ctrl_exec_cluster_store_up",
            "1 while the coordination store (etcd or local) answers",
            value=1 if snap.etcd == "ok" else 0,
        )
        rejected = CounterMetricFamily(
            "ctrl_exec_records_rejected",
            "Store records refused: not sealed with the cluster key, or malformed",
            labels=["kind"],
        )
        for kind, n in sorted(self._rejected().items()):
            rejected.add_metric([kind], n)
        yield rejected

    def describe(self) -> Iterator[Metric]:
        return iter(())
