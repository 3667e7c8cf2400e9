"""``ced completion bash|zsh``: the shell completion scripts, and their dynamic candidates.

The scripts carry the verbs and each verb's options (from
:mod:`dispatcher.ced.verbhelp`); for host names, tags and script names they call the
hidden verb ``ced __complete hosts|tags|scripts``, under ``timeout`` when the system has
it. Every source is bounded in time: host names are one directory listing; tags stop
reading registry records after :data:`TAGS_BUDGET_S`; script names come from a per-user
cache of discovery (:data:`CACHE_TTL_S`) and, when it is stale, from ``GET
/capabilities`` on at most :data:`DISCOVER_HOSTS` agents (those named on the line first),
each with a :data:`DISCOVER_TIMEOUT_S` deadline. A completion never fails loudly: any
error gives fewer candidates. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from typing import TYPE_CHECKING

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.output import out
from dispatcher.ced.verbhelp import DOCS, OPTIONS, flag_names
from dispatcher.errors import ExitCode, UsageError

if TYPE_CHECKING:
    from dispatcher.core import Dispatcher
    from dispatcher.registry import Registry

TAGS_BUDGET_S = 1.0
CACHE_TTL_S = 300.0
DISCOVER_HOSTS = 8
DISCOVER_TIMEOUT_S = 1.5
SHELL_TIMEOUT_S = 3  # the script's bound on one ``ced __complete`` (timeout(1))
GLOBAL = ("--config", "--json", "--help", "--version")
PATHS = {"--config": "file", "--output-dir": "dir", "--out": "dir"}
CHOICES = {"--order": "host done", "--lookup-by": "ip hostname"}


def verbs() -> list[str]:
    return [v for v in DOCS if not v.startswith("_")]


def _options(verb: str) -> list[str]:
    names = [n for o in (*DOCS[verb].options, "--config") for n in flag_names(o)]
    return [*names, "--help"]


def valued() -> list[str]:
    """Every option that takes a value (the word after it is not a verb or a target)."""
    return sorted(n for o, (metavar, _) in OPTIONS.items() if metavar for n in flag_names(o))


# ----- bash ------------------------------------------------------------------------------

BASH = r"""# ced completion for bash: eval "$(ced completion bash)" (or save it in
# /etc/bash_completion.d/ced). Host names and tags come from the registry, script names
# from discovery (cached); every lookup is bounded (timeout %(timeout)ss).
_ced_valued=" %(valued)s "
_ced_verbs="%(verbs)s"
_ced_global="%(global)s"

_ced_opts() {
    case "$1" in
%(opts)s
    esac
}

_ced_positional() {
    case "$1" in
%(positional)s
    esac
}

_ced_ask() {
    local prog="${_ced_prog:-${COMP_WORDS[0]}}"
    if command -v timeout >/dev/null 2>&1; then
        timeout %(timeout)s "$prog" "${_ced_conf[@]}" __complete "$@" 2>/dev/null
    else
        "$prog" "${_ced_conf[@]}" __complete "$@" 2>/dev/null
    fi
}

