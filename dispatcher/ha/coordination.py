"""The coordination backend of a config, and the identity values derived from it.

Kept light (no web framework, no etcd client until an etcd backend is built), so
``ced cluster ...`` can use it.
"""

from __future__ import annotations

from cluster.backend import KVBackend, make_backend
from dispatcher.config import DispatcherConfig, derived_advertise_url


def lease_ttl(cfg: DispatcherConfig) -> int:
    """The configured lease TTL as whole seconds (at least 1)."""
    return max(1, round(cfg.lease_ttl))


def advertise_url(cfg: DispatcherConfig) -> str:
    """``advertise_url``, or the API's own URL when it is not configured."""
    return derived_advertise_url(cfg)


def backend_from_config(cfg: DispatcherConfig, timeout: float | None = None) -> KVBackend:
    """etcd when ``etcd_endpoints`` is set, else the embedded backend in ``state_dir``.

    The default per-call timeout is a quarter of the lease TTL (0.3 to 1 s), so a dead
    etcd member costs a keep-alive round little of its margin.
    """
    if timeout is None:
        timeout = max(0.3, min(1.0, lease_ttl(cfg) / 4))
    return make_backend(
        etcd_endpoints=cfg.etcd_endpoints, state_dir=cfg.state_dir,
        cluster_name=cfg.cluster_name, etcd_cacert=cfg.etcd_cacert or None,
        etcd_cert=cfg.etcd_cert or None, etcd_key=cfg.etcd_key or None, timeout=timeout,
    )  # fmt: skip
