"""``ced setup-ca``, ``setup-operator-ca``, ``issue-operator``, ``setup-ctrl-exec``,
``rotate-cert``, ``serial-status`` and ``maintain``.

All but ``serial-status`` and ``issue-operator`` (it signs locally with the operator CA
key and writes only to ``--out``) are leader-only actions (:mod:`dispatcher.ha.actions`): carried
out here without etcd, by the cluster leader with it. In a cluster ``rotate-cert`` then
follows the members converging on the new serial
(:func:`dispatcher.ced.cluster.wait_converged`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from dispatcher.ced.invocation import Invocation, local_user
from dispatcher.ced.output import PROG, err, out, out_json
from dispatcher.errors import ExitCode, Fail


def cmd_setup_ca(inv: Invocation) -> ExitCode:
    out("Setting up dispatcher CA...")
    doc = inv.leader_action("setup-ca", {}, failed="Error: ").data
    out("CA created:")
    out(f"  Key:  {doc['key']}")
    out(f"  Cert: {doc['cert']}")
    out("Keep ca.key secure - it never leaves this host.")
    return ExitCode.OK


def cmd_setup_operator_ca(inv: Invocation) -> ExitCode:
    replace = bool(inv.ns.replace)
    if (
        replace
        and sys.stdin.isatty()
        and not inv.ns.yes
        and not inv.confirm("Replace the operator CA (every operator certificate stops working)?")
    ):
        out("Aborted.")
        return ExitCode.OK
    out("Replacing the operator CA..." if replace else "Setting up the operator CA...")
    doc = inv.leader_action("setup-operator-ca", {"replace": True} if replace else {},
                            failed="Error: ").data  # fmt: skip
    out("Operator CA created:")
    out(f"  Key:         {doc['key']}")
    out(f"  Cert:        {doc['cert']}")
    out(f"  Fingerprint: {doc['fingerprint']}")
    out("The API trusts it without configuration (every instance, once replicated).")
    out(f"Issue operator certificates with '{PROG} issue-operator NAME'.")
    return ExitCode.OK


def cmd_issue_operator(inv: Invocation) -> ExitCode:
    from dispatcher.pki import operatorca

    inv.need(1, "issue-operator NAME [--days N] [--out DIR]")
    days = int(inv.ns.days) if inv.ns.days is not None else operatorca.DEFAULT_DAYS
    issued = operatorca.issue_operator(inv.d.cfg.ca_dir, inv.words[0], days, inv.ns.out or ".",
                                       issued_by=local_user())  # fmt: skip
    if inv.json:
        out_json({"ok": 1, "cn": issued.cn, "serial": issued.serial, "days": issued.days,
                  "cert": str(issued.cert), "key": str(issued.key)})  # fmt: skip
        return ExitCode.OK
    out(f"Operator certificate issued for {issued.cn}:")
    out(f"  Cert:   {issued.cert}")
    out(f"  Key:    {issued.key}")
    out(f"  Serial: {issued.serial}")
    out(f"  Valid:  {issued.days} days")
    return ExitCode.OK


def _replace_existing(inv: Invocation) -> bool:
    """Warn about an existing dispatcher cert; whether to go on."""
    count = len(inv.d.registry.names())
    if not count:
        out("Existing dispatcher cert found. No registered agents - replacing.")
        return True
    out("WARNING: Existing dispatcher cert found.")
    out(f"  {count} registered agent{'' if count == 1 else 's'} will require "
        "re-pairing after this operation.")  # fmt: skip
    out("  Operations (run/ping) continue to work until agent certs expire.")
    out("  /capabilities will be rejected by agents until re-paired.")
    out()
    return inv.confirm("Proceed?")


def cmd_setup_dispatcher(inv: Invocation) -> ExitCode:
    if Path(inv.d.cfg.cert).exists() and not _replace_existing(inv):
        out("Aborted.")
        return ExitCode.OK
    out("Generating dispatcher certificate...")
    doc = inv.leader_action("setup-ctrl-exec", {}, failed="Error: ").data
    out("Dispatcher cert created:")
    out(f"  Key:    {doc['key']}")
    out(f"  Cert:   {doc['cert']}")
    out(f"  Serial: {doc['serial']}")
    out(f"Run '{PROG} pairing-mode' to re-pair agents as needed.")
    return ExitCode.OK


# ----- rotation ----------------------------------------------------------------------------


def cmd_rotate_cert(inv: Invocation) -> ExitCode:
    from dispatcher.ha import actions

    if (
        sys.stdin.isatty()
        and not inv.json
        and not inv.confirm("Rotate the dispatcher certificate?")
    ):
        out("Aborted.")
        return ExitCode.OK
    if inv.in_cluster:
        return _rotate_in_cluster(inv)
    if not inv.json:
        out("Rotating dispatcher certificate...")
    try:
        res = actions.request(inv.d, "rotate-cert").data
    except actions.ActionFailed as exc:
        reason = exc.__cause__ or exc
        if inv.json:
            out_json({"ok": 0, "error": str(reason)})
            return ExitCode.FAILURE
        raise Fail(f"Rotation failed: {reason}") from None
    if not isinstance(res, dict) or not res.get("rotated", True):
        error = res.get("error") if isinstance(res, dict) else None
        raise Fail(f"Rotation failed: {error or 'unknown error'}")
    if inv.json:
        out_json({"ok": 1, **res})
    else:
        _print_rotation(res)
    return ExitCode.OK


def _print_rotation(res: dict[str, Any]) -> None:
    updated = res.get("updated") or []
    failed = res.get("failed") or []
    out(f"New serial:      {res.get('new_serial') or res.get('serial') or '?'}")
    out(f"Old serial:      {res.get('old_serial') or '(none)'}")
    out(f"Overlap expires: {res.get('overlap_expires') or '?'}")
    out(f"Agents pending:  {res.get('agents_pending') or 0}")
    if not res.get("agents_pending"):
        return
    out()
    out(f"  Updated: {len(updated) if isinstance(updated, list) else updated}")
    out(f"  Failed:  {len(failed) if isinstance(failed, list) else failed}")
    if isinstance(failed, list) and failed:
        out()
        out("Agents requiring attention:")
        for f in failed:
            host = f.get("host") or f.get("hostname") or "?" if isinstance(f, dict) else f
            error = f.get("error") or "failed" if isinstance(f, dict) else "failed"
            out(f"  {host!s:<30}  {error}")
        out()
        out("Failed agents are retried by the maintenance run (ced maintain).")
        out("Agents offline longer than the overlap window will require re-pairing.")


def _rotate_in_cluster(inv: Invocation) -> ExitCode:
    """The leader rotates, publishes the generation and restarts every member in turn;
    wait (``--timeout``, default 300 s) until every member presents the new serial."""
    from dispatcher.ced import cluster

    if not inv.json:
        out("Rotating dispatcher certificate (carried out by the cluster leader)...")
    expected = cluster.members(inv)
    done = inv.leader_action("rotate-cert", {}, timeout=180.0)
    res: dict[str, Any] = {**done.data, "generation": done.generation}
    leader, epoch = inv.leader
    serial = str(res.get("new_serial") or "")
    if not inv.json:
        out(f"New serial:      {serial}")
        out(f"Old serial:      {res.get('old_serial') or '(none)'}")
        out(f"Overlap expires: {res.get('overlap_expires') or '?'}")
        out(f"Agents updated:  {len(res.get('updated') or [])}, "
            f"failed: {len(res.get('failed') or [])}")  # fmt: skip
        out(f"Leader:          {leader} (epoch {epoch}), generation {res.get('generation')}")
        out("Rolling restart: every member restarts in turn to present the new serial...")
    timeout = float(inv.ns.timeout) if inv.ns.timeout else 300.0
    conv = cluster.wait_converged(inv, serial, int(res.get("generation") or 0), timeout, expected)
    if inv.json:
        out_json({"ok": 1 if conv["converged"] else 0, **res, "leader": leader, "epoch": epoch,
                  "cluster": conv})  # fmt: skip
    elif conv["converged"]:
        out(f"Every member presents {serial} ({', '.join(conv['members'])}) "
            f"after {conv['seconds']} s.")  # fmt: skip
        out("The old serial is retired once every agent acknowledged the new one.")
    else:
        err(f"Not converged after {conv['seconds']} s: {', '.join(conv['waiting'])}")
    return ExitCode.OK if conv["converged"] else ExitCode.FAILURE


def cmd_serial_status(inv: Invocation) -> ExitCode:
    from dispatcher.pki import rotation

    res = rotation.serial_status(inv.d)
    if inv.json:  # one JSON document: no header lines before it (upstream prints them)
        out_json(res)
        return ExitCode.OK
    state = res.get("state")
    if isinstance(state, dict) and state:
        out(f"Current serial:  {state.get('current_serial') or '?'}")
        out(f"Previous serial: {state.get('previous_serial') or '(none)'}")
        out(f"Rotated at:      {state.get('rotated_at') or '?'}")
        out(f"Overlap expires: {state.get('overlap_expires') or '?'}")
        out()
    else:
        out("No rotation has been performed.")
        out()
    agents = res.get("agents") or []
    if not agents:
        out("No registered agents.")
        return ExitCode.OK
    out(f"{'HOSTNAME':<30}  {'STATUS':<10}  {'CONFIRMED':<24}  SERIAL")
    out("-" * 85)
    for a in agents:
        serial = str(a.get("dispatcher_serial") or "-")
        short = serial[:16] + ("..." if len(serial) > 16 else "")
        out(f"{a.get('hostname', '?')!s:<30}  {a.get('serial_status') or 'unknown'!s:<10}  "
            f"{a.get('serial_confirmed') or '-'!s:<24}  {short}")  # fmt: skip
    return ExitCode.OK


def cmd_rotate_ca(inv: Invocation) -> ExitCode:
    """``rotate-ca``: start or resume; ``--status`` reports; ``--finish`` drops the old CA."""
    if inv.ns.status and inv.ns.finish:
        raise Fail("rotate-ca: --status and --finish exclude each other")
    mode = "status" if inv.ns.status else ("finish" if inv.ns.finish else "run")
    if (
        mode != "status"
        and sys.stdin.isatty()
        and not inv.json
        and not inv.ns.yes
        and not inv.confirm("Rotate the CA (agents get a CA bundle, then new certs)?")
    ):
        out("Aborted.")
        return ExitCode.OK
    res = inv.leader_action("rotate-ca", {"mode": mode}, timeout=600.0).data or {}
    if inv.json:
        out_json({"ok": 1, **res})
        return ExitCode.OK
    if not res.get("phase"):
        out("No CA rotation recorded.")
        return ExitCode.OK
    out(f"Phase:   {res['phase']}")
    out(f"Old CA:  {res.get('old_fingerprint')}")
    out(f"New CA:  {res.get('new_fingerprint')}")
    for key in ("done", "renewed", "pending", "offline", "upstream"):
        names = res.get(key) or []
        out(f"{key + ':':<9}{' '.join(names) if names else '-'}")
    for name, error in sorted((res.get("errors") or {}).items()):
        out(f"  {name}: {error}")
    out(f"Operator: {res.get('operator')}")
    if res["phase"] == "drop":
        out("Run 'ced rotate-ca --finish' once every agent runs its renewed certificate.")
    return ExitCode.OK if not (res.get("offline") or res.get("upstream")) else ExitCode.FAILURE


def cmd_maintain(inv: Invocation) -> ExitCode:
    res = inv.leader_action("maintain", {}, timeout=600.0).data or {}
    if inv.json:
        out_json({"ok": 1, **res} if "ok" not in res else res)
        return ExitCode.OK
    out(f"Maintenance run: {res.get('pinged', 0)}/{res.get('agents', 0)} agents pinged, "
        "dispatcher cert checked.")  # fmt: skip
    return ExitCode.OK
