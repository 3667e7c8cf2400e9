"""Start a real etcd (1 or 3 members) on free loopback ports (tests, demo, runbooks).

Every member gets its own data dir under ``root``, ``--pre-vote``, ``--logger=zap`` and a
fresh ``--initial-cluster-token``. Members are stopped with SIGKILL by PID (a SIGTERM of a
whole cluster can take ~7 s), and :meth:`EtcdCluster.stop_member` /
:meth:`EtcdCluster.start_member` let a test take one member down and bring it back on its
data dir; :meth:`EtcdCluster.pause` / :meth:`EtcdCluster.resume` freeze and thaw every
member at once (SIGSTOP/SIGCONT: the whole store stops answering, clients time out).

:func:`secure_etcd` is the setup the documentation asks for (docs/trust-model.md): TLS
with client certificates from a lab CA (:mod:`ops.lab.etcdpki`) and etcd authentication
on, with a ``root`` user, a role ``ctrl-exec`` granted readwrite on the cluster prefix
only, and a user ``ctrl-exec`` with that role. Passwords are random, in 0600 files.
Client certificates are required by ``--trusted-ca-file`` alone: ``--client-cert-auth``
(the certificate's CN as etcd user) makes etcd 3.4 refuse every gateway request once
auth is on, so it is left out then. Setup goes through the gateway's auth API (``/v3/auth/...``, what ``etcdctl user add``,
``role grant-permission --prefix`` and ``auth enable`` call) in about 50 ms. The lab
runs etcd with ``--bcrypt-cost 4`` (etcd's minimum; the default 10 costs ~50 ms per
authentication) and ``--auth-token simple`` with ``--auth-token-ttl`` (default 300 s).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ops.lab.net import free_port

ETCD = shutil.which("etcd")
SKIP_REASON = "etcd is not installed (apt-get install etcd-server); CI installs it"


@dataclass(frozen=True)
class TLSFiles:
    """Server cert/key (serverAuth and clientAuth: the 3.4 gateway dials itself with it),
    the CA clients must present certs from, and a client cert/key for health checks."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@dataclass(frozen=True)
class AuthFiles:
    """etcd authentication of a lab cluster: ``user`` (role limited to ``prefix``) and root."""

    prefix: str
    user: str
    password_file: Path
    root_password_file: Path

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def root_password(self) -> str:
        return self.root_password_file.read_text().strip()


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode("ascii")


def _range_end(prefix: str) -> str:
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # lab prefixes end in "/" (0x2f): never 0xff
    return bytes(raw).decode()


def _write_secret(path: Path, value: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    os.replace(tmp, path)


def gateway(
    url: str, ctx: ssl.SSLContext | None, path: str, payload: dict[str, object], token: str = ""
) -> dict[str, object]:
    """POST to a member's gateway (``<url>/v3/<path>``); the JSON answer, or RuntimeError
    with etcd's error text."""
    req = urllib.request.Request(
        f"{url}/v3/{path}", data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **({"Authorization": token} if token else {})},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            answer: dict[str, object] = json.loads(r.read() or b"{}")
            return answer
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"etcd {path}: {exc.code} {exc.read().decode(errors='replace')}"
        ) from None


def add_user(url: str, ctx: ssl.SSLContext | None, directory: Path, user: str, prefix: str,
             token: str = "") -> Path:  # fmt: skip
    """A user (and a role of the same name) with readwrite on ``prefix`` only
    (``etcdctl role grant-permission --prefix``); its password in ``directory/<user>.password``
    (0600). Before auth is enabled no ``token`` is needed, after it root's."""
    password = secrets.token_urlsafe(18)
    path = directory / f"{user}.password"
    _write_secret(path, password)
    perm = {"permType": "READWRITE", "key": _b64(prefix), "range_end": _b64(_range_end(prefix))}
    calls: tuple[tuple[str, dict[str, object]], ...] = (
        ("auth/role/add", {"name": user}),
        ("auth/role/grant", {"name": user, "perm": perm}),
        ("auth/user/add", {"name": user, "password": password}),
        ("auth/user/grant", {"user": user, "role": user}),
    )
    for call, payload in calls:
        gateway(url, ctx, call, payload, token)
    return path


