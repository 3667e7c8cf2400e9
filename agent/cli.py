"""``ctrl-exec-agent`` / ``cea``: serve, pairing and local checks (spec 1.3)."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import ssl
import sys
import time

from agent import allowlist
from agent.common import logfmt
from agent.common.errors import ConfigError
from agent.config import DEFAULT_ALLOWLIST, DEFAULT_CONFIG, AgentConfig, load
from agent.version import __version__

EX_CONFIG = 78
MODES = ("serve", "request-pairing", "pairing-status", "paired", "self-check", "self-ping",
         "cert-staged", "promote-cert")  # fmt: skip
USAGE = f"""usage: ctrl-exec-agent [--config PATH] [--allowlist PATH] MODE [options]

modes:
  serve             run the mTLS agent (port from agent.conf, default 7443)
  request-pairing   --dispatcher HOST [--port 7444] [--background] [--timeout N]
                    [--lookup-by ip|hostname] [--ca-fingerprint SHA256:HEX]
                    [--token-file F | --token - | env CTRL_EXEC_PAIRING_TOKEN]:
                    pair with a dispatcher (the fingerprint pins its CA, as
                    ced pairing-mode prints it; a pairing token from ced
                    pairing-token create is approved without an operator)
  pairing-status    is this agent paired? prints the cert expiry
  paired            exit 0 when cert, key and CA exist, else 1
  self-check        check config, allowlist and scripts
  self-ping         mTLS round trip to the local agent
  cert-staged       exit 0 when a renewed cert is staged, else 1
  promote-cert      install a valid staged cert (run before serve)

