"""etcd authentication with a real etcd on TLS with auth on (``ops.lab.etcd.secure_etcd``).

The right user works (the whole backend contract runs against such an etcd too:
``tests/integration/test_cluster_contract.py``, ``etcd-auth``); a wrong password is a
clear error naming the endpoint and the user, with no traceback, for ``ctrl-exec-api``
(exit 78) and ``ced cluster status`` (exit 1); a lapsed token is renewed once, for calls
and for watches.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.backend import EtcdBackend
from cluster.errors import AccessDenied
from ops.lab.apidaemon import make_daemon
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster, add_user, gateway, secure_etcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
CLUSTER = "authc"


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    # simple tokens lapse after 1 idle second here (etcd's default is 300)
    cluster = secure_etcd(tmp_path_factory.mktemp("etcd-auth"), f"/{CLUSTER}/", auth_token_ttl=1)
    try:
        yield cluster.start()
    finally:
        cluster.close()


def wrong_password_conf(etcd: EtcdCluster, tmp_path: Path) -> dict[str, str]:
    wrong = tmp_path / "wrong.password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    return {**etcd.client_conf(), "etcd_password_file": str(wrong), "cluster_name": CLUSTER,
            "instance_id": "i1", "sync_mode": "shared-fs", "lease_ttl": "2"}  # fmt: skip


def test_the_right_user_leads_and_writes_fenced(etcd: EtcdCluster) -> None:
    b = EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, **etcd.client_kwargs())
    try:
        lease = b.lease_grant(5)
        won = b.campaign(lease.id, "a")
        assert won.won and won.leader is not None
        assert b.leader() == won.leader
        assert b.revision() >= won.leader.epoch
        b.resign(lease.id)
        assert b.leader() is None
    finally:
        b.close()


def test_a_wrong_password_stops_the_daemon_with_a_clear_error(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    (tmp_path / "ca").mkdir()
    (tmp_path / "agents").mkdir()
    d = make_daemon(tmp_path, "i1", tmp_path / "ca", tmp_path / "agents",
                    wrong_password_conf(etcd, tmp_path))  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "dispatcher.api.daemon", "--config", str(d.config)],
                       capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert p.returncode == 78, p.stderr
    want = (f'ACTION=api-fatal REASON="{d.config}: refusing to start: etcd at '
            f"{etcd.endpoints[0]} refused user 'ctrl-exec': etcdserver: authentication failed, "
            'invalid user ID or password (check etcd_user and etcd_password_file)"')  # fmt: skip
    assert any(line.endswith(want) for line in p.stderr.splitlines()), p.stderr
    assert "Traceback" not in p.stderr and "not-the-password" not in p.stderr


def test_a_wrong_password_in_ced_cluster_status(etcd: EtcdCluster, tmp_path: Path) -> None:
    conf = tmp_path / "ctrl-exec.conf"
    lines = {**wrong_password_conf(etcd, tmp_path), "state_dir": str(tmp_path / "state")}
    conf.write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", "cluster", "status",
                        "--config", str(conf)], capture_output=True, text=True, env=ENV,
                       timeout=60)  # fmt: skip
    assert p.returncode == 1, p.stdout + p.stderr
    assert f"etcd at {etcd.endpoints[0]} refused user 'ctrl-exec'" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_lapsed_token_is_renewed_once(
    etcd: EtcdCluster, caplog: pytest.LogCaptureFixture
) -> None:
    b = EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, **etcd.client_kwargs())
    key = f"/{CLUSTER}/probe"
    try:
        b.store.put(key, "1")
        first = b.store._token
        assert first
        caplog.set_level(logging.INFO, logger="ctrl-exec.cluster")
        time.sleep(2.5)  # idle longer than --auth-token-ttl 1
        b.store.put(key, "2")  # "invalid auth token" -> authenticate -> the put again
        renewals = [r for r in caplog.records if "authenticating again" in r.getMessage()]
        assert len(renewals) == 1
        assert b.store._token and b.store._token != first
        kv = b.get_kv(key)
        assert kv is not None and kv.value == b"2"
        # a watch after a lapse: renewed as well, and it sees the next change
        time.sleep(2.5)
        rev = b.revision()  # renews the token (a second renewal)
        time.sleep(2.5)
        timer = threading.Timer(0.5, lambda: b.store.put(key, "3"))
        timer.start()
        try:
            event = b.store.watch_once(key, 5.0, rev + 1)
        finally:
            timer.join()
        assert event is not None and event.value == b"3"
        renewals = [r for r in caplog.records if "authenticating again" in r.getMessage()]
        assert 3 <= len(renewals) <= 4  # 4: the timer's put and the watch raced to renew
    finally:
        b.close()


def test_credentials_before_auth_is_on_and_after(tmp_path: Path) -> None:
    """A rollout: the dispatchers get etcd_user first, etcd turns auth on later; the
    client works throughout (no token while auth is off, then it authenticates)."""
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    plain = EtcdCluster(tmp_path / "etcd", size=1).start()
    try:
        url = plain.endpoints[0]
        password = add_user(url, None, tmp_path, "ctrl-exec", f"/{CLUSTER}/").read_text().strip()
        b = EtcdBackend(plain.endpoints, cluster_name=CLUSTER, user="ctrl-exec", password=password)
        try:
            b.store.put(f"/{CLUSTER}/k", "1")  # auth off: a warning, no token
            assert b.store._token == ""
            root_pw = "root-" + password
            gateway(url, None, "auth/user/add", {"name": "root", "password": root_pw})
            gateway(url, None, "auth/user/grant", {"user": "root", "role": "root"})
            gateway(url, None, "auth/enable", {})
            b.store.put(f"/{CLUSTER}/k", "2")  # "user name is empty" -> authenticate -> put
            assert b.store._token
            with pytest.raises(AccessDenied):
                b.store.put("/elsewhere", "x")
        finally:
            b.close()
    finally:
        plain.close()
