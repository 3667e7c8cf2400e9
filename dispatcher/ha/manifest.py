"""Config generations: what a generation covers, its manifest and its document.

A generation is the shared state of the cluster at one moment: every file of ``ca_dir``
(``/etc/ctrl-exec``: CA, dispatcher cert and key, the kept ``.prev``/``.next`` pairs, the
auth hook...), the registry and ``rotation.json``. The leader publishes it in the store as
a :class:`Generation` document: number, epoch, leader, and a manifest of
``(path, mode, size, sha256)`` per file. File contents never go into the store (the CA
key is in the manifest only as a hash).

Paths in a manifest are *logical*, so instances may keep their files at different places:

* ``ca/<relative path>``: a file under ``ca_dir`` (recursively);
* ``registry/<relative path>``: a file under ``registry_dir``;
* ``rotation.json``: ``rotation_file``;
* ``pki/cert``, ``pki/key``, ``pki/ca`` (and ``.prev``/``.next`` of cert and key): the
  dispatcher cert, key and CA when the config puts them outside ``ca_dir``.

Never part of a generation: dot files (temp files of atomic writes, the sync stage
directories, the registry lock), anything that is not a regular file, and the instance's
own ``ctrl-exec.conf`` (it holds ``instance_id`` and ``advertise_url``, which differ per
instance).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.common.errors import CtrlExecError
from dispatcher.config import DispatcherConfig

STAGE_DIR = ".ctrl-exec-sync"  # per target directory: same filesystem, so rename is atomic
MAX_FILE = 64 * 1024 * 1024  # a generation file larger than this is refused


class ManifestError(CtrlExecError, ValueError):
    """A generation document or a logical path is malformed."""


@dataclass(frozen=True)
class Entry:
    """One file of a generation."""

    path: str  # logical path
    mode: int  # permission bits (0o777 mask)
    size: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "mode": self.mode, "size": self.size, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: Any) -> Entry:
        if not isinstance(d, Mapping):
            raise ManifestError("manifest entry is not an object")
        try:
            e = cls(str(d["path"]), int(d["mode"]) & 0o777, int(d["size"]), str(d["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"bad manifest entry {d!r}: {exc}") from None
        check_logical(e.path)
        if len(e.sha256) != 64 or any(c not in "0123456789abcdef" for c in e.sha256):
            raise ManifestError(f"bad sha256 for {e.path}")
        if not 0 <= e.size <= MAX_FILE:
            raise ManifestError(f"bad size for {e.path}")
        return e


def manifest_hash(entries: Mapping[str, Entry]) -> str:
    """sha256 of the canonical manifest (sorted ``[path, mode, size, sha256]`` rows)."""
    rows = [[e.path, e.mode, e.size, e.sha256] for _, e in sorted(entries.items())]
    raw = json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class Generation:
    """A published generation (the document under ``/<cluster>/generation``)."""

    number: int
    epoch: int
    leader: str
    manifest_sha256: str
    files: dict[str, Entry] = field(default_factory=dict)
    published_at: float = 0.0
    sync_mode: str = "push"

    def to_json(self) -> str:
        return json.dumps(
            {
                "generation": self.number,
                "epoch": self.epoch,
                "leader": self.leader,
                "manifest_sha256": self.manifest_sha256,
                "published_at": self.published_at,
                "sync_mode": self.sync_mode,
                "files": [e.to_json() for _, e in sorted(self.files.items())],
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Generation:
        """Parse and verify (the manifest hash must match the files); ManifestError."""
        try:
            d = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"generation is not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise ManifestError("generation is not an object")
        try:
            number, epoch = int(d["generation"]), int(d["epoch"])
            leader, mh = str(d.get("leader", "")), str(d["manifest_sha256"])
            files_raw = d.get("files")
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"generation lacks {exc}") from None
        if not isinstance(files_raw, list):
            raise ManifestError("generation has no file list")
        files: dict[str, Entry] = {}
        for item in files_raw:
            e = Entry.from_json(item)
            if e.path in files:
                raise ManifestError(f"{e.path} listed twice")
            files[e.path] = e
        if manifest_hash(files) != mh:
            raise ManifestError("manifest_sha256 does not match the file list")
        return cls(number, epoch, leader, mh, files, float(d.get("published_at") or 0.0),
                   str(d.get("sync_mode") or "push"))  # fmt: skip


def check_logical(path: str) -> None:
    """Refuse anything that is not a clean logical path (no ``..``, no dot files)."""
    if not path or path.startswith("/") or "\\" in path or "\0" in path:
        raise ManifestError(f"bad logical path {path!r}")
    parts = path.split("/")
    if any(not p or p in (".", "..") or p.startswith(".") for p in parts):
        raise ManifestError(f"bad logical path {path!r}")
    if parts[0] not in ("ca", "registry", "pki", "rotation.json"):
        raise ManifestError(f"bad logical path {path!r}")
    if parts[0] in ("ca", "registry") and len(parts) < 2:
        raise ManifestError(f"bad logical path {path!r}")


def _under(path: str | Path, root: str | Path) -> bool:
    p, r = os.path.abspath(path), os.path.abspath(root)
    return p == r or p.startswith(r.rstrip("/") + "/")


class Layout:
    """Where each logical path lives for one instance's config."""

    def __init__(self, cfg: DispatcherConfig) -> None:
        self.roots: dict[str, Path] = {
            "ca": Path(os.path.abspath(cfg.ca_dir)),
            "registry": Path(os.path.abspath(cfg.registry_dir)),
        }
        self.files: dict[str, Path] = {"rotation.json": Path(os.path.abspath(cfg.rotation_file))}
        for name, path, suffixes in (
            ("cert", cfg.cert, ("", ".prev", ".next")),
            ("key", cfg.key, ("", ".prev", ".next")),
            ("ca", cfg.ca, ("",)),
        ):
            if path and not _under(path, cfg.ca_dir):
                for suffix in suffixes:
                    self.files[f"pki/{name}{suffix}"] = Path(os.path.abspath(path + suffix))
        self.excluded = {os.path.abspath(cfg.path)}  # the instance's own config file

    def _skip(self, path: Path, root_name: str) -> bool:
        ap = str(path)
        if ap in self.excluded or any(str(f) == ap for f in self.files.values()):
            return True
        # a root nested in another (registry_dir under ca_dir) belongs to the inner one
        return any(
            other != root_name and _under(ap, r) and len(str(r)) > len(str(self.roots[root_name]))
            for other, r in self.roots.items()
        )

    def covers(self, path: str | Path) -> bool:
        """Whether a generation carries this local file (a change to it is replicated)."""
        p = Path(os.path.abspath(path))
        if any(p == f for f in self.files.values()):
            return True
        for name, root in self.roots.items():
            if _under(p, root) and p != root:
                rel = p.relative_to(root).parts
                return not any(part.startswith(".") for part in rel) and not self._skip(p, name)
        return False

    def local(self, logical: str) -> Path:
        """The local file of a logical path (ManifestError when it maps nowhere)."""
        check_logical(logical)
        if logical in self.files:
            return self.files[logical]
        head, _, rest = logical.partition("/")
        root = self.roots.get(head)
        if root is None or not rest:
            raise ManifestError(f"logical path {logical!r} maps nowhere")
        p = root / rest
        if self._skip(p, head):
            raise ManifestError(f"logical path {logical!r} is not synced")
        return p

    def walk(self) -> Iterator[tuple[str, Path]]:
        """Every synced file that exists: ``(logical, local path)``."""
        for name, root in self.roots.items():
            if not root.is_dir():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    p = Path(dirpath) / fn
                    if self._skip(p, name):
                        continue
                    rel = p.relative_to(root).as_posix()
                    yield f"{name}/{rel}", p
        for logical, p in self.files.items():
            yield logical, p

    def stage_dirs(self) -> Iterator[Path]:
        """Every leftover stage directory under the synced roots and files."""
        seen: set[str] = set()
        dirs = [r for r in self.roots.values() if r.is_dir()]
        dirs += [p.parent for p in self.files.values()]
        for top in dirs:
            cand = top / STAGE_DIR
            if str(cand) not in seen and cand.is_dir():
                seen.add(str(cand))
                yield cand
        for root in self.roots.values():
            if not root.is_dir():
                continue
            for dirpath, dirnames, _ in os.walk(root):
                if STAGE_DIR in dirnames:
                    cand = Path(dirpath) / STAGE_DIR
                    if str(cand) not in seen:
                        seen.add(str(cand))
                        yield cand
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]


