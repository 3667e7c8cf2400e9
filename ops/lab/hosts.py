"""Lab hosts: each one a network, mount and UTS namespace on a shared bridge.

A :class:`Lab` is a small private network (``10.213.N.0/24``) on a bridge that lives in its
own "switch" namespace. Each :class:`Host` of it has:

* its own network namespace with one interface (``eth0``, its own address) and ``lo``;
* its own mount namespace in which the real default paths (``/etc/ctrl-exec``,
  ``/var/lib/ctrl-exec``, ``/etc/ctrl-exec-agent``, ``/var/lib/ctrl-exec-agent``, ``/run``,
  ``/etc/systemd/system``, ``/var/lib/etcd``, ...; :data:`DEFAULT_PATHS`) are bind mounts of
  empty directories under the lab's root, and the vendor configuration a guide edits
  (``/etc/default``, ``/etc/haproxy``, ``/etc/keepalived``; :data:`COPIED_PATHS`) starts
  as a copy of the machine's, so every daemon runs with its defaults and two hosts never
  share a file; ``/etc/hosts`` lists the lab's hosts by name; extra read-only bind mounts
  (``binds``) put, for example, this checkout's venv at ``/opt/ctrl-exec/venv``;
* ``systemctl`` and ``journalctl`` (:mod:`ops.lab.systemctl`) first on its ``PATH``
  (:meth:`Host.env`), since a lab host has no systemd;
* its own host name (UTS namespace), so ``socket.getfqdn()`` is the host's lab name.

Safety first (DESIGN.md section 5): before any namespace exists, a blackhole route for
``10.213.0.0/16`` is added in the root namespace, so that nothing started outside the lab can
ever send the lab's addresses to a real network; clients run inside a host
(:meth:`Host.run`, :meth:`Host.popen`). The route stays after the lab is gone (it is
harmless and protects later labs). Empty mount points are created on the real file system
where a default path does not exist yet; nothing is ever written into them from here.

Needs root (``ip netns``, ``unshare``, ``nsenter``, ``mount``); :func:`available` says
whether this machine can run a lab.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0.0/16"  # every lab's addresses, blackholed in the root namespace
DOMAIN = "lab.test"  # RFC 6761: never a real name
#: A host's own paths: empty at first (the real default paths of the product, and the
#: places a service writes), then those that start as a copy of the machine's (the vendor
#: configuration a guide edits: /etc/default/etcd, /etc/haproxy/haproxy.cfg, ...).
DEFAULT_PATHS = (
    "/etc/ctrl-exec",
    "/var/lib/ctrl-exec",
    "/etc/ctrl-exec-agent",
    "/var/lib/ctrl-exec-agent",
    "/var/log/ctrl-exec",
    "/etc/systemd/system",
    "/etc/etcd",
    "/run",
    "/root",
)
COPIED_PATHS = (
    "/etc/default", "/etc/haproxy", "/etc/keepalived", "/etc/sysctl.d", "/var/lib/etcd",
)  # fmt: skip
LAB_BIN = Path(__file__).resolve().parent / "bin"  # systemctl and journalctl for lab hosts


class LabError(RuntimeError):
    """The lab could not be built or a command on a host failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    got = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and got.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {got.stderr.strip()}")
    return got


