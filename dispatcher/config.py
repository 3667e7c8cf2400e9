"""``ctrl-exec.conf``: upstream's flat keys plus DESIGN.md section 6.

Errors name ``file:line``. ``state_dir`` only sets defaults: upstream's explicit
``registry_dir`` and ``rotation_file`` win where set.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from agent.common import kvconf
from agent.common.errors import ConfigError
from agent.common.records import field, fields, record

DEFAULT_CONFIG = "/etc/ctrl-exec/ctrl-exec.conf"
CONFIG_ENV = "CTRL_EXEC_CONFIG"  # overrides DEFAULT_CONFIG for ced and ctrl-exec-api


def default_config_path() -> str:
    """``$CTRL_EXEC_CONFIG`` when set, else :data:`DEFAULT_CONFIG`."""
    return os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG


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
    api_names: list[str] = field(default_factory=list)  # subjectAltName of the API cert
    api_require_client_cert: bool = False  # yes: no API request without an operator cert
    api_proxy_port: int = 0  # PROXY v2 API listener for HAProxy (0: off)
    api_proxy_sources: list[str] = field(default_factory=lambda: ["127.0.0.1"])
    api_max_children: int = 64
    api_header_timeout: float = 10.0  # seconds to send a request's head once connected
    api_max_conns_per_ip: int = 64  # open API connections per client IP (PROXY v2: the real one)
    read_timeout: float = 60.0
    max_parallel: int = 256
    max_hosts: int = 5000
    # characters of each host's stdout and of its stderr kept in a run's results (0: all,
    # as upstream); bounds a large fan-out's memory (agents cap each at their max_output)
    max_result_output: int = 0
    cert_days: int = 365
    cert_renewal_days: int = 90
    cert_overlap_days: int = 30
    cert_check_interval: int = 14400
    dispatcher_id: str = ""
    service_user: str = "ctrl-exec"
    pairing_max_queue: int = 10
    pairing_max_per_source: int = 3  # pending pairing requests per client address (0: off)
    pairing_timeout: int = 600
    pairing_rate_limit_volume: str = "10/60/300"
    pairing_rate_limit_disable: bool = False
    pairing_port: int = 7444
    pairing_bind: str = "0.0.0.0"
    # PROXY v2 pairing listener for HAProxy (0: off); peers from api_proxy_sources only
    pairing_proxy_port: int = 0
    # with etcd unreachable: run under the local lock alone ("local") or refuse ("refuse")
    run_lock_without_etcd: str = "local"
    health_port: int = 7446
    # job history (dispatcher/history/): arguments kept or only their SHA-256 ("hash"),
    # retention by age (seconds) and count, and the bytes of each host's stdout/stderr kept
    history_args: str = "keep"
    history_max_age: int = 30 * 86400
    history_max_runs: int = 10000
    history_output_max: int = 65536
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
    etcd_user: str = ""  # etcd's own authentication (with etcd_password_file)
    etcd_password_file: str = ""  # first line: the password; not readable by others
    etcd_insecure: bool = False  # allow http:// etcd endpoints on non-loopback addresses
    cluster_name: str = "ctrl-exec"
    instance_id: str = ""
    lease_ttl: float = 5.0
    log_target: str = "auto"
    log_format: str = "kv"  # kv (KEY=value lines) or json (one object per line)
    warnings: list[str] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line in the file

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

    def error(self, key: str, message: str) -> ConfigError:
        """A :class:`ConfigError` naming this file and the line of ``key`` (if set there)."""
        return ConfigError(message, self.path, self.lines.get(key))

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
_FIELDS = {
    f.name: f for f in fields(DispatcherConfig) if f.name not in ("path", "warnings", "lines")
}
# upstream keys that upstream itself does not use: accepted with a warning
_IGNORED = {"port": "not used (as upstream: give the agent port with --port)"}

#: Keys that only mean something in an etcd cluster. Set (to a non-empty value) without a
#: usable ``etcd_endpoints`` they are an error: the instance would run the embedded
#: backend, lead alone and sign beside the real cluster.
CLUSTER_KEYS = (
    "cluster_name", "instance_id", "lease_ttl", "advertise_url", "sync_mode",
    "sync_ack", "sync_ack_timeout", "etcd_cacert", "etcd_cert", "etcd_key",
    "etcd_user", "etcd_password_file", "etcd_insecure",
)  # fmt: skip


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


def is_loopback_host(host: str) -> bool:
    """``localhost`` (and ``*.localhost``), 127.0.0.0/8 and ``::1``; names are not resolved."""
    import ipaddress

    h = host.strip("[]").lower().rstrip(".")
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def parse_url(url: str, what: str, default_scheme: str | None = None) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an ``http``/``https`` URL; ValueError naming ``what``.

    With ``default_scheme`` a bare ``host:port`` is accepted (etcdctl's form).
    """
    from urllib.parse import urlsplit

    raw = url.strip()
    if default_scheme and "://" not in raw:
        raw = f"{default_scheme}://{raw}"
    bad = ValueError(f"{what} {url!r} is not a usable URL (http[s]://host[:port])")
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise bad
    if port == 0:
        raise bad
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def derived_advertise_url(cfg: DispatcherConfig) -> str:
    """What the instance advertises: ``advertise_url``, or the API's own URL."""
    if cfg.advertise_url:
        return cfg.advertise_url.rstrip("/")
    scheme = "https" if cfg.api_cert and cfg.api_key else "http"
    host = cfg.api_bind
    if host in ("", "0.0.0.0", "::"):
        host = socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{cfg.api_port}"


