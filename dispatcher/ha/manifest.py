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
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    # sha256 of each manifest chunk in the store (derived from files: not compared)
    chunks: tuple[str, ...] = field(default=(), compare=False)

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


# ----- the generation in the store: a small head and content-addressed chunks ---------------
#
# ``/<cluster>/generation`` holds the head (number, epoch, leader, manifest hash, file count
# and the sha256 of each chunk, in order); each chunk holds the manifest rows of the files
# whose path hashes to its bucket (``chunk_index``), as zlib-compressed JSON, under
# ``/<cluster>/generation-chunks/<sha256 of the stored bytes>``. Bucketing by path hash
# keeps every other chunk byte-identical when one file changes, so a generation writes one
# chunk and the head. Signing (or any other envelope) goes in this one function pair.

HEAD_FORMAT = 2
CHUNK_FILES = 512  # target files per chunk (the chunk count is a power of two)
MAX_CHUNKS = 4096
MAX_CHUNK_RAW = 16 * 1024 * 1024  # a chunk inflating past this is refused (zip bomb)
ChunkGetter = Callable[[Sequence[str]], Mapping[str, bytes]]
_ENCODED: dict[tuple[tuple[str, int, int, str], ...], tuple[str, bytes]] = {}


def chunk_count(files: int) -> int:
    """Chunks for ``files`` files: the smallest power of two giving at most CHUNK_FILES each."""
    n = 1
    while n * CHUNK_FILES < files and n < MAX_CHUNKS:
        n *= 2
    return n


def chunk_index(path: str, count: int) -> int:
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:4], "big") % count


def encode_generation(g: Generation) -> tuple[bytes, dict[str, bytes]]:
    """``(head, {chunk sha256: chunk bytes})``: what the leader writes to the store."""
    count = chunk_count(len(g.files))
    buckets: list[list[tuple[str, int, int, str]]] = [[] for _ in range(count)]
    for path, e in sorted(g.files.items()):
        buckets[chunk_index(path, count)].append((e.path, e.mode, e.size, e.sha256))
    chunks: dict[str, bytes] = {}
    order: list[str] = []
    for rows in buckets:
        key = tuple(rows)
        hit = _ENCODED.get(key)  # an unchanged chunk is not encoded again
        if hit is None:
            raw = json.dumps(rows, separators=(",", ":"), ensure_ascii=True).encode()
            data = zlib.compress(raw, 6)
            hit = (hashlib.sha256(data).hexdigest(), data)
        sha, data = hit
        chunks[sha] = data
        order.append(sha)
    if len(_ENCODED) > 4 * count:
        _ENCODED.clear()
    _ENCODED.update(
        (tuple(rows), (sha, chunks[sha])) for rows, sha in zip(buckets, order, strict=True)
    )
    head = json.dumps(
        {
            "format": HEAD_FORMAT,
            "generation": g.number,
            "epoch": g.epoch,
            "leader": g.leader,
            "manifest_sha256": g.manifest_sha256,
            "published_at": g.published_at,
            "sync_mode": g.sync_mode,
            "files": len(g.files),
            "chunks": order,
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    return head, chunks


def decode_generation(
    raw: bytes | str,
    get_chunks: ChunkGetter | None = None,
    parsed: dict[str, list[Entry]] | None = None,
) -> Generation:
    """The generation of a head read from the store, its chunks fetched with ``get_chunks``
    and verified (each chunk's sha256, every row, the manifest hash); ManifestError.

    Without ``get_chunks`` only the head is decoded (``files`` empty, ``chunks`` set).
    ``parsed`` holds the rows of chunks verified before, by sha256 (only those not in it
    are fetched); it is left holding exactly this generation's chunks."""
    try:
        d = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"generation head is not JSON: {exc}") from None
    if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
        raise ManifestError("generation head is not an object of format 2")
    try:
        number, epoch = int(d["generation"]), int(d["epoch"])
        leader, mh = str(d.get("leader", "")), str(d["manifest_sha256"])
        n_files, order = int(d["files"]), d["chunks"]
        at, mode = float(d.get("published_at") or 0.0), str(d.get("sync_mode") or "push")
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"generation head lacks {exc}") from None
    if (
        not isinstance(order, list)
        or not 1 <= len(order) <= MAX_CHUNKS
        or any(not _is_sha(c) for c in order)
        or len(order) != chunk_count(n_files)
    ):
        raise ManifestError("generation head has a bad chunk list")
    chunks = tuple(str(c) for c in order)
    if get_chunks is None:
        return Generation(number, epoch, leader, mh, {}, at, mode, chunks)
    known = parsed if parsed is not None else {}
    got = get_chunks([c for c in chunks if c not in known])
    files: dict[str, Entry] = {}
    rows_of: dict[str, list[Entry]] = {}
    for i, sha in enumerate(chunks):
        rows = known.get(sha)
        if rows is None:
            data = got.get(sha)
            if data is None:
                raise ManifestError(f"chunk {i} ({sha[:16]}) of generation {number} is missing")
            if hashlib.sha256(data).hexdigest() != sha:
                raise ManifestError(f"chunk {i} of generation {number} fails its hash check")
            rows = [Entry.from_json(item) for item in _inflate_rows(data, i)]
            if any(chunk_index(e.path, len(chunks)) != i for e in rows):
                raise ManifestError(f"chunk {i} of generation {number} holds a foreign path")
        rows_of[sha] = rows
        for e in rows:
            if e.path in files:
                raise ManifestError(f"{e.path} listed twice")
            files[e.path] = e
    if len(files) != n_files or manifest_hash(files) != mh:
        raise ManifestError("manifest_sha256 does not match the file list")
    if parsed is not None:
        parsed.clear()
        parsed.update(rows_of)
    return Generation(number, epoch, leader, mh, files, at, mode, chunks)