defaults: --config {DEFAULT_CONFIG}  --allowlist {DEFAULT_ALLOWLIST}
"""


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=80)


def _parser() -> argparse.ArgumentParser:
    # a fixed width spares argparse's terminal probe: shutil, and with it zlib, bz2 and
    # lzma, would stay in the daemon's memory (~0.5 MB RSS)
    p = argparse.ArgumentParser(prog="ctrl-exec-agent", add_help=False, usage=USAGE,
                                formatter_class=_Formatter)  # fmt: skip
    p.add_argument("mode", nargs="?")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--allowlist", default=DEFAULT_ALLOWLIST)
    p.add_argument("--dispatcher")
    p.add_argument("--port", type=int, default=7444)
    p.add_argument("--background", action="store_true")
    p.add_argument("--timeout", type=int)
    p.add_argument("--lookup-by", choices=("ip", "hostname"))
    p.add_argument("--ca-fingerprint")
    p.add_argument("--token-file")
    p.add_argument("--token")
    p.add_argument("--version", action="store_true")
    p.add_argument("-h", "--help", action="store_true")
    return p


def _framed(headline: str, lines: list[str]) -> None:
    bar = "-" * 64
    print(bar, f"ctrl-exec-agent: {headline}", *lines, bar, sep="\n", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        import agent

        print(f"ctrl-exec-agent {__version__}")
        print(f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}")
        print(f"modules: {os.path.dirname(agent.__file__)}")
        return 0
    if args.help or not args.mode:
        print(USAGE, end="")
        return 0
    if args.mode not in MODES:
        print(f"Unknown mode '{args.mode}'\n{USAGE}", end="", file=sys.stderr)
        return 2
    handler = {
        "serve": cmd_serve, "request-pairing": cmd_request_pairing,
        "pairing-status": cmd_pairing_status, "paired": cmd_paired,
        "self-check": cmd_self_check, "self-ping": cmd_self_ping,
        "cert-staged": cmd_cert_staged, "promote-cert": cmd_promote_cert,
    }[args.mode]  # fmt: skip
    return handler(args)


def _config(args: argparse.Namespace) -> AgentConfig:
    return load(args.config)


def _missing_credentials(cfg: AgentConfig) -> list[str]:
    return [p for p in (cfg.cert, cfg.key, cfg.ca) if not os.path.isfile(p)]


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError as exc:
        _framed("cannot start - configuration error.", [str(exc)])
        return EX_CONFIG
    logfmt.setup("ctrl-exec-agent", cfg.log_target, fmt=cfg.log_format)
    for w in cfg.warnings:
        logfmt.event("config-warn", 30, reason=w)
    if missing := _missing_credentials(cfg):
        _framed("cannot start - this agent has not been paired yet.",
                [f"missing: {', '.join(missing)}",
                 "pair it: ctrl-exec-agent request-pairing --dispatcher HOST"])  # fmt: skip
        return EX_CONFIG
    from agent.server import AgentServer

    server = AgentServer(cfg, args.allowlist)
    try:
        server.load_all()
    except (ConfigError, ssl.SSLError, OSError) as exc:
        _framed("cannot start - configuration error.", [str(exc)])
        return EX_CONFIG
    if cfg.executor_socket:
        from agent.profiles import undefined

        wanted = {s.name: s.profile for s in server.scripts.values()}
        if errors := undefined(wanted, cfg.profile_defs):
            _framed("cannot start - configuration error.",
                    [f"{args.allowlist}: {e}" for e in errors])  # fmt: skip
            return EX_CONFIG
        logfmt.event("executor-mode", socket=cfg.executor_socket, uid=os.geteuid())
    try:
        asyncio.run(server.serve())
    except OSError as exc:
        _framed("cannot start - cannot listen.", [f"{cfg.bind}:{cfg.port}: {exc}"])
        return EX_CONFIG
    finally:
        logfmt.shutdown()
    return 0


def cmd_request_pairing(args: argparse.Namespace) -> int:
    from agent import pairing

    if not args.dispatcher:
        print("request-pairing needs --dispatcher HOST", file=sys.stderr)
        return 2
    timeout = args.timeout if args.timeout is not None else (30 if args.background else 600)
    if not 1 <= timeout <= 600:
        print("--timeout must be 1..600 seconds", file=sys.stderr)
        return 2
    pin = None
    if args.ca_fingerprint is not None:
        from agent.common.certs import parse_fingerprint

        try:
            pin = parse_fingerprint(args.ca_fingerprint)
        except ValueError as exc:
            print(f"--ca-fingerprint: {exc}", file=sys.stderr)
            return 2
    try:
        token = pairing.read_token(args.token_file, args.token, os.environ)
    except pairing.PairingError as exc:
        print(f"request-pairing: {exc}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
    logfmt.setup(
        "ctrl-exec-agent",
        "stderr" if cfg.log_target == "auto" else cfg.log_target,
        fmt=cfg.log_format,
    )
    host = cfg.host
    try:
        pairing.preflight([cfg.cert, cfg.key, cfg.ca])
        pairing.probe(args.dispatcher, args.port)
        if "." not in host:
            print(f"Warning: '{host}' is not a fully qualified name.", file=sys.stderr)
        print(f"Generating key and CSR for '{host}'...", flush=True)
        req = pairing.prepare(host, cfg.key_type)
        print(f"Pairing code: {req.code}", flush=True)
        print(f"Connecting to ctrl-exec at {args.dispatcher} for pairing...", flush=True)
        hints: dict[str, object] = {"port": cfg.port}
        if args.lookup_by:
            hints["lookup_by"] = args.lookup_by
        if token:
            hints[pairing.TOKEN_FIELD] = token
            print("Presenting a pairing token: approval needs no operator if it is valid.",
                  flush=True)  # fmt: skip
        started = time.monotonic()
        session, reqid = pairing.submit_retrying(args.dispatcher, args.port, req, hints,
                                                 timeout, ca_pin=pin)  # fmt: skip
        timeout = max(1, timeout - int(time.monotonic() - started))
        if args.background:
            print(reqid, flush=True)
            if os.fork() != 0:
                return 0
            os.setsid()
        session.sock.settimeout(timeout)
        result, session = pairing.wait_reconnecting(session, req, hints, timeout)
        session.close()
        pairing.store(result, req, cfg.cert, cfg.key, cfg.ca, cfg.trusted_dispatchers_path)
    except pairing.PairingError as exc:
        logfmt.event("pair-denied" if exc.denied else "pair-timeout"
                     if "timed out" in str(exc) else "pair-fail", 40, reason=str(exc))  # fmt: skip
        print(f"Pairing failed: {exc}", file=sys.stderr)
        return 2 if "timed out" in str(exc) else 3
    except (OSError, ssl.SSLError) as exc:
        print(f"Pairing failed: {exc}", file=sys.stderr)
        return 3
    finally:
        logfmt.shutdown()
    logfmt.event("pair-complete", status="approved", dispatcher=result.get("dispatcher_id"),
                 dispatcher_host=args.dispatcher)  # fmt: skip
    print("Pairing complete. Certificates stored.")
    if pin is not None:
        print(f"Dispatcher CA: {session.ca_fingerprint} (matches --ca-fingerprint)")
    else:
        print(f"Dispatcher CA: {session.ca_fingerprint} - not pinned: compare it with the "
              "fingerprint ced pairing-mode shows")  # fmt: skip
    print(
        "Start or restart the agent: ctrl-exec-agent serve (or systemctl restart ctrl-exec-agent)"
    )
    return 0


def cmd_pairing_status(args: argparse.Namespace) -> int:
    from agent.common import certs

    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"Not paired. Reason: configuration error: {exc}")
        return 1
    if missing := _missing_credentials(cfg):
        print(f"Not paired. Reason: missing {', '.join(missing)}")
        return 1
    print(f"Paired. Certificate expires: {certs.cert_expiry(cfg.cert)}")
    return 0


def cmd_paired(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError:
        return 1
    return 1 if _missing_credentials(cfg) else 0


def cmd_self_check(args: argparse.Namespace) -> int:
    from agent.common import certs

    print("Checking config...")
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"  Config error: {exc}")
        return 1
    print(f"  Config OK (port {cfg.port})")
    for w in cfg.warnings:
        print(f"  Warning: {w}")
    try:
        scripts, warnings = allowlist.load(args.allowlist, cfg.script_dirs)
    except ConfigError as exc:
        print(f"  Allowlist error: {exc}")
        return 1
    for w in warnings:
        print(f"  Warning: {w}")
    print(f"  Allowlist OK ({len(scripts)} scripts)")
    if cfg.executor_socket:
        print(f"  Executor mode (socket {cfg.executor_socket}): scripts run under their profiles")
    for name in sorted(scripts):
        s = scripts[name]
        if cfg.executor_socket:
            ok, notes = _profile_check(cfg, s)
        else:
            ok, notes = os.path.isfile(s.path) and os.access(s.path, os.X_OK), []
        state = "ok" if ok else "NOT EXECUTABLE"
        print(f"  Script '{name}': {s.path}  (profile: {s.profile}) [{state}]")
        for note in notes:
            print(f"    {note}")
    if missing := _missing_credentials(cfg):
        print(f"  Not paired: missing {', '.join(missing)}")
    else:
        print(f"  Certificate expires: {certs.cert_expiry(cfg.cert)}")
    print("Self-check complete.")
    return 0


def _profile_check(cfg: AgentConfig, script: allowlist.Script) -> tuple[bool, list[str]]:
    """Executor mode: can the profile's ``run_as`` execute the script? With the reason."""
    from agent import profiles

    prof = cfg.profile_defs.get(script.profile)
    if prof is None:
        return False, [f"Profile error: profile '{script.profile}' is not defined"]
    try:
        user = profiles.resolve_user(prof.run_as)
    except KeyError as exc:
        return False, [f"Profile error: {exc.args[0]}"]
    why = profiles.can_execute(script.path, user, "CAP_DAC_OVERRIDE" in prof.caps)
    notes = [f"runs as {user.name} (uid {user.uid}, gid {user.gid}); {profiles.describe(prof)}"]
    if why:
        notes.append(f"not executable by {user.name}: {why}")
    return not why, notes