_ced_complete() {
    local -a w=() rest=() _ced_conf=()
    local i t cur verb="" skip=0 prev="" tagged=0 cands="" strip from_value=0
    # join what COMP_WORDBREAKS split (role=web, host:port): one word each
    for ((i = 0; i <= COMP_CWORD; i++)); do
        t="${COMP_WORDS[i]}"
        if ((${#w[@]} > 0)) && [[ "$t" == "=" || "$t" == ":" || "${w[-1]}" == *[=:] ]]; then
            w[-1]+="$t"
        else
            w+=("$t")
        fi
    done
    cur="${w[-1]}"
    for ((i = 1; i < ${#w[@]} - 1; i++)); do
        t="${w[i]}"
        prev="$t"
        if ((skip)); then
            skip=0
            [[ "${w[i - 1]}" == "--config" ]] && _ced_conf=(--config "$t")
            continue
        fi
        [[ "$t" == "--" ]] && { COMPREPLY=(); return 0; }
        [[ "$t" == "--tags" || "$t" == "--all" ]] && tagged=1
        if [[ "$_ced_valued" == *" $t "* ]]; then skip=1; continue; fi
        [[ "$t" == -* ]] && continue
        if [[ -z "$verb" ]]; then verb="$t"; else rest+=("$t"); fi
    done
    ((skip)) || prev=""
    case "$prev" in
%(values)s
        -*) COMPREPLY=(); return 0 ;;
    esac
    if ((!from_value)); then
        if [[ "$cur" == -* ]]; then
            if [[ -z "$verb" ]]; then cands="$_ced_global"; else cands="$(_ced_opts "$verb")"; fi
        elif [[ -z "$verb" ]]; then
            cands="$_ced_verbs"
        else
            case "$(_ced_positional "$verb")" in
                hosts+scripts)
                    cands="$(_ced_ask hosts)"
                    if ((tagged || ${#rest[@]} > 0)); then
                        cands+=" $(_ced_ask scripts "${rest[@]}")"
                    fi ;;
                hosts) cands="$(_ced_ask hosts)" ;;
                *) cands="$(_ced_positional "$verb")"
                   [[ ${#rest[@]} -gt 0 && "$verb" != cluster ]] && cands="" ;;
            esac
        fi
    fi
    # literal prefix matches: never compgen -W, which expands every word it is given
    COMPREPLY=()
    while IFS= read -r t; do
        [[ -n "$t" && "$t" == "$cur"* ]] && COMPREPLY+=("$t")
    done <<< "${cands// /$'\n'}"
    # bash replaces only the part after the last '=' or ':' (COMP_WORDBREAKS)
    if [[ "$cur" == *[=:]* ]]; then
        strip="${cur%%"${cur##*[=:]}"}"
        for i in "${!COMPREPLY[@]}"; do COMPREPLY[i]="${COMPREPLY[i]#"$strip"}"; done
    fi
    return 0
}
complete -o default -F _ced_complete ced ctrl-exec-dispatcher
"""

BASH_VALUES = r"""        --config) COMPREPLY=($(compgen -f -- "$cur")); return 0 ;;
        -o|--output-dir|--out) COMPREPLY=($(compgen -d -- "$cur")); return 0 ;;
        --tags)
            local head=""
            from_value=1
            [[ "$cur" == *,* ]] && head="${cur%%,*},"
            while IFS= read -r t; do
                [[ -n "$t" ]] && cands+="$head$t"$'\n'
            done < <(_ced_ask tags) ;;
%s"""


def _case(items: dict[str, str]) -> str:
    return "\n".join(f'        {k}) echo "{v}" ;;' for k, v in items.items())


def bash_script() -> str:
    opts = {v: " ".join(_options(v)) for v in verbs()}
    positional = {}
    for v in verbs():
        kinds = DOCS[v].complete
        positional[v] = ("hosts+scripts" if kinds == ("hosts", "scripts") else
                         "hosts" if kinds == ("hosts",) else " ".join(kinds))  # fmt: skip
    choices = "\n".join(f'        {o}) from_value=1; cands="{c}" ;;' for o, c in CHOICES.items())
    return BASH % {
        "valued": " ".join(valued()), "verbs": " ".join(verbs()),
        "global": " ".join(GLOBAL), "opts": _case(opts), "positional": _case(positional),
        "values": BASH_VALUES % choices, "timeout": SHELL_TIMEOUT_S,
    }  # fmt: skip


# ----- zsh -------------------------------------------------------------------------------

ZSH = r"""#compdef ced ctrl-exec-dispatcher
# ced completion for zsh: ced completion zsh > "${fpath[1]}/_ced" (or source it after
# compinit). Host names and tags come from the registry, script names from discovery.
_ced_ask() {
    local -a conf
    local i
    for ((i = 1; i < $#words; i++)); do
        [[ "${words[i]}" == --config ]] && conf=(--config "${words[i+1]}")
    done
    if (( $+commands[timeout] )); then
        timeout %(timeout)s ${words[1]} $conf __complete "$@" 2>/dev/null
    else
        ${words[1]} $conf __complete "$@" 2>/dev/null
    fi
}

_ced() {
    local -a verbs opts valued rest
    local verb="" i t skip=0 tagged=0
    verbs=(%(verbs)s)
    valued=(%(valued)s)
    for ((i = 2; i < CURRENT; i++)); do
        t="${words[i]}"
        if ((skip)); then skip=0; continue; fi
        [[ "$t" == "--" ]] && return 0
        [[ "$t" == --tags || "$t" == --all ]] && tagged=1
        if (( ${valued[(Ie)$t]} )); then skip=1; continue; fi
        [[ "$t" == -* ]] && continue
        if [[ -z "$verb" ]]; then verb="$t"; else rest+=("$t"); fi
    done
    if ((skip)); then
        case "${words[CURRENT-1]}" in
            --config) _files; return ;;
            -o|--output-dir|--out) _files -/; return ;;
            --tags) compset -P '*,'; compadd -- ${(f)"$(_ced_ask tags)"}; return ;;
%(choices)s
            *) return 1 ;;
        esac
    fi
    if [[ "$PREFIX" == -* ]]; then
        case "$verb" in
            "") opts=(%(global)s) ;;
%(opts)s
        esac
        compadd -- $opts
        return
    fi
    if [[ -z "$verb" ]]; then
        compadd -- $verbs
        return
    fi
    case "$verb" in
%(positional)s
    esac
}

if [[ "$funcstack[1]" == _ced ]]; then
    _ced "$@"
else
    compdef _ced ced ctrl-exec-dispatcher
fi
"""


def zsh_script() -> str:
    opts = "\n".join(f"            {v}) opts=({' '.join(_options(v))}) ;;" for v in verbs())
    positional = []
    for v in verbs():
        kinds = DOCS[v].complete
        if kinds == ("hosts", "scripts"):
            body = ('compadd -- ${(f)"$(_ced_ask hosts)"}; '
                    '(( tagged || $#rest )) && compadd -- ${(f)"$(_ced_ask scripts $rest)"}')  # fmt: skip
        elif kinds == ("hosts",):
            body = 'compadd -- ${(f)"$(_ced_ask hosts)"}'
        elif kinds:
            body = f"(( $#rest )) || compadd -- {' '.join(kinds)}"
        else:
            continue
        positional.append(f"        {v}) {body} ;;")
    choices = "\n".join(f"            {o}) compadd -- {c}; return ;;" for o, c in CHOICES.items())
    return ZSH % {
        "verbs": " ".join(verbs()), "valued": " ".join(valued()), "global": " ".join(GLOBAL),
        "opts": opts, "positional": "\n".join(positional), "choices": choices,
        "timeout": SHELL_TIMEOUT_S,
    }  # fmt: skip


def cmd_completion(inv: Invocation) -> ExitCode:
    inv.need(1, "completion bash|zsh")
    shell = inv.words[0]
    if shell == "bash":
        out(bash_script().rstrip("\n"))
    elif shell == "zsh":
        out(zsh_script().rstrip("\n"))
    else:
        raise UsageError(f"completion: unknown shell '{shell}' (bash or zsh)")
    return ExitCode.OK


# ----- candidates (ced __complete hosts|tags|scripts [host...]) --------------------------


def _registry(inv: Invocation) -> Registry:
    from dispatcher.ced.invocation import DEFAULT_CONFIG
    from dispatcher.config import CONFIG_ENV, load
    from dispatcher.registry import Registry

    explicit = inv.ns.config or os.environ.get(CONFIG_ENV)
    cfg = load(explicit or DEFAULT_CONFIG, required=bool(explicit))
    return Registry(cfg.registry_dir)


#: what a candidate may look like: the shells get nothing else (a tag or script name is
#: the agents' word, and a shell must never be handed ``$(...)`` to complete with)
SAFE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def safe(words: list[str]) -> list[str]:
    return [w for w in words if SAFE.fullmatch(w)]


def host_names(inv: Invocation) -> list[str]:
    from dispatcher.registry import valid_name

    return sorted(n for n in _registry(inv).names() if valid_name(n))


def tag_pairs(inv: Invocation, budget_s: float = TAGS_BUDGET_S) -> list[str]:
    """Every ``key=value`` of the registry's tags (records read until ``budget_s``)."""
    reg = _registry(inv)
    deadline = time.monotonic() + budget_s
    pairs: set[str] = set()
    for name in reg.names():
        if time.monotonic() > deadline:
            break
        tags = (reg.get(name) or {}).get("tags")
        if isinstance(tags, dict):
            pairs.update(f"{k}={v}" for k, v in tags.items()
                         if SAFE.fullmatch(str(k)) and SAFE.fullmatch(str(v)))  # fmt: skip
    return sorted(pairs)


def cache_path(config: str) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(os.path.abspath(config).encode()).hexdigest()[:16]
    return os.path.join(base, "ctrl-exec", f"scripts-{key}.json")


def _read_cache(path: str) -> tuple[float, list[str]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        names = safe([str(n) for n in doc["scripts"]])
        return float(doc["at"]), names
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0, []


def _write_cache(path: str, names: list[str]) -> None:
    from dispatcher.ced.live import write_atomic

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        write_atomic(path, json.dumps({"at": time.time(), "scripts": names}))
    except OSError:
        pass  # a cache we cannot keep: discovery again next time


async def _discover(d: Dispatcher, inv: Invocation, names: list[str]) -> list[str]:
    from dispatcher.client import fanout
    from dispatcher.client.blocking import BLOCKING
    from dispatcher.operations import authorise
    from dispatcher.registry import resolve

    targets = resolve(d.registry, names, inv.default_port)
    await authorise(d, inv.caller(), "ping", hosts=names, io=BLOCKING)
    reach = fanout.Reach(d.client_ctx(), DISCOVER_TIMEOUT_S, DISCOVER_HOSTS, io=BLOCKING)

    async def one(t: fanout.TargetLike) -> list[str]:
        r = await reach.call(t, "GET", "/capabilities", None)
        scripts = (r.body or {}).get("scripts") if r.code == 200 else None
        if not isinstance(scripts, list):
            return []
        return [str(s["name"]) for s in scripts if isinstance(s, dict) and "name" in s]

    got = await fanout.fan_out(targets, one, DISCOVER_HOSTS, lambda _t, _e: [], io=BLOCKING)
    return sorted({n for names_ in got for n in safe(names_)})


def script_names(inv: Invocation, named: list[str]) -> list[str]:
    """Script names from the cache, else from discovery on a few agents (cached)."""
    from dispatcher.ced.invocation import DEFAULT_CONFIG
    from dispatcher.client.io import run_blocking

    path = cache_path(inv.ns.config or DEFAULT_CONFIG)
    at, cached = _read_cache(path)
    if cached and time.time() - at < CACHE_TTL_S:
        return cached
    known = set(host_names(inv))
    pick = [n for n in named if n in known]
    pick += [n for n in sorted(known) if n not in pick]
    try:
        found = run_blocking(_discover(inv.d, inv, pick[:DISCOVER_HOSTS]))
    except Exception:
        return cached  # stale beats nothing
    if found:
        _write_cache(path, found)
    return found or cached


def cmd_candidates(inv: Invocation) -> ExitCode:
    """``ced __complete hosts|tags|scripts [host...]``: one candidate per line."""
    inv.need(1, "__complete hosts|tags|scripts [host...]")
    kind, rest = inv.words[0], inv.words[1:]
    try:
        if kind == "hosts":
            found = host_names(inv)
        elif kind == "tags":
            found = tag_pairs(inv)
        elif kind == "scripts":
            found = script_names(inv, rest)
        else:
            raise UsageError(f"__complete: unknown kind '{kind}'")
    except UsageError:
        raise
    except Exception:
        return ExitCode.FAILURE  # a completion shows fewer candidates, never a traceback
    for name in found:
        out(name)
    return ExitCode.OK
