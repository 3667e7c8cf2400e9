"""Main job (until the cluster lands): a local fleet of real agents doing real work.

Creates a CA and a dispatcher identity with ``dispatcher.pki.ca``, gives three agents on
127.0.0.2-4 keys and CSRs made by ``agent.common.certs`` (signed after the CSR checks), starts
them as real ``ctrl-exec-agent serve`` processes, then pings every agent and runs an
allowlisted script on each over mTLS, printing what came back. Stops everything at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent import trustmap  # noqa: E402
from agent.common import certs  # noqa: E402
from agent.common.tlsconf import client_context  # noqa: E402
from agent.common.wire import parse_response, request_bytes  # noqa: E402
from dispatcher.pki import ca as pki  # noqa: E402

AGENTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
PORT = 17443
SCRIPT = """#!/bin/sh
echo "hello from $(hostname) as $(id -un); args: $*"
printf 'context: '; cat; echo
"""


def call(
    addr: str, method: str, path: str, body: object, ca: Path, cert: Path, key: Path
) -> tuple[int, dict]:
    ctx = client_context(str(ca), str(cert), str(key))
    with socket.create_connection((addr, PORT), timeout=10) as raw, ctx.wrap_socket(raw) as s:
        s.sendall(request_bytes(method, path, body, host=addr))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    resp = parse_response(data)
    return resp.code, resp.json()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="ctrl-exec-demo-"))
    print(f"work dir: {work}")
    ca_dir = work / "etc-ctrl-exec"
    ca = pki.create_ca(ca_dir)
    disp_cert = pki.issue_dispatcher_cert(ca, ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key")
    serial = format(disp_cert.serial_number, "x")
    print(f"CA ready; dispatcher serial {serial}")
    script = work / "hello.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, addr in enumerate(AGENTS, 1):
            d = work / f"agent{i}"
            (d / "state").mkdir(parents=True)
            key = certs.new_key("ec-p256")
            csr = certs.make_csr(key, f"agent{i}.demo")
            print(f"agent{i}: CSR pairing code {certs.pairing_code(csr)}")
            (d / "agent.key").write_bytes(certs.key_pem(key))
            (d / "agent.crt").write_text(pki.sign_csr(ca, csr))
            shutil.copy(ca.cert_path, d / "ca.crt")
            trustmap.add(d / "state" / "ctrl-exec-dispatchers", serial, "demo-dispatcher")
            (d / "agent.conf").write_text(
                f"port = {PORT}\nbind = {addr}\ncert = {d}/agent.crt\nkey = {d}/agent.key\n"
                f"ca = {d}/ca.crt\nstate_dir = {d}/state\nhostname = agent{i}.demo\n"
                f"log_target = stderr\nrevoked_serials = {d}/revoked\n[tags]\nrole = demo\n"
            )
            (d / "scripts.conf").write_text(f"hello = {script}\n")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "serve", "--config", str(d / "agent.conf"),
                 "--allowlist", str(d / "scripts.conf")],
                stderr=open(d / "agent.log", "wb"),  # noqa: SIM115
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            ))  # fmt: skip
        for addr in AGENTS:
            for _ in range(300):
                try:
                    socket.create_connection((addr, PORT), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.02)
        dc, dk = ca_dir / "dispatcher.crt", ca_dir / "dispatcher.key"
        for addr in AGENTS:
            t0 = time.perf_counter()
            code, body = call(addr, "POST", "/ping", {"reqid": "demo0001"}, ca.cert_path, dc, dk)
            ms = (time.perf_counter() - t0) * 1000
            print(
                f"ping {addr}: {code} host={body.get('host')} expiry={body.get('expiry')} ({ms:.1f} ms)"
            )
        ok = True
        for addr in AGENTS:
            req = {"script": "hello", "args": ["one", "two words"], "reqid": "demo0002",
                   "username": os.environ.get("USER", ""), "token": ""}  # fmt: skip
            code, body = call(addr, "POST", "/run", req, ca.cert_path, dc, dk)
            print(
                f"==> {addr}  [{'OK' if body.get('exit') == 0 else 'FAIL'}  exit:{body.get('exit')}]"
            )
            print(body.get("stdout", ""), end="")
            ok = ok and body.get("exit") == 0
        code, body = call(AGENTS[0], "GET", "/capabilities", None, ca.cert_path, dc, dk)
        print("capabilities:", json.dumps(body))
        return 0 if ok else 1
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(10)


if __name__ == "__main__":
    sys.exit(main())