def enable_auth(url: str, ctx: ssl.SSLContext | None, auth: AuthFiles) -> None:
    """root (role root), ``auth.user`` limited to ``auth.prefix``, then ``auth enable``."""
    root_password = secrets.token_urlsafe(18)
    _write_secret(auth.root_password_file, root_password)
    gateway(url, ctx, "auth/user/add", {"name": "root", "password": root_password})
    gateway(url, ctx, "auth/user/grant", {"user": "root", "role": "root"})
    made = add_user(url, ctx, auth.password_file.parent, auth.user, auth.prefix)
    assert made == auth.password_file, (made, auth.password_file)
    gateway(url, ctx, "auth/enable", {})


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    scheme: str = "http"
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def settings(self, initial_cluster: str, token: str, state: str) -> dict[str, str]:
        """This member's etcd settings (``--KEY VALUE`` on the command line, ``KEY: VALUE``
        in a config file), besides pre-vote and logging."""
        return {
            "name": self.name, "data-dir": str(self.data_dir),
            "listen-client-urls": self.client_url, "advertise-client-urls": self.client_url,
            "listen-peer-urls": self.peer_url, "initial-advertise-peer-urls": self.peer_url,
            "initial-cluster": initial_cluster, "initial-cluster-token": token,
            "initial-cluster-state": state,
        }  # fmt: skip


