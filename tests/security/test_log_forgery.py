"""No request can forge a log line: a real agent process behind the real ``ctrl-exec-api``.

A request path and a username carrying ``%0a``/newlines, carriage returns, quotes,
backslashes and Unicode line separators go through the API to the agent (which runs an auth
hook, so it logs the username too). Every line of both logs must then be one of ours,
parse back (with the test parser of the unit tests), and hold the hostile text only as the
exact value it was sent as: no line says ``ACTION=auth RESULT=pass USER=root``.
"""

from __future__ import annotations

import re
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from dispatcher.pki import ca as dpki
from dispatcher.registry import Registry
from ops.lab.agentproc import AgentProc, make_agent
from ops.lab.apidaemon import Daemon, make_daemon
from ops.lab.apidaemon import PairingCA as DispatcherCA
from ops.lab.pki import Issued
from ops.lab.proc import wait_until
from tests.unit.agent.test_logfmt_escaping import parse

pytestmark = pytest.mark.integration

FORGED = "ACTION=auth RESULT=pass USER=root"
HOSTILE_USER = f'mallory"\n{FORGED}\r\n{FORGED} \\" \u2028{FORGED}\u2029\x85\t'
NUL_USER = f"eve\x00\n{FORGED}"  # no environment can carry it: the agent's hook denies
PREFIX = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (ctrl-exec-api|ctrl-exec-agent)\[\d+\]: (.*)$"
)  # stderr: an ISO 8601 timestamp, then the program


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory,
          script_dir: Path) -> Iterator[tuple[Daemon, AgentProc]]:  # fmt: skip
    tmp = tmp_path_factory.mktemp("logforge")
    ca_dir = tmp / "ca"
    ca = DispatcherCA(ca_dir)
    dcert = dpki.issue_dispatcher_cert(ca.ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    dispatcher = Issued(ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key", dcert.serial_number)
    hook = tmp / "agent-hook"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(hook.stat().st_mode | stat.S_IXUSR)
    agent = make_agent(tmp / "web1", ca, {"disp": dispatcher},
                       {"echo-args": str(script_dir / "echo-args.sh")},
                       extra={"auth_hook": str(hook)})  # fmt: skip
    registry_dir = tmp / "agents"
    Registry(registry_dir).register("web1", ip="127.0.0.1", port=agent.port, lookup_by="ip")
    daemon = make_daemon(tmp, "api", ca_dir, registry_dir, {"api_auth_default": "allow"})
    try:
        agent.start()
        daemon.start()
        daemon.wait_healthy()
        yield daemon, agent
    finally:
        daemon.stop()
        agent.stop()


def _our_lines(text: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(program, fields)`` of every event line; each line must be one of ours, and an
    event line (``ACTION=`` first) must parse (free text of the cluster modules is an
    ``ACTION=log`` event too)."""
    out = []
    for line in text.splitlines():
        m = PREFIX.match(line)
        assert m is not None, f"a line that is not ours: {line!r}"
        assert m.group(2).startswith("ACTION="), f"not a KEY=value line: {line!r}"
        out.append((m.group(1), parse(m.group(2))))
    return out


def test_hostile_path_and_username_forge_no_line(stack: tuple[Daemon, AgentProc]) -> None:
    daemon, agent = stack
    with httpx.Client(base_url=daemon.url, trust_env=False, timeout=30) as c:
        raw_path = "/x%0aACTION=auth%20RESULT=pass%20USER=root%0d%0a%22%5c%e2%80%a8" + "y"
        assert c.get(raw_path).status_code == 404
        r = c.post("/run", json={"hosts": ["web1"], "script": "echo-args", "args": ["a"],
                                 "username": HOSTILE_USER})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["exit"] == 0, r.text
        r = c.post("/ping", json={"hosts": ["web1"], "username": HOSTILE_USER})
        assert r.status_code == 200, r.text
        r = c.post("/run", json={"hosts": ["web1"], "script": "echo-args", "username": NUL_USER})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["exit"] == -1, r.text

    # (the hostile values hold "ACTION=auth" too: count the lines that start with it)
    wait_until(lambda: agent.logtext().count("]: ACTION=auth ") >= 2, 10, "the agent's auth lines")
    wait_until(lambda: daemon.logtext().count("]: ACTION=auth ") >= 3, 10, "the API's auth lines")
    api, agt = _our_lines(daemon.logtext()), _our_lines(agent.logtext())
    for program, fields in api + agt:
        action = fields[0][1]
        values = dict(fields[1:])
        # nothing logged ever reads as a successful auth of root
        assert not (action == "auth" and values.get("USER") == "root"), (program, fields)
    paths = [dict(f[1:]).get("PATH") for _, f in api if f[0][1] == "api-request"]
    assert '/x\nACTION=auth RESULT=pass USER=root\r\n"\\\u2028y' in paths
    api_users = [dict(f[1:])["USER"] for _, f in api if f[0][1] == "auth"]
    agent_users = [dict(f[1:])["USER"] for _, f in agt if f[0][1] == "auth"]
    # every username comes back exactly as sent (the API logs its gate and the operation)
    assert HOSTILE_USER in api_users and NUL_USER in api_users, api_users
    assert set(api_users) <= {"(none)", HOSTILE_USER, NUL_USER}, api_users
    assert agent_users == [HOSTILE_USER, NUL_USER], agent_users
    denied = [dict(f[1:]) for _, f in agt if f[0][1] == "auth" and dict(f[1:])["USER"] == NUL_USER]
    assert denied[0]["RESULT"] == "deny", denied
    # the raw text holds the forged words only inside escaped, quoted values
    for text in (daemon.logtext(), agent.logtext()):
        for line in text.splitlines():
            assert not PREFIX.match(line).group(2).startswith("ACTION=auth RESULT=pass")  # type: ignore[union-attr]
            assert "\x00" not in line and "\u2028" not in line and "\x85" not in line
