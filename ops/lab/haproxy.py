"""A real HAProxy in front of ctrl-exec instances, configured by ``dispatcher.haproxy``.

:class:`HAProxy` writes the configuration that ``ced cluster haproxy-config`` would print
(:func:`dispatcher.haproxy.render`), checks it with ``haproxy -c``, runs ``haproxy -db -f
CFG`` in the foreground as a subprocess (log to ``haproxy.log`` in its directory), waits
until its frontends accept, talks to the runtime API on the stats socket (``show stat``,
``show servers state``, ``set server ... state drain``) and stops by PID.
"""

from __future__ import annotations

import csv
import io
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dispatcher.haproxy import Member, render
from ops.lab.net import free_port, wait_listening
from ops.lab.proc import terminate

HAPROXY = shutil.which("haproxy")
SKIP_REASON = "haproxy is not installed (apt-get install haproxy); CI installs it"
API_BACKEND = "be_ctrl_exec_api"
PAIRING_BACKEND = "be_ctrl_exec_pairing"
_SUN_PATH_MAX = 96  # sockaddr_un.sun_path is 108 bytes; HAProxy refuses paths over 97


class HAProxyError(RuntimeError):
    pass


def socket_path(path: Path, prefix: str = "hap-") -> tuple[Path, Path | None]:
    """``path`` for a Unix socket, or one of its name in a new short temporary directory
    (returned as well: the caller removes it) when ``path`` is too long for one."""
    if len(str(path)) <= _SUN_PATH_MAX:
        return path, None
    short = Path(tempfile.mkdtemp(prefix=prefix))
    return short / path.name, short


@dataclass
class HAProxy:
    """One HAProxy process. ``start()``, then ``stop()`` (or use it as a context manager)."""

    root: Path
    members: list[Member]
    bind: str = "127.0.0.1"
    api_port: int = 0  # 0: a free port
    pairing_port: int = 0  # 0: a free port
    proxy_protocol: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _sock_dir: Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if HAPROXY is None:
            raise HAProxyError(SKIP_REASON)
        self.root.mkdir(parents=True, exist_ok=True)
        self.api_port = self.api_port or free_port(self.bind)
        self.pairing_port = self.pairing_port or free_port(self.bind)
        self.stats_socket, self._sock_dir = socket_path(self.root / "admin.sock")

    @property
    def config(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def log(self) -> Path:
        return self.root / "haproxy.log"

    @property
    def api_url(self) -> str:
        return f"https://{self.bind}:{self.api_port}"

    def render(self) -> str:
        return render(
            self.members, bind=self.bind, api_port=self.api_port,
            pairing_port=self.pairing_port, stats_socket=str(self.stats_socket),
            proxy_protocol=self.proxy_protocol, log_stdout=True, full=True,
        )  # fmt: skip

    def write_config(self) -> Path:
        """Write the configuration and check it with ``haproxy -c``."""
        assert HAPROXY is not None
        self.config.write_text(self.render())
        r = subprocess.run([HAPROXY, "-c", "-f", str(self.config)], capture_output=True,
                           text=True, timeout=30)  # fmt: skip
        if r.returncode != 0:
            raise HAProxyError(f"haproxy -c rejected {self.config}: {r.stdout}{r.stderr}")
        return self.config

    def start(self, timeout: float = 10.0) -> HAProxy:
        """Write and check the config, start HAProxy, wait until both frontends accept."""
        assert HAPROXY is not None
        self.write_config()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [HAPROXY, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        try:
            for port in (self.api_port, self.pairing_port):
                wait_listening(self.bind, port, self.proc, timeout)
            deadline = time.monotonic() + timeout
            while not self.stats_socket.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no stats socket at {self.stats_socket}")
                time.sleep(0.02)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise HAProxyError(f"haproxy did not start: {exc}: {self.logtext()[-2000:]}") from exc
        return self

    def stop(self) -> int | None:
        """Stop HAProxy by its PID (SIGTERM: immediate stop in ``-db`` mode; SIGKILL after
        5 s): its exit status (None if it had to be killed)."""
        rc = terminate(self.proc, 5)
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
        return rc

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logtext(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # ----- runtime API (stats socket) ---------------------------------------------------

    def command(self, line: str, timeout: float = 5.0) -> str:
        """One runtime API command; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.stats_socket))
            s.sendall(line.rstrip("\n").encode() + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        return out.decode(errors="replace")

    def stat(self) -> list[dict[str, str]]:
        """``show stat`` as rows (``pxname``, ``svname``, ``status``, ``check_status``, ...)."""
        text = self.command("show stat").lstrip("# ")
        return [dict(row) for row in csv.DictReader(io.StringIO(text)) if row.get("pxname")]

    def statuses(self, backend: str) -> dict[str, str]:
        """Server name -> ``UP``/``DOWN``/``DRAIN``/``MAINT``... in ``backend``."""
        return {r["svname"]: r["status"] for r in self.stat()
                if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def servers_state(self, backend: str | None = None) -> list[dict[str, str]]:
        """``show servers state [backend]`` as rows keyed by its header line."""
        text = self.command(f"show servers state {backend or ''}".strip())
        lines = [ln for ln in text.splitlines() if ln.strip()]
        head = next((ln for ln in lines if ln.startswith("# ")), "")
        keys = head[2:].split()
        rows = []
        for ln in lines:
            if ln.startswith("#") or ln.strip() == "1":
                continue
            rows.append(dict(zip(keys, ln.split(), strict=False)))
        return rows

    def set_state(self, backend: str, server: str, state: str) -> str:
        """``set server BACKEND/SERVER state ready|drain|maint``; HAProxy's answer (empty: ok)."""
        answer = self.command(f"set server {backend}/{server} state {state}").strip()
        if answer:
            raise HAProxyError(f"set server {backend}/{server} state {state}: {answer}")
        return answer

    def drain(self, backend: str, server: str) -> None:
        self.set_state(backend, server, "drain")

    def wait_status(
        self, backend: str, want: Mapping[str, str | tuple[str, ...]] | None = None, *,
        any_up: bool = False, timeout: float = 15.0,
    ) -> dict[str, str]:  # fmt: skip
        """Wait until the servers of ``backend`` have the ``want`` statuses (or one is UP).

        A tuple in ``want`` accepts any of its statuses (``("DOWN", "MAINT")``).
        """
        deadline = time.monotonic() + timeout
        seen: dict[str, str] = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HAProxyError(f"haproxy exited {self.proc.returncode}: {self.logtext()}")
            seen = self.statuses(backend)
            if any_up and "UP" in seen.values():
                return seen
            if want is not None and all(
                seen.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in want.items()
            ):
                return seen
            time.sleep(0.05)
        raise TimeoutError(f"{backend}: wanted {want or 'one UP'}, have {seen}")
