"""The etcd, disaster-recovery and certificate runbooks, run from their markdown on the
multi-host lab (:func:`ops.lab.deployment.deployed`).

A runbook uses the deployment guide's convention (:mod:`ops.lab.guide_exec`): each
```` ```sh on=TARGET ```` block runs on the host it names, with the guide's site values
(:func:`ops.lab.deployment.site`) prepended; ``simulate`` blocks make the failure happen,
``diagnose`` blocks run after Verify. :func:`run` times the runbook from its first
Procedure block to the end of Verify and prints ``[runbook] NAME: N.N s``;
:func:`baseline` checks the lab is back to normal between runbooks.

To rehearse on a lab that stays up (as root; Ctrl-C stops it)::

    .venv/bin/python -m ops.lab.runbook_etcd serve /tmp/rb-lab
    echo ops/runbooks/etcd-quorum-loss.md > /tmp/rb-lab/commands     # in another shell
    echo "nosim ops/runbooks/etcd-quorum-loss.md" > /tmp/rb-lab/commands  # no failure made
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ops.lab import deployment, guide_exec
from ops.lab.hosts import Host, LabError
from ops.lab.proc import ROOT

RUNBOOKS = ROOT / "ops" / "runbooks"
#: The order they run in on one lab: each leaves the cluster at its baseline.
ORDER = (
    "etcd-quorum-loss.md",
    "replace-etcd-member.md",
    "cert-rotation-ha.md",
    "ca-compromise.md",
    "disaster-recovery.md",
)
CED = "/opt/ctrl-exec/venv/bin/ced"
#: etcdctl as the runbooks call it on the first etcd member (root's password lives there).
ETCDCTL = (
    "ETCDCTL_API=3 etcdctl --cacert /etc/etcd/pki/ca.crt "
    '--user "root:$(cat /etc/etcd/ca/root.password)" --dial-timeout 2s --command-timeout 5s '
    "--endpoints https://etcd1.lab.test:2379,https://etcd2.lab.test:2379,"
    "https://etcd3.lab.test:2379"
)

Roles = Mapping[str, Sequence[Host]]


@dataclass
class Result:
    name: str
    seconds: float  # first Procedure block to the end of Verify
    blocks: int
    printed: list[str] = field(default_factory=list)  # the "[runbook] ..." lines it printed

    def line(self) -> str:
        return f"[runbook] {self.name.removesuffix('.md')}: {self.seconds:.1f} s"


def run(
    path: Path, roles: Roles, site: str, *, log: Callable[[str], None] = print,
    timeout: float = 420, simulate: bool = True,
) -> Result:  # fmt: skip
    """Run the runbook at ``path``; raises :class:`guide_exec.GuideStepFailed` on a failed
    block (its title, host and output). ``simulate=False`` leaves out the failure (it
    happened already)."""
    blocks = [b for b in guide_exec.parse(path) if simulate or not b.simulate]
    first = next((i for i, b in enumerate(blocks) if b.section == "Procedure"), None)
    last = max((i for i, b in enumerate(blocks) if b.section in ("Procedure", "Verify")),
               default=None)  # fmt: skip
    if first is None or last is None:
        raise guide_exec.GuideFormatError(f"{path}: no block under Procedure")
    guide_exec.run(blocks[:first], roles, site, timeout=timeout, log=log)
    t0 = time.monotonic()
    report = guide_exec.run(blocks[first : last + 1], roles, site, timeout=timeout, log=log)
    took = time.monotonic() - t0
    guide_exec.run(blocks[last + 1 :], roles, site, timeout=timeout, log=log)
    printed = [ln for _, _, out in report.outputs for ln in out.splitlines()
               if ln.startswith("[runbook] ")]  # fmt: skip
    result = Result(path.name, took, len(blocks), printed)
    for line in [*printed, result.line()]:
        log(line)
    return result


def forged_ping(host: Host, leaked: str = "/root/leaked") -> dict[str, str]:
    """What each agent answers to a certificate an attacker signs with the leaked CA key
    (``leaked``/ca.key, ca.crt on ``host``, a dispatcher host: the agents' firewall admits
    it) with the dispatcher certificate's current, public serial and name:
    ``{agent: HTTP status}``, ``000`` when the TLS handshake is refused."""
    script = f"""
