"""The multi-host lab (:mod:`ops.lab.hosts`): hosts with their own network, default paths and
names; partitions; two load balancers sharing a virtual IP with keepalived, configured by
``ced cluster keepalived-config`` run on each load balancer, real HAProxy in front."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.lab import vrrp
from ops.lab.haproxy import HAPROXY
from ops.lab.hosts import SUBNET, Host, Lab, available, lab
from ops.lab.proc import ROOT

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(available() is not None, reason=f"no lab: {available()}"),
]

PY = sys.executable
ENV = {"PYTHONPATH": str(ROOT), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Lab]:
    with lab(tmp_path, ["alpha", "beta"]) as the_lab:
        yield the_lab


def connect(src: Host, address: str, port: int) -> subprocess.CompletedProcess[str]:
    probe = (
        "import socket,sys\n"
        f"s=socket.create_connection(({address!r},{port}),timeout=1)\n"
        "print(s.recv(64).decode())"
    )
    return src.run([PY, "-c", probe], check=False, timeout=10)


def serve(host: Host, port: int, answer: str) -> None:
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {port})); s.listen()
        while True:
            c, _ = s.accept(); c.sendall({answer!r}.encode()); c.close()
    """)
    host.popen([PY, "-c", code])


def test_the_lab_subnet_is_blackholed_in_the_root_namespace(two: Lab) -> None:
    got = subprocess.run(["ip", "route", "get", two.hosts["alpha"].address],
                         capture_output=True, text=True)  # fmt: skip
    assert got.returncode != 0 or "blackhole" in got.stdout, got.stdout
    routes = subprocess.run(["ip", "route", "show", "type", "blackhole"],
                            capture_output=True, text=True).stdout  # fmt: skip
    assert SUBNET in routes


def test_hosts_have_their_own_default_paths_names_and_addresses(two: Lab) -> None:
    a, b = two.hosts["alpha"], two.hosts["beta"]
    a.run("echo mine > /etc/ctrl-exec/ctrl-exec.conf && echo state > /var/lib/ctrl-exec/x")
    assert a.path("/etc/ctrl-exec").joinpath("ctrl-exec.conf").read_text() == "mine\n"
    assert b.run("ls -A /etc/ctrl-exec /var/lib/ctrl-exec").stdout.split() == [
        "/etc/ctrl-exec:", "/var/lib/ctrl-exec:"]  # fmt: skip
    assert not Path("/etc/ctrl-exec/ctrl-exec.conf").exists() or (
        Path("/etc/ctrl-exec/ctrl-exec.conf").read_text() != "mine\n"
    )
    fqdn = a.run([PY, "-c", "import socket; print(socket.getfqdn())"]).stdout.strip()
    assert fqdn == "alpha.lab.test"
    assert b.run(["getent", "hosts", "alpha.lab.test"]).stdout.split()[0] == a.address
    serve(b, 7445, "beta")
    two.wait_reachable(a, b, 7445)
    assert connect(a, "beta.lab.test", 7445).stdout.strip() == "beta"


def test_block_and_unplug_cut_and_heal(two: Lab) -> None:
    a, b = two.hosts["alpha"], two.hosts["beta"]
    serve(b, 7445, "beta")
    two.wait_reachable(a, b, 7445)
    b.block(a)
    assert connect(a, b.address, 7445).returncode != 0
    b.unblock()
    two.wait_reachable(a, b, 7445)
    a.unplug()
    assert connect(a, b.address, 7445).returncode != 0
    a.plug()
    two.wait_reachable(a, b, 7445)


def haproxy_conf(backend: Host) -> str:
    return textwrap.dedent(f"""
        global
            maxconn 100
            stats socket /run/haproxy/ctrl-exec.sock mode 600 level admin
        defaults
            mode tcp
            timeout connect 1s
            timeout client 5s
            timeout server 5s
        frontend api
            bind *:7445
            default_backend app
        backend app
            server app {backend.address}:8445
    """)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
@pytest.mark.skipif(shutil.which("keepalived") is None, reason="keepalived is not installed")
def test_two_load_balancers_share_a_virtual_ip(tmp_path: Path) -> None:
    with lab(tmp_path, ["lb1", "lb2", "app", "client"]) as the_lab:
        lb1, lb2, app, client = (the_lab.hosts[n] for n in ("lb1", "lb2", "app", "client"))
        vip = the_lab.address(200)
        serve(app, 8445, "app")
        haproxies = {}
        for lb, peer, prio in ((lb1, lb2, 150), (lb2, lb1, 100)):
            lb.path("/etc/ctrl-exec").joinpath("haproxy.cfg").write_text(haproxy_conf(app))
            lb.path("/etc/ctrl-exec").joinpath("ctrl-exec.conf").write_text("api_port = 7445\n")
            haproxies[lb.name] = lb.popen([HAPROXY, "-db", "-f", "/etc/ctrl-exec/haproxy.cfg"])
            conf = lb.run([PY, "-m", "dispatcher.ced", "cluster", "keepalived-config",
                           "--vip", f"{vip}/24", "--interface", "eth0", "--address", lb.address,
                           "--peer", peer.address, "--priority", str(prio)], env=ENV).stdout  # fmt: skip
            assert f"unicast_peer {{\n        {peer.address}\n    }}" in conf
            vrrp.start(lb, conf)
        took = vrrp.wait_holder([lb1, lb2], vip, lb1, timeout=20)
        print(f"[lab] VIP on lb1 after {took:.2f} s")
        the_lab.wait_reachable(client, app, 8445)
        got = connect(client, vip, 7445)
        assert got.stdout.strip() == "app", got
        # HAProxy dies on lb1: its check fails, lb2 takes the address
        haproxies["lb1"].kill()
        t0 = time.monotonic()
        vrrp.wait_holder([lb1, lb2], vip, lb2, timeout=15)
        print(f"[lab] VIP moved to lb2 {time.monotonic() - t0:.2f} s after HAProxy died on lb1")
        assert connect(client, vip, 7445).stdout.strip() == "app"
        # lb1's HAProxy is back: with the higher priority it takes the address back
        haproxies["lb1"] = lb1.popen([HAPROXY, "-db", "-f", "/etc/ctrl-exec/haproxy.cfg"])
        vrrp.wait_holder([lb1, lb2], vip, lb1, timeout=15)
        assert connect(client, vip, 7445).stdout.strip() == "app"


def test_keepalived_config_refuses_bad_arguments(tmp_path: Path) -> None:
    conf = tmp_path / "c.conf"
    conf.write_text("")
    got = subprocess.run(
        [PY, "-m", "dispatcher.ced", "cluster", "keepalived-config", "--vip", "10.0.0.5",
         "--interface", "eth0", "--address", "10.0.0.5", "--peer", "10.0.0.6",
         "--config", str(conf)],
        capture_output=True, text=True, env=ENV,
    )  # fmt: skip
    assert got.returncode == 2, got.stderr
    assert "virtual IP is one of the hosts' own addresses" in got.stderr
