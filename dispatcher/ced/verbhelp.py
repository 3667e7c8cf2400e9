"""``ced <verb> --help``: each verb's usage, options and examples (an argparse epilog).

:data:`DOCS` is the one table of what each verb takes (its words, its options, examples);
:data:`OPTIONS` says what each option means. ``ced completion`` completes from the same
tables (:mod:`dispatcher.ced.completion`). Imported only for help and completion.
"""

from __future__ import annotations

import argparse
import textwrap

from agent.common.records import record


@record(frozen=True)
class VerbDoc:
    """One verb: its positional words, what it does, its options, examples."""

    words: str
    summary: str
    options: tuple[str, ...]
    examples: tuple[str, ...]
    #: what the positional words complete to: hosts, scripts, verbs, or fixed choices
    complete: tuple[str, ...] = ()


#: option -> (metavar, or "" for a flag; help)
OPTIONS: dict[str, tuple[str, str]] = {
    "--config": ("PATH", "ctrl-exec.conf (default /etc/ctrl-exec/ctrl-exec.conf)"),
    "--json": ("", "one JSON document on stdout"),
    "--port": ("N", "default agent port (7443; the pairing port for pairing-mode)"),
    "--username": ("NAME", "user for the auth hook (default $USER)"),
    "--token": ("TOKEN", "token for the auth hook (default $ENVEXEC_TOKEN)"),
    "--tags": ("K=V[,K=V...]", "agents whose registry tags have every pair"),
    "--all": ("", "every registered agent"),
    "--strict": ("", "any unknown name refuses the whole run (nothing runs)"),
    "--dry-run": ("", "print the resolved targets and exit (nothing runs)"),
    "--batch": (
        "N|N%",
        "run in waves of N hosts (or N%% of the targets); the next wave "
        "starts when the current one has finished",
    ),
    "--max-fail": (
        "N|N%",
        "stop starting hosts once N (or N%%) have failed or were "
        "unreachable; running ones finish, the rest are 'skipped' (exit 1)",
    ),
    "--fail-fast": ("", "the same as --max-fail 1"),
    "--stream": ("", "one JSON object per host as it finishes (NDJSON), with its outcome"),
    "--order": ("host|done", "host: print every result at the end, in target order"),
    "--output-dir": ("DIR", "write DIR/<host>.stdout, .stderr and .exit"),
    "--async": ("", "submit detached; poll with status/wait"),
    "--timeout": ("SECONDS", "how long to wait (wait: 300; pairing-mode: 1..600)"),
    "--lookup-by": ("ip|hostname", "how the dispatcher reaches the agent"),
    "--ip": ("ADDR", "the agent's address"),
    "--agent-port": ("N", "the agent's port"),
    "--rename": ("NEW", "a new registry name"),
    "--days": ("N", "certificate lifetime in days"),
    "--out": ("DIR", "where to write NAME.crt and NAME.key"),
    "--yes": ("", "do not ask for confirmation"),
    "--count": ("N", "pairing-token create: how many tokens"),
    "--expires": ("T[s|m|h|d]", "pairing-token create: how long they stay valid"),
    "--re-pair": ("", "pairing-token create: may take over an already registered name"),
    "--status": ("", "show the rotation's state only"),
    "--finish": ("", "drop the old CA (once every agent trusts the new one)"),
    "--to": ("MEMBER", "switchover: the member to take over"),
    "--reason": ("TEXT", "pause: why (shown by cluster status)"),
    "--full": ("", "haproxy-config: the whole file, not only the sections"),
    "--bind": ("ADDR,...", "haproxy-config: listen addresses"),
    "--vip": ("IP[/LEN]", "keepalived-config: the virtual address"),
    "--interface": ("IF", "keepalived-config: the interface"),
    "--address": ("OWN_IP", "keepalived-config: this balancer's address"),
    "--peer": ("PEER_IP", "keepalived-config: the other balancer's address"),
    "--priority": ("N", "keepalived-config: VRRP priority"),
    "--router-id": ("N", "keepalived-config: VRRP router id"),
    "--host": ("HOST", "history: runs that targeted HOST"),
    "--script": ("SCRIPT", "history: runs of SCRIPT"),
    "--since": ("DUR|ISO", "history: runs started since 30m, 2h, 7d ago, or an ISO 8601 time"),
    "--user": ("USER", "history: runs by USER (certificate CN, Unix user or SUDO_USER)"),
    "--limit": ("N", "history: at most N runs (20; 1..1000)"),
}

SHORT = {"--output-dir": "-o", "--yes": "-y"}
TARGETS = ("--tags", "--all", "--strict", "--dry-run")
AUTH = ("--port", "--username", "--token")
CLUSTER_WORDS = ("status", "switchover", "history", "pause", "resume", "haproxy-config",
                 "forget", "adopt-local", "keepalived-config")  # fmt: skip

