"""``ced <verb> --help`` for every verb, and ``ced completion bash|zsh`` run in a real
shell (``COMP_WORDS``/``COMP_CWORD`` and the completion function) against a registry."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dispatcher.ced.cluster import subverbs
from dispatcher.ced.main import VERBS, _parser, main
from dispatcher.ced.verbhelp import CLUSTER_WORDS, DOCS, OPTIONS, flag_names
from dispatcher.registry import Registry
from ops.lab.proc import ROOT

CED = Path(sys.executable).parent / "ced"
PUBLIC = [v for v in VERBS if not v.startswith("_")]


# ----- per-verb help -------------------------------------------------------------------------


def test_every_verb_has_help_and_every_documented_option_parses() -> None:
    assert sorted(DOCS) == sorted(PUBLIC)
    assert set(CLUSTER_WORDS) == set(subverbs())
    for verb, doc in DOCS.items():
        for option in doc.options:
            assert option in OPTIONS, (verb, option)
            metavar = OPTIONS[option][0]
            value = {"--order": ["host"], "--lookup-by": ["ip"]}.get(option, ["1"])
            for flag in flag_names(option):  # the one parser accepts what the help names
                _parser().parse_intermixed_args([verb, flag, *(value if metavar else [])])
        assert doc.examples, verb
        for e in doc.examples:  # each example uses the verb, and parses
            assert "ced" in e and verb in e.replace('"', " ").replace(")", " ").split(), (verb, e)


@pytest.mark.parametrize("verb", PUBLIC)
def test_verb_help(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([verb, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: ced {verb}"), text
    assert "\nExamples:\n" in text and "--config PATH" in text
    for option in DOCS[verb].options:
        assert option in text, (verb, option)
    for example in DOCS[verb].examples:
        assert f"  {example}\n" in text
    assert "Modes:" not in text  # the verb's help, not the general one


def test_general_help_and_the_rolling_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "Rolling (run; ping takes --batch):" in text and "completion bash|zsh" in text
    assert "__complete" not in text
    assert main(["run", "--help"]) == 0
    run = capsys.readouterr().out
    assert "--batch N|N%" in run and "--max-fail N|N%" in run and "--fail-fast" in run


# ----- completion in a real bash -----------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("completion")
    state = tmp / "state"
    reg = Registry(state / "agents")
    for name, tags in (("web1", {"role": "web", "env": "prod"}), ("web2", {"role": "web"}),
                       ("db1", {"role": "db"})):  # fmt: skip
        reg.register(name, ip="127.0.0.1", port=1, lookup_by="ip", tags=tags)  # port 1: refused
    conf = tmp / "ctrl-exec.conf"
    conf.write_text(f"state_dir = {state}\nca_dir = {tmp / 'ca'}\nlog_target = stderr\n")
    (tmp / "cache").mkdir()
    return tmp


def _env(site: Path) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": str(site), "XDG_CACHE_HOME": str(site / "cache"),
            "PYTHONPATH": str(ROOT), "USER": "tester"}  # fmt: skip


def _script(shell: str) -> str:
    cmd = [str(CED)] if CED.exists() else [sys.executable, "-m", "dispatcher.ced"]
    p = subprocess.run([*cmd, "completion", shell], capture_output=True, text=True, check=True,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})  # fmt: skip
    return p.stdout


def bash_complete(site: Path, *words: str) -> list[str]:
    """COMPREPLY for ``words`` (the last one is being completed), as bash would split them
    (``=`` and ``:`` are COMP_WORDBREAKS)."""
    if not CED.exists():
        pytest.skip(f"no {CED} (pip install -e .)")
    script = site / "ced.bash"
    if not script.exists():
        script.write_text(_script("bash"))
    quoted = " ".join(f"'{w}'" for w in words)
    prog = f"_ced_prog={CED}; " if CED.exists() else ""
    code = (f"source {script}; {prog}COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1}; "
            "COMPREPLY=(); _ced_complete; printf '%s\\n' \"${COMPREPLY[@]}\"")  # fmt: skip
    p = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30,
                       env=_env(site))  # fmt: skip
    assert p.returncode == 0, p.stderr
    return [ln for ln in p.stdout.splitlines() if ln]


def test_bash_completes_verbs_and_options(site: Path) -> None:
    assert bash_complete(site, "ced", "r") == ["run", "rotate-cert", "rotate-ca"]
    assert sorted(bash_complete(site, "ced", "")) == sorted(PUBLIC)
    assert bash_complete(site, "ced", "--co") == ["--config"]
    assert bash_complete(site, "ced", "run", "--ba") == ["--batch"]
    assert set(bash_complete(site, "ced", "run", "--")) >= {"--batch", "--max-fail",
                                                            "--fail-fast", "--tags"}  # fmt: skip
    assert bash_complete(site, "ced", "ping", "--max") == []  # not a ping option
    assert bash_complete(site, "ced", "run", "--order", "") == ["host", "done"]
    assert bash_complete(site, "ced", "completion", "") == ["bash", "zsh"]
    assert bash_complete(site, "ced", "cluster", "sw") == ["switchover"]
    assert bash_complete(site, "ced", "run", "--batch", "") == []  # a number: nothing to offer
    assert bash_complete(site, "ced", "run", "web1", "--", "") == []  # script args are free


def test_bash_completes_hosts_and_tags_from_the_registry(site: Path) -> None:
    conf = str(site / "ctrl-exec.conf")
    assert bash_complete(site, "ced", "--config", conf, "run", "") == ["db1", "web1", "web2"]
    assert bash_complete(site, "ced", "--config", conf, "ping", "--all", "w") == ["web1", "web2"]
    assert bash_complete(site, "ced", "--config", conf, "unpair", "d") == ["db1"]
    assert bash_complete(site, "ced", "--config", conf, "run", "--tags", "r") == [
        "role=db", "role=web"]  # fmt: skip
    # "role=w" reaches the function as three words; the reply replaces only the last
    assert bash_complete(site, "ced", "--config", conf, "run", "--tags", "role", "=", "w") == [
        "web"]  # fmt: skip
    assert bash_complete(site, "ced", "--config", conf, "run", "--tags", "role", "=",
                         "web,e") == ["web,env=prod"]  # fmt: skip
    # the option's value is not taken for the verb
    assert bash_complete(site, "ced", "--config", conf, "--json", "run", "--batch", "2",
                         "d") == ["db1"]  # fmt: skip


def test_scripts_come_from_the_cache_and_a_dead_agent_never_hangs(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = str(site / "ctrl-exec.conf")
    t0 = time.monotonic()
    got = bash_complete(site, "ced", "--config", conf, "run", "web1", "")
    took = time.monotonic() - t0
    assert got == ["db1", "web1", "web2"]  # no agent answered: hosts only, quickly
    assert took < 10, took
    from dispatcher.ced.completion import cache_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(site / "cache"))
    cache = Path(cache_path(conf))
    assert cache.parent.parent == site / "cache" and not cache.exists()  # nothing found
    cache.parent.mkdir(exist_ok=True)
    cache.write_text(f'{{"at": {time.time()}, "scripts": ["check-disk", "deploy"]}}')
    got = bash_complete(site, "ced", "--config", conf, "run", "web1", "de")
    assert got == ["deploy"]
    print(f"[completion] scripts with no agent answering: {took:.2f}s; from the cache: ok")


def test_zsh_script(site: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (the zsh script is checked only for its content)")
    script = site / "_ced"
    script.write_text(_script("zsh"))
    p = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr


def test_zsh_script_content() -> None:
    text = _script("zsh")
    assert text.startswith("#compdef ced ctrl-exec-dispatcher\n")
    assert "__complete" in text and "compdef _ced ced" in text
    for verb in PUBLIC:
        assert f"        {verb}) opts=(" in text, verb


def test_completion_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["completion", "fish"]) == 2
    assert "unknown shell 'fish' (bash or zsh)" in capsys.readouterr().err
    assert main(["completion"]) == 2
