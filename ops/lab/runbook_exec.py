"""Extract the command blocks of a runbook and run them the way an operator would.

The convention (``ops/runbooks/README.md``): a fenced block whose info string is ``sh``
followed by ``runbook`` (a step), ``runbook-simulate`` (the event the runbook answers, made
to happen in the lab) or ``runbook-diagnose`` (read-only diagnostics of "When this
fails") holds commands; any other ``sh``/``bash`` block is an error. :func:`parse` returns
the blocks in document order with the ``##`` section each stands in.

:func:`run` writes every block to a file and runs one ``bash -euo pipefail`` that sources
them in order, as if pasted into one terminal: variables and functions a block defines are
there for the next ones, and the first failing command ends the run. Markers around each
block in the shared output tell which block failed and how long each took.

    python -m ops.lab.runbook_exec ops/runbooks/switchover.md   # with the lab's env loaded
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TAGS = ("runbook", "runbook-simulate", "runbook-diagnose")
SECTIONS = ("Pre-flight", "Procedure", "Verify", "When this fails")
_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*(.*?)\s*$")
_MARK = re.compile(r"^@@@runbook-block (\d+) (start|ok) ([\d.]+)$")


class RunbookFormatError(ValueError):
    pass


@dataclass(frozen=True)
class Block:
    index: int  # 1-based, in document order
    tag: str  # one of TAGS
    section: str  # the "## " heading it stands under ("" before the first)
    line: int  # line of the opening fence
    code: str

    @property
    def title(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return f"#{self.index} {self.tag} ({self.section}, line {self.line}): {first[:70]}"


@dataclass
class Runbook:
    path: Path
    title: str
    sections: list[str]
    blocks: list[Block]

    def in_section(self, section: str, tag: str = "runbook") -> list[Block]:
        return [b for b in self.blocks if b.section == section and b.tag == tag]


def parse(path: Path) -> Runbook:
    """The runbook's title, its ``##`` sections and its command blocks, in order."""
    lines = path.read_text().splitlines()
    title, section = "", ""
    sections: list[str] = []
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m is None:
            if line.startswith("# ") and not title:
                title = line[2:].strip()
            elif line.startswith("## "):
                section = line[3:].strip()
                sections.append(section)
            i += 1
            continue
        indent, fence, lang, info = m.groups()
        start = i + 1
        i += 1
        body: list[str] = []
        while i < len(lines) and not (lines[i].strip().startswith(fence)
                                      and lines[i].strip().strip("`") == ""):  # fmt: skip
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i >= len(lines):
            raise RunbookFormatError(f"{path.name}:{start}: unclosed code fence")
        i += 1
        if lang not in ("sh", "bash", "shell", "console"):
            continue
        tag = info.split()[0] if info else ""
        if lang != "sh" or tag not in TAGS:
            raise RunbookFormatError(
                f"{path.name}:{start}: shell block without a runbook tag "
                f"(```sh runbook, runbook-simulate or runbook-diagnose): ```{lang} {info}"
            )
        blocks.append(Block(len(blocks) + 1, tag, section, start, "\n".join(body) + "\n"))
    return Runbook(path, title, sections, blocks)


@dataclass
class BlockResult:
    block: Block
    ok: bool
    seconds: float
    output: str


@dataclass
class RunResult:
    runbook: Runbook
    returncode: int
    timed_out: bool
    seconds: float
    results: list[BlockResult] = field(default_factory=list)
    output: str = ""

    @property
    def ok(self) -> bool:
        return (not self.timed_out and self.returncode == 0
                and len(self.results) == len(self.runbook.blocks)
                and all(r.ok for r in self.results))  # fmt: skip

    @property
    def failed(self) -> BlockResult | None:
        return next((r for r in self.results if not r.ok), None)

    def report(self) -> str:
        lines = [f"{self.runbook.path.name}: {'OK' if self.ok else 'FAILED'} "
                 f"in {self.seconds:.1f} s (bash exit {self.returncode}"
                 f"{', timed out' if self.timed_out else ''})"]  # fmt: skip
        for r in self.results:
            lines.append(f"  [{'ok' if r.ok else 'FAILED'} {r.seconds:5.1f} s] {r.block.title}")
        missing = self.runbook.blocks[len(self.results) :]
        lines += [f"  [not run] {b.title}" for b in missing]
        bad = self.failed
        if bad is not None or not self.ok:
            shown = bad.output if bad is not None else self.output[-6000:]
            lines.append("--- output of the failed block ---")
            lines.append(shown.rstrip()[-8000:])
        return "\n".join(lines)


def driver(blocks: list[Block], files: list[Path]) -> str:
    """The bash program that sources every block in order between markers."""
    out = [
        "set -euo pipefail",
        '__rb_mark() { printf \'\\n@@@runbook-block %s %s %s\\n\' "$1" "$2" "$(date +%s.%N)"; }',
    ]
    for b, f in zip(blocks, files, strict=True):
        out += [f"__rb_mark {b.index} start", f'. "{f}"', f"__rb_mark {b.index} ok"]
    return "\n".join(out) + "\n"


def run(rb: Runbook, env: dict[str, str], *, timeout: float = 120, cwd: Path | None = None,
        skip_simulate: bool = False) -> RunResult:  # fmt: skip
    """Run the blocks of ``rb`` in one ``bash -euo pipefail``; see the module docstring."""
    blocks = [b for b in rb.blocks if not (skip_simulate and b.tag == "runbook-simulate")]
    with tempfile.TemporaryDirectory(prefix="runbook-") as tmp:
        files = []
        for b in blocks:
            f = Path(tmp) / f"{b.index:02d}-{b.tag}.sh"
            f.write_text(b.code)
            files.append(f)
        prog = Path(tmp) / "driver.sh"
        prog.write_text(driver(blocks, files))
        log = Path(tmp) / "output.log"
        t0 = time.monotonic()
        timed_out = False
        with open(log, "wb") as out:
            p = subprocess.Popen(["bash", str(prog)], stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                 start_new_session=True)  # fmt: skip
            try:
                rc = p.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(
                    p.pid, signal.SIGKILL
                )  # the shell and what it waits for; daemons it started
                rc = p.wait()  # (setsid) live on in their own sessions
        seconds = time.monotonic() - t0
        text = log.read_text(errors="replace")
    return RunResult(rb, rc, timed_out, seconds, _split(blocks, text), text)


def _split(blocks: list[Block], text: str) -> list[BlockResult]:
    by_index = {b.index: b for b in blocks}
    results: list[BlockResult] = []
    current: Block | None = None
    started = 0.0
    buf: list[str] = []
    for line in text.splitlines():
        m = _MARK.match(line)
        if m is None:
            buf.append(line)
            continue
        idx, what, when = int(m.group(1)), m.group(2), float(m.group(3))
        if what == "start":
            current, started, buf = by_index[idx], when, []
        elif current is not None:
            results.append(BlockResult(current, True, when - started, "\n".join(buf)))
            current, buf = None, []
    if current is not None:  # started, never finished: the failing block
        results.append(BlockResult(current, False, time.time() - started, "\n".join(buf)))
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run a runbook's command blocks in order")
    ap.add_argument("runbook", type=Path)
    ap.add_argument("--simulate", action="store_true",
                    help="also run the runbook-simulate blocks (lab only)")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args(argv)
    rb = parse(args.runbook)
    res = run(rb, dict(os.environ), timeout=args.timeout, skip_simulate=not args.simulate)
    print(res.output)
    print(res.report())
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