def available() -> str | None:
    """None when this machine can run a lab, else why not (one line)."""
    if os.geteuid() != 0:
        return "network and mount namespaces need root"
    for tool in ("ip", "unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:  # root in a container may still lack the right to make namespaces
        probe = subprocess.run(["unshare", "--net", "--mount", "--uts", "--", "true"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make namespaces: {exc}"
    if probe.returncode != 0:
        return f"cannot make namespaces: {probe.stderr.strip()[:200]}"
    return None


def ensure_blackhole(subnet: str = SUBNET) -> None:
    """Make ``subnet`` unroutable in the root namespace (idempotent)."""
    routes = _ip("route", "show", "type", "blackhole").stdout.split()
    if subnet not in routes:
        _ip("route", "add", "blackhole", subnet)


@dataclass
class Host:
    """One lab host (see the module docstring). Start processes on it with :meth:`popen`."""

    lab: Lab
    name: str
    address: str
    index: int
    keeper: subprocess.Popen[bytes] | None = None
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.lab.domain}"

    @property
    def netns(self) -> str:
        return f"{self.lab.tag}-{self.name}"

    @property
    def root(self) -> Path:
        """Where this host's default paths live on the real file system."""
        return self.lab.root / self.name

    def path(self, default_path: str) -> Path:
        """The real location of ``default_path`` (or a file under one of the host's own
        paths) on this host."""
        for own in (*self.lab.paths, *self.lab.copied):
            if default_path == own or default_path.startswith(own.rstrip("/") + "/"):
                return self.root / default_path.lstrip("/")
        raise LabError(f"{default_path} is not under one of the host's own paths")

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """An environment for commands on this host: the lab's ``systemctl`` first on PATH."""
        return {
            "PATH": f"{LAB_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root", "LANG": "C.UTF-8", "LAB_PYTHON": sys.executable,
            "LAB_ROOT": str(LAB_BIN.parents[2]), "LAB_FILE": str(self.lab.root / "lab.json"),
            "LAB_HOST": self.name, **(extra or {}),
        }  # fmt: skip

    def _enter(self) -> list[str]:
        if self.keeper is None or self.keeper.poll() is not None:
            raise LabError(f"host {self.name} is not running")
        return ["nsenter", "-t", str(self.keeper.pid), "-n", "-m", "-u", "--"]

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` as run on this host."""
        return [*self._enter(), *argv]

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` on this host (stopped with the lab, or by :meth:`stop`)."""
        p: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.command(argv), env=dict(env) if env is not None else None, **kw
        )
        self.children.append(p)
        return p

    def run(
        self, argv: Sequence[str] | str, *, timeout: float = 60, check: bool = True,
        env: Mapping[str, str] | None = None, input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run ``argv`` (a list, or a shell command line) on this host and wait for it."""
        cmd = ["sh", "-c", argv] if isinstance(argv, str) else list(argv)
        got = subprocess.run(
            self.command(cmd), capture_output=True, text=True, timeout=timeout,
            env=dict(env) if env is not None else None, input=input,
        )  # fmt: skip
        if check and got.returncode != 0:
            shown = argv if isinstance(argv, str) else shlex.join(argv)
            raise LabError(
                f"on {self.name}: {shown} exited {got.returncode}: {got.stderr.strip()[-500:]}"
            )
        return got

    # -- network faults ---------------------------------------------------------------------

    @property
    def port(self) -> str:
        """This host's port on the lab's bridge (in the switch namespace)."""
        return f"{self.lab.tag}{self.index}p"

    def unplug(self) -> None:
        """Cut this host off the lab's network (its switch port down)."""
        _ip("-n", self.lab.switch_ns, "link", "set", self.port, "down")

    def plug(self) -> None:
        """Undo :meth:`unplug`."""
        _ip("-n", self.lab.switch_ns, "link", "set", self.port, "up")

    def block(self, *others: Host) -> None:
        """Drop every packet between this host and ``others`` (both directions, iptables)."""
        for o in others:
            self.run(["iptables", "-w", "-A", "INPUT", "-s", o.address, "-j", "DROP"])
            self.run(["iptables", "-w", "-A", "OUTPUT", "-d", o.address, "-j", "DROP"])

    def unblock(self) -> None:
        """Undo every :meth:`block` of this host."""
        self.run(["iptables", "-w", "-F", "INPUT"], check=False)
        self.run(["iptables", "-w", "-F", "OUTPUT"], check=False)

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self, grace: float = 10) -> None:
        """Stop every process started on this host, then the host's namespaces."""
        for p in reversed(self.children):
            _terminate(p, grace)
        self.children.clear()
        if self.keeper is not None:
            _terminate(self.keeper, 2)
            self.keeper = None
        # whatever else still runs in the namespace (daemons that double-forked)
        pids = _ip("netns", "pids", self.netns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", self.netns, check=False)


def _copy_owned(src: Path, dst: Path) -> None:
    """Copy a directory tree with modes and owners (a package's files, as installed)."""
    shutil.copytree(src, dst, symlinks=True)
    for d, _, files in os.walk(src):
        for name in (None, *files):
            s = Path(d) / name if name else Path(d)
            st = s.lstat()
            os.lchown(dst / s.relative_to(src), st.st_uid, st.st_gid)


def _terminate(p: subprocess.Popen[bytes], grace: float) -> None:
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(18)  # SIGCONT, in case a test stopped it
        p.terminate()
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


class Lab:
    """A private network of :class:`Host`\\ s; a context manager that removes it all."""

    def __init__(
        self, root: Path, *, net: int | None = None, paths: Sequence[str] = DEFAULT_PATHS,
        copied: Sequence[str] = COPIED_PATHS, binds: Mapping[str, Path] | None = None,
        domain: str = DOMAIN,
    ) -> None:  # fmt: skip
        why = available()
        if why:
            raise LabError(f"cannot build a lab here: {why}")
        self.root = Path(root)
        self.tag = "cl" + secrets.token_hex(2)  # short: interface names have 15 bytes
        self.net = net if net is not None else 1 + secrets.randbelow(250)
        self.paths = tuple(paths)
        self.copied = tuple(copied)
        self.binds = dict(binds or {})  # mount point -> real path, read-only on every host
        self.domain = domain
        self.hosts: dict[str, Host] = {}
        self.names: dict[str, str] = {}  # extra names in every host's /etc/hosts
        self.switch_ns = f"{self.tag}-sw"
        self._started = False

    def __enter__(self) -> Lab:
        ensure_blackhole()  # before any namespace exists
        _ip("netns", "add", self.switch_ns)
        self._started = True
        _ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch_ns, "link", "set", "br0", "up")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, index: int) -> str:
        return f"10.213.{self.net}.{index}"

    def add(self, name: str) -> Host:
        """A new host called ``name`` (its address is the next free one)."""
        if name in self.hosts:
            raise LabError(f"host {name} exists already")
        if not name.replace("-", "").isalnum():
            raise LabError(f"bad host name {name!r}")
        index = len(self.hosts) + 10
        host = Host(self, name, self.address(index), index)
        self.hosts[name] = host
        self._write_hosts_file()
        self._start(host)
        return host

    def add_name(self, fqdn: str, address: str) -> None:
        """Make ``fqdn`` resolve to ``address`` on every host (a service name, a VIP)."""
        self.names[fqdn] = address
        self._write_hosts_file()
        self._refresh_hosts()

    def _write_hosts_file(self) -> None:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{h.address} {h.fqdn} {h.name}" for h in self.hosts.values()]
        lines += [f"{address} {fqdn}" for fqdn, address in self.names.items()]
        tmp = self.root / ".hosts.tmp"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.root / "hosts")  # bind-mounted by name: rewrite in place below

    def _start(self, host: Host) -> None:
        _ip("netns", "add", host.netns)
        eth, port = f"{self.tag}{host.index}e", host.port
        _ip("link", "add", eth, "type", "veth", "peer", "name", port)
        _ip("link", "set", port, "netns", self.switch_ns)
        _ip("-n", self.switch_ns, "link", "set", port, "master", "br0")
        _ip("-n", self.switch_ns, "link", "set", port, "up")
        _ip("link", "set", eth, "netns", host.netns)
        _ip("-n", host.netns, "link", "set", eth, "name", "eth0")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        mounts = []
        own_paths = (*self.paths, *self.copied)
        binds = dict(self.binds)
        if sys.base_prefix.startswith("/root/"):  # this Python lives in root's home
            binds.setdefault(sys.base_prefix, Path(sys.base_prefix))
        inner = {}  # binds under one of the host's own paths: made inside its directory first
        for point, real in binds.items():
            if any(point.startswith(o.rstrip("/") + "/") for o in own_paths):
                inner[point] = real
        for point, real in inner.items():
            target = host.path(point)
            target.mkdir(parents=True, exist_ok=True)
            q = shlex.quote(str(target))
            mounts += [
                f"mount --bind {shlex.quote(str(real))} {q}",
                f"mount -o remount,bind,ro {q}",
            ]
        for path in own_paths:
            own = host.path(path)
            if path in self.copied and Path(path).is_dir():
                _copy_owned(Path(path), own)
            own.mkdir(parents=True, exist_ok=True)
            Path(path).mkdir(parents=True, exist_ok=True)  # an empty mount point
            mounts.append(f"mount --rbind {shlex.quote(str(own))} {shlex.quote(path)}")
        for point, real in binds.items():
            if point in inner:
                continue
            Path(point).mkdir(parents=True, exist_ok=True)
            q = shlex.quote(point)
            mounts.append(f"mount --bind {shlex.quote(str(real))} {q}")
            mounts.append(f"mount -o remount,bind,ro {q}")
        hosts_file = host.root / "etc-hosts"
        shutil.copyfile(self.root / "hosts", hosts_file)
        mounts.append(f"mount --bind {shlex.quote(str(hosts_file))} /etc/hosts")
        script = " && ".join(
            [
                *mounts,
                f"hostname {host.name}",
                # as at boot: the packages' run-time directories (/run/haproxy, ...)
                "{ systemd-tmpfiles --create --prefix=/run >/dev/null 2>&1 || true; }",
                # daemons notify readiness (sd_notify) only when systemd looks booted; the
                # lab's systemctl (ops/lab/systemctl.py) listens for it
                "mkdir -p /run/systemd/system",
                "echo ready",
                "exec sleep infinity",
            ]
        )
        keeper = subprocess.Popen(
            ["ip", "netns", "exec", host.netns,
             "unshare", "--mount", "--uts", "--propagation", "private", "--", "sh", "-c", script],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert keeper.stdout is not None
        line = keeper.stdout.readline()
        if line.strip() != b"ready":
            err = keeper.stderr.read().decode() if keeper.stderr else ""
            keeper.kill()
            raise LabError(f"host {host.name} did not start: {err.strip()}")
        # `ip netns exec` forks `unshare`, which execs `sh`, which execs `sleep`: the keeper's
        # PID is the process holding the host's namespaces.
        host.keeper = keeper
        self._refresh_hosts()
        self._write_lab_file()

    def _write_lab_file(self) -> None:
        """``lab.json``: what :mod:`ops.lab.remote` (ssh, scp) needs to reach each host."""
        doc = {
            "own_paths": [*self.paths, *self.copied],
            "hosts": [{"name": h.name, "fqdn": h.fqdn, "address": h.address,
                       "root": str(h.root), "pid": h.keeper.pid}
                      for h in self.hosts.values() if h.keeper is not None],
        }  # fmt: skip
        tmp = self.root / ".lab.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, self.root / "lab.json")

    def _refresh_hosts(self) -> None:
        """Every host's ``/etc/hosts`` lists every host (rewritten in place: bind mounts)."""
        text = (self.root / "hosts").read_text()
        for h in self.hosts.values():
            if h.keeper is not None:
                (h.root / "etc-hosts").write_text(text)

    def close(self) -> None:
        for host in reversed(list(self.hosts.values())):
            host.stop()
        if self._started:
            _ip("netns", "del", self.switch_ns, check=False)
            self._started = False

    def wait_reachable(self, src: Host, dst: Host, port: int, timeout: float = 10) -> None:
        """Wait until ``dst:port`` accepts TCP connections from ``src``."""
        deadline = time.monotonic() + timeout
        probe = (
            "import socket,sys\n"
            f"s=socket.create_connection(('{dst.address}',{port}),timeout=1);s.close()"
        )
        while True:
            got = src.run(["python3", "-c", probe], check=False, timeout=5)
            if got.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"{dst.name}:{port} not reachable from {src.name}")
            time.sleep(0.1)


@contextlib.contextmanager
def lab(root: Path, names: Sequence[str] = ()) -> Iterator[Lab]:
    """A :class:`Lab` with hosts ``names`` already added."""
    with Lab(root) as the_lab:
        for name in names:
            the_lab.add(name)
        yield the_lab