def _inflate_rows(data: bytes, i: int) -> list[dict[str, Any]]:
    try:
        z = zlib.decompressobj()
        raw = z.decompress(data, MAX_CHUNK_RAW)
        if z.unconsumed_tail or not z.eof:
            raise ManifestError(f"chunk {i} is truncated or inflates too far")
        rows = json.loads(raw)
    except (zlib.error, ValueError) as exc:
        raise ManifestError(f"chunk {i} is unreadable: {exc}") from None
    if not isinstance(rows, list):
        raise ManifestError(f"chunk {i} is not a list")
    out: list[dict[str, Any]] = []
    for r in rows:
        if not isinstance(r, list) or len(r) != 4:
            raise ManifestError(f"chunk {i} has a bad row")
        out.append({"path": r[0], "mode": r[1], "size": r[2], "sha256": r[3]})
    return out


def _is_sha(value: object) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


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

    def walk(self) -> Iterator[tuple[str, str | Path]]:
        """Every synced file that exists: ``(logical, local path)``.

        Plain string work (no per-file pathlib): with 20,000 registry records it runs once
        per publish and per apply."""
        skip = self.excluded | {str(f) for f in self.files.values()}
        for name, root in self.roots.items():
            if not root.is_dir():
                continue
            top = str(root)
            # a root nested in another (registry_dir under ca_dir) belongs to the inner one
            inner = {
                str(r)
                for other, r in self.roots.items()
                if other != name and _under(r, root) and len(str(r)) > len(top)
            }
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = sorted(
                    d for d in dirnames if not d.startswith(".") and f"{dirpath}/{d}" not in inner
                )
                rel_dir = dirpath[len(top) + 1 :]
                prefix = f"{name}/{rel_dir}/" if rel_dir else f"{name}/"
                for fn in sorted(filenames):
                    if fn.startswith("."):
                        continue
                    full = f"{dirpath}/{fn}"
                    if full not in skip:
                        yield prefix + fn, full
        yield from self.files.items()

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

    def entry(self, logical: str, path: str | Path) -> Entry | None:
        path = str(path)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            digest = cached[1]
        else:
            try:
                digest = file_sha256(path)
            except OSError:
                return None
            with self._lock:
                self._cache[path] = (key, digest)
        return Entry(logical, st.st_mode & 0o777, st.st_size, digest)

    def known(self, path: Path, sha256: str) -> None:
        """``path`` was just written with content of ``sha256`` (verified by the writer)."""
        try:
            st = os.lstat(path)
        except OSError:
            return
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._lock:
            self._cache[str(path)] = (key, sha256)

    def scan(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        for logical, path in self.layout.walk():
            e = self.entry(logical, path)
            if e is not None:
                out[logical] = e
        return out


def file_sha256(path: str | Path) -> str:
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
