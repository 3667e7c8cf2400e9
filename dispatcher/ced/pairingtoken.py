"""``ced pairing-token create|list|revoke``: tokens that approve pairing requests.

``create --count N --expires T [--tags k=v,...] [--re-pair] [--json]`` makes the tokens
here and has the leader store only their SHA-256 (:mod:`dispatcher.pairing.tokens`): the
tokens are printed once, one per line on stdout (the summary goes to stderr), and exist
nowhere else. ``list`` shows every kept token without secrets; ``revoke ID[,ID...]`` or
``revoke --all`` (every unused token). All three are leader-only actions, carried out by
the cluster leader from any dispatcher host.
"""

from __future__ import annotations

import json

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import err, out, out_json, table
from dispatcher.errors import ExitCode, UsageError

USAGE = ("pairing-token create --count N --expires T[s|m|h|d] [--tags k=v,...] [--re-pair] "
         "| list | revoke ID[,ID...]|--all")  # fmt: skip


def cmd_pairing_token(inv: Invocation) -> ExitCode:
    sub = inv.words[0] if inv.words else ""
    if sub == "create":
        return _create(inv)
    if sub == "list":
        return _list(inv)
    if sub == "revoke":
        return _revoke(inv)
    raise UsageError(f"Usage: ced {USAGE}")


def _create(inv: Invocation) -> ExitCode:
    from dispatcher.pairing import tokens

    ns = inv.ns
    if ns.count is None or ns.expires is None:
        raise UsageError(f"Usage: ced {USAGE}")
    if not 1 <= ns.count <= tokens.MAX_CREATE:
        raise UsageError(f"--count must be between 1 and {tokens.MAX_CREATE}")
    try:
        expires_in = tokens.parse_duration(ns.expires)
        tags = tokens.parse_tags(ns.tags or "")
    except tokens.TokenError as exc:
        raise UsageError(str(exc)) from None
    made = [tokens.new_token() for _ in range(ns.count)]
    hashes = {tid: tokens.token_hash(tok) for tid, tok in made}
    args = {"hashes": json.dumps(hashes), "expires_in": expires_in,
            "tags": ",".join(f"{k}={v}" for k, v in tags.items()), "re_pair": bool(ns.re_pair)}  # fmt: skip
    inv.leader_action("pairing-token-create", args, failed="Error: ")
    if inv.json:
        out_json({"ok": 1, "expires_in": expires_in, "tags": tags, "re_pair": bool(ns.re_pair),
                  "tokens": [{"id": tid, "token": tok} for tid, tok in made],
                  **inv.by_leader()})  # fmt: skip
        return ExitCode.OK
    for _, tok in made:
        out(tok)
    what = ", ".join(f"{k}={v}" for k, v in tags.items()) or "no tags"
    err(f"Created {len(made)} pairing token(s), valid {expires_in} s ({what}"
        f"{', may re-pair registered names' if ns.re_pair else ''}). They are shown this once "
        "and stored only as hashes: give each agent one (request-pairing --token-file).")  # fmt: skip
    return ExitCode.OK


def _list(inv: Invocation) -> ExitCode:
    rows = inv.leader_action("pairing-token-list", {}).data or []
    if inv.json:
        out_json({"ok": 1, "tokens": rows, **inv.by_leader()})
        return ExitCode.OK
    if not rows:
        out("No pairing tokens.")
        return ExitCode.OK
    head = ["ID", "STATE", "EXPIRES", "USED BY", "TAGS"]
    body = [[str(r["id"]), str(r["state"]), str(r["expires"]), str(r.get("used_by") or "-"),
             ",".join(f"{k}={v}" for k, v in (r.get("tags") or {}).items()) or "-"]
            for r in rows]  # fmt: skip
    for line in table([head, *body]):
        out(line)
    return ExitCode.OK


def _revoke(inv: Invocation) -> ExitCode:
    ids = ",".join(inv.words[1:])
    if bool(ids) == bool(inv.ns.all):
        raise UsageError("Usage: ced pairing-token revoke ID[,ID...] | --all")
    doc = inv.leader_action("pairing-token-revoke", {"ids": ids, "every": bool(inv.ns.all)},
                            failed="Error: ").data  # fmt: skip
    revoked = list(doc.get("revoked") or [])
    if inv.json:
        out_json({"ok": 1, "revoked": revoked, **inv.by_leader()})
    else:
        out(f"Revoked {len(revoked)} pairing token(s)" + (f": {', '.join(revoked)}"
                                                          if revoked else "."))  # fmt: skip
    return ExitCode.OK
