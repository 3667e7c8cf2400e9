"""Attacks on ``ced``'s command server (:mod:`dispatcher.ced.cmdserver`): it is handed the
operator's terminal and runs commands with the operator's rights, so nobody else may
serve, or be served by, it.

* a runtime directory another user made, opened up, or redirected with a symlink;
* a server of another user listening on the operator's socket path;
* another user's client reaching the operator's server (file modes opened by mistake);
* malformed requests: garbage, another protocol, a length past the limit, no descriptors;
* a ``dispatcher`` package planted in the directory ``ced`` starts from.

Each must leave the command run by ``ced`` itself (or not at all) and the server serving.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab.cedserver import Served, ced_cmd, ced_python, log_pids
from tests.integration.test_ced_server import Fleet, fleet, served, wait_for
from tests.support.attacks import attack, show_attacks

__all__ = ["fleet", "served", "show_attacks"]

pytestmark = pytest.mark.integration


def nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("needs root (to act as another user)")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")


def history_count(fleet: Fleet) -> int:
    runs = fleet.state / "history" / "runs"
    return len(list(runs.iterdir())) if runs.exists() else 0


def test_a_runtime_directory_not_the_operators_is_never_used(fleet: Fleet, tmp_path: Path) -> None:
    who = nobody()
    mine = tmp_path / "private"
    mine.mkdir(mode=0o700)
    for case in ("another user's", "world-writable", "a symlink"):
        rt = tmp_path / f"rt-{case.split()[0].strip(chr(39) + 's')}"
        rt.mkdir(mode=0o700)
        d = rt / "ctrl-exec"
        if case == "a symlink":
            d.symlink_to(mine)
        else:
            d.mkdir()
            if case == "another user's":
                os.chown(d, who.pw_uid, who.pw_gid)
                d.chmod(0o700)
            else:
                d.chmod(0o777)
        s = Served(rt)
        env = s.env()
        for _ in range(2):
            p = subprocess.run([*ced_cmd(), "--config", str(fleet.conf), "run", "web1", "echo-args"],
                               env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
            assert p.returncode == 0, p.stderr
        time.sleep(0.5)
        target = mine if case == "a symlink" else d
        assert not any(target.iterdir()), f"{case}: a socket or lock was made there"
        attack(f"ced server runtime dir {case}", "ced ran the command itself, made nothing there")


FAKE_SERVER = """
import os, socket, sys
path, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
os.setgroups([]); os.setgid(gid); os.setuid(uid)
s.listen(8)   # the credentials a client sees are those of listen()
print("ready", flush=True)
s.settimeout(20)
conn, _ = s.accept()
conn.settimeout(10)
try:
    data, anc, _f, _a = conn.recvmsg(65536, socket.CMSG_SPACE(64))
except OSError:
    data, anc = b"", []
