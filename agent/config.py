"""``agent.conf``: every upstream key plus ``bind``, ``state_dir`` and our own extras.

Errors name the file and line; ``ctrl-exec-agent serve`` exits 78 on any of them.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from agent import profiles as profiles_mod
from agent.common import kvconf
from agent.common.errors import ConfigError
from agent.common.ratelimit import RateSpec

DEFAULT_CONFIG = "/etc/ctrl-exec-agent/agent.conf"
DEFAULT_ALLOWLIST = "/etc/ctrl-exec-agent/scripts.conf"
DEFAULT_STATE_DIR = "/var/lib/ctrl-exec-agent"
DEFAULT_EXECUTOR_SOCKET = "/run/ctrl-exec-agent/exec.sock"

KNOWN_KEYS = {
    # upstream
    "port", "cert", "key", "ca", "trusted_dispatchers_path", "revoked_serials",
    "script_dirs", "auth_hook", "auth_hook_timeout", "allowed_ips", "rate_limit_volume",
    "rate_limit_probe", "rate_limit_disable", "max_children", "stdin_timeout",
    "executor_socket", "async_runs_dir", "cert_staging_path", "pairing_port",
    # removed upstream, accepted and ignored
    "dispatcher_serial_path", "dispatcher_cn", "sandbox", "writable_paths",
    # ours
    "bind", "state_dir", "hostname", "script_timeout", "max_output", "log_target", "log_format",
    "key_type", "handshake_timeout", "request_timeout", "async_ttl", "max_conns_per_ip",
    "dispatcher_reserved_slots",
}  # fmt: skip
IGNORED_KEYS = {"dispatcher_serial_path", "dispatcher_cn", "sandbox", "writable_paths",
                "pairing_port"}  # fmt: skip
KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ec-p256")
DEFAULT_VOLUME = RateSpec(10, 60, 300)  # upstream's rate_limit_volume
DEFAULT_PROBE = RateSpec(3, 600, 3600)  # upstream's rate_limit_probe


@dataclass
class AgentConfig:
    path: str
    port: int
    cert: str
    key: str
    ca: str
    bind: str = "0.0.0.0"
    state_dir: str = DEFAULT_STATE_DIR
    trusted_dispatchers_path: str = ""
    revoked_serials: str = "/etc/ctrl-exec-agent/revoked-serials"
    async_runs_dir: str = ""
    cert_staging_path: str = ""
    script_dirs: list[str] = field(default_factory=list)
    auth_hook: str = ""
    auth_hook_timeout: float = 10.0
    allowed_ips: list[ipaddress.IPv4Network | ipaddress.IPv6Network] | None = None
    rate_limit_volume: RateSpec = DEFAULT_VOLUME
    rate_limit_probe: RateSpec = DEFAULT_PROBE
    rate_limit_disable: bool = False
    max_children: int = 256
    max_conns_per_ip: int = 8  # open connections per client IP before TLS (0: no cap)
    dispatcher_reserved_slots: int = 16  # of max_children, only for recent dispatcher IPs
    stdin_timeout: float = 10.0
    script_timeout: float = 3600.0
    max_output: int = 8 * 1024 * 1024
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0
    async_ttl: int = 86400
    hostname: str = ""
    log_target: str = "auto"
    log_format: str = "kv"  # kv or json
    key_type: str = "rsa-3072"
    tags: dict[str, str] = field(default_factory=dict)
    profiles: dict[str, dict[str, str]] = field(default_factory=dict)
    profile_defs: dict[str, profiles_mod.Profile] = field(default_factory=dict)
    executor_socket: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def host(self) -> str:
        return self.hostname or fqdn()


def fqdn() -> str:
    name = socket.getfqdn()
    if "." not in name or name.startswith("localhost"):
        return socket.gethostname()
    return name


def _rate(value: str, path: str, line: int, key: str) -> RateSpec:
    parts = value.split("/")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"{key} must be limit/window/block seconds, got {value!r}", path, line)
    a, b, c = (int(p) for p in parts)
    return RateSpec(a, b, c)


def _number(value: str, path: str, line: int, key: str, cast: type = int) -> float:
    try:
        n = cast(value)
    except ValueError:
        raise ConfigError(f"{key} must be a number, got {value!r}", path, line) from None
    if n < 0:
        raise ConfigError(f"{key} must not be negative", path, line)
    return float(n) if cast is float else int(n)


def parse_allowed_ips(
    value: str, path: str, line: int, warnings: list[str]
) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            warnings.append(
                f"{path}:{line}: allowed_ips entry {item!r} is not an address or network; dropped"
            )
    return nets


def load(path: str = DEFAULT_CONFIG) -> AgentConfig:
    sections: list[str] = []
    entries = kvconf.parse_ini(kvconf.read_text(path), path, sections)
    top: dict[str, tuple[int, str]] = {}
    tags: dict[str, str] = {}
    profiles: dict[str, dict[str, str]] = {}
    profile_lines: dict[str, dict[str, tuple[int, str]]] = {
        sec.split(" ", 1)[1]: {} for sec in sections if sec.startswith("profile ")
    }
    warnings: list[str] = []
    for e in entries:
        if e.section == "":
            if e.key not in KNOWN_KEYS:
                import difflib  # only for a typo: not held in the daemon's memory

                hint = difflib.get_close_matches(e.key, sorted(KNOWN_KEYS), n=1)
                extra = f" (did you mean '{hint[0]}'?)" if hint else ""
                warnings.append(f"{path}:{e.line}: unknown key '{e.key}' ignored{extra}")
                continue
            if e.key in IGNORED_KEYS:
                warnings.append(f"{path}:{e.line}: key '{e.key}' is no longer used; ignored")
                continue
            top[e.key] = (e.line, e.value)
        elif e.section == "tags":
            tags[e.key] = e.value
        elif e.section.startswith("profile "):
            pname = e.section.split(" ", 1)[1]
            profiles.setdefault(pname, {})[e.key] = e.value
            profile_lines.setdefault(pname, {})[e.key] = (e.line, e.value)

    def req(key: str) -> tuple[int, str]:
        if key not in top or not top[key][1]:
            raise ConfigError(f"Missing '{key}'", path)
        return top[key]

    pline, port_s = req("port")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ConfigError(f"port must be 1..65535, got {port_s!r}", path, pline)
    cfg = AgentConfig(
        path=path, port=int(port_s), cert=req("cert")[1], key=req("key")[1], ca=req("ca")[1],
        tags=tags, profiles=profiles, warnings=warnings,
    )  # fmt: skip

    def get(key: str) -> tuple[int, str] | None:
        return top.get(key)

    for key in ("bind", "state_dir", "trusted_dispatchers_path", "revoked_serials",
                "async_runs_dir", "cert_staging_path", "hostname"):  # fmt: skip
        if (v := get(key)) is not None:
            setattr(cfg, key, v[1])
    if (v := get("log_target")) is not None:
        if v[1] not in ("auto", "syslog", "stderr"):
            raise ConfigError("log_target must be auto, syslog or stderr", path, v[0])
        cfg.log_target = v[1]
    if (v := get("log_format")) is not None:
        if v[1] not in ("kv", "json"):
            raise ConfigError("log_format must be kv or json", path, v[0])
        cfg.log_format = v[1]
    if (v := get("key_type")) is not None:
        if v[1] not in KEY_TYPES:
            raise ConfigError(f"key_type must be one of {', '.join(KEY_TYPES)}", path, v[0])
        cfg.key_type = v[1]
    for key in ("auth_hook_timeout", "stdin_timeout", "script_timeout", "handshake_timeout",
                "request_timeout"):  # fmt: skip
        if (v := get(key)) is not None:
            setattr(cfg, key, _number(v[1], path, v[0], key, float))
    for key in ("max_children", "max_output", "async_ttl", "max_conns_per_ip",
                "dispatcher_reserved_slots"):  # fmt: skip
        if (v := get(key)) is not None:
            setattr(cfg, key, int(_number(v[1], path, v[0], key)))
    if (v := get("dispatcher_reserved_slots")) is None:  # the default fits any max_children
        cfg.dispatcher_reserved_slots = min(cfg.dispatcher_reserved_slots, cfg.max_children // 4)
    elif cfg.dispatcher_reserved_slots >= cfg.max_children:
        raise ConfigError(
            f"dispatcher_reserved_slots ({cfg.dispatcher_reserved_slots}) must be below "
            f"max_children ({cfg.max_children})", path, v[0],
        )  # fmt: skip
    if (v := get("rate_limit_volume")) is not None:
        cfg.rate_limit_volume = _rate(v[1], path, v[0], "rate_limit_volume")
    if (v := get("rate_limit_probe")) is not None:
        cfg.rate_limit_probe = _rate(v[1], path, v[0], "rate_limit_probe")
    if (v := get("rate_limit_disable")) is not None:
        cfg.rate_limit_disable = kvconf.is_true(v[1])
    if (v := get("allowed_ips")) is not None:
        cfg.allowed_ips = parse_allowed_ips(v[1], path, v[0], warnings)
    if (v := get("script_dirs")) is not None:
        cfg.script_dirs = [d for d in v[1].split(":") if d]
        for d in cfg.script_dirs:
            if not d.startswith("/"):
                raise ConfigError(f"script_dirs entry {d!r} is not absolute", path, v[0])
    if (v := get("auth_hook")) is not None and v[1]:
        if not (os.path.isfile(v[1]) and os.access(v[1], os.X_OK)):
            raise ConfigError(f"auth_hook {v[1]!r} does not exist or is not executable",
                              path, v[0])  # fmt: skip
        cfg.auth_hook = v[1]
    cfg.profile_defs = profiles_mod.parse(profile_lines, path, warnings)
    if (v := get("executor_socket")) is not None and v[1]:
        if not v[1].startswith("/"):
            raise ConfigError("executor_socket must be an absolute path", path, v[0])
        cfg.executor_socket = v[1]
    elif cfg.profile_defs:
        warnings.append(f"{path}: profiles are inert without executor_socket "
                        "(scripts run as the agent's own user)")  # fmt: skip
    state = Path(cfg.state_dir)
    cfg.trusted_dispatchers_path = cfg.trusted_dispatchers_path or str(
        state / "ctrl-exec-dispatchers"
    )
    cfg.async_runs_dir = cfg.async_runs_dir or str(state / "runs")
    cfg.cert_staging_path = cfg.cert_staging_path or str(state / "agent.crt.staged")
    return cfg