def cmd_self_ping(args: argparse.Namespace) -> int:
    import json
    import secrets

    from agent.common.tlsconf import client_context
    from agent.common.wire import parse_response, request_bytes

    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"FAIL: configuration error: {exc}")
        return 1
    host = "127.0.0.1" if cfg.bind in ("0.0.0.0", "", "::") else cfg.bind
    try:
        ctx = client_context(cfg.ca, cfg.cert, cfg.key)
        with (
            socket.create_connection((host, cfg.port), timeout=10) as raw,
            ctx.wrap_socket(raw) as s,
        ):
            s.sendall(request_bytes("POST", "/ping", {"reqid": secrets.token_hex(4)}))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        resp = parse_response(data)
        body = resp.json()
    except (OSError, ssl.SSLError, ValueError) as exc:
        print(f"FAIL: {exc}")
        return 1
    if resp.code == 403 and body.get("error") == "serial mismatch":
        print(
            f"PASS: agent on {host}:{cfg.port} answered over mTLS"
            " (own cert not trusted, as expected)"
        )
        return 0
    if resp.code == 200:
        print(f"PASS: agent on {host}:{cfg.port} answered: {json.dumps(body)}")
        return 0
    print(f"FAIL: unexpected answer {resp.code}: {json.dumps(body)}")
    return 1


def cmd_cert_staged(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except ConfigError:
        return 1
    return 0 if os.path.isfile(cfg.cert_staging_path) else 1


def cmd_promote_cert(args: argparse.Namespace) -> int:
    from agent.common import certs

    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 0
    logfmt.setup("ctrl-exec-agent", cfg.log_target, fmt=cfg.log_format)
    try:
        result = certs.promote(cfg.cert_staging_path, cfg.cert, cfg.ca, cfg.key)
    except OSError as exc:
        result = f"error: {exc}"
    if result != "absent":
        logfmt.event("cert-promote", status=result)
    logfmt.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
