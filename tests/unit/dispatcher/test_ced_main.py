"""``ced``'s entry point: the verb table, and the one map from errors to exit codes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.ced.invocation import Invocation
from dispatcher.ced.main import VERBS, main, on_error, parse, verb
from dispatcher.errors import (
    ConfigError,
    CtrlExecError,
    ExitCode,
    Fail,
    NotLeaderError,
    UsageError,
)
from dispatcher.ha.actions import ActionFailed
from dispatcher.operations import Denied
from dispatcher.registry import RegistryError
from dispatcher.runlocks import LockConflict
from ops.lab.proc import ROOT


def invocation(*argv: str) -> Invocation:
    ns, script_args = parse(list(argv))
    return Invocation(ns, script_args)


def test_exit_codes_are_upstreams() -> None:
    codes = [ExitCode.OK, ExitCode.FAILURE, ExitCode.USAGE, ExitCode.PENDING, ExitCode.CONFIG,
             ExitCode.INTERRUPTED]  # fmt: skip
    assert [int(c) for c in codes] == [0, 1, 2, 2, 78, 130]


def test_every_verb_names_a_function() -> None:
    for name in VERBS:
        assert callable(verb(name)), name


def test_only_the_chosen_verb_module_is_imported() -> None:
    code = ("import sys; from dispatcher.ced.main import verb; verb('run'); "
            "print(sorted(m for m in sys.modules if m.startswith('dispatcher.ced.')))")  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)  # fmt: skip
    loaded = ast.literal_eval(p.stdout)  # a printed list of module names
    assert loaded == ["dispatcher.ced.invocation", "dispatcher.ced.live", "dispatcher.ced.main",
                      "dispatcher.ced.output", "dispatcher.ced.run"]  # fmt: skip


@pytest.mark.parametrize(
    ("exc", "code", "stderr"),
    [
        (UsageError("Usage: ced deny <reqid>"), 2,
         "Usage: ced deny <reqid>\nRun 'ced --help' for usage.\n"),
        (UsageError("no mode given"), 2, "Error: no mode given\nRun 'ced --help' for usage.\n"),
        (Fail("Edit failed: no registry entry for 'x'"), 1,
         "Edit failed: no registry entry for 'x'\n"),
        (ConfigError("bad key", "/etc/x.conf", 3), 2, "Error: /etc/x.conf:3: bad key\n"),
        (Denied("not allowed", 3), 1, "Denied: not allowed\n"),
        (LockConflict(["h1:s"]), 1, "Locked: already running: h1:s\n"),
        (RegistryError("unknown agent(s): a, b"), 2,
         "Error: unknown agent(s): a, b\n"
         "Hosts must be registered agent names (see 'ctrl-exec-dispatcher list-agents').\n"),
        (RegistryError("invalid agent name '-'"), 2, "Error: invalid agent name '-'\n"),
        (ActionFailed("nothing to change"), 1, "Error: nothing to change\n"),
        (NotLeaderError("not the leader"), 1, "Error: not the leader\n"),
        (CtrlExecError("boom"), 1, "Error: boom\n"),
        (KeyboardInterrupt(), 130, "Interrupted.\n"),
        (BrokenPipeError(), 1, ""),
    ],
)  # fmt: skip
def test_each_error_has_one_exit_code_and_text(
    exc: BaseException, code: int, stderr: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert on_error(invocation("list-agents"), exc) == code
    got = capsys.readouterr()
    assert (got.out, got.err) == ("", stderr)


@pytest.mark.parametrize(
    ("exc", "doc", "code"),
    [
        (Denied("not allowed", 3), {"ok": 0, "error": "not allowed", "code": 3}, 1),
        (LockConflict(["h1:s", "h2:s"]),
         {"ok": 0, "error": "locked", "code": 4, "conflicts": ["h1:s", "h2:s"]}, 1),
        (RegistryError("unknown agent(s): a"), {"ok": 0, "error": "unknown agent(s): a", "code": 2},
         2),
        (CtrlExecError("boom"), {"ok": 0, "error": "boom"}, 1),
    ],
)  # fmt: skip
def test_json_errors_are_one_document(
    exc: BaseException, doc: dict[str, object], code: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert on_error(invocation("--json", "run", "a", "s"), exc) == code
    assert json.loads(capsys.readouterr().out) == doc


def test_an_unexpected_error_keeps_its_traceback() -> None:
    with pytest.raises(ValueError, match="a bug"):
        on_error(invocation("run"), ValueError("a bug"))


def test_main_exit_statuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("ctrl-exec-dispatcher ")
    assert main([]) == 2
    assert main(["bogus"]) == 2
    assert capsys.readouterr().err.startswith("Error: no mode given\n")
    assert main(["--config", str(tmp_path / "missing.conf"), "list-agents"]) == 2
    assert "missing.conf" in capsys.readouterr().err
    assert main(["--port", "x", "run", "h", "s"]) == 2