DOCS: dict[str, VerbDoc] = {
    "run": VerbDoc(
        "<target>... <script> [-- <arg>...]",
        "Run an allowlisted script on one or more agents. Targets are registered names, "
        "globs ('web*'), '-' (names on stdin), --tags or --all. Exit 0 when every host ran "
        "it with exit 0; 1 when any failed, was unreachable, denied, locked, unknown or "
        "skipped (a run stopped by --max-fail exits 1); 2 on a usage or config error.",
        (
            *TARGETS,
            "--batch",
            "--max-fail",
            "--fail-fast",
            "--stream",
            "--order",
            "--output-dir",
            "--async",
            "--json",
            *AUTH,
        ),
        (
            "ced run web1 web2 check-disk -- /var",
            "ced run --tags role=web,env=prod restart-nginx",
            "ced run --all --batch 10% --max-fail 2 deploy -- v42",
            "ced run 'web*' --fail-fast --dry-run uptime",
            "ced run --stream --tags role=db backup | jq -c 'select(.outcome != \"ok\")'",
        ),
        ("hosts", "scripts"),
    ),
    "ping": VerbDoc(
        "<target>...",
        "Check mTLS connectivity to agents (renews agent certificates when due). Exit 0 "
        "once every known host was asked; 1 with unknown names; 2 on a usage error.",
        (*TARGETS, "--batch", "--stream", "--order", "--json", *AUTH),
        ("ced ping web1", "ced ping --all --batch 50", "ced --json ping --tags role=web"),
        ("hosts",),
    ),
    "status": VerbDoc(
        "<reqid>",
        "Show the state of an async run.",
        ("--json", *AUTH),
        ("ced status 3f9a0c1e2b4d5a6f",),
    ),
    "wait": VerbDoc(
        "<reqid>",
        "Poll an async run until complete: exit 0 all ok, 1 some failed, 2 timed out.",
        ("--timeout", "--json", *AUTH),
        ("ced run --async db1 backup && ced wait <reqid> --timeout 600",),
    ),
    "history": VerbDoc(
        "",
        "Runs of every instance, newest first (the job history).",
        ("--host", "--script", "--since", "--user", "--limit", "--json"),
        ("ced history --since 2h --script restart-nginx", "ced history --host web1 --json"),
    ),
    "show": VerbDoc(
        "<reqid>",
        "One run: each host's outcome, exit, stdout and stderr (from the instance that ran it; "
        "exit 1 when that instance is unreachable).",
        ("--json",),
        ("ced show 3f2a9c1d5e7b8a60", "ced show 3f2a9c1d5e7b8a60 --json"),
    ),
    "pairing-mode": VerbDoc(
        "[start|stop]",
        "Accept agent pairing requests on port 7444.",
        ("--timeout", "--port"),
        ("ced pairing-mode --timeout 120", "ced pairing-mode stop"),
        ("start", "stop"),
    ),
    "pairing-token": VerbDoc(
        "<create|list|revoke> [ID[,ID...]]",
        "Pairing tokens for bulk onboarding: an agent that presents a valid, unused, "
        "unexpired token (request-pairing --token-file) is approved automatically, once. "
        "Tokens are printed once at creation; only their hashes are kept.",
        ("--count", "--expires", "--tags", "--re-pair", "--all", "--json"),
        (
            "ced pairing-token create --count 200 --expires 2h --tags role=web > tokens.txt",
            "ced pairing-token list",
            "ced pairing-token revoke --all",
        ),
        ("create", "list", "revoke"),
    ),
    "list-requests": VerbDoc(
        "", "Show pending pairing requests.", ("--json",), ("ced list-requests",)
    ),
    "approve": VerbDoc(
        "<reqid>",
        "Approve a pairing request (signs the agent's certificate).",
        ("--lookup-by", "--ip", "--agent-port", "--json"),
        ("ced approve 7c1d", "ced approve 7c1d --lookup-by ip --ip 10.0.0.7"),
    ),
    "deny": VerbDoc("<reqid>", "Deny a pairing request.", ("--json",), ("ced deny 7c1d",)),
    "setup-ca": VerbDoc("", "One-time CA initialisation.", ("--json",), ("ced setup-ca",)),
    "setup-operator-ca": VerbDoc(
        "",
        "One-time operator CA initialisation (the API trusts it).",
        ("--json",),
        ("ced setup-operator-ca",),
    ),
    "issue-operator": VerbDoc(
        "<name>",
        "A client certificate for an operator or automation account.",
        ("--days", "--out", "--json"),
        ("ced issue-operator alice --days 90 --out ~/.ctrl-exec",),
    ),
    "setup-ctrl-exec": VerbDoc(
        "",
        "Generate the dispatcher key and certificate.",
        ("--yes", "--json"),
        ("ced setup-ctrl-exec --yes",),
    ),
    "list-agents": VerbDoc(
        "",
        "List registered agents.",
        ("--tags", "--json"),
        ("ced list-agents", "ced list-agents --tags role=web --json"),
    ),
    "edit-agent": VerbDoc(
        "<name>",
        "Change an agent's registry record.",
        ("--rename", "--ip", "--agent-port", "--lookup-by", "--json"),
        ("ced edit-agent web1 --ip 10.0.0.8", "ced edit-agent web1 --rename web01"),
        ("hosts",),
    ),
    "unpair": VerbDoc(
        "<name>",
        "Remove an agent from the registry.",
        ("--yes", "--json"),
        ("ced unpair web9 --yes",),
        ("hosts",),
    ),
    "list-locks": VerbDoc("", "Show held host:script locks.", ("--json",), ("ced list-locks",)),
    "rotate-cert": VerbDoc(
        "", "Rotate the dispatcher certificate and broadcast it.", ("--json",), ("ced rotate-cert",)
    ),
    "serial-status": VerbDoc(
        "",
        "Show the dispatcher serial and per-agent state.",
        ("--json",),
        ("ced serial-status --json",),
    ),
    "rotate-ca": VerbDoc(
        "",
        "Start or resume a CA rotation.",
        ("--status", "--finish", "--json"),
        ("ced rotate-ca", "ced rotate-ca --status", "ced rotate-ca --finish"),
    ),
    "maintain": VerbDoc(
        "", "Ping all agents (renewals), rotation checks, purge.", ("--json",), ("ced maintain",)
    ),
    "check-config": VerbDoc(
        "",
        "Check ctrl-exec.conf as an instance reads it (exit 0 or 78).",
        (),
        ("ced check-config", "ced --config ./new.conf check-config"),
    ),
    "cluster": VerbDoc(
        "<status|switchover|history|pause|resume|haproxy-config|forget|adopt-local|"
        "keepalived-config> [args]",
        "The dispatcher cluster: members and leader (status), a new leader (switchover), "
        "leadership history, maintenance (pause/resume), load balancer config, roster.",
        (
            "--json",
            "--to",
            "--reason",
            "--full",
            "--bind",
            "--vip",
            "--interface",
            "--address",
            "--peer",
            "--priority",
            "--router-id",
            "--yes",
        ),
        (
            "ced cluster status --json",
            "ced cluster switchover --to disp2",
            "ced cluster pause --reason 'kernel upgrades'",
            "ced cluster haproxy-config --full --bind 10.0.0.10",
            "ced cluster keepalived-config --vip 10.0.0.10/24 --interface eth0 "
            "--address 10.0.0.11 --peer 10.0.0.12",
        ),
        CLUSTER_WORDS,
    ),
    "server": VerbDoc(
        "[status|stop]",
        "This user's command server, which runs ced's commands from one warm process: "
        "whether it runs (exit 0, else 1), or stop it. CED_SERVER=auto (default) lets a ced "
        "on a terminal start one, 1 any ced, 0 none.",
        ("--json",),
        ("ced server", "ced server stop", "ced --json server status"),
        ("status", "stop"),
    ),
    "completion": VerbDoc(
        "<bash|zsh>",
        "Print the shell completion script: verbs, options, host names and tags from the "
        "registry, script names from discovery (cached for 5 minutes).",
        (),
        ('eval "$(ced completion bash)"', "ced completion zsh > ~/.zfunc/_ced"),
        ("bash", "zsh"),
    ),
}


def flag_names(option: str) -> list[str]:
    short = SHORT.get(option)
    return [short, option] if short else [option]


def help_text(verb: str) -> str:
    """``ced <verb> --help``."""
    doc = DOCS[verb]
    p = argparse.ArgumentParser(
        prog=f"ced {verb}", usage=f"ced {verb} {doc.words} [options]".replace("  ", " "),
        description=textwrap.fill(doc.summary, 88), add_help=False,
        epilog="Examples:\n" + "\n".join(f"  {e}" for e in doc.examples),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=92),
    )  # fmt: skip
    for option in (*doc.options, "--config"):
        metavar, text = OPTIONS[option]
        if metavar:
            p.add_argument(*flag_names(option), metavar=metavar, help=text)
        else:
            p.add_argument(*flag_names(option), action="store_true", help=text)
    p.add_argument("-h", "--help", action="store_true", help="this help")
    return p.format_help()
