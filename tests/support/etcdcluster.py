"""Real etcd members for tests: the launcher lives in :mod:`ops.lab.etcd` (the demo uses it)."""

from __future__ import annotations

from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster, Member, TLSFiles

__all__ = ["ETCD", "SKIP_REASON", "EtcdCluster", "Member", "TLSFiles"]
