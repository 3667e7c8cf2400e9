"""The etcd password file: read it only when nobody else can (as ssh treats its keys).

Importable without any etcd client library (``ced check-config`` uses it).
"""

from __future__ import annotations

import os
import stat


class PasswordFileError(ValueError):
    """The password file is missing, unreadable, empty, or readable by others."""


def check_password_file(path: str) -> os.stat_result:
    """The file's status; :class:`PasswordFileError` unless it is a regular file that
    "others" can neither read nor write (owner and group only, e.g. 0600 or 0640)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise PasswordFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PasswordFileError(f"{path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        raise PasswordFileError(
            f"{path} is accessible by others (mode {mode:04o}): the etcd password must not "
            f"be; run chmod 600 {path} (or 640 with the service group)"
        )
    return st


def read_password_file(path: str) -> str:
    """The password: the file's first line without its line end (it may not be empty)."""
    check_password_file(path)
    try:
        with open(path, encoding="utf-8") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise PasswordFileError(f"cannot read {path}: {exc}") from None
    password = first.rstrip("\r\n")
    if not password:
        raise PasswordFileError(f"{path} is empty: its first line is the etcd password")
    return password
