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
    text = render(MEMBERS, bind="127.0.0.1", stats_socket="/tmp/x.sock")
    assert "mode tcp" in text and "option redispatch" in text and "retries 2" in text
    assert "server d1 127.0.0.1:17445 check port 17446" in text
    assert "server node_two 127.0.0.2:17444 check port 17446" in text
    assert text.count("GET /leader") == 1 and text.count("GET /ready") == 1
    assert "on-marked-down shutdown-sessions" in text
    proxied = render(MEMBERS, proxy_protocol=True)
    assert "server d1 127.0.0.1:17447 send-proxy-v2 check port 17446" in proxied


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_accepts_it(tmp_path: Path) -> None:
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(render(MEMBERS, bind="127.0.0.1", stats_socket=str(tmp_path / "s.sock"),
                          proxy_protocol=True))  # fmt: skip
    r = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_log_to_stdout_is_optional() -> None:
    assert "log " not in render(MEMBERS)
    text = render(MEMBERS, log_stdout=True)
    assert "    log stdout format raw local0 info" in text
    assert "    log global" in text and "    option tcplog" in text


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