def _cluster_problems(cfg: DispatcherConfig, raw: dict[str, tuple[int, str]]) -> list[ConfigError]:
    """The rules of DESIGN.md section 3 that keep a typo from changing the topology."""
    path = cfg.path
    out: list[ConfigError] = []
    ep_line = cfg.lines.get("etcd_endpoints")
    endpoints_ok = bool(cfg.etcd_endpoints)
    for url in cfg.etcd_endpoints:
        try:
            parse_url(url, "etcd_endpoints entry", "http")
        except ValueError as exc:
            out.append(ConfigError(str(exc), path, ep_line))
            endpoints_ok = False
    if not cfg.etcd_endpoints:
        present = [k for k in CLUSTER_KEYS if k in raw and raw[k][1].strip()]
        for key in sorted(present, key=lambda k: raw[k][0]):
            out.append(ConfigError(
                f"{key} is set but etcd_endpoints is not: without etcd this instance would "
                "run the embedded backend and lead alone beside any real cluster (set "
                f"etcd_endpoints, or remove {key})", path, raw[key][0],
            ))  # fmt: skip
        return out
    if cfg.advertise_url:
        try:
            parse_url(cfg.advertise_url, "advertise_url")
        except ValueError as exc:
            out.append(ConfigError(str(exc), path, cfg.lines.get("advertise_url")))
            return out
    if not endpoints_ok:
        return out
    out.extend(_etcd_access_problems(cfg))
    remote = _remote_etcd(cfg)
    if remote and cfg.advertise_url:
        host = parse_url(cfg.advertise_url, "advertise_url")[1]
        if is_loopback_host(host):
            out.append(ConfigError(
                f"advertise_url {cfg.advertise_url} is a loopback address but etcd is not "
                f"({remote}): peers on other hosts cannot reach this instance; advertise "
                "an address they reach", path, cfg.lines.get("advertise_url"),
            ))  # fmt: skip
    return out


def _etcd_access_problems(cfg: DispatcherConfig) -> list[ConfigError]:
    """Plain HTTP to etcd only on loopback (unless ``etcd_insecure``); user and password
    file together."""
    out: list[ConfigError] = []
    if not cfg.etcd_insecure:
        for url in cfg.etcd_endpoints:
            scheme, host, _ = parse_url(url, "etcd_endpoints entry", "http")
            if scheme == "http" and not is_loopback_host(host):
                out.append(cfg.error("etcd_endpoints", (
                    f"etcd endpoint {url} is plain HTTP on a non-loopback address: anyone on "
                    "the path reads and rewrites the cluster's coordination records; use "
                    "https:// with etcd_cacert (and etcd_cert/etcd_key or etcd_user), or set "
                    "etcd_insecure = yes to accept it"
                )))  # fmt: skip
                break
    if cfg.etcd_user and not cfg.etcd_password_file:
        out.append(cfg.error("etcd_user", "etcd_user needs etcd_password_file (a file whose "
                             "first line is the password, mode 0600)"))  # fmt: skip
    elif cfg.etcd_password_file and not cfg.etcd_user:
        out.append(cfg.error("etcd_password_file", "etcd_password_file needs etcd_user"))
    return out


def _remote_etcd(cfg: DispatcherConfig) -> str | None:
    """The first etcd endpoint host that is not a loopback address (None: all are)."""
    for url in cfg.etcd_endpoints:
        try:
            host = parse_url(url, "etcd_endpoints entry", "http")[1]
        except ValueError:
            continue
        if not is_loopback_host(host):
            return host
    return None


