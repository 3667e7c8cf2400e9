"""Switch a forked child's credentials to a profile's, for the single exec of the script.

The profile's spawner (:mod:`agent.executor.spawner`) forks a child (root, with root's
capabilities, its bounding set already reduced to the profile's) and calls :func:`apply`
in it just before ``execve`` of the script. :class:`Creds` is worked out once per profile
and user (:attr:`agent.executor.sandbox.Plan.credentials`), so the child only makes
system calls. The steps, in order, and what each guarantees:

The steps, in order, and what each guarantees:

1. ``PR_CAPBSET_DROP`` of every capability not in the profile (0..``cap_last_cap``)
   that the spawner has not dropped already: the bounding set is exactly the
   profile's, so neither the script nor anything it execs (a setuid-root or
   file-capability binary included) can gain any other. Done first, while the child
   still holds ``CAP_SETPCAP``.
2. ``setgroups`` (the ``run_as`` user's groups, from ``getgrouplist``; none for a
   numeric uid without a passwd entry beyond its own gid), then ``setresgid``: real,
   effective and saved gid are the user's, no group of root's is left.
3. For a non-root ``run_as``: ``PR_SET_KEEPCAPS`` 1, then ``setresuid``: real, effective
   and saved uid are the user's (no way back to 0); the kernel clears the effective and
   ambient sets, and ``KEEPCAPS`` keeps the permitted set only long enough for step 4
   (the flag itself is cleared again, and by the exec anyway).
4. ``capset`` (``_LINUX_CAPABILITY_VERSION_3``): effective, permitted and inheritable
   are exactly the profile's capabilities; every other one is gone from the permitted
   set for good.
5. ``PR_CAP_AMBIENT_CLEAR_ALL``, then ``PR_CAP_AMBIENT_RAISE`` of each profile
   capability: the ambient set is exactly the profile's, so a non-root script keeps them
   across its (unprivileged) exec and a non-root script's children keep them too.
6. ``PR_SET_NO_NEW_PRIVS`` 1 when the profile asks for it (the default): setuid, setgid
   and file-capability bits are ignored by the script's exec and every later one.

After these steps the child holds nothing but the profile's capabilities, so the
kernel's permission check on the exec of the script is the ``run_as`` user's own (a
0700 root-owned script gives ``EACCES`` to ``nobody``), unless the profile itself lists
``CAP_DAC_OVERRIDE`` or ``CAP_DAC_READ_SEARCH``. The credentials the script starts with
are the ones util-linux ``setpriv --reuid --regid --groups --bounding-set --inh-caps
--ambient-caps [--no-new-privs]`` followed by an exec would give it (see
:meth:`agent.executor.sandbox.Plan.command`): for root (no ``run_as``) the exec computes
permitted = effective = bounding | inheritable = the profile's capabilities, as before.

Any failing step raises :class:`CredsError` naming the step; the caller must not exec
then (fail closed). Linux only; ``ctypes`` on the C library (Python 3.11 has no
``os.prctl``). Imports only ``ctypes`` and ``os``: it also runs in the small spawner
process (:mod:`agent.executor.spawner`).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE, PR_CAP_AMBIENT_CLEAR_ALL = 2, 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]  # fmt: skip


_capset = _libc.capset
_capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_capset.restype = ctypes.c_int


class CredsError(Exception):
    """A step of :func:`apply` failed (the message names it)."""


def last_cap(default: int) -> int:
    """The highest capability number this kernel knows (``cap_last_cap``)."""
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return default


class Creds:
    """What the script runs with: ids, groups, the capability numbers that make up its
    bounding, effective, permitted, inheritable and ambient sets (``caps``), the other
    capability numbers up to ``cap_last_cap`` (``drop``), ``no_new_privs``. A plain
    class of plain values, so that it crosses to the spawner with :mod:`marshal`."""

    __slots__ = ("caps", "drop", "gid", "groups", "no_new_privs", "uid")

    def __init__(self, uid: int, gid: int, groups: tuple[int, ...], caps: tuple[int, ...],
                 drop: tuple[int, ...], no_new_privs: bool) -> None:  # fmt: skip
        self.uid, self.gid, self.groups = uid, gid, groups
        self.caps, self.drop, self.no_new_privs = caps, drop, no_new_privs

    def astuple(self) -> tuple[int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...], bool]:
        return (self.uid, self.gid, self.groups, self.caps, self.drop, self.no_new_privs)

    @property
    def mask(self) -> int:
        return sum(1 << c for c in self.caps)


def _ok(rc: int, what: str) -> None:
    if rc != 0:
        raise CredsError(f"{what}: {os.strerror(ctypes.get_errno())}")


def apply(c: Creds) -> None:
    """Steps 1-6 of the module docstring, on the calling (single-threaded, forked) process."""
    for cap in c.drop:
        _ok(_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    try:
        os.setgroups(list(c.groups))
        os.setresgid(c.gid, c.gid, c.gid)
    except OSError as exc:
        raise CredsError(f"set groups and gid {c.gid}: {exc.strerror}") from None
    if c.uid != 0:
        _ok(_prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep capabilities")
        try:
            os.setresuid(c.uid, c.uid, c.uid)
        except OSError as exc:
            raise CredsError(f"set uid {c.uid}: {exc.strerror}") from None
        _ok(_prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "clear keep capabilities")
    mask = c.mask
    data = (_CapData * 2)()
    for i in (0, 1):
        word = (mask >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    _ok(_capset(ctypes.byref(header), data), "set capabilities")
    _ok(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient capabilities")
    for cap in c.caps:
        _ok(
            _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0),
            f"raise ambient capability {cap}",
        )
    if c.no_new_privs:
        _ok(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
