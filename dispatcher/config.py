"""``ctrl-exec.conf``: upstream's flat keys plus DESIGN.md section 6.

Errors name ``file:line``. ``state_dir`` only sets defaults: upstream's explicit
``registry_dir`` and ``rotation_file`` win where set.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from agent.common import kvconf
from agent.common.errors import ConfigError
from agent.common.records import field, fields, record

DEFAULT_CONFIG = "/etc/ctrl-exec/ctrl-exec.conf"


def sanitise_id(name: str) -> str:
    """Upstream's dispatcher_id sanitising (spec 4.3)."""
    s = re.sub(r"[^A-Za-z0-9._-]", "-", name)
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)[:64]
    return s or "dispatcher"


@record
class DispatcherConfig:
    path: str = DEFAULT_CONFIG
    ca_dir: str = "/etc/ctrl-exec"
    state_dir: str = "/var/lib/ctrl-exec"
    cert: str = ""
    key: str = ""
    ca: str = ""
    registry_dir: str = ""
    rotation_file: str = ""
    auth_hook: str = ""
    auth_hook_timeout: float = 10.0
    api_auth_default: str = "deny"
    auth_deny_generic: bool = False
    api_port: int = 7445
    api_bind: str = "127.0.0.1"
    api_cert: str = ""
    api_key: str = ""
    api_client_ca: str = ""
    api_proxy_port: int = 0  # PROXY v2 API listener for HAProxy (0: off)
    api_proxy_sources: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    api_max_children: int = 64
    read_timeout: float = 60.0
    max_parallel: int = 256
    max_hosts: int = 5000
    cert_days: int = 365
    cert_renewal_days: int = 90
    cert_overlap_days: int = 30
    cert_check_interval: int = 14400
    dispatcher_id: str = ""
    service_user: str = "ctrl-exec"
    pairing_max_queue: int = 10
    pairing_timeout: int = 600
    pairing_rate_limit_volume: str = "10/60/300"
    pairing_rate_limit_disable: bool = False
    pairing_port: int = 7444
    pairing_bind: str = "0.0.0.0"
    health_port: int = 7446
    health_bind: str = "127.0.0.1"
    advertise_url: str = ""
    sync_mode: str = "push"
    sync_ack: str = "majority"  # leader-only changes answer once these members applied them
    sync_ack_timeout: float = 10.0  # seconds to wait for that before answering "not acked"
    drain_wait: float = 2.0  # seconds a draining instance keeps serving before it restarts
    etcd_endpoints: list[str] = field(default_factory=list)
    etcd_cacert: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    cluster_name: str = "ctrl-exec"
    instance_id: str = ""
    lease_ttl: float = 5.0
    log_target: str = "auto"
    warnings: list[str] = field(default_factory=list)

    def finish(self) -> DispatcherConfig:
        """Fill the derived defaults (call after setting keys)."""
        ca_dir, state = Path(self.ca_dir), Path(self.state_dir)
        self.cert = self.cert or str(ca_dir / "dispatcher.crt")
        self.key = self.key or str(ca_dir / "dispatcher.key")
        self.ca = self.ca or str(ca_dir / "ca.crt")
        self.registry_dir = self.registry_dir or str(state / "agents")
        self.rotation_file = self.rotation_file or str(state / "rotation.json")
        self.dispatcher_id = sanitise_id(self.dispatcher_id or socket.gethostname())
        self.instance_id = self.instance_id or socket.gethostname()
        return self

    @property
    def pairing_dir(self) -> str:
        return str(Path(self.state_dir) / "pairing")

    @property
    def locks_dir(self) -> str:
        return str(Path(self.state_dir) / "locks")

    @property
    def runs_dir(self) -> str:
        return str(Path(self.state_dir) / "runs")

    @property
    def pairing_pidfile(self) -> str:
        return str(Path(self.state_dir) / "pairing-mode.pid")


_ALIASES = {"timeout": "read_timeout"}
_FIELDS = {f.name: f for f in fields(DispatcherConfig) if f.name not in ("path", "warnings")}


def _convert(key: str, value: str, path: str, line: int) -> object:
    ftype = str(_FIELDS[key].type)
    try:
        if ftype == "int":
            return int(value)
        if ftype == "float":
            return float(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}", path, line) from None
    if ftype == "bool":
        return kvconf.is_true(value)
    if ftype.startswith("list"):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def load(path: str = DEFAULT_CONFIG, required: bool = True) -> DispatcherConfig:
    """Load ``path``. With ``required=False`` a missing file gives the defaults."""
    cfg = DispatcherConfig(path=path)
    try:
        text = kvconf.read_text(path)
    except ConfigError:
        if required:
            raise
        return cfg.finish()
    for key, (line, value) in kvconf.parse_flat(text, path).items():
        key = _ALIASES.get(key, key)
        if key not in _FIELDS:
            import difflib  # only for a typo: ``ced`` starts without it

            hint = difflib.get_close_matches(key, sorted(_FIELDS), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            cfg.warnings.append(f"{path}:{line}: unknown key '{key}' ignored{extra}")
            continue
        setattr(cfg, key, _convert(key, value, path, line))
    if cfg.api_auth_default not in ("deny", "allow"):
        raise ConfigError("api_auth_default must be deny or allow", path)
    if cfg.sync_mode not in ("push", "shared-fs"):
        raise ConfigError("sync_mode must be push or shared-fs", path)
    if cfg.sync_ack not in ("majority", "one", "none"):
        raise ConfigError("sync_ack must be majority, one or none", path)
    if not 0 < cfg.sync_ack_timeout <= 600:
        raise ConfigError("sync_ack_timeout must be between 0 and 600 seconds", path)
    if not 0 <= cfg.drain_wait <= 300:
        raise ConfigError("drain_wait must be between 0 and 300 seconds", path)
    return cfg.finish()
