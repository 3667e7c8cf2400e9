from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dispatcher.haproxy import Member, render

MEMBERS = [
    Member("d1", "127.0.0.1", 17445, 17446, 17444, 17447),
    Member("node two", "127.0.0.2", 17445, 17446, 17444, 17447),
]


def test_render_shape() -> None:
    text = render(MEMBERS, bind="127.0.0.1", stats_socket="/tmp/x.sock", full=True)
    assert "mode tcp" in text and "option redispatch" in text and "retries 2" in text
    assert "server d1 127.0.0.1:17445 check port 17446" in text
    assert "server node_two 127.0.0.2:17444 check port 17446" in text
    assert text.count("GET /leader") == 1 and text.count("GET /ready") == 1
    assert "on-marked-down shutdown-sessions" in text
    # one slow check of a busy leader must not cut every agent waiting for its approval
    pairing = text.split("backend be_ctrl_exec_pairing", 1)[1]
    assert "default-server inter 500 fall 2 rise 1" in pairing
    proxied = render(MEMBERS, proxy_protocol=True)
    assert "server d1 127.0.0.1:17447 send-proxy-v2 check port 17446" in proxied


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_it(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(MEMBERS, bind="127.0.0.1", stats_socket=str(tmp_path / "s.sock"),
                          proxy_protocol=True, full=True))  # fmt: skip
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_whole_file_logs_to_syslog_or_stdout() -> None:
    assert "    log /dev/log local0 info" in render(MEMBERS, full=True)
    text = render(MEMBERS, log_stdout=True, full=True)
    assert "    log stdout format raw local0 info" in text and "/dev/log" not in text


SHARED = """global
    log /dev/log local0
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend other_service
    bind 127.0.0.1:18080
    default_backend other
backend other
    server o 127.0.0.1:18081
"""


def test_for_a_shared_load_balancer_only_our_sections() -> None:
    text = render(MEMBERS, bind=["192.0.2.10", "2001:db8::10"], pairing_timeout=600)
    sections = {ln for ln in text.splitlines() if ln and not ln.startswith((" ", "#"))}
    assert not {"global", "defaults"} & sections and "stats socket" not in text
    for section in ("frontend fe_ctrl_exec_api", "backend be_ctrl_exec_api",
                    "frontend fe_ctrl_exec_pairing", "backend be_ctrl_exec_pairing"):  # fmt: skip
        assert section in text
    assert text.count("    mode tcp") == 4 and text.count("    log global") == 2
    assert "    bind 192.0.2.10:7445" in text and "    bind [2001:db8::10]:7444" in text
    # an agent waits up to pairing_timeout for its approval: the pairing sections outlast it
    pairing = text[text.index("frontend fe_ctrl_exec_pairing") :]
    assert "timeout client 630s" in pairing and "timeout server 630s" in pairing


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_our_sections_beside_another_service(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(SHARED + render(MEMBERS, bind="127.0.0.1", proxy_protocol=True))
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pairing_goes_through_proxy_v2_when_the_instance_has_a_proxy_pairing_port() -> None:
    members = [
        Member("d1", "127.0.0.1", 17445, 17446, 17444, 17447, pairing_proxy_port=17448),
        Member("d2", "127.0.0.2", 17445, 17446, 17444, 17447),  # no proxy pairing port
    ]
    proxied = render(members, proxy_protocol=True)
    pairing = proxied.split("backend be_ctrl_exec_pairing", 1)[1]
    assert "server d1 127.0.0.1:17448 send-proxy-v2 check port 17446" in pairing
    assert "server d2 127.0.0.2:17444 check port 17446" in pairing
    plain = render(members).split("backend be_ctrl_exec_pairing", 1)[1]
    assert "send-proxy-v2" not in plain and "127.0.0.1:17444 check" in plain


def test_a_member_record_advertises_its_proxy_pairing_port() -> None:
    from cluster.backend import MemberInfo
    from dispatcher.ced.cluster import haproxy_members
    from dispatcher.config import DispatcherConfig

    info = MemberInfo("d1", advertise_url="https://10.0.0.1:7445", health_port=7446,
                      pairing_port=7444, proxy_port=7447, pairing_proxy_port=7448)  # fmt: skip
    back = MemberInfo.from_json(info.to_json())
    assert back.pairing_proxy_port == 7448
    members = haproxy_members(DispatcherConfig().finish(), [back])
    assert members[0].pairing_proxy_port == 7448
    text = render(members, proxy_protocol=True)
    assert "server d1 10.0.0.1:7448 send-proxy-v2 check port 7446" in text
    assert MemberInfo.from_json('{"instance_id": "old"}').pairing_proxy_port == 0  # older peers
