"""Attacks on shell completion: words an agent controls must never run in the operator's shell.

Tag keys and values reach the registry from the agents' ``[tags]`` (discovery), script
names from their allowlists (``GET /capabilities``). A completion hands candidates to the
operator's interactive shell, where ``compgen -W`` would expand ``$(...)`` in them. Each
attack plants such a word where completion reads it (a registry record, the script cache,
a registry file name, and straight into the completion function), completes, and checks
that no command ran, the word was not offered by ``ced __complete``, and the registry is
unchanged. Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatcher.ced.completion import cache_path
from dispatcher.registry import Registry
from ops.lab.proc import ROOT

CED = Path(sys.executable).parent / "ced"


def _tree(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(d)}|{st.st_mode}|{st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    if not CED.exists():
        pytest.skip(f"no {CED} (pip install -e .)")
    state = tmp_path / "state"
    reg = Registry(state / "agents")
    reg.register("web1", ip="127.0.0.1", port=1, lookup_by="ip", tags={
        "role": "web", "x": f"$(touch {tmp_path}/pwned-tag-value)",
        f"`touch {tmp_path}/pwned-tag-key`": "y"})  # fmt: skip
    (state / "agents" / "$(touch pwned-name).json").write_text("{}")  # cwd: site
    (tmp_path / "ctrl-exec.conf").write_text(
        f"state_dir = {state}\nca_dir = {tmp_path / 'ca'}\nlog_target = stderr\n")  # fmt: skip
    (tmp_path / "script.bash").write_text(subprocess.run(
        [str(CED), "completion", "bash"], capture_output=True, text=True, check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}).stdout)  # fmt: skip
    return tmp_path


def _complete(site: Path, words: list[str], before: str = "") -> list[str]:
    quoted = " ".join("'" + w.replace("'", "'\\''") + "'" for w in words)
    code = (f"cd {site}; source {site}/script.bash; _ced_prog={CED}; {before}"
            f"COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; COMPREPLY=(); _ced_complete; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"")  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(site), "XDG_CACHE_HOME": str(site / "cache"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    p = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 0, p.stderr
    return [ln for ln in p.stdout.splitlines() if ln]


def _pwned(site: Path) -> list[str]:
    return sorted(p.name for p in site.rglob("pwned*"))


def test_a_tag_with_command_substitution_never_runs(site: Path) -> None:
    conf = str(site / "ctrl-exec.conf")
    before = _tree(site / "state")
    got = _complete(site, ["ced", "--config", conf, "run", "--tags", ""])
    assert got == ["role=web"], got  # the planted pairs are not offered
    assert _pwned(site) == [] and _tree(site / "state") == before
    print(
        "[attack] tag value/key '$(touch ...)' from an agent's [tags]: refused (not offered, "
        "nothing ran, registry unchanged)"
    )


def test_a_script_name_with_command_substitution_never_runs(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = str(site / "ctrl-exec.conf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(site / "cache"))
    cache = Path(cache_path(conf))
    cache.parent.mkdir(parents=True)
    evil = [f"$(touch {site}/pwned-script)", f"`touch {site}/pwned-script2`", "ok-script"]
    cache.write_text(json.dumps({"at": time.time(), "scripts": evil}))
    got = _complete(site, ["ced", "--config", conf, "run", "web1", ""])
    assert got == ["web1", "ok-script"], got
    assert _pwned(site) == []
    print("[attack] script name '$(touch ...)' from discovery: refused (not offered, nothing ran)")


def test_a_host_file_name_with_command_substitution_is_not_a_candidate(site: Path) -> None:
    conf = str(site / "ctrl-exec.conf")
    got = _complete(site, ["ced", "--config", conf, "ping", ""])
    assert got == ["web1"] and _pwned(site) == []
    print(
        "[attack] registry file named '$(touch ...).json': refused (not a valid agent name, "
        "not offered)"
    )


def test_the_shell_side_never_expands_a_candidate(site: Path) -> None:
    """Even a candidate that got past ``ced __complete`` is matched literally in bash."""
    conf = str(site / "ctrl-exec.conf")
    ask = (f"_ced_ask() {{ printf '%s\\n' '$(touch {site}/pwned-shell)' "
           f"'`touch {site}/pwned-shell2`' '*' 'role=db'; }}; ")  # fmt: skip
    got = _complete(site, ["ced", "--config", conf, "run", "--tags", ""], before=ask)
    assert _pwned(site) == []
    assert "$(touch" in got and "*" in got  # literal words (split at blanks): not run, not globbed
    assert "script.bash" not in got
    got = _complete(site, ["ced", "--config", conf, "run", "--tags", "role", "=", "d"],
                    before=ask)  # fmt: skip
    assert got == ["db"] and _pwned(site) == []
    print(
        "[attack] '$(...)', '`...`' and '*' handed to the bash function: refused (matched "
        "as literal words, nothing ran, no glob)"
    )
