"""Fault injectors against a running :mod:`ops.lab.hacluster` cluster (pytest-free).

Every injector injects, holds, undoes and returns a :class:`Fault` (what, on whom, when);
the undo is in a ``finally`` and :meth:`Faults.close` undoes whatever is still in place,
so a fault never outlives its run, even when the caller fails:

* ``kill9``: SIGKILL of the leader, wait for a successor, start the victim again;
* ``sigstop``: SIGSTOP of the leader for 2 x TTL + 1 s (its lease expires, a peer takes
  over), then SIGCONT (the resumed process must not act under its old epoch);
* ``sigterm``: SIGTERM of the leader (it drains and resigns), start it again;
* ``partition``: the leader cut from etcd and only from etcd: the process is moved into
  its own cgroup (v2) and an ``iptables`` rule drops every packet it sends to the etcd
  members' client ports (HAProxy, clients and peers still reach it; etcd's answers never
  get acknowledged). Held 2 x TTL + 1 s, then the rule is deleted;
* ``etcd_restart``: SIGKILL of one etcd member (of 3), restart on its data dir;
* ``readonly``: a follower's state, CA and registry dirs made read-only for a while: each
  bind-mounted onto itself and remounted ``ro`` (we run as root, so ``chmod`` would not
  stop a write), then unmounted.

Why not a network namespace for the partition: loopback is per namespace, and the lab's
etcd, HAProxy, peers and agents all listen on 127.0.0.x of the root namespace; an
instance moved into a namespace would lose every peer, not just etcd (and etcd would
need another listen address). The cgroup-scoped DROP rule cuts exactly the instance ->
etcd path, touches only loopback packets of the instance's own process, and sends
nothing to any network (so no blackhole route is needed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ops.lab.hacluster import Cluster, Inst
from ops.lab.proc import wait_until

CGROUP2 = Path("/sys/fs/cgroup/unified")  # Debian 12 hybrid; pure v2 mounts it at the top
if not (CGROUP2 / "cgroup.procs").exists():
    CGROUP2 = Path("/sys/fs/cgroup")

KINDS = ("kill9", "sigstop", "sigterm", "partition", "etcd_restart", "readonly")


@dataclass
class Fault:
    kind: str
    target: str  # instance name, or etcd member name
    started: float  # time.time() of the injection
    ended: float = 0.0  # time.time() it was undone
    detail: dict[str, object] = field(default_factory=dict)


def partition_available() -> str:
    """Empty when :meth:`Faults.partition` can work here, else why not."""
    if os.geteuid() != 0:
        return "needs root (iptables, cgroups)"
    if not (CGROUP2 / "cgroup.procs").exists():
        return f"no cgroup v2 hierarchy at {CGROUP2}"
    p = subprocess.run(["iptables", "-m", "cgroup", "-h"], capture_output=True, text=True)
    if p.returncode != 0 or "--path" not in p.stdout:
        return "iptables has no cgroup match"
    return ""


def readonly_available() -> str:
    return "" if os.geteuid() == 0 else "needs root (bind mounts)"


class Faults:
    """The injectors for one cluster; ``rng`` picks etcd members. Use as a context
    manager (or call :meth:`close`) so every undo runs."""

    def __init__(self, c: Cluster, rng: random.Random | None = None) -> None:
        self.c = c
        self.rng = rng or random.Random()
        self.done: list[Fault] = []
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> Faults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Undo every fault still in place (last first); never raises."""
        while self._undo:
            with contextlib.suppress(Exception):
                self._undo.pop()()

    @property
    def hold(self) -> float:
        """Past the lease: 2 x TTL + 1 s."""
        return 2.0 * self.c.ttl + 1.0

    def inject(self, kind: str) -> Fault:
        fn: Callable[[], Fault] = getattr(self, kind)
        f = fn()
        self.done.append(f)
        return f

    @contextlib.contextmanager
    def _undoing(self, undo: Callable[[], None]) -> Iterator[None]:
        """``undo`` runs on the way out, and from :meth:`close` if the process got here
        by an exception that skipped it."""
        self._undo.append(undo)
        try:
            yield
        finally:
            if undo in self._undo:
                self._undo.remove(undo)
                undo()

    # -- the leader process ------------------------------------------------------------------

    def _successor(self, old: Inst, timeout: float) -> tuple[str, float]:
        t0 = time.monotonic()
        others = [i for i in self.c.insts.values() if i is not old and i.alive]
        new = wait_until(lambda: self.c.leaders(others), timeout, "a new leader", 0.05)
        return new[0].name, round(time.monotonic() - t0, 3)

    def kill9(self) -> Fault:
        old = self.c.one_leader(20)
        f = Fault("kill9", old.name, time.time())
        old.signal(signal.SIGKILL)
        assert old.proc is not None
        old.proc.wait(10)
        f.detail["new_leader"], f.detail["failover_s"] = self._successor(old, self.hold + 10)
        self.c.restart(old)
        f.ended = time.time()
        return f

    def sigterm(self) -> Fault:
        old = self.c.one_leader(20)
        f = Fault("sigterm", old.name, time.time())
        old.signal(signal.SIGTERM)
        f.detail["new_leader"], f.detail["failover_s"] = self._successor(old, 10)
        assert old.proc is not None
        f.detail["exit"] = old.proc.wait(40)
        self.c.restart(old)
        f.ended = time.time()
        return f

    def sigstop(self) -> Fault:
        old = self.c.one_leader(20)
        f = Fault("sigstop", old.name, time.time())
        with self._undoing(lambda: _signal(old, signal.SIGCONT)):
            old.signal(signal.SIGSTOP)
            f.detail["new_leader"], f.detail["failover_s"] = self._successor(old, self.hold + 10)
            time.sleep(max(0.0, f.started + self.hold - time.time()))
        f.ended = time.time()
        f.detail["alive_after"] = old.alive
        return f

    def partition(self) -> Fault:
        why = partition_available()
        if why:
            raise RuntimeError(f"partition unavailable: {why}")
        old = self.c.one_leader(20)
        assert old.proc is not None
        f = Fault("partition", old.name, time.time())
        group = CGROUP2 / f"ctrl-exec-lab-{secrets.token_hex(4)}"
        ports = ",".join(str(m.client_port) for m in self.c.etcd.members)
        rule = ["OUTPUT", "-p", "tcp", "-m", "multiport", "--dports", ports, "-m", "cgroup",
                "--path", group.name, "-j", "DROP"]  # fmt: skip
        group.mkdir()
        try:
            # new sockets of the process are in the group (a socket keeps the group it was
            # created in); its connections open already are cut by their port pairs
            (group / "cgroup.procs").write_text(str(old.proc.pid))
            etcd_ports = {m.client_port for m in self.c.etcd.members}
            rules = [rule] + [
                ["OUTPUT", "-p", "tcp", "-s", "127.0.0.1", "--sport", str(lp), "-d",
                 "127.0.0.1", "--dport", str(rp), "-j", "DROP"]
                for lp, rp in _connections(old.proc.pid, etcd_ports)
            ]  # fmt: skip
            with contextlib.ExitStack() as stack:
                for r in rules:
                    stack.enter_context(self._undoing(functools.partial(_iptables_delete, r)))
                    subprocess.run(["iptables", "-w", "-I", *r], check=True, capture_output=True)
                f.detail["cut_connections"] = len(rules) - 1
                f.detail["new_leader"], f.detail["failover_s"] = self._successor(
                    old, self.hold + 10
                )
                time.sleep(max(0.0, f.started + self.hold - time.time()))
        finally:
            _leave_cgroup(group)
        f.ended = time.time()
        f.detail["alive_after"] = old.alive
        return f

    # -- etcd ------------------------------------------------------------------------------------

    def etcd_restart(self) -> Fault:
        i = self.rng.randrange(len(self.c.etcd.members))
        m = self.c.etcd.members[i]
        f = Fault("etcd_restart", m.name, time.time())
        with self._undoing(lambda: self._start_member(i)):
            self.c.etcd.stop_member(i)
            time.sleep(1.0)
        f.ended = time.time()
        return f

    def _start_member(self, i: int) -> None:
        m = self.c.etcd.members[i]
        if m.proc is None or m.proc.poll() is not None:
            self.c.etcd.start_member(i, timeout=30)

    # -- a follower's disk ---------------------------------------------------------------------

    @contextlib.contextmanager
    def read_only(self, inst: Inst, state: bool = True) -> Iterator[list[Path]]:
        """``inst``'s state (unless not ``state``), CA and registry dirs read-only inside
        the block."""
        dirs = sorted({inst.ca_dir, inst.registry_dir} | ({inst.state} if state else set()))
        with contextlib.ExitStack() as stack:
            for d in dirs:
                stack.enter_context(self._undoing(functools.partial(_umount, d)))
                _mount_ro(d)
            yield dirs

    def readonly(self, seconds: float = 4.0) -> Fault:
        why = readonly_available()
        if why:
            raise RuntimeError(f"read-only disk unavailable: {why}")
        leader = self.c.one_leader(20)
        victim = self.rng.choice([i for i in self.c.insts.values()
                                  if i is not leader and i.alive])  # fmt: skip
        f = Fault("readonly", victim.name, time.time())
        with self.read_only(victim) as dirs:
            f.detail["dirs"] = [str(d) for d in dirs]
            time.sleep(seconds)
        f.ended = time.time()
        f.detail["alive_after"] = victim.alive
        return f


