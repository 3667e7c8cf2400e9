"""``ced run``/``ping`` while the fan-out runs: results as hosts finish, progress, recap.

:class:`Live` is the fan-out's per-host callback (called on its worker threads, so every
write is under one lock). It prints each result as it finishes (text, or one JSON object
per line with ``--stream``), keeps a progress line on stderr (only on a terminal, or with
``CED_PROGRESS=1``; never with ``--json`` or ``--stream``), writes each host's output to
``-o DIR`` and, at the end, prints the recap on stderr: the counts by outcome, the hosts
that were not ok, the slowest hosts. Standard library only (``ced run`` imports it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from dispatcher.ced.output import format_run, host_label

Result = dict[str, Any]

#: outcome keys, in the recap's order (as dispatcher.client.fanout.OUTCOMES); a rolling
#: run adds ``skipped`` (hosts its failure budget kept from starting)
OUTCOMES = ("ok", "failed", "unreachable", "denied", "locked", "unknown")
SKIPPED = "skipped"
SLOWEST = 3
TICK_S = 1.0  # the progress line's redraw period on a terminal
LISTED = 10


def progress_wanted(stream: IO[str]) -> bool:
    """``CED_PROGRESS=1`` forces the progress line, ``0`` disables it; else only on a TTY."""
    forced = os.environ.get("CED_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return _isatty(stream)


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def rtt_ms(r: Result) -> int:
    """A result's ``rtt`` (``"123ms"``) in milliseconds; -1 when absent."""
    rtt = r.get("rtt")
    if isinstance(rtt, str) and rtt.endswith("ms") and rtt[:-2].isdigit():
        return int(rtt[:-2])
    return -1


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(OUTCOMES, 0)


