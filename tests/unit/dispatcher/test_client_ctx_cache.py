"""Dispatcher.client_ctx: loaded once per version of the cert files, reloaded after a rotation."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import threading
from pathlib import Path

from agent.common.tlsconf import server_context
from dispatcher.config import DispatcherConfig
from dispatcher.core import Dispatcher
from ops.lab.pki import Issued, TestCA


def _install(src: Issued, ca_dir: Path) -> None:
    """As a rotation does: each file replaced by a rename (new inode)."""
    for path, name in ((src.key, "dispatcher.key"), (src.cert, "dispatcher.crt")):
        tmp = ca_dir / f".{name}.tmp"
        shutil.copy(path, tmp)
        os.replace(tmp, ca_dir / name)


def _presented_serial(ctx: ssl.SSLContext, pki: TestCA, tmp: Path) -> int:
    """The serial of the client certificate ``ctx`` presents to a real TLS server."""
    srv = pki.issue("ctx-server", cn="server.test")
    sctx = server_context(str(srv.cert), str(srv.key), str(pki.cert_path))
    seen: list[int] = []
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with sctx.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                from agent.certinfo import identity_der

                seen.append(int(identity_der(der)[0], 16))
                tls.sendall(b"x")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw) as tls,
        ):
            tls.recv(1)
        t.join(10)
    return seen[0]


def test_cached_until_the_files_change(tmp_path: Path, pki: TestCA) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    shutil.copy(pki.cert_path, ca_dir / "ca.crt")
    first = pki.issue("ctx-disp-1", cn="ctrl-exec-dispatcher")
    _install(first, ca_dir)
    d = Dispatcher(DispatcherConfig(ca_dir=str(ca_dir), state_dir=str(tmp_path / "s")).finish())
    a = d.client_ctx()
    assert d.client_ctx() is a  # no reload per request
    assert _presented_serial(a, pki, tmp_path) == first.serial
    second = pki.issue("ctx-disp-2", cn="ctrl-exec-dispatcher")
    _install(second, ca_dir)  # a rotation
    b = d.client_ctx()
    assert b is not a
    assert _presented_serial(b, pki, tmp_path) == second.serial
    assert d.client_ctx() is b