print("got", len(data), sum(len(a[2]) // 4 for a in anc), flush=True)
"""


def test_a_server_of_another_user_gets_nothing(fleet: Fleet, tmp_path: Path) -> None:
    who = nobody()
    s = Served(tmp_path / "run")
    fake = subprocess.Popen([sys.executable, "-c", FAKE_SERVER, s.socket, str(who.pw_uid),
                             str(who.pw_gid)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert fake.stdout is not None and fake.stdout.readline().strip() == "ready"
        pid, p = s.run("--config", str(fleet.conf), "run", "web1", "echo-args", "--", "x")
        assert p.returncode == 0, p.stderr
        assert log_pids(p.stderr) == {pid}, "ced must run it itself"
        out = fake.communicate(timeout=30)[0]
    finally:
        fake.kill()
    assert "got 0 0" in out, out
    attack("ced server of another user", "no request byte, no descriptor sent to it")


def as_nobody_send(path: str, request: bytes, who: pwd.struct_passwd) -> bytes:
    """In a forked child running as ``who``: connect, send ``request`` with descriptors 0-2
    as ``ced`` does, and return everything answered (the child's exit status 3: refused)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(who.pw_gid)
            os.setuid(who.pw_uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.connect(path)
            fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
            # the server may close (refuse) before, while or after the request is sent:
            # a broken pipe or a reset is that refusal, as is an end without an answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                c.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                c.settimeout(10)
                while chunk := c.recv(4096):
                    os.write(w, chunk)
            os._exit(0)
        except BaseException as exc:
            os.write(w, f"child failed: {exc!r}".encode())
            os._exit(3)
    os.close(w)
    answer = b""
    while chunk := os.read(r, 4096):
        answer += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def _request(s: Served, *argv: str) -> str:
    code = ("import sys; from dispatcher.ced.entry import encode_request; "
            "sys.stdout.write(encode_request(sys.argv[1:]).hex())")  # fmt: skip
    p = subprocess.run([ced_python(), "-P", "-c", code, *argv], env=s.env(),
                       capture_output=True, text=True, check=True)  # fmt: skip
    return p.stdout


@pytest.fixture
def reachable() -> Iterator[Served]:
    """A server whose runtime directory another user could reach (pytest's is private)."""
    base = Path(tempfile.mkdtemp(prefix="ced-attack-"))
    base.chmod(0o711)
    try:
        with Served(base / "run") as s:
            yield s
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_another_users_client_is_not_served(fleet: Fleet, reachable: Served) -> None:
    who = nobody()
    served = reachable
    before = history_count(fleet)
    request = _request(served, "--config", str(fleet.conf), "run", "web1", "echo-args")
    rt = served.runtime
    modes = {p: p.stat().st_mode & 0o777 for p in (rt, rt / "ctrl-exec")}
    for path in modes:
        path.chmod(0o777)  # an operator's mistake: the socket reachable by everybody
    os.chmod(served.socket, 0o777)
    try:
        answer = as_nobody_send(served.socket, bytes.fromhex(request), who)
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
        os.chmod(served.socket, 0o600)
    assert answer == b"", answer
    assert history_count(fleet) == before, "a run was made for another user"
    pid, ok = served.run("--config", str(fleet.conf), "run", "web1", "echo-args")
    assert ok.returncode == 0 and pid not in log_pids(ok.stderr), "the server stopped serving"
    attack("ced server client of another user", "closed unanswered, nothing ran")


def test_malformed_requests_run_nothing(fleet: Fleet, served: Served) -> None:
    before = history_count(fleet)
    good = bytes.fromhex(_request(served, "--config", str(fleet.conf), "run", "web1",
                                  "echo-args"))  # fmt: skip
    fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))
    body = good[4:]
    other = body.replace(b"ced-cmd/1", b"ced-cmd/9", 1)
    cases = {
        "garbage": (b"\x00\x00\x00\x10" + os.urandom(16), True),
        "another protocol": (len(other).to_bytes(4, "big") + other, True),
        "a length past the limit": ((64 << 20).to_bytes(4, "big") + body, True),
        "a truncated request": (good[: len(good) // 2], True),
        "no descriptors": (good, False),
    }
    for name, (payload, with_fds) in cases.items():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(served.socket)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)] if with_fds else []
            c.sendmsg([payload], anc)
            if name == "a truncated request":
                c.shutdown(socket.SHUT_WR)
            c.settimeout(15)
            answer = b""
            while chunk := c.recv(4096):
                answer += chunk
        assert answer == b"stale\n", (name, answer)
        attack(f"ced server request: {name}", "answered stale, nothing ran")
    assert history_count(fleet) == before
    pid, ok = served.run("--config", str(fleet.conf), "run", "web1", "echo-args")
    assert ok.returncode == 0 and pid not in log_pids(ok.stderr), "the server stopped serving"


def test_a_package_planted_in_the_working_directory_is_not_imported(
    fleet: Fleet, tmp_path: Path
) -> None:
    evil = tmp_path / "evil"
    marker = tmp_path / "imported"
    for pkg in ("dispatcher", "dispatcher/ced"):
        (evil / pkg).mkdir(parents=True)
        (evil / pkg / "__init__.py").write_text(f"open({str(marker)!r}, 'a').write('x')\n")
    (evil / "dispatcher" / "ced" / "cmdserver.py").write_text(
        f"open({str(marker)!r}, 'a').write('server')\n"
    )
    s = Served(tmp_path / "run")
    try:
        pid, p = s.run("--config", str(fleet.conf), "run", "web1", "echo-args", cwd=evil)
        assert p.returncode == 0, p.stderr
        assert wait_for(lambda: s.pid() is not None and os.path.exists(s.socket), 20)
        pid, p = s.run("--config", str(fleet.conf), "run", "web1", "echo-args", cwd=evil)
        assert p.returncode == 0 and pid not in log_pids(p.stderr), p.stderr
        assert not marker.exists(), "code from the working directory ran"
    finally:
        s.stop()
    attack("ced server started in a directory with a 'dispatcher' package", "not imported")
