"""Agent benchmark: raw /run and /ping latency, runs/s with 50 concurrent clients, RSS.

Starts one real agent process on loopback (EC P-256 certs, as our dispatcher uses) and
measures from a client in this process:

* /ping and /run of a trivial script: median and p99 over N requests, once with a fresh
  TLS handshake per request and once resuming the TLS session (the steady state);
* runs per second with 50 concurrent clients (threads, resumed sessions), bounded count;
* the agent's RSS when idle and the peak during the load.

Usage: .venv/bin/python bench/agent_bench.py [--requests 300] [--load 1000]
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.common.wire import parse_response, request_bytes  # noqa: E402
from ops.lab.agentproc import AgentProc, make_agent  # noqa: E402
from ops.lab.pki import Issued, TestCA  # noqa: E402


class Client:
    def __init__(self, agent: AgentProc, who: Issued, resume: bool):
        self.agent, self.ctx, self.resume = agent, agent.client_ctx(who), resume
        self.session: ssl.SSLSession | None = None
        self.resumed = 0

    def call(self, method: str, path: str, body: object) -> int:
        with socket.create_connection((self.agent.host, self.agent.port), timeout=30) as raw:
            s = self.ctx.wrap_socket(raw, session=self.session if self.resume else None)
            with s:
                s.sendall(request_bytes(method, path, body))
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
                if s.session_reused:
                    self.resumed += 1
                if self.resume:
                    self.session = s.session
        return parse_response(data).code


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _kb_fields(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if len(words) == 2 and words[1] == "kB":
            out[key] = int(words[0])
    return out


def memory_split(pid: int) -> str:
    """RSS as anonymous (the agent's own) and file pages (shared libraries: libpython,
    libcrypto, libc, counted once on the host), and PSS (shared pages divided among the
    processes mapping them)."""
    status = _kb_fields(Path(f"/proc/{pid}/status"))
    rollup = _kb_fields(Path(f"/proc/{pid}/smaps_rollup"))
    return (f"anonymous {status.get('RssAnon', 0) / 1024:.1f} MiB + files "
            f"{status.get('RssFile', 0) / 1024:.1f} MiB; PSS {rollup.get('Pss', 0) / 1024:.1f} MiB")  # fmt: skip


IDLE_RSS_TARGET_MB = 20.0  # issue 12 item 6 (upstream 32 MB)
RUN_TARGET_MS = 3.0  # raw agent /run, resumed session


def latency(client: Client, method: str, path: str, body: object, n: int) -> tuple[float, float]:
    client.call(method, path, body)  # warm-up (and first session)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        code = client.call(method, path, body)
        samples.append((time.perf_counter() - t0) * 1000)
        assert code == 200, code
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--load", type=int, default=1000, help="total runs in the 50-client test")
    ap.add_argument("--clients", type=int, default=50)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ctrl-exec-bench-"))
    ca = TestCA(tmp / "pki")
    disp = ca.issue("dispatcher")
    script = tmp / "true.sh"
    script.write_text("#!/bin/sh\necho ok\n")
    script.chmod(0o755)
    agent = make_agent(tmp / "agent", ca, {"bench": disp}, {"trivial": str(script)},
                       extra={"log_target": "stderr"})  # fmt: skip
    agent.start()
    assert agent.proc is not None
    pid = agent.proc.pid
    run_body = {"script": "trivial", "args": [], "reqid": "0123456789abcdef",
                "username": "", "token": ""}  # fmt: skip
    try:
        time.sleep(0.5)
        idle = rss_kb(pid)
        mb = idle * 1024 / 1e6
        verdict = "PASS" if mb < IDLE_RSS_TARGET_MB else "FAIL"
        print(f"load average {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs")
        print(f"agent idle RSS: {idle / 1024:.1f} MiB = {mb:.1f} MB "
              f"(target < {IDLE_RSS_TARGET_MB:.0f} MB: {verdict}; upstream 32 MB)")  # fmt: skip
        print(f"  {memory_split(pid)}")
        for resume in (False, True):
            label = "resumed session" if resume else "fresh handshake"
            c = Client(agent, disp, resume)
            pm, pp = latency(c, "POST", "/ping", {"reqid": "x"}, a.requests)
            rm, rp = latency(c, "POST", "/run", run_body, a.requests)
            print(
                f"[{label}] /ping median {pm:.2f} ms p99 {pp:.2f} ms (target < 5 ms; upstream 148 ms)"
            )
            verdict = "PASS" if rm < RUN_TARGET_MS else "FAIL"
            print(f"[{label}] /run  median {rm:.2f} ms p99 {rp:.2f} ms "
                  f"(target < {RUN_TARGET_MS:.0f} ms: {verdict}; upstream 73 ms)")  # fmt: skip
            if resume:
                print(f"[{label}] sessions resumed: {c.resumed} of {2 * a.requests + 2}")
        peak = [idle]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak.append(rss_kb(pid))
                time.sleep(0.05)

        per = a.load // a.clients
        errors: list[str] = []

        def worker() -> None:
            c = Client(agent, disp, True)
            for _ in range(per):
                try:
                    if c.call("POST", "/run", run_body) != 200:
                        errors.append("status")
                except OSError as exc:
                    errors.append(str(exc))

        sampler = threading.Thread(target=sample)
        sampler.start()
        threads = [threading.Thread(target=worker) for _ in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        total = per * a.clients
        print(f"{a.clients} concurrent clients: {total} runs in {wall:.2f} s = {total / wall:.0f} runs/s, "
              f"errors {len(errors)}")  # fmt: skip
        print(f"agent peak RSS under load: {max(peak) / 1024:.1f} MiB")
        time.sleep(0.5)
        print(f"agent RSS after the load: {rss_kb(pid) / 1024:.1f} MiB ({memory_split(pid)})")
        print(f"load average {os.getloadavg()[0]:.2f} (1 min)")
    finally:
        agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
