"""The registry's tag index: which agents carry ``key=value``, without reading every record.

``--tags role=web`` on a registry of 10,000 agents would otherwise open and parse 10,000
records per run. The index (``<registry_dir>/.index/tags.json``) maps every tag
``key`` -> ``value`` -> agent names, and is a cache: it records the registry directory's
identity and ``st_mtime_ns`` when it was built, and is rebuilt (one scan) whenever they
differ. Every record write is a rename into the directory (``StateWriter``, upstream's
temp-file writes too), which changes its mtime, so a write is never missed; an index
built within :data:`SETTLE` seconds of the directory's last change is used but not
saved (file timestamps tick coarsely: a write in the same tick would not show), as git
treats a "racily clean" index. The index only narrows the candidates: the caller
checks the tags again on each chosen record, so a stale entry can never select an
agent whose record no longer has the tag.

The index lives in a hidden directory, which the HA manifest skips (it is derived, each
instance keeps its own) and :meth:`~dispatcher.registry.Registry.names` ignores.
Standard library only (``ced run`` imports this module).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.common import logfmt
from agent.common.fsutil import atomic_write

if TYPE_CHECKING:
    from dispatcher.registry import Registry

INDEX_DIR = ".index"
INDEX_NAME = "tags.json"
VERSION = 1
SETTLE = 2.0  # seconds: an index of a directory changed more recently is not saved

#: key -> value -> names
TagMap = dict[str, dict[str, list[str]]]


def _stamp(registry_dir: Path) -> list[int] | None:
    try:
        st = os.stat(registry_dir)
    except FileNotFoundError:
        return None
    return [st.st_dev, st.st_ino, st.st_mtime_ns]


def index_path(registry: Registry) -> Path:
    return registry.dir / INDEX_DIR / INDEX_NAME


def _read(path: Path, stamp: list[int]) -> TagMap | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != VERSION or doc.get("dir") != stamp:
        return None
    tags = doc.get("tags")
    return tags if isinstance(tags, dict) else None


def build(registry: Registry, names: list[str] | None = None) -> TagMap:
    """The tag map from every readable record (one scan of the registry; ``names``: its
    listing, if the caller has one)."""
    tags: TagMap = {}
    for name in registry.names() if names is None else names:
        rec = registry.get(name)
        have = rec.get("tags") if rec is not None else None
        if not isinstance(have, dict):
            continue
        for key, value in have.items():
            if isinstance(key, str) and isinstance(value, str):
                tags.setdefault(key, {}).setdefault(value, []).append(name)
    return tags


def load(registry: Registry) -> tuple[TagMap, list[str] | None]:
    """The current tag map, and the registry listing when it had to be rebuilt (None when
    the saved index was still the directory's): the listing is taken after the
    directory's stamp, so an agent added meanwhile makes the stamp stale, never the map.
    A rebuilt map is saved once the directory has settled; a failed save is logged."""
    stamp = _stamp(registry.dir)
    if stamp is None:
        return {}, []
    path = index_path(registry)
    cached = _read(path, stamp)
    if cached is not None:
        return cached, None
    names = registry.names()
    tags = build(registry, names)
    if time.time() - stamp[2] / 1e9 >= SETTLE and _stamp(registry.dir) == stamp:
        doc: dict[str, Any] = {"version": VERSION, "dir": stamp, "tags": tags}
        try:
            path.parent.mkdir(mode=0o755, exist_ok=True)
            if _stamp(registry.dir) == stamp:  # creating .index/ changes the directory
                atomic_write(path, json.dumps(doc, separators=(",", ":")), 0o644)
        except OSError as exc:
            logfmt.event("tag-index-save-fail", logfmt.WARNING, path=path, error=exc)
    return tags, names


def matching(tags: TagMap, wanted: Iterable[tuple[str, str]]) -> set[str]:
    """Names carrying every ``key=value`` of ``wanted`` according to ``tags``."""
    out: set[str] | None = None
    for key, value in wanted:
        hits = set(tags.get(key, {}).get(value, ()))
        out = hits if out is None else out & hits
        if not out:
            return set()
    return out if out is not None else set()
