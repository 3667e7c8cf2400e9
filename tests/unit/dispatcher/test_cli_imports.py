"""``ced`` must start fast: no web framework, etcd client or HTTP library on import.

``ced run``, ``ced ping`` and ``ced status`` run over the blocking client
(:mod:`dispatcher.client.blocking`): they must not import asyncio (about 50 ms of start-up
on a small machine), ``cryptography``, ``dataclasses`` or ``logging`` either. Checked on
real invocations against an in-process TLS responder, with ``python -X importtime``.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.common.tlsconf import server_context
from agent.common.wire import response_bytes
from dispatcher.registry import Registry
from ops.lab.pki import Issued, TestCA
from ops.lab.proc import ROOT

HEAVY = ("fastapi", "uvicorn", "etcd3gw", "requests")
# asyncio: ~50 ms; dataclasses (through inspect): ~15 ms (agent.common.records stands in);
# logging: ~6 ms (agent.common.logfmt writes a one-shot process's lines itself).
NOT_ON_RUN_PATH = {*HEAVY, "cryptography", "asyncio", "concurrent", "dataclasses", "inspect",
                   "logging"}  # fmt: skip


def _names(stderr: str) -> tuple[set[str], int]:
    names: set[str] = set()
    total = 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            names.add(m.group(4).split(".")[0])
            if not m.group(3).strip() and len(m.group(3)) == 1:
                total += int(m.group(2))  # top-level imports only
    return names, total


def _importtime(stmt: str) -> tuple[set[str], int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-X", "importtime", "-c", stmt], capture_output=True,
                       text=True, env=env, check=True)  # fmt: skip
    return _names(p.stderr)


def test_cli_import_is_light() -> None:
    names, total = _importtime("import dispatcher.ced.main")
    print(f"import dispatcher.ced.main: {total / 1000:.1f} ms (cumulative, top-level)")
    assert not names & set(HEAVY), names & set(HEAVY)


def test_run_path_imports_are_light() -> None:
    # What `ced run` / `ced ping` import: no cryptography either (DESIGN.md section 7).
    stmt = ("import dispatcher.ced.main, dispatcher.ced.run, dispatcher.operations, "
            "dispatcher.client.blocking")  # fmt: skip
    names, total = _importtime(stmt)
    print(f"import dispatcher.ced main + run + operations + blockingclient: {total / 1000:.1f} ms")
    assert not names & NOT_ON_RUN_PATH, names & NOT_ON_RUN_PATH


# ----- real invocations --------------------------------------------------------------------


class Responder:
    """A TLS listener answering every request with ``reply`` (JSON), on a thread."""

    def __init__(self, ctx: ssl.SSLContext, reply: dict[str, object]) -> None:
        self.ctx = ctx
        self.reply = reply
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = tls.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    tls.sendall(response_bytes(200, self.reply))
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def responder(pki: TestCA) -> Iterator[Responder]:
    agent = pki.issue("imports-agent", cn="imports.test")
    ctx = server_context(str(agent.cert), str(agent.key), str(pki.cert_path))
    reply = {"status": "ok", "exit": 0, "stdout": "hi\n", "stderr": "", "reqid": "r",
             "version": "0", "expiry": "Jan  1 00:00:00 2099 GMT"}  # fmt: skip
    r = Responder(ctx, reply)
    yield r
    r.close()


@pytest.fixture
def conf(tmp_path: Path, pki: TestCA, dispatcher_cert: Issued, responder: Responder) -> Path:
    assert (pki.dir / "dispatcher.crt") == dispatcher_cert.cert  # pki.dir is a ca_dir
    Registry(tmp_path / "state" / "agents").register("h1", ip="127.0.0.1", port=responder.port,
                                                     lookup_by="ip")  # fmt: skip
    path = tmp_path / "ctrl-exec.conf"
    path.write_text(f"ca_dir = {pki.dir}\nstate_dir = {tmp_path / 'state'}\nlog_target = stderr\n")
    return path


@pytest.mark.parametrize("verb", [["run", "h1", "s"], ["ping", "h1"], ["status", "0123"]])
def test_dispatch_verbs_import_no_asyncio_nor_crypto(conf: Path, verb: list[str]) -> None:
    env = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-X", "importtime", "-m", "dispatcher.ced", "--config", str(conf),
           "--json", *verb]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    if verb[0] == "status":
        assert p.returncode == 1 and json.loads(p.stdout)["error"] == "not found"
    else:
        assert p.returncode == 0, p.stderr[-2000:]
        assert json.loads(p.stdout)["results"][0]["host"] == "h1"
    names, total = _names(p.stderr)
    print(f"ced {verb[0]}: imports {total / 1000:.1f} ms (cumulative, top-level)")
    assert "dispatcher" in names
    assert not names & NOT_ON_RUN_PATH, names & NOT_ON_RUN_PATH


@pytest.mark.parametrize("verb", [["run", "h1", "s"], ["ping", "h1"]])
def test_hook_path_imports_no_crypto(
    conf: Path, tmp_path: Path, dispatcher_cert: Issued, verb: list[str]
) -> None:
    # With an auth hook the context carries the dispatcher serial: read without cryptography.
    seen = tmp_path / "hook-context.json"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ncat > {seen}\nexit 0\n")
    hook.chmod(0o755)
    conf.write_text(conf.read_text() + f"auth_hook = {hook}\n")
    env = {"PATH": "/usr/bin:/bin", "USER": "tester", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-X", "importtime", "-m", "dispatcher.ced", "--config", str(conf),
           "--json", *verb]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr[-2000:]
    names, _total = _names(p.stderr)
    assert not names & NOT_ON_RUN_PATH, names & NOT_ON_RUN_PATH
    context = json.loads(seen.read_text())
    assert context["dispatcher_serial"] == dispatcher_cert.serial_hex


def test_the_entry_point_imports_only_c_modules() -> None:
    """What ``ced`` loads before it hands a command to its server: no ``ssl``, ``socket``,
    ``signal`` (both ``enum``), ``json`` (``re``) or anything of the project but itself."""
    base, _ = _importtime("pass")
    names, total = _importtime("import dispatcher.ced.entry")
    extra = names - base
    print(f"import dispatcher.ced.entry: {total / 1000:.1f} ms, beyond start-up: {sorted(extra)}")
    assert extra <= {"__future__", "dispatcher", "_signal", "_socket"}, extra
