"""Run a deployment guide's command blocks on the lab hosts they name.

The convention (``docs/deploy.md``): a fenced block whose info string is ``sh`` followed by
``on=TARGET`` holds commands for the hosts of ``TARGET``: a role (``dispatcher``, ``etcd``,
``lb``, ``agent``, ``operator``: every host of it, one after the other) or one host of it
(``dispatcher-1``, ``lb-2``). Optional words after it:

* ``lab=skip``: not run in the lab (installing packages: the lab hosts share the machine's
  ``/usr``, which ``ops/setup.sh`` provisioned);
* ``async``: started, not waited for; it must have ended when the next block has (an agent
  waiting for its pairing approval while the next block approves it);
* ``simulate`` (runbooks): the event the runbook answers ("the leader's host died"): the
  on-call engineer does not run it, it already happened; the lab runs it at that point;
* ``diagnose`` (runbooks): read-only diagnostics under "When this fails"; the lab runs it
  after Verify, on the recovered cluster, and it must exit 0 too.

One block ``sh site`` sets the site's variables (host names, the virtual IP); the lab
replaces it with its own values and prepends them to every block. Any other ``sh`` or
``bash`` block is a format error, so nothing in the guide goes untested.

Each block runs as ``bash -euo pipefail`` on its host (:meth:`ops.lab.hosts.Host.run`), with
the lab's ``systemctl``, ``ssh`` and ``scp`` on its ``PATH``. The first failure stops the
run with the block, its line, the host and the end of its output.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ops.lab.hosts import Host

_FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w+-]*)\s*(.*?)\s*$")


class GuideFormatError(ValueError):
    pass


class GuideStepFailed(AssertionError):
    pass


@dataclass(frozen=True)
class Block:
    index: int
    line: int
    section: str
    target: str  # "site" for the variables block
    code: str
    skip: bool = False
    background: bool = False
    simulate: bool = False
    diagnose: bool = False

    @property
    def title(self) -> str:
        first = next((ln.strip() for ln in self.code.splitlines() if ln.strip()), "")
        return f"#{self.index} on={self.target} ({self.section}, line {self.line}): {first[:60]}"


def parse(path: Path) -> list[Block]:
    blocks: list[Block] = []
    section = ""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        m = _FENCE.match(line)
        if not m:
            i += 1
            continue
        indent, fence, lang, rest = m.groups()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise GuideFormatError(f"{path}:{i + 1}: unclosed code block")
        if lang in ("sh", "bash"):
            words = rest.split()
            target = next((w[3:] for w in words if w.startswith("on=")), "")
            if "site" in words:
                target = "site"
            if not target:
                raise GuideFormatError(
                    f"{path}:{i + 1}: a {lang} block needs on=HOST (or 'site'): every "
                    "command in the guide runs in the lab test"
                )
            blocks.append(Block(len(blocks) + 1, i + 1, section, target, "\n".join(body) + "\n",
                                skip="lab=skip" in words, background="async" in words,
                                simulate="simulate" in words, diagnose="diagnose" in words))  # fmt: skip
        i = j + 1
    return blocks


@dataclass
class Report:
    timings: list[tuple[Block, str, float]] = field(default_factory=list)
    outputs: list[tuple[Block, str, str]] = field(default_factory=list)  # block, host, stdout

    def lines(self) -> list[str]:
        return [f"[guide] {b.title} on {h}: {t:.2f} s" for b, h, t in self.timings]


def run(
    blocks: Sequence[Block],
    roles: Mapping[str, Sequence[Host]],
    site: str,
    *,
    timeout: float = 180,
    log: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> Report:
    """Run ``blocks`` on the hosts of ``roles`` with the variables ``site``."""
    report = Report()
    pending: list[tuple[Block, Host, subprocess.Popen[str]]] = []
    for block in blocks:
        if block.target == "site" or block.skip:
            continue
        hosts = targets(block, roles)
        script = f"{site}\n{block.code}"
        for host in hosts:
            t0 = time.monotonic()
            argv = host.command(["bash", "-euo", "pipefail", "-c", script])
            if block.background:
                p = subprocess.Popen(argv, env=host.env(env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
                pending.append((block, host, p))
                continue
            got = subprocess.run(argv, env=host.env(env), capture_output=True, text=True,
                                 timeout=timeout)  # fmt: skip
            took = time.monotonic() - t0
            report.timings.append((block, host.name, took))
            report.outputs.append((block, host.name, got.stdout))
            log(f"[guide] {block.title} on {host.name}: {took:.2f} s")
            if got.returncode != 0:
                raise GuideStepFailed(
                    f"{block.title} failed on {host.name} (exit {got.returncode}):\n"
                    f"{(got.stdout + got.stderr)[-3000:]}{_abandon(pending)}"
                )
        if not block.background:
            _collect(pending, timeout, log)
    _collect(pending, timeout, log)
    return report


def _abandon(pending: list[tuple[Block, Host, subprocess.Popen[str]]]) -> str:
    """Stop the async blocks still running (a later step failed) and return what the
    failed or unfinished ones printed, for the failure's report (a step that waits on
    async work usually fails because of it)."""
    parts = []
    while pending:
        block, host, p = pending.pop(0)
        if p.poll() is None:
            p.kill()
        out, _ = p.communicate()
        if p.returncode != 0:
            state = "killed" if p.returncode < 0 else f"exit {p.returncode}"
            parts.append(f"\n--- async {block.title} on {host.name} ({state}):\n{out[-1500:]}")
    return "".join(parts[:5]) + (f"\n... {len(parts) - 5} more" if len(parts) > 5 else "")


def _collect(
    pending: list[tuple[Block, Host, subprocess.Popen[str]]], timeout: float,
    log: Callable[[str], None],
) -> None:  # fmt: skip
    while pending:
        block, host, p = pending.pop(0)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            raise GuideStepFailed(
                f"{block.title} on {host.name} did not end:\n{out[-3000:]}"
            ) from None
        log(f"[guide] {block.title} on {host.name}: ended (async)")
        if p.returncode != 0:
            raise GuideStepFailed(
                f"{block.title} failed on {host.name} (exit {p.returncode}):\n{out[-3000:]}"
            )


def targets(block: Block, roles: Mapping[str, Sequence[Host]]) -> list[Host]:
    """The hosts of ``block.target``: a role, or ``ROLE-N`` (1-based)."""
    if block.target in roles:
        return list(roles[block.target])
    m = re.fullmatch(r"(.+)-(\d+)", block.target)
    if m and m[1] in roles and 1 <= int(m[2]) <= len(roles[m[1]]):
        return [roles[m[1]][int(m[2]) - 1]]
    raise GuideFormatError(f"line {block.line}: no lab host for on={block.target}")