set -eu
d=$(mktemp -d /root/forged.XXXXXX)
serial=$(openssl x509 -in /etc/ctrl-exec/dispatcher.crt -noout -serial | cut -d= -f2)
subject=$(openssl x509 -in /etc/ctrl-exec/dispatcher.crt -noout -subject -nameopt compat | sed 's/^subject=//')
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/key" \
    -out "$d/csr" -subj "$subject" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth,serverAuth\n' > "$d/ext"
openssl x509 -req -in "$d/csr" -CA {leaked}/ca.crt -CAkey {leaked}/ca.key \
    -set_serial "0x$serial" -days 1 -extfile "$d/ext" -out "$d/crt" 2>/dev/null
for a in {" ".join(deployment.AGENTS)}; do
    code=$(curl -sk -m 10 -o /dev/null -w '%{{http_code}}' --cert "$d/crt" --key "$d/key" \
        -H 'Content-Type: application/json' -d '{{}}' "https://$a:7443/ping" || true)
    echo "$a $code"
done
rm -rf "$d"
"""
    got = host.run(["bash", "-c", script], env=host.env(), timeout=60)
    return dict(line.split() for line in got.stdout.splitlines() if line.strip())


def _sh(host: Host, cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return host.run(["bash", "-c", cmd], env=host.env(), timeout=timeout, check=False)


def forged_operator_call(host: Host, leaked: str = "/root/leaked") -> str:
    """The HTTP status of ``POST /ping`` through the virtual IP with an operator
    certificate an attacker signs with the leaked operator CA key (``leaked``/operator-ca.*
    on ``host``); ``000`` when the TLS handshake is refused."""
    hosts = ",".join(f'"{a}"' for a in deployment.AGENTS)
    script = f"""
set -eu
d=$(mktemp -d /root/forged-op.XXXXXX)
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/key" \
    -out "$d/csr" -subj /CN=mallory 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n' > "$d/ext"
openssl x509 -req -in "$d/csr" -CA {leaked}/operator-ca.crt -CAkey {leaked}/operator-ca.key \
    -CAcreateserial -days 1 -extfile "$d/ext" -out "$d/crt" 2>/dev/null
curl -sk -m 20 -o /dev/null -w '%{{http_code}}' --cert "$d/crt" --key "$d/key" \
    -H 'Content-Type: application/json' -d '{{"hosts":[{hosts}]}}' \
    "https://{deployment.VIP_NAME}:7445/ping" || true
