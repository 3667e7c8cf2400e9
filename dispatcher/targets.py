"""Which agents an operation reaches: names, globs, tags, ``--all`` (one function, linear).

A :class:`Selection` is what the operator asked for: references (``name``,
``name:port``, or a glob such as ``web*`` / ``db[12]:7444``), ``tags`` (every
``key=value`` must match the registry record's ``tags``, which discovery fills from
the agents' ``[tags]``), ``all`` (every registered agent) and ``strict``.

With references and tags, the tags filter the referenced agents; with tags alone (or
``all``) they filter every registered agent. A plain name that is not registered, or a
glob that matches nothing, is *unknown*: reported per host while the rest still run,
or, with ``strict`` (upstream's all-or-nothing), a :class:`RegistryError` before any
work. Nothing selected at all is always a RegistryError.

``max_hosts`` is checked on the raw references before anything else, and again on the
expanded list before any record is read (with tags: once the tags have filtered). Tags
are looked up in the registry's tag index (:mod:`dispatcher.tagindex`), so only the
records of the agents that carry them are read: each at most twice (its tags checked
again, then the target), and the registry directory is listed at most once per run
(the index is rebuilt with one scan only after the registry changed).

Standard library only (``ced run`` imports this module).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from agent.common.records import record
from dispatcher import tagindex
from dispatcher.registry import DEFAULT_PORT, Registry, RegistryError, Target, resolve, valid_name

GLOB_CHARS = frozenset("*?[")
_PORT_RE = re.compile(r"^(.*):(\d{1,5})$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
UNKNOWN = "unknown agent"

Tags = tuple[tuple[str, str], ...]


@record(frozen=True)
class Selection:
    """What to reach; ``strict`` refuses the whole operation on any unknown reference."""

    refs: tuple[str, ...] = ()
    tags: Tags = ()
    all: bool = False
    strict: bool = True

    @property
    def plain(self) -> bool:
        """Names only (upstream's form): no glob, no tags, not ``all``."""
        return not self.tags and not self.all and not any(is_glob(r) for r in self.refs)

    @property
    def empty(self) -> bool:
        return not self.refs and not self.tags and not self.all


@record(frozen=True)
class Resolved:
    """The targets, in selection order, and the references that named no agent."""

    targets: list[Target]
    unknown: list[str]


def is_glob(ref: str) -> bool:
    return any(c in GLOB_CHARS for c in ref)


def parse_tags(text: str) -> Tags:
    """``key=value[,key=value...]``; ValueError naming the bad pair."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.strip().partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not _TAG_RE.match(key) or not value:
            raise ValueError(f"bad tag {part.strip()!r} (expected key=value[,key=value...])")
        out[key] = value
    return tuple(out.items())


def tags_of(mapping: object) -> Tags:
    """Tags from a JSON object (the API's ``tags``); ValueError unless strings to strings."""
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ValueError("tags must be an object of strings")
    for k in mapping:
        if not _TAG_RE.match(k):
            raise ValueError(f"bad tag key {k!r}")
    return tuple(mapping.items())


def read_stdin_names(text: str) -> list[str]:
    """Names given on stdin (``-``): whitespace-separated, ``#`` starts a comment."""
    names: list[str] = []
    for line in text.splitlines():
        names.extend(line.split("#", 1)[0].split())
    return names


def _limit(count: int, max_hosts: int) -> None:
    if count > max_hosts:
        raise ValueError(f"too many hosts (max {max_hosts})")


def unknown_error(unknown: Sequence[str]) -> RegistryError:
    """The registry's own message (upstream's ``unknown agent(s): a, b``)."""
    names = list(unknown)
    shown = ", ".join(names[:20]) + (f" (and {len(names) - 20} more)" if len(names) > 20 else "")
    return RegistryError(f"unknown agent(s): {shown}")


def _split_port(ref: str) -> tuple[str, str]:
    m = _PORT_RE.match(ref)
    return (m.group(1), ":" + m.group(2)) if m else (ref, "")


def _expand(refs: Sequence[str], names: list[str] | None) -> tuple[dict[str, None], list[str]]:
    """References with globs expanded against ``names``; the unknown ones apart."""
    wanted: dict[str, None] = {}
    unknown: list[str] = []
    known = set(names) if names is not None else None
    for ref in refs:
        name, port = _split_port(ref)
        if is_glob(name) and known is not None:
            assert names is not None
            match = re.compile(fnmatch.translate(name)).match
            hits = [n for n in names if match(n)]
            if not hits:
                unknown.append(ref)
            for n in hits:
                wanted.setdefault(n + port, None)
        elif known is not None and (not valid_name(name) or name not in known):
            unknown.append(ref)
        else:
            wanted.setdefault(ref, None)
    return wanted, unknown


def _has_tags(registry: Registry, ref: str, tags: Tags) -> bool:
    rec = registry.get(_split_port(ref)[0])
    have = rec.get("tags") if rec is not None else None
    return isinstance(have, dict) and all(have.get(k) == v for k, v in tags)


def _describe(sel: Selection) -> str:
    parts = [" ".join(sel.refs)] if sel.refs else []
    if sel.tags:
        parts.append("tags " + ",".join(f"{k}={v}" for k, v in sel.tags))
    return " with ".join(parts) if parts else "all"


def select(
    registry: Registry, sel: Selection, default_port: int = DEFAULT_PORT, max_hosts: int = 500
) -> Resolved:
    """Resolve ``sel`` to targets (see the module text); ValueError past ``max_hosts``,
    RegistryError for unknown references with ``strict``, or when nothing is selected."""
    refs = list(sel.refs)
    if len(refs) > max_hosts and len(set(refs)) > max_hosts:
        raise ValueError(f"too many hosts (max {max_hosts})")
    if sel.empty:
        raise RegistryError("no agents given (names, globs, --tags or --all)")
    if sel.plain and sel.strict:  # upstream's path, unchanged
        return Resolved(resolve(registry, refs, default_port), [])
    carry: set[str] | None = None
    listed: list[str] | None = None
    if sel.tags:  # the index first: a rebuild lists the directory, once for both
        tag_map, listed = tagindex.load(registry)
        carry = tagindex.matching(tag_map, sel.tags)
    names = listed if listed is not None else registry.names()
    if sel.all or not refs:
        wanted: dict[str, None] = dict.fromkeys(names)
        unknown: list[str] = []
        if refs:  # --all plus names: the names must still exist
            extra, unknown = _expand(refs, names)
            wanted.update(extra)
    else:
        wanted, unknown = _expand(refs, names)
    if sel.strict and unknown:
        raise unknown_error(unknown)
    chosen = list(wanted)
    if carry is not None:
        chosen = [ref for ref in chosen if _split_port(ref)[0] in carry]
        if listed is None:  # a saved index: re-check its answer on the records
            chosen = [ref for ref in chosen if _has_tags(registry, ref, sel.tags)]
    _limit(len(chosen), max_hosts)
    if not chosen:
        if unknown:
            raise unknown_error(unknown)
        raise RegistryError(f"no registered agent matches {_describe(sel)}")
    targets = resolve(registry, chosen, default_port)
    return Resolved(targets, unknown)