def write_atomic(path: str, data: str) -> None:
    """``data`` at ``path`` through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8", errors="replace") as f:
        f.write(data)
    os.replace(tmp, path)


def save_output(outdir: str, r: Result) -> None:
    """``DIR/<host>.stdout``, ``.stderr`` and ``.exit`` for a host that was reached."""
    from dispatcher.registry import valid_name

    host = str(r.get("host", ""))
    if r.get("status") == "unknown" or not valid_name(host):
        return  # nothing ran; and never a path from a name that is not a registry key
    base = os.path.join(outdir, host)
    write_atomic(base + ".stdout", str(r.get("stdout") or ""))
    stderr = str(r.get("stderr") or "")
    if r.get("error"):
        stderr += f"ERROR: {r['error']}\n"
    write_atomic(base + ".stderr", stderr)
    write_atomic(base + ".exit", f"{r.get('exit', -1)}\n")


class Live:
    """The per-host callback of one ``ced run``/``ping`` (see the module text).

    ``show`` prints one finished result (None: results are printed by the caller at the
    end, in target order); ``ndjson`` prints each as one JSON object with its
    ``outcome``; ``progress`` is the stream for the progress line (None: none).
    """

    def __init__(
        self,
        *,
        show: Callable[[Result], None] | None = None,
        ndjson: bool = False,
        progress: IO[str] | None = None,
        outdir: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = 0  # known once the targets are resolved (expect)
        self.show = show
        self.ndjson = ndjson
        self.progress = progress
        self.tty = progress is not None and _isatty(progress)
        self.outdir = outdir
        self.clock = clock
        self.t0 = clock()
        self.counts = empty_counts()
        self.done: list[tuple[Result, str]] = []
        self.lock = threading.Lock()
        self.failure: BaseException | None = None
        self.drawn = False  # a progress line is on the terminal
        self.waves = ""  # "wave 2/5" while a rolling run goes
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def expect(self, total: int) -> None:
        """The number of hosts (the fan-out's ``on_targets``); draws the first line."""
        with self.lock:
            self.total = total
            self._draw()
        if self.tty and self._ticker is None:  # elapsed keeps moving while hosts are slow
            self._ticker = threading.Thread(target=self._tick, name="ced-progress", daemon=True)
            self._ticker.start()

    def wave(self, n: int, total: int, size: int) -> None:
        """A wave starts (the operation's ``on_wave``): the progress line names it; on a
        stream that is not a terminal, a line says so."""
        with self.lock:
            if total <= 1:
                return
            self.waves = f"wave {n}/{total}  "
            if self.progress is not None and not self.tty:
                self.progress.write(f"wave {n}/{total}: {size} host{'s' if size != 1 else ''}\n")
            self._draw()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self.lock:
                if self._stop.is_set() or self.failure is not None:
                    return
                try:
                    self._draw()
                except Exception as exc:
                    self.failure = exc

    def __call__(self, r: Result, outcome: str) -> None:
        with self.lock:
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            self.done.append((r, outcome))
            if self.failure is not None:
                return
            try:
                self._emit(r, outcome)
            except Exception as exc:  # a closed pipe, a full disk: reported once, at the end
                self.failure = exc

    def _emit(self, r: Result, outcome: str) -> None:
        if self.outdir is not None:  # made on the first result: a refused run leaves nothing
            os.makedirs(self.outdir, mode=0o755, exist_ok=True)
            save_output(self.outdir, r)
        if self.ndjson:
            line = json.dumps({**r, "outcome": outcome}, ensure_ascii=False,
                              separators=(",", ":"))  # fmt: skip
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
        elif self.show is not None:
            self._clear()
            self.show(r)
            sys.stdout.flush()
        self._draw()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def line(self) -> str:
        c = self.counts
        skipped = f"  skipped {c[SKIPPED]}" if c.get(SKIPPED) else ""
        return (f"[{len(self.done)}/{self.total}] {self.waves}ok {c['ok']}  failed {c['failed']}  "
                f"unreachable {c['unreachable']}{skipped}  elapsed {self.elapsed():.1f}s")  # fmt: skip

    def _clear(self) -> None:
        if self.progress is not None and self.tty:
            self.progress.write("\r\x1b[K")
            self.progress.flush()

    def _draw(self) -> None:
        if self.progress is None:
            return
        if self.tty:
            self.progress.write("\r\x1b[K" + self.line())
            self.drawn = True
        else:
            self.progress.write(self.line() + "\n")
        self.progress.flush()

    def close(self, quiet: bool = False) -> None:
        """End the progress line; re-raise what a write failed with (unless ``quiet``)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2 * TICK_S)
        with self.lock:
            if self.progress is not None and self.drawn:
                self.progress.write("\n")
                self.progress.flush()
                self.drawn = False
            if self.failure is not None and not quiet:
                raise self.failure


def show_run(r: Result) -> None:
    format_run([r])


def recap(
    done: list[tuple[Result, str]],
    counts: dict[str, int],
    elapsed: float,
    rolled: dict[str, Any] | None = None,
) -> list[str]:
    """The final recap: counts by outcome, the hosts that were not ok, the slowest; for a
    rolling run (``rolled``: the answer's ``rolling``), the waves and where it stopped."""
    total = sum(counts.values())
    kinds = (*OUTCOMES, SKIPPED) if rolled is not None or counts.get(SKIPPED) else OUTCOMES
    parts = ", ".join(f"{counts.get(k, 0)} {k}" for k in kinds)
    lines = [f"--- {total} host{'s' if total != 1 else ''} in {elapsed:.1f}s: {parts}"]
    if rolled is not None:
        lines.append(_rolling_line(rolled))
    for kind in kinds[1:]:
        names = [host_label(r) for r, o in done if o == kind]
        if names:
            more = f" (and {len(names) - LISTED} more)" if len(names) > LISTED else ""
            lines.append(f"{kind}: {', '.join(names[:LISTED])}{more}")
    timed = sorted(((rtt_ms(r), str(r.get("host", "?"))) for r, o in done if o != "unknown"),
                   key=lambda x: (-x[0], x[1]))  # fmt: skip
    slow = [f"{name} ({ms}ms)" for ms, name in timed[:SLOWEST] if ms >= 0]
    if slow and total > 1:
        lines.append(f"slowest: {', '.join(slow)}")
    return lines


def _rolling_line(rolled: dict[str, Any]) -> str:
    waves, started = rolled.get("waves", 0), rolled.get("waves_started", 0)
    batch = f" of {rolled['batch']}" if rolled.get("batch") else ""
    line = f"waves: {started}/{waves} started{batch}"
    if rolled.get("max_fail"):
        line += f", --max-fail {rolled['max_fail']}"
    if rolled.get("stopped"):
        line += f": stopped, {rolled.get('skipped', 0)} host(s) never started (skipped)"
    return line
