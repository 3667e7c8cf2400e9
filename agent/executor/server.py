"""The executor's Unix-socket server: one run per connection, from the agent's uid only.

For every request it re-reads ``agent.conf`` and ``scripts.conf`` (when their inode, size
or mtime changed), so the agent can name only a script the allowlist holds and never
chooses the path or the profile. The script runs with :func:`agent.runner.run_script`
in the profile's mount namespace (:mod:`agent.executor.sandbox`), with the limits of ``agent.conf``
(``script_timeout``, ``stdin_timeout``, ``max_output``). If the agent goes away during a
run, the run finishes (bounded by ``script_timeout``), is logged and its result dropped.
Per profile it keeps a :class:`~agent.executor.sandbox.Plan` (credentials worked out once)
and a spawner (:mod:`agent.executor.spawner`); both are dropped when the configuration
changes or on SIGHUP, and a spawner of a since rebuilt namespace is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any

from agent import allowlist, config, profiles
from agent.common import logfmt, sdnotify
from agent.common.errors import ConfigError
from agent.executor import protocol
from agent.executor.sandbox import (
    ExecError,
    Namespaces,
    Plan,
    SandboxError,
    Spawner,
    lower_own_limits,
)
from agent.runner import Child, RunResult, run_script

ev = logfmt.event
REQUEST_TIMEOUT = 10.0
_UCRED = struct.Struct("3i")  # pid, uid, gid


@dataclass
class Loaded:
    key: tuple[tuple[int, int, int], ...]
    cfg: config.AgentConfig
    scripts: dict[str, allowlist.Script]


def _stat_key(*paths: str) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def peer_uid(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return int(_UCRED.unpack(raw)[1])


class ExecutorServer:
    def __init__(self, config_path: str, allowlist_path: str, socket_path: str,
                 agent_uid: int, agent_gid: int):  # fmt: skip
        self.config_path = config_path
        self.allowlist_path = allowlist_path
        self.socket_path = socket_path
        self.agent_uid = agent_uid
        self.agent_gid = agent_gid
        self.live = 0
        self._loaded: Loaded | None = None
        self._plans: dict[tuple[profiles.Profile, profiles.RunAs], Plan] = {}
        self.namespaces = Namespaces()
        self.spawners: dict[tuple[str, tuple[int, ...]], Spawner] = {}
        self._stopping: asyncio.Event | None = None

    # ----- configuration ---------------------------------------------------------

    def load(self) -> Loaded:
        """The current config and allowlist (re-read when either file changed)."""
        try:
            key = _stat_key(self.config_path, self.allowlist_path)
        except OSError as exc:
            raise ConfigError(f"cannot stat: {exc.strerror}", exc.filename) from None
        if self._loaded is None or self._loaded.key != key:
            cfg = config.load(self.config_path)
            scripts, warnings = allowlist.load(self.allowlist_path, cfg.script_dirs)
            for w in [*cfg.warnings, *warnings]:
                ev("config-warn", logging.WARNING, reason=w)
            for msg in profiles.undefined({s.name: s.profile for s in scripts.values()},
                                          cfg.profile_defs):  # fmt: skip
                ev("config-warn", logging.WARNING, reason=f"{self.allowlist_path}: {msg}")
            self._loaded = Loaded(key, cfg, scripts)
            self._forget_plans()
            ev("exec-load", scripts=len(scripts), profiles=len(cfg.profile_defs))
        return self._loaded

    def _forget_plans(self) -> None:
        """Drop the plans and stop the spawners (the profiles may have changed)."""
        self._plans.clear()
        for sp in self.spawners.values():
            sp.close()
        self.spawners.clear()

    def spawner(self, plan: Plan) -> Spawner:
        """The spawner of ``plan``'s profile (one per profile: its bounding set is the
        profile's and it sits in the profile's mount namespace)."""
        key = (plan.profile.name, plan.credentials.caps)
        sp = self.spawners.get(key)
        if sp is None:
            sp = self.spawners[key] = Spawner(plan.credentials.caps)
        return sp

    def protected_dirs(self, cfg: config.AgentConfig) -> tuple[str, ...]:
        """The agent's own directories: read-only for every script, whatever its profile."""
        dirs = [os.path.dirname(self.config_path), os.path.dirname(self.allowlist_path),
                cfg.state_dir, os.path.dirname(cfg.trusted_dispatchers_path),
                cfg.async_runs_dir, os.path.dirname(cfg.cert), os.path.dirname(cfg.key),
                os.path.dirname(self.socket_path)]  # fmt: skip
        out = [os.path.realpath(d) for d in dirs if d]
        return tuple(d for d in dict.fromkeys(out) if d != "/")

    # ----- serving ---------------------------------------------------------------

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        loop = asyncio.get_running_loop()
        lower_own_limits()
        self._stopping = asyncio.Event()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._on_connect, self.socket_path,
                                                     backlog=128, limit=64 * 1024)  # fmt: skip
        finally:
            os.umask(old)
        os.chown(self.socket_path, self.agent_uid, self.agent_gid)
        os.chmod(self.socket_path, 0o600)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        ev("exec-start", socket=self.socket_path, agent_uid=self.agent_uid)
        sdnotify.notify("READY=1", f"STATUS=listening on {self.socket_path}")
        if ready is not None:
            ready.set()
        await self._stopping.wait()
        sdnotify.notify("STOPPING=1")
        ev("exec-stop", live=self.live)
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)
        deadline = time.monotonic() + 10
        while self.live and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.namespaces.clear()
        self._forget_plans()

    def _reload(self) -> None:
        self._loaded = None
        self._forget_plans()
        self.namespaces.clear()
        try:
            self.load()
        except ConfigError as exc:
            ev("config-warn", logging.ERROR, reason=str(exc))

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = peer_uid(sock)
            if uid != self.agent_uid:
                ev("exec-reject", logging.WARNING, uid=uid, reason="peer uid is not the agent's")
                await self._reply(writer, protocol.refusal(f"peer uid {uid} is not allowed"))
                return
            cfg = None
            with contextlib.suppress(ConfigError):
                cfg = self.load().cfg
            if self.live >= (cfg.max_children if cfg else 256):
                ev("exec-reject", logging.WARNING, uid=uid, reason="busy", live=self.live)
                await self._reply(writer, protocol.refusal("executor busy"))
                return
            self.live += 1
            try:
                reply = await self._request(reader)
            finally:
                self.live -= 1
            if not await self._reply(writer, reply):
                ev("exec-orphan", logging.WARNING, exit=reply.get("exit"),
                   reason="the agent went away before the result")  # fmt: skip
        except Exception as exc:  # one connection never takes the executor down
            ev("error", logging.ERROR, reason=f"{exc.__class__.__name__}: {exc}")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict[str, Any]) -> bool:
        try:
            writer.write(protocol.encode(obj))
            await asyncio.wait_for(writer.drain(), 30)
        except (OSError, TimeoutError):
            return False
        return True

    async def _request(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            obj = await asyncio.wait_for(protocol.read_frame(reader, protocol.MAX_REQUEST),
                                         REQUEST_TIMEOUT)  # fmt: skip
            req = protocol.parse_request(obj)
        except TimeoutError:
            ev("exec-bad-frame", logging.WARNING, reason="no request in time")
            return protocol.refusal("executor: no request in time")
        except protocol.FrameError as exc:
            ev("exec-bad-frame", logging.WARNING, reason=str(exc))
            return protocol.refusal(f"executor: malformed request: {exc}")
        try:
            loaded = self.load()
        except ConfigError as exc:
            ev("exec-deny", logging.ERROR, script=req.script, reqid=req.reqid, reason=str(exc))
            return protocol.refusal(f"executor: config error: {exc}")
        res = await self.run(loaded, req)
        return protocol.result_obj(res)

    async def run(self, loaded: Loaded, req: protocol.Request) -> RunResult:
        cfg = loaded.cfg
        entry = loaded.scripts.get(req.script)
        if entry is None or not allowlist.within_dirs(entry.path, cfg.script_dirs):
            ev("exec-deny", logging.WARNING, script=req.script, reqid=req.reqid,
               dispatcher=req.dispatcher, reason="not in the allowlist")  # fmt: skip
            return RunResult(-1, "", "", error="executor: script not permitted")
        prof = cfg.profile_defs.get(entry.profile)
        if prof is None:
            ev("exec-deny", logging.WARNING, script=req.script, reqid=req.reqid,
               profile=entry.profile, reason="undefined profile")  # fmt: skip
            return RunResult(-1, "", "", error=f"executor: undefined profile '{entry.profile}'")
        try:
            user = profiles.resolve_user(prof.run_as)
        except KeyError as exc:
            msg = f"executor: profile could not be applied: {exc.args[0]}\n"
            ev("exec-run", logging.WARNING, script=req.script, exit=126, reqid=req.reqid,
               profile=prof.name, reason=exc.args[0])  # fmt: skip
            return RunResult(126, "", msg)
        plan = self._plans.get((prof, user))
        if plan is None:  # its credentials are worked out once, not per run
            if len(self._plans) >= 256:
                self._plans.clear()
            plan = self._plans[(prof, user)] = Plan(prof, user)

        async def spawn(argv: list[str], env: dict[str, str]) -> Child:
            # The namespace is looked up and handed to the child with no await in
            # between, so a concurrent rebuild can never close it under this start.
            nsfd = self.namespaces.get(loaded.key, prof, lambda: self.protected_dirs(cfg))
            return await plan.spawn(self.spawner(plan), nsfd, argv, env)

        try:
            res = await run_script(
                entry.path, req.args, req.stdin.encode(), timeout=cfg.script_timeout,
                stdin_timeout=cfg.stdin_timeout, max_output=cfg.max_output, env=plan.env(),
                spawn=spawn,
            )  # fmt: skip
        except SandboxError as exc:
            ev("exec-run", logging.ERROR, script=req.script, exit=126, reqid=req.reqid,
               profile=prof.name, reason=str(exc))  # fmt: skip
            return RunResult(126, "", f"executor: profile could not be applied: {exc}\n")
        except ExecError as exc:
            res = RunResult(exc.exit, "", f"executor: cannot execute {exc}\n"
                            f"executor: '{entry.path}' cannot be executed by the profile's "
                            f"run_as user ({user.name}): check its owner, group and mode\n")  # fmt: skip
        ev("exec-run", script=req.script, exit=res.exit, reqid=req.reqid,
           dispatcher=req.dispatcher, profile=prof.name, run_as=user.name)  # fmt: skip
        return res