def _parse(path: str, required: bool) -> tuple[DispatcherConfig, list[ConfigError]]:
    """The config with every problem found (file:line each); parsing stops at none."""
    cfg = DispatcherConfig(path=path)
    try:
        text = kvconf.read_text(path)
    except ConfigError as exc:
        if required:
            return cfg.finish(), [exc]
        return cfg.finish(), []
    try:
        raw = kvconf.parse_flat(text, path)
    except ConfigError as exc:
        return cfg.finish(), [exc]
    errors: list[ConfigError] = []
    for key, (line, value) in raw.items():
        key = _ALIASES.get(key, key)
        if key in _IGNORED:
            cfg.warnings.append(f"{path}:{line}: key '{key}' ignored: {_IGNORED[key]}")
            continue
        if key not in _FIELDS:
            import difflib  # only for a typo: ``ced`` starts without it

            hint = difflib.get_close_matches(key, sorted(_FIELDS), n=1)
            extra = f" (did you mean '{hint[0]}'?)" if hint else ""
            errors.append(ConfigError(f"unknown key '{key}'{extra}", path, line))
            continue
        try:
            setattr(cfg, key, _convert(key, value, path, line))
        except ConfigError as exc:
            errors.append(exc)
            continue
        cfg.lines[key] = line
    raw = {_ALIASES.get(k, k): v for k, v in raw.items()}
    if cfg.api_auth_default not in ("deny", "allow"):
        errors.append(cfg.error("api_auth_default", "api_auth_default must be deny or allow"))
    if cfg.sync_mode not in ("push", "shared-fs"):
        errors.append(cfg.error("sync_mode", "sync_mode must be push or shared-fs"))
    if cfg.log_format not in ("kv", "json"):
        errors.append(cfg.error("log_format", "log_format must be kv or json"))
    if cfg.run_lock_without_etcd not in ("local", "refuse"):
        errors.append(cfg.error("run_lock_without_etcd",
                                "run_lock_without_etcd must be local or refuse"))  # fmt: skip
    if cfg.history_args not in ("keep", "hash"):
        errors.append(cfg.error("history_args", "history_args must be keep or hash"))
    for key in ("history_max_age", "history_max_runs", "history_output_max"):
        if getattr(cfg, key) < 1:
            errors.append(cfg.error(key, f"{key} must be a positive number"))
    if cfg.sync_ack not in ("majority", "one", "none"):
        errors.append(cfg.error("sync_ack", "sync_ack must be majority, one or none"))
    if not 0 < cfg.sync_ack_timeout <= 600:
        errors.append(cfg.error("sync_ack_timeout",
                                "sync_ack_timeout must be between 0 and 600 seconds"))  # fmt: skip
    if not 0 <= cfg.drain_wait <= 300:
        errors.append(cfg.error("drain_wait", "drain_wait must be between 0 and 300 seconds"))
    if cfg.lease_ttl < 1:
        errors.append(cfg.error("lease_ttl", "lease_ttl must be at least 1 second"))
    if not 0 < cfg.api_header_timeout <= 3600:
        errors.append(cfg.error("api_header_timeout",
                                "api_header_timeout must be between 0 and 3600 seconds"))  # fmt: skip
    if cfg.api_max_conns_per_ip < 1:
        errors.append(cfg.error("api_max_conns_per_ip", "api_max_conns_per_ip must be at least 1"))
    for key in ("max_parallel", "max_hosts"):
        if getattr(cfg, key) < 1:
            errors.append(cfg.error(key, f"{key} must be at least 1"))
    if cfg.max_result_output < 0:
        errors.append(cfg.error("max_result_output", "max_result_output must be 0 (all) or more"))
    for key in ("api_port", "health_port", "pairing_port"):
        if not 0 < getattr(cfg, key) < 65536:
            errors.append(cfg.error(key, f"{key} must be a port number (1-65535)"))
    errors.extend(_cluster_problems(cfg, raw))
    return cfg.finish(), errors


def load(path: str = DEFAULT_CONFIG, required: bool = True) -> DispatcherConfig:
    """Load ``path``; raise the first :class:`ConfigError` (every one names file:line).

    With ``required=False`` a missing file gives the defaults. These rules hold for
    ``ced`` and ``ctrl-exec-api`` alike: unknown keys, numbers, enumerations, the
    cluster keys without ``etcd_endpoints``, unparsable URLs, a loopback ``advertise_url``
    while etcd is remote, plain-HTTP etcd off loopback without ``etcd_insecure``,
    ``etcd_user`` and ``etcd_password_file`` apart. The daemon checks more
    (:func:`instance_problems`).
    """
    cfg, errors = _parse(path, required)
    if errors:
        raise errors[0]
    return cfg