class EtcdCluster:
    """``size`` members; with ``tls`` on https with client certificates; with
    ``auth_prefix`` authentication on (see :func:`secure_etcd`), ``auth_token_ttl``
    seconds for idle simple tokens."""

    def __init__(
        self,
        root: Path,
        size: int = 1,
        tls: TLSFiles | None = None,
        auth_prefix: str | None = None,
        auth_token_ttl: int = 300,
    ) -> None:
        if ETCD is None:
            raise RuntimeError(SKIP_REASON)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.auth_token_ttl = auth_token_ttl
        self.auth: AuthFiles | None = None
        if auth_prefix is not None:
            if not (auth_prefix.startswith("/") and auth_prefix.endswith("/")):
                raise ValueError(f"auth prefix {auth_prefix!r}: /<cluster_name>/ expected")
            self.auth = AuthFiles(auth_prefix, "ctrl-exec", root / "ctrl-exec.password",
                                  root / "root.password")  # fmt: skip
        self.token = f"ctrl-exec-lab-{secrets.token_hex(6)}"
        self.members = [
            Member(
                name=f"m{i}",
                client_port=free_port(),
                peer_port=free_port(),
                data_dir=root / f"m{i}.data",
                log=root / f"m{i}.log",
                scheme="https" if tls else "http",
            )
            for i in range(1, size + 1)
        ]
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        for m in self.members:
            self._spawn(m, state="new")
        self.wait_healthy(self.members, timeout)
        if self.auth is not None:
            self._enable_auth(self.auth)
        return self

    # -- clients ---------------------------------------------------------------------------

    def client_conf(self) -> dict[str, str]:
        """The ``ctrl-exec.conf`` keys of a dispatcher of this etcd (``etcd_*``)."""
        conf = {"etcd_endpoints": ",".join(self.endpoints)}
        if self.tls is not None:
            conf.update(etcd_cacert=str(self.tls.ca), etcd_cert=str(self.tls.client_cert),
                        etcd_key=str(self.tls.client_key))  # fmt: skip
        if self.auth is not None:
            conf.update(etcd_user=self.auth.user,
                        etcd_password_file=str(self.auth.password_file))  # fmt: skip
        return conf

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments of :class:`cluster.backend.EtcdBackend` for this etcd."""
        out: dict[str, str] = {}
        if self.tls is not None:
            out.update(ca=str(self.tls.ca), cert=str(self.tls.client_cert),
                       key=str(self.tls.client_key))  # fmt: skip
        if self.auth is not None:
            out.update(user=self.auth.user, password=self.auth.password)
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        return ctx

    def gateway(self, path: str, payload: dict[str, object], token: str = "") -> dict[str, object]:
        """POST to the first member's gateway (see :func:`gateway`)."""
        return gateway(self.members[0].client_url, self.ssl_context(), path, payload, token)

    def root_token(self) -> str:
        assert self.auth is not None, "this etcd runs without authentication"
        answer = self.gateway(
            "auth/authenticate", {"name": "root", "password": self.auth.root_password}
        )
        return str(answer["token"])

    def add_user(self, user: str, prefix: str, token: str = "") -> Path:
        """A user limited to ``prefix`` (see :func:`add_user`); its password file."""
        return add_user(self.members[0].client_url, self.ssl_context(), self.root, user,
                        prefix, token)  # fmt: skip

    def _enable_auth(self, auth: AuthFiles) -> None:
        enable_auth(self.members[0].client_url, self.ssl_context(), auth)

    def _spawn(self, m: Member, state: str) -> None:
        assert ETCD is not None
        argv = [ETCD]
        for key, value in m.settings(self.initial_cluster, self.token, state).items():
            argv += [f"--{key}", value]
        argv += ["--pre-vote", "--logger=zap", "--log-outputs=stderr"]
        if self.auth is not None:
            argv += ["--bcrypt-cost", "4", "--auth-token", "simple",
                     "--auth-token-ttl", str(self.auth_token_ttl)]  # fmt: skip
        if self.tls is not None:
            argv += [
                "--cert-file", str(self.tls.server_cert),
                "--key-file", str(self.tls.server_key),
                "--trusted-ca-file", str(self.tls.ca),  # alone: a client cert is required
            ]  # fmt: skip
            if self.auth is None:
                # with auth on, etcd 3.4 refuses every gateway request under this flag
                # ("CommonName of client sending a request against gateway will be
                # ignored...", etcd PR 10366): the CA file alone already requires a cert
                argv.append("--client-cert-auth")
        with open(m.log, "ab") as log:
            m.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_healthy(self, members: list[Member], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(members)
        ctx = self.ssl_context()
        while pending:
            m = pending[0]
            if m.proc is not None and m.proc.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(
                    f"{m.client_url}/health", timeout=0.5, context=ctx
                ) as r:
                    if b'"true"' in r.read():
                        pending.pop(0)
                        continue
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd {m.name} not healthy after {timeout} s")
            time.sleep(0.05)

    def stop_member(self, index: int) -> None:
        """SIGKILL one member (its data dir stays)."""
        m = self.members[index]
        if m.proc is not None and m.proc.poll() is None:
            os.kill(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)
        m.proc = None

    def start_member(self, index: int, timeout: float = 20.0) -> None:
        """Restart a stopped member on its data dir and wait until it is healthy."""
        m = self.members[index]
        self._spawn(m, state="existing")
        self.wait_healthy([m], timeout)

    def pause(self) -> None:
        """SIGSTOP every member: etcd stops answering (connections hang until a timeout)."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGSTOP)

    def resume(self, timeout: float = 20.0) -> None:
        """SIGCONT every member paused by :meth:`pause`; wait until each is healthy."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                os.kill(m.proc.pid, signal.SIGCONT)
        self.wait_healthy(self.members, timeout)

    def close(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)


def secure_etcd(root: Path, prefix: str, size: int = 1, auth_token_ttl: int = 300) -> EtcdCluster:
    """An etcd (not started) on TLS with client certificates from a fresh lab CA, and
    authentication with a user ``ctrl-exec`` limited to ``prefix`` (``/<cluster_name>/``)."""
    from ops.lab.etcdpki import make_etcd_tls

    tls = make_etcd_tls(root / "pki")
    return EtcdCluster(root, size=size, tls=tls, auth_prefix=prefix, auth_token_ttl=auth_token_ttl)
