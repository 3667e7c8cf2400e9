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

    Raises a :class:`ConfigError` (``etcd_password_file``'s line) for an unusable password
    file.

    The default per-call timeout is a quarter of the lease TTL (0.3 to 1 s), so a dead
    etcd member costs a keep-alive round little of its margin.
    """
    if timeout is None:
        timeout = max(0.3, min(1.0, lease_ttl(cfg) / 4))
    return make_backend(
        etcd_endpoints=cfg.etcd_endpoints, state_dir=cfg.state_dir,
        cluster_name=cfg.cluster_name, etcd_cacert=cfg.etcd_cacert or None,
        etcd_cert=cfg.etcd_cert or None, etcd_key=cfg.etcd_key or None,
        etcd_user=cfg.etcd_user or None, etcd_password=etcd_password(cfg), timeout=timeout,
    )  # fmt: skip


def etcd_password(cfg: DispatcherConfig) -> str | None:
    """The password of ``etcd_password_file`` (None without it); a :class:`ConfigError`
    naming that line when the file is missing, empty or readable by others."""
    if not (cfg.etcd_endpoints and cfg.etcd_password_file):
        return None
    from cluster.credentials import PasswordFileError, read_password_file

    try:
        return read_password_file(cfg.etcd_password_file)
    except PasswordFileError as exc:
        raise cfg.error("etcd_password_file", f"etcd_password_file: {exc}") from None