def _signal(inst: Inst, sig: int) -> None:
    if inst.alive:
        inst.signal(sig)


def _iptables_delete(rule: list[str]) -> None:
    for _ in range(5):  # every copy, should one have been inserted twice
        if subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True).returncode != 0:
            return


def _connections(pid: int, ports: set[int]) -> list[tuple[int, int]]:
    """``(local port, remote port)`` of the TCP connections of ``pid`` to one of ``ports``
    on 127.0.0.1 (from ``/proc/PID/fd`` and ``/proc/net/tcp``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, inode = cols[1], cols[2], cols[9]
        rport = int(remote.split(":")[1], 16)
        if inode in inodes and rport in ports and remote.startswith("0100007F"):
            out.append((int(local.split(":")[1], 16), rport))
    return out


def _leave_cgroup(group: Path) -> None:
    """Move every process of ``group`` back to the root group and remove it."""
    with contextlib.suppress(OSError):
        for pid in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                (group.parent / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


_MOUNTS = threading.Lock()  # mount(8) of two lanes at once can fail on the utab lock


def _mount_ro(d: Path) -> None:
    """Bind-mount ``d`` onto itself, read-only (3 attempts, then the error)."""
    steps = (["mount", "--bind", str(d), str(d)], ["mount", "-o", "remount,ro,bind", str(d)])
    with _MOUNTS:
        for attempt in range(3):
            why = ""
            for argv in steps:
                p = subprocess.run(argv, capture_output=True, text=True)
                if p.returncode != 0:
                    why = f"{' '.join(argv[:3])}: exit {p.returncode}: {p.stderr.strip()}"
                    break
            if not why:
                return
            _umount_locked(d)
            if attempt == 2:
                raise RuntimeError(f"cannot make {d} read-only: {why}")
            time.sleep(0.2)


def _umount(d: Path) -> None:
    """Unmount ``d`` if something is mounted on it (lazily: an open file keeps nothing)."""
    with _MOUNTS:
        _umount_locked(d)


def _umount_locked(d: Path) -> None:
    with contextlib.suppress(OSError):
        for _ in range(3):  # every layer, should one have been stacked twice
            if subprocess.run(["mountpoint", "-q", str(d)]).returncode != 0:
                return
            subprocess.run(["umount", "-l", str(d)], capture_output=True)