class Scanner:
    """The manifest of the local files; sha256 cached by inode, size, mtime and ctime."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._cache: dict[str, tuple[tuple[int, int, int, int], str]] = {}
        self._lock = threading.Lock()

    def entry(self, logical: str, path: Path) -> Entry | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            cached = self._cache.get(str(path))
        if cached is not None and cached[0] == key:
            digest = cached[1]
        else:
            try:
                digest = file_sha256(path)
            except OSError:
                return None
            with self._lock:
                self._cache[str(path)] = (key, digest)
        return Entry(logical, st.st_mode & 0o777, st.st_size, digest)

    def scan(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for logical, path in self.layout.walk():
            e = self.entry(logical, path)
            if e is not None:
                out[logical] = e
        return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 16):
            h.update(chunk)
    return h.hexdigest()


MATERIAL_KEYS = ("cert", "key", "ca", "api_cert", "api_key", "api_client_ca")


def material(cfg: DispatcherConfig) -> dict[str, str]:
    """sha256 of each certificate, key and CA file a running instance loads ("-": none).

    A process whose loaded material differs from the files on disk must restart (or
    reload) to present them: :attr:`MemberInfo.restart_pending`.
    """
    out: dict[str, str] = {}
    for k in MATERIAL_KEYS:
        path = getattr(cfg, k)
        if not path:
            out[k] = "-"
            continue
        try:
            out[k] = file_sha256(Path(path))
        except OSError:
            out[k] = "missing"
    # the operator CA (trusted by the API without a config key): its arrival is a restart
    try:
        out["operator_ca"] = file_sha256(Path(cfg.ca_dir) / "operator-ca.crt")
    except OSError:
        out["operator_ca"] = "-"
    return out
