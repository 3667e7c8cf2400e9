from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agent.common import authhook
from agent.runner import run_script, script_env


def _script(tmp: Path, name: str, body: str) -> str:
    p = tmp / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


def test_argv_is_literal_and_stdin_is_context(tmp_path: Path) -> None:
    s = _script(tmp_path, "a.sh", 'for a in "$@"; do echo "[$a]"; done; cat\n')
    res = asyncio.run(run_script(s, ["; rm -rf /", "$(id)", "a b", "`x`"], b'{"k":1}'))
    assert res.exit == 0
    assert res.stdout == '[; rm -rf /]\n[$(id)]\n[a b]\n[`x`]\n{"k":1}'


def test_exit_codes(tmp_path: Path) -> None:
    assert asyncio.run(run_script(_script(tmp_path, "e.sh", "exit 3\n"), [], b"")).exit == 3
    killed = asyncio.run(run_script(_script(tmp_path, "k.sh", "kill -9 $$\n"), [], b""))
    assert killed.exit == 126
    missing = asyncio.run(run_script(str(tmp_path / "missing"), [], b""))
    assert missing.exit == 127 and "exec failed" in missing.stderr
    noexec = tmp_path / "n.sh"
    noexec.write_text("#!/bin/sh\n")
    assert asyncio.run(run_script(str(noexec), [], b"")).exit == 127


def test_timeout_kills_group(tmp_path: Path) -> None:
    s = _script(tmp_path, "slow.sh", "echo started; sleep 30\n")
    t0 = time.monotonic()
    res = asyncio.run(run_script(s, [], b"", timeout=0.5))
    assert time.monotonic() - t0 < 5
    assert res.exit == -1 and "timed out" in res.error
    assert res.stdout == "started\n"


def test_output_bounded_but_drained(tmp_path: Path) -> None:
    s = _script(tmp_path, "big.sh", "head -c 500000 /dev/zero | tr '\\0' x; echo done >&2\n")
    res = asyncio.run(run_script(s, [], b"", max_output=1000))
    assert len(res.stdout) == 1000 and res.stdout_truncated
    assert res.stderr == "done\n" and not res.stderr_truncated and res.exit == 0


def test_stdin_timeout_does_not_hang(tmp_path: Path) -> None:
    s = _script(tmp_path, "nostdin.sh", "sleep 1; echo ok\n")
    res = asyncio.run(run_script(s, [], b"x" * 2_000_000, stdin_timeout=0.2))
    assert res.exit == 0 and res.stdout == "ok\n"
    assert res.stdin_unwritten > 0


def test_env_is_sanitised() -> None:
    env = script_env({"PATH": "/evil", "HOME": "/root", "ENVEXEC_TOKEN": "x", "LD_PRELOAD": "y"})
    assert env == {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/root"}  # fmt: skip


def test_hook_contract(tmp_path: Path) -> None:
    out = tmp_path / "seen"
    hook = _script(
        tmp_path,
        "hook.sh",
        f'cat > {out}; echo >> {out}; env | grep ^ENVEXEC_ >> {out}; exit "$CODE"\n',
    )
    ctx = authhook.build_context("run", script="s", hosts=["a", "b"], args=["x", "y z"],
                                 username="u", token="t", source_ip="1.2.3.4")  # fmt: skip
    import os

    for code, expect in ((0, (True, "")), (1, (False, "denied")), (2, (False, "bad credentials")),
                         (3, (False, "insufficient privilege")), (7, (False, "hook exited 7"))):  # fmt: skip
        os.environ["CODE"] = str(code)
        d = asyncio.run(authhook.call(hook, ctx, 5))
        assert (d.allowed, d.reason) == expect
    del os.environ["CODE"]
    text = out.read_text()
    first = json.loads(text.splitlines()[0])
    assert first["hosts"] == ["a", "b"] and first["args"] == ["x", "y z"]
    assert "ENVEXEC_HOSTS=a,b" in text and 'ENVEXEC_ARGS_JSON=["x", "y z"]' in text


def test_hook_timeout_and_missing(tmp_path: Path) -> None:
    hook = _script(tmp_path, "slow.sh", "sleep 30\n")
    t0 = time.monotonic()
    d = asyncio.run(authhook.call(hook, authhook.build_context("run"), 0.3))
    assert not d.allowed and time.monotonic() - t0 < 5
    d = asyncio.run(authhook.call(str(tmp_path / "nope"), authhook.build_context("run"), 1))
    assert not d.allowed and "not found or not executable" in d.reason


def test_a_context_no_environment_can_carry_is_denied(tmp_path: Path) -> None:
    hook = tmp_path / "hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    for bad in ("a\x00b", "a\ud800"):
        ctx = authhook.build_context("run", script="s", username=bad)
        got = asyncio.run(authhook.call(str(hook), ctx, 5))
        assert not got.allowed and got.reason == authhook.BAD_CONTEXT
        got = authhook.call_sync(str(hook), ctx, 5)
        assert not got.allowed and got.reason == authhook.BAD_CONTEXT