def instance_problems(cfg: DispatcherConfig) -> list[ConfigError]:
    """What ``ctrl-exec-api`` also needs, checked without network and without binding:
    the API certificate files exist and load, ``api_client_ca`` is no CA that signs agents
    and ``api_require_client_cert`` has an operator CA, ``sync_mode = push`` in a cluster has the
    API on TLS, an advertised address that is not loopback while etcd is remote when it
    is derived from ``api_bind`` (``ced`` on an operator host advertises nothing), the
    PROXY v2 settings, distinct ports, the etcd TLS files and a private password file."""
    out: list[ConfigError] = []
    for key in ("api_cert", "api_key", "api_client_ca"):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            out.append(cfg.error(key, f"{key} {value} does not exist"))
    if bool(cfg.api_cert) != bool(cfg.api_key):
        key = "api_cert" if cfg.api_cert else "api_key"
        out.append(cfg.error(key, "api_cert and api_key go together"))
    elif cfg.api_cert and not out:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                cfg.api_cert, cfg.api_key
            )
        except (OSError, ssl.SSLError) as exc:
            out.append(cfg.error("api_cert", f"cannot load the API certificate: {exc}"))
    if cfg.etcd_endpoints and cfg.sync_mode == "push" and not (cfg.api_cert and cfg.api_key):
        out.append(cfg.error(
            "sync_mode", "sync_mode = push needs api_cert and api_key: followers fetch the "
            "generation files from the leader over mTLS (use sync_mode = shared-fs when the "
            "state paths are on a shared filesystem)",
        ))  # fmt: skip
    if cfg.etcd_endpoints and bool(cfg.etcd_cert) != bool(cfg.etcd_key):
        out.append(cfg.error("etcd_cert" if cfg.etcd_cert else "etcd_key",
                             "etcd_cert and etcd_key go together"))  # fmt: skip
    out.extend(_etcd_file_problems(cfg))
    remote = _remote_etcd(cfg)
    if (
        remote
        and not cfg.advertise_url
        and (cfg.api_bind in ("localhost", "::1") or cfg.api_bind.startswith("127."))
    ):
        out.append(ConfigError(
            f"advertise_url is not set, so this instance would advertise its API address "
            f"{derived_advertise_url(cfg)} (api_bind), a loopback address, while etcd is not "
            f"({remote}): set advertise_url to an address peers reach",
            cfg.path, cfg.lines.get("api_bind", cfg.lines.get("etcd_endpoints")),
        ))  # fmt: skip
    ports = {
        "api_port": cfg.api_port,
        "health_port": cfg.health_port,
        "pairing_port": cfg.pairing_port,
        "pairing_proxy_port": cfg.pairing_proxy_port,
    }  # api_proxy_port: proxyproto.check_config
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port and port in seen:
            out.append(cfg.error(key, f"{key} {port} is also {seen[port]}"))
        seen.setdefault(port, key)
    from dispatcher.api import operatorcerts, proxyproto
    from dispatcher.proxyv2 import check_pairing_config

    for check in (proxyproto.check_config, check_pairing_config):
        try:
            check(cfg)
        except ConfigError as exc:
            out.append(exc)
    if (problem := operatorcerts.no_trust_problem(cfg)) is not None:
        out.append(problem)
    if cfg.api_client_ca and Path(cfg.api_client_ca).is_file():
        try:  # operators are not agents: never a CA that signs agents
            operatorcerts.check_client_ca(cfg)
        except ConfigError as exc:
            out.append(exc)
    return out


def _etcd_file_problems(cfg: DispatcherConfig) -> list[ConfigError]:
    """The etcd TLS files exist; the password file is usable and private."""
    if not cfg.etcd_endpoints:
        return []
    out: list[ConfigError] = []
    for key in ("etcd_cacert", "etcd_cert", "etcd_key"):
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            out.append(cfg.error(key, f"{key} {value} does not exist"))
    if cfg.etcd_user and cfg.etcd_password_file:
        from cluster.credentials import PasswordFileError, read_password_file

        try:
            read_password_file(cfg.etcd_password_file)
        except PasswordFileError as exc:
            out.append(cfg.error("etcd_password_file", f"etcd_password_file: {exc}"))
    return out


def instance_warnings(cfg: DispatcherConfig) -> list[str]:
    """What ``ctrl-exec-api`` warns about at start (and ``check-config`` prints) but runs
    with: a plain-HTTP API on an address other hosts reach."""
    out = []
    if not (cfg.api_cert and cfg.api_key) and not is_loopback_host(cfg.api_bind or "0.0.0.0"):
        where = f"{cfg.path}:{cfg.lines['api_bind']}" if "api_bind" in cfg.lines else cfg.path
        out.append(
            f"{where}: the API listens on {cfg.api_bind} in plain HTTP: anyone who reaches "
            "it needs no certificate; set api_cert and api_key (or bind it to 127.0.0.1)"
        )
    return out


def check(path: str = DEFAULT_CONFIG) -> list[str]:
    """Every problem of ``path`` for an instance (``file:line: message`` each; [] when fine).

    The load rules of :func:`load` plus :func:`instance_problems`; no network, no etcd,
    no port binding (a port in use shows only at start).
    """
    cfg, errors = _parse(path, True)
    if not errors:
        errors = instance_problems(cfg)
    return [str(e) for e in errors]
