"""The agent's mTLS server on 7443 (``ctrl-exec-agent serve``).

One asyncio loop. Each connection: ``allowed_ips`` and rate limits on the TCP peer, the
TLS handshake with a deadline (a silent client never blocks others), the revocation
check before the request is read, one request with upstream's limits, one response, close.
Scripts run as subprocesses of the loop, so many runs proceed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import re
import signal
import ssl
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import allowlist, certinfo, revocation, trustmap
from agent.childwatch import use_pidfd_watcher
from agent.common import authhook, logfmt
from agent.common.datefmt import openssl_date
from agent.common.errors import ConfigError
from agent.common.fsutil import atomic_write_json
from agent.common.ratelimit import RateLimiter
from agent.common.serial import serial_to_hex
from agent.common.tlsconf import server_context
from agent.common.wire import RequestError, read_request, response_bytes
from agent.config import AgentConfig
from agent.runner import run_allowed
from agent.version import __version__

REQID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
ev = logfmt.event

Reply = tuple[int, dict[str, Any]]


@dataclass
class Peer:
    ip: str
    serial: str  # canonical hex, "" when the client sent no certificate
    dispatcher: str | None = None


class AgentServer:
    """State and request handling; :meth:`serve` runs the listener."""

    def __init__(self, cfg: AgentConfig, allowlist_path: str):
        self.cfg = cfg
        self.allowlist_path = allowlist_path
        self.scripts: dict[str, allowlist.Script] = {}
        self.trusted: dict[str, str] = {}
        self.revoked: frozenset[str] = frozenset()
        self.expiry = "unknown"
        self.live = 0
        self.server: asyncio.Server | None = None
        self.limiter = RateLimiter(
            cfg.rate_limit_volume,
            cfg.rate_limit_probe,
            cfg.rate_limit_disable,
            on_event=lambda action, ip, reason: ev(action, logging.WARNING, peer=ip, reason=reason),
        )
        self.ssl_ctx: ssl.SSLContext | None = None
        self._stopping: asyncio.Event | None = None

    # ----- loading and reloading -------------------------------------------------

    def load_all(self) -> None:
        """Initial load: any error is fatal (the caller exits 78)."""
        self._load_allowlist(strict=True)
        self._load_trust(strict=True)
        self._load_revoked(strict=True)
        self._load_cert()

    def _load_allowlist(self, strict: bool) -> None:
        try:
            scripts, warnings = allowlist.load(self.allowlist_path, self.cfg.script_dirs)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good allowlist")
            return
        for w in warnings:
            ev("config-warn", logging.WARNING, reason=w)
        self.scripts = scripts

    def _load_trust(self, strict: bool) -> None:
        try:
            entries, warnings = trustmap.load(self.cfg.trusted_dispatchers_path)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good map")
            return
        for line, w in warnings:
            ev("config-warn", logging.WARNING,
               reason=f"{self.cfg.trusted_dispatchers_path}:{line}: {w}; skipped")  # fmt: skip
        self.trusted = entries

    def _load_revoked(self, strict: bool) -> None:
        try:
            revoked = revocation.load(self.cfg.revoked_serials)
        except ConfigError as exc:
            if strict:
                raise
            ev("config-warn", logging.ERROR, reason=f"{exc}; keeping the last good list")
            return
        if revoked is None:
            ev("revoked-serials-absent", path=self.cfg.revoked_serials)
            revoked = frozenset()
        self.revoked = revoked

    def _load_cert(self) -> None:
        result = "absent"
        if os.path.exists(self.cfg.cert_staging_path):
            from agent.common import certs  # cryptography (~8 MB RSS) only when a cert is staged

            result = certs.promote(
                self.cfg.cert_staging_path, self.cfg.cert, self.cfg.ca, self.cfg.key
            )
            ev("cert-promote", status=result)
        if self.ssl_ctx is None:
            self.ssl_ctx = server_context(self.cfg.cert, self.cfg.key, self.cfg.ca)
        elif result == "promoted":
            self.ssl_ctx.load_cert_chain(self.cfg.cert, self.cfg.key)
        try:
            self.expiry = openssl_date(certinfo.not_after(self.cfg.cert))
        except (OSError, ValueError, IndexError):
            self.expiry = "unknown"

    def reload(self) -> None:
        """SIGHUP: allowlist, trust map, revocation list, rate-limit state, staged cert."""
        self._load_allowlist(strict=False)
        self._load_trust(strict=False)
        self._load_revoked(strict=False)
        self.limiter.clear()
        try:
            self._load_cert()
        except (OSError, ssl.SSLError, ValueError) as exc:
            ev("config-warn", logging.ERROR, reason=f"certificate reload failed: {exc}")
        ev("reload", scripts=len(self.scripts), dispatchers=len(self.trusted),
           revoked=len(self.revoked))  # fmt: skip

    # ----- serving -----------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        use_pidfd_watcher()
        self._stopping = asyncio.Event()
        self.server = await asyncio.start_server(
            self._on_connect, host=self.cfg.bind, port=self.cfg.port, backlog=512,
            limit=64 * 1024,
        )  # fmt: skip
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        ev("start", port=self.cfg.port, bind=self.cfg.bind, version=__version__)
        if ready is not None:
            ready.set()
        await self._stopping.wait()
        ev("stop", live=self.live)
        self.server.close()
        # Give in-flight requests a moment to finish; scripts keep their own timeouts.
        deadline = time.monotonic() + 10
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def _ip_allowed(self, ip: str) -> bool:
        if self.cfg.allowed_ips is None:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.cfg.allowed_ips)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername") or ("", 0)
        ip = str(peername[0])
        try:
            if not self._ip_allowed(ip):
                ev("ip-block", logging.WARNING, peer=ip)
                return
            if self.limiter.blocked(ip):
                return
            if self.live >= self.cfg.max_children:
                ev("overload", logging.WARNING, peer=ip, live=self.live)
                return
            self.live += 1
            try:
                await self._connection(reader, writer, ip)
            finally:
                self.live -= 1
        except Exception as exc:  # one connection never takes the listener down
            ev("error", logging.ERROR, peer=ip, reason=f"{exc.__class__.__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ip: str
    ) -> None:
        assert self.ssl_ctx is not None
        try:
            await writer.start_tls(self.ssl_ctx, ssl_handshake_timeout=self.cfg.handshake_timeout)
        except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", None) or exc.__class__.__name__
            ev("tls-failure", logging.WARNING, peer=ip, reason=reason)
            self.limiter.record_failure(ip)
            return
        sslobj = writer.get_extra_info("ssl_object")
        cert = sslobj.getpeercert() if sslobj is not None else None
        peer = Peer(ip, serial_to_hex(cert.get("serialNumber", "")) if cert else "")
        peer.dispatcher = self.trusted.get(peer.serial) if peer.serial else None
        # Authenticated dispatchers are exempt from the volume limit (they fan out to us).
        if peer.dispatcher is None and self.limiter.record_connection(ip):
            return
        if peer.serial and peer.serial in self.revoked:
            ev("revoked-cert", logging.WARNING, peer=ip, serial=peer.serial)
            await self._send(writer, 403, {"error": "certificate revoked"})
            return
        try:
            req = await asyncio.wait_for(read_request(reader), self.cfg.request_timeout)
        except RequestError as exc:
            await self._send(writer, exc.code, exc.body)
            return
        except TimeoutError:
            ev("timeout", logging.WARNING, peer=ip, reason="request not received in time")
            return
        code, body = await self.route(req.method, req.path, req.body, peer)
        await self._send(writer, code, body)

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> None:
        writer.write(response_bytes(code, body))
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await asyncio.wait_for(writer.drain(), 30)

    # ----- routing ---------------------------------------------------------------------

    async def route(self, method: str, path: str, body: bytes, peer: Peer) -> Reply:
        if method == "POST" and path == "/run":
            return await self.h_run(body, peer)
        if method == "POST" and path == "/ping":
            return self.h_ping(body, peer)
        if method == "GET" and path == "/capabilities":
            return await self.h_capabilities(peer)
        if method == "GET" and path.startswith("/result/"):
            return self.h_result(path[len("/result/") :], peer)
        if method == "POST" and path == "/rotate-serial":
            return await self.h_rotate_serial(body, peer)
        if method == "POST" and path == "/renew":
            return self.h_renew(body, peer)
        if method == "POST" and path == "/renew-complete":
            return self.h_renew_complete(body, peer)
        return 404, {"error": "not found"}

    def _gate(self, peer: Peer, reqid: str = "") -> Reply | None:
        if peer.dispatcher is None:
            ev("serial-reject", logging.WARNING, peer=peer.ip, peer_serial=peer.serial,
               reqid=reqid or "(none)")  # fmt: skip
            return 403, {"error": "serial mismatch", "status": "forbidden"}
        return None

    @staticmethod
    def _json(body: bytes) -> Any:
        try:
            return json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError):
            return None

    @staticmethod
    def _reqid_of(obj: Any) -> str:
        if isinstance(obj, dict) and isinstance(obj.get("reqid"), str):
            return str(obj["reqid"])
        return ""

    def h_ping(self, body: bytes, peer: Peer) -> Reply:
        reqid = self._reqid_of(self._json(body))
        if (denied := self._gate(peer, reqid)) is not None:
            return denied
        ev("ping", peer=peer.ip, dispatcher=peer.dispatcher, reqid=reqid)
        return 200, {
            "status": "ok",
            "host": self.cfg.host,
            "version": __version__,
            "expiry": self.expiry,
            "staged": os.path.exists(self.cfg.cert_staging_path),
            "reqid": reqid,
        }

    async def _hook(self, action: str, peer: Peer, **kw: Any) -> authhook.Decision:
        ctx = authhook.build_context(
            action, source_ip=peer.ip, dispatcher=peer.dispatcher or "",
            dispatcher_serial=peer.serial, **kw,
        )  # fmt: skip
        d = await authhook.call(self.cfg.auth_hook, ctx, self.cfg.auth_hook_timeout)
        ev("auth", logging.INFO if d.allowed else logging.WARNING,
           result="pass" if d.allowed else "deny", authaction=action,
           user=kw.get("username") or "(none)", ip=peer.ip,
           reason=None if d.allowed else d.reason, dispatcher=peer.dispatcher)  # fmt: skip
        return d

    async def h_run(self, body: bytes, peer: Peer) -> Reply:
        obj = self._json(body)
        if (denied := self._gate(peer, self._reqid_of(obj))) is not None:
            return denied
        if not isinstance(obj, dict):
            return 200, {"exit": -1, "error": "invalid JSON"}
        script = obj.get("script", "")
        reqid = obj.get("reqid", "")
        args = obj.get("args", [])
        username = obj.get("username", "")
        token = obj.get("token", "")
        if not isinstance(reqid, str):
            return 200, {"exit": -1, "error": "reqid must be a string"}
        if not isinstance(args, list):
            return 200, {"exit": -1, "error": "args must be an array", "reqid": reqid}
        if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in args):
            return 200, {"exit": -1, "error": "args must be strings", "reqid": reqid}
        argv = [str(a) for a in args]
        if any("\0" in a for a in argv):
            return 200, {"exit": -1, "error": "args must not contain NUL bytes", "reqid": reqid}
        if not isinstance(username, str) or not isinstance(token, str):
            return 200, {"exit": -1, "error": "username and token must be strings", "reqid": reqid}
        entry = None
        if isinstance(script, str) and allowlist.NAME_RE.match(script):
            entry = self.scripts.get(script)
            if entry is not None and not allowlist.within_dirs(entry.path, self.cfg.script_dirs):
                entry = None
        if entry is None:
            ev("deny", logging.WARNING, script=str(script), peer=peer.ip, reqid=reqid)
            return 200, {"script": script, "exit": -1, "reqid": reqid,
                         "error": "script not permitted"}  # fmt: skip
        if self.cfg.auth_hook:
            d = await self._hook("run", peer, script=script, args=argv, username=username,
                                 token=token, reqid=reqid)  # fmt: skip
            if not d.allowed:
                ev("deny", logging.WARNING, script=script, peer=peer.ip, reqid=reqid,
                   reason=d.reason, dispatcher=peer.dispatcher)  # fmt: skip
                return 200, {"script": script, "exit": -1, "reqid": reqid,
                             "error": f"not authorised: {d.reason}"}  # fmt: skip
        context = {
            "script": script, "args": argv, "reqid": reqid, "peer_ip": peer.ip,
            "username": username, "token": token, "dispatcher": peer.dispatcher,
            "timestamp": authhook.utc_now(),
        }  # fmt: skip
        stdin = json.dumps(context, separators=(",", ":")).encode()
        if obj.get("async") is True:
            return await self._run_async(entry, argv, stdin, reqid, peer)
        res = await run_allowed(
            entry.path, script, argv, stdin, executor_socket=self.cfg.executor_socket,
            timeout=self.cfg.script_timeout, stdin_timeout=self.cfg.stdin_timeout,
            max_output=self.cfg.max_output, reqid=reqid, dispatcher=peer.dispatcher or "",
        )  # fmt: skip
        if res.stdin_unwritten:
            ev("stdin-timeout", logging.WARNING, script=script, reqid=reqid,
               bytes=res.stdin_unwritten)  # fmt: skip
        ev("run", script=script, exit=res.exit, peer=peer.ip, dispatcher=peer.dispatcher,
           reqid=reqid)  # fmt: skip
        out: dict[str, Any] = {"script": script, "exit": res.exit, "stdout": res.stdout,
                               "stderr": res.stderr, "reqid": reqid}  # fmt: skip
        if res.error:
            out["error"] = res.error
        if res.stdout_truncated:
            out["stdout_truncated"] = True
        if res.stderr_truncated:
            out["stderr_truncated"] = True
        return 200, out

    # ----- async runs --------------------------------------------------------------

    def _sweep(self, root: Path) -> None:
        cutoff = time.time() - self.cfg.async_ttl
        for rec in root.glob("*/*.json"):
            with contextlib.suppress(OSError):
                if rec.stat().st_mtime < cutoff:
                    rec.unlink()

    async def _run_async(
        self, entry: allowlist.Script, argv: list[str], stdin: bytes, reqid: str, peer: Peer
    ) -> Reply:
        script = entry.name
        if not REQID_RE.match(reqid):
            return 200, {"script": script, "exit": -1, "reqid": reqid,
                         "error": "async run requires a valid reqid"}  # fmt: skip
        assert peer.dispatcher is not None
        root = Path(self.cfg.async_runs_dir)
        owner_dir = root / peer.dispatcher
        lock_dir = root / ".locks"
        try:
            owner_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            lock_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._sweep(root)
            fd = os.open(lock_dir / f"{script}.lock", os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            ev("async-store-fail", logging.ERROR, script=script, reqid=reqid, reason=str(exc))
            return 200, {"script": script, "exit": -1, "reqid": reqid,
                         "error": "could not start async job"}  # fmt: skip
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                ev("run-async-busy", script=script, peer=peer.ip, reqid=reqid,
                   dispatcher=peer.dispatcher)  # fmt: skip
                return 409, {"script": script, "status": "busy", "reqid": reqid,
                             "error": "script already running"}  # fmt: skip
            record_path = owner_dir / f"{reqid}.json"
            started = authhook.utc_now()
            atomic_write_json(record_path, {"reqid": reqid, "status": "running",
                                            "script": script, "owner": peer.dispatcher,
                                            "started": started}, 0o640)  # fmt: skip
            job = {
                "path": entry.path, "args": argv, "stdin": stdin.decode(), "reqid": reqid,
                "script": script, "owner": peer.dispatcher, "started": started,
                "record": str(record_path), "timeout": self.cfg.script_timeout,
                "stdin_timeout": self.cfg.stdin_timeout, "max_output": self.cfg.max_output,
                "executor_socket": self.cfg.executor_socket,
            }  # fmt: skip
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agent.asyncjob", str(fd),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL, pass_fds=(fd,),
                    start_new_session=True, env=self._job_env(),
                )  # fmt: skip
                await proc.communicate(json.dumps(job).encode())
                if proc.returncode != 0:
                    raise OSError(f"job launcher exited {proc.returncode}")
            except OSError as exc:
                ev("async-store-fail", logging.ERROR, script=script, reqid=reqid,
                   reason=str(exc))  # fmt: skip
                with contextlib.suppress(OSError):
                    record_path.unlink()
                return 200, {"script": script, "exit": -1, "reqid": reqid,
                             "error": "could not start async job"}  # fmt: skip
        finally:
            os.close(fd)
        ev("run-async", script=script, peer=peer.ip, dispatcher=peer.dispatcher, reqid=reqid)
        return 202, {"script": script, "status": "accepted", "reqid": reqid}

    @staticmethod
    def _job_env() -> dict[str, str]:
        env = dict(os.environ)
        # The job imports this package the way the agent did.
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = pkg_root + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        return env

    def h_result(self, reqid: str, peer: Peer) -> Reply:
        if (denied := self._gate(peer, reqid)) is not None:
            return denied
        unknown = 404, {"status": "unknown", "reqid": reqid}
        if not REQID_RE.match(reqid):
            return unknown
        assert peer.dispatcher is not None
        path = Path(self.cfg.async_runs_dir) / peer.dispatcher / f"{reqid}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            ev("result-miss", peer=peer.ip, reqid=reqid, dispatcher=peer.dispatcher)
            return unknown
        if not isinstance(record, dict) or record.get("owner") != peer.dispatcher:
            ev("result-deny", logging.WARNING, peer=peer.ip, reqid=reqid, reason="not-owner")
            return unknown
        ev("result", peer=peer.ip, reqid=reqid, dispatcher=peer.dispatcher,
           status=record.get("status"))  # fmt: skip
        return 200, record

    # ----- discovery, rotation, renewal ----------------------------------------------

    async def h_capabilities(self, peer: Peer) -> Reply:
        if peer.dispatcher is None:
            reason = "serial-mismatch" if self.trusted else "no trusted dispatchers stored"
            ev("capabilities-deny", logging.WARNING, peer=peer.ip, reason=reason)
            return 403, {"error": "forbidden"}
        if self.cfg.auth_hook:
            d = await self._hook("discovery", peer)
            if not d.allowed:
                ev("capabilities-deny", logging.WARNING, peer=peer.ip, reason=d.reason)
                return 403, {"error": "not authorised"}
        from agent import schema

        scripts = []
        for name in sorted(self.scripts):
            s = self.scripts[name]
            item: dict[str, Any] = {
                "name": name, "path": s.path, "profile": s.profile,
                "executable": os.path.isfile(s.path) and os.access(s.path, os.X_OK),
            }  # fmt: skip
            sc = schema.load_sidecar(s.path)
            if sc is not None:
                item["schema"], item["schema_version"] = sc
            scripts.append(item)
        ev("capabilities", peer=peer.ip, dispatcher=peer.dispatcher, scripts=len(scripts))
        return 200, {"status": "ok", "host": self.cfg.host, "version": __version__,
                     "scripts": scripts, "tags": dict(self.cfg.tags)}  # fmt: skip

    async def h_rotate_serial(self, body: bytes, peer: Peer) -> Reply:
        obj = self._json(body)
        if (denied := self._gate(peer, self._reqid_of(obj))) is not None:
            return denied
        assert peer.dispatcher is not None
        if not isinstance(obj, dict):
            return 200, {"status": "error", "error": "invalid JSON"}
        serial, action = obj.get("serial"), obj.get("action")
        if not isinstance(serial, str) or not serial:
            return 200, {"status": "error", "error": "serial required"}
        if action not in ("add", "remove"):
            return 200, {"status": "error", "error": f"invalid action '{action}'"}
        canon = serial_to_hex(serial)
        if not canon or len(canon) > 64:
            return 200, {"status": "error", "error": f"invalid serial '{serial}'"}
        if self.cfg.auth_hook:
            token = obj.get("token") if isinstance(obj.get("token"), str) else ""
            d = await self._hook("rotate", peer, args=[action, serial], token=str(token))
            if not d.allowed:
                ev("rotate-deny", logging.WARNING, peer=peer.ip, reason=d.reason,
                   dispatcher=peer.dispatcher)  # fmt: skip
                return 403, {"error": f"not authorised: {d.reason}"}
        try:
            if action == "add":
                trustmap.add(self.cfg.trusted_dispatchers_path, serial, peer.dispatcher)
            else:
                trustmap.remove(self.cfg.trusted_dispatchers_path, serial, peer.dispatcher)
        except PermissionError as exc:
            ev("rotate-fail", logging.WARNING, peer=peer.ip, reason=str(exc),
               dispatcher=peer.dispatcher)  # fmt: skip
            return 200, {"status": "error", "error": str(exc)}
        except (OSError, ValueError) as exc:
            ev("rotate-fail", logging.ERROR, peer=peer.ip, reason=str(exc))
            return 200, {"status": "error", "error": f"could not update map: {exc}"}
        self._load_trust(strict=False)
        ev("rotate", dispatcher=peer.dispatcher, serial_action=action, serial=canon,
           peer=peer.ip)  # fmt: skip
        return 200, {"status": "ok", "action": action, "serial": canon,
                     "dispatcher": peer.dispatcher}  # fmt: skip

    def h_renew(self, body: bytes, peer: Peer) -> Reply:
        from agent.common import certs

        reqid = self._reqid_of(self._json(body))
        try:
            key = certs.load_key(self.cfg.key)
        except (OSError, ValueError, AssertionError) as exc:
            ev("renew", logging.ERROR, peer=peer.ip, error=f"agent key not available: {exc}")
            return 200, {"status": "error", "error": "agent key not available"}
        try:
            csr = certs.make_csr(key, self.cfg.host)
        except ValueError as exc:
            ev("renew", logging.ERROR, peer=peer.ip, error=str(exc))
            return 200, {"status": "error", "error": "could not generate CSR"}
        ev("renew", peer=peer.ip, reqid=reqid, status="csr-generated")
        return 200, {"status": "ok", "csr": csr, "reqid": reqid}

    def h_renew_complete(self, body: bytes, peer: Peer) -> Reply:
        from agent.common import certs

        obj = self._json(body)
        reqid = self._reqid_of(obj)
        cert = obj.get("cert") if isinstance(obj, dict) else None
        if not isinstance(cert, str) or not cert.strip():
            return 200, {"status": "error", "error": "cert required"}
        try:
            certs.validate_for_key(cert.encode(), self.cfg.ca, self.cfg.key)
            certs.stage(cert.encode(), self.cfg.cert_staging_path)
        except (ValueError, OSError) as exc:
            ev("renew-complete", logging.WARNING, peer=peer.ip, reqid=reqid, error=str(exc))
            return 200, {"status": "error", "error": str(exc)}
        ev("renew-complete", peer=peer.ip, reqid=reqid, status="cert-staged")
        return 200, {"status": "ok", "reqid": reqid, "staged": True}