rm -rf "$d"
"""
    return host.run(["bash", "-c", script], env=host.env(), timeout=60).stdout.strip()


def baseline_problem(roles: Roles) -> str | None:
    """None when the lab is at its baseline: every etcd member healthy, one leader and
    every instance serving, both agents answering through the virtual IP; else what is
    not."""
    etcd1, disp1, ops = roles["etcd"][0], roles["dispatcher"][0], roles["operator"][0]
    got = _sh(etcd1, f"{ETCDCTL} endpoint health --cluster -w json")
    try:
        health = json.loads(got.stdout or "[]")
    except json.JSONDecodeError:
        health = []
    if len(health) != len(roles["etcd"]) or not all(h.get("health") for h in health):
        return f"etcd not all healthy: {got.stdout.strip()[:300]} {got.stderr.strip()[:300]}"
    got = _sh(disp1, f"{CED} cluster status --json")
    try:
        status = json.loads(got.stdout)
    except json.JSONDecodeError:
        return f"cluster status: {got.stderr.strip()[:300]}"
    members = status.get("members") or []
    if not status.get("leader") or len(members) != len(roles["dispatcher"]):
        return f"cluster status: leader {status.get('leader')}, {len(members)} members"
    if not all(m.get("state") == "serving" for m in members):
        return (
            f"not every member serving: {[(m.get('instance_id'), m.get('state')) for m in members]}"
        )
    leaders = set()
    for h in roles["dispatcher"]:
        got = _sh(h, "curl -fsS -m 3 http://127.0.0.1:7446/status")
        try:
            doc = json.loads(got.stdout)
        except json.JSONDecodeError:
            return f"{h.name}: /status {got.stderr.strip()[:200]}"
        if doc.get("role") == "leader":
            leaders.add(h.name)
    if len(leaders) != 1:
        return f"leaders by /status: {sorted(leaders)}"
    try:
        doc = deployment.run_via_vip(ops)
    except (LabError, ValueError) as exc:  # reported; the caller retries
        return f"run through the VIP: {exc}"
    results = doc.get("results")
    if not isinstance(results, list) or sorted(r.get("host") for r in results) != sorted(
        deployment.AGENTS
    ) or not all(r.get("exit") == 0 for r in results):  # fmt: skip
        return f"run through the VIP: {doc}"
    return None


def baseline(roles: Roles, timeout: float = 120) -> float:
    """Wait (at most ``timeout`` s) for :func:`baseline_problem` to clear; seconds taken."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    problem = baseline_problem(roles)
    while problem is not None:
        if time.monotonic() > deadline:
            raise AssertionError(f"lab not at its baseline after {timeout:.0f} s: {problem}")
        time.sleep(1)
        problem = baseline_problem(roles)
    return time.monotonic() - t0


def diagnostics(roles: Roles) -> str:
    """What the lab looks like (for a failed runbook's report)."""
    out = []
    for h in roles["dispatcher"]:
        got = _sh(h, "curl -sS -m 3 http://127.0.0.1:7446/status; echo; "
                     "journalctl -u ctrl-exec-api | tail -n 15")  # fmt: skip
        out.append(f"--- {h.name}\n{got.stdout[-2500:]}{got.stderr[-500:]}")
    for h in roles["etcd"]:
        got = _sh(h, "journalctl -u etcd | tail -n 5")
        out.append(f"--- {h.name}\n{got.stdout[-1500:]}")
    return "\n".join(out)


def serve(root: Path) -> int:
    """Deploy a lab and run the runbooks named on ``root/commands`` (a FIFO) against it;
    ``baseline`` checks the baseline."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the lab is stopped on the way out
    root.mkdir(parents=True, exist_ok=True)
    fifo = root / "commands"
    if not fifo.exists():
        os.mkfifo(fifo)
    with deployment.deployed(root / "lab") as (lab, roles, _):
        site = deployment.site(lab)
        print(f"lab ready: echo RUNBOOK.md > {fifo}", flush=True)
        while True:
            with fifo.open() as f:
                for line in f:
                    what = line.strip()
                    if what in ("quit", ""):
                        return 0
                    importlib.reload(guide_exec)  # edits to the runbooks' code apply now
                    mod = importlib.reload(importlib.import_module("ops.lab.runbook_etcd"))
                    try:
                        if what == "baseline":
                            print(f"baseline after {mod.baseline(roles):.1f} s", flush=True)
                        elif what.startswith("nosim "):
                            mod.run(Path(what.split()[1]), roles, site, simulate=False)
                        else:
                            mod.run(Path(what), roles, site)
                    except (AssertionError, ValueError) as exc:
                        print(f"FAILED: {exc}\n{mod.diagnostics(roles)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ops.lab.runbook_etcd")
    ap.add_argument("verb", choices=["serve"])
    ap.add_argument("root", type=Path)
    args = ap.parse_args(argv)
    return serve(args.root)


if __name__ == "__main__":
    sys.exit(main())
