"""Attacks on etcd access: each must be refused AND leave etcd's keyspace unchanged.

One real etcd on TLS (client certificates required) with authentication on, as
``ops.lab.etcd.secure_etcd`` sets it up and docs/trust-model.md describes: the user
``ctrl-exec`` may read and write ``/prod/`` only; a second user ``tenant`` may read and
write ``/other/`` only. Before and after every attack the whole keyspace is read as
root (every key, value, revision and lease, plus the store revision: any write bumps it)
and must be identical. Each refusal prints ``[attack] <name>: refused (<detail>)``.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import EtcdBackend, MemberInfo
from cluster.errors import AccessDenied, BackendUnavailable
from ops.lab.etcd import ETCD, SKIP_REASON, EtcdCluster, secure_etcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CLUSTER = "prod"


def attack(name: str, detail: str) -> None:
    print(f"[attack] {name}: refused ({detail})")


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    if ETCD is None:
        pytest.skip(SKIP_REASON)
    cluster = secure_etcd(tmp_path_factory.mktemp("etcd-auth"), f"/{CLUSTER}/")
    cluster.start()
    try:
        cluster.add_user("tenant", "/other/", cluster.root_token())
        # the honest cluster at work: a leader, a member, a generation
        honest = EtcdBackend(cluster.endpoints, cluster_name=CLUSTER, **cluster.client_kwargs())
        lease = honest.lease_grant(60)
        assert honest.campaign(lease.id, "honest").won
        honest.claim_member(lease.id, MemberInfo(instance_id="honest"))
        honest.put_value(honest.keys.generation, '{"generation": 1}')
        honest.close()
        yield cluster
    finally:
        cluster.close()


def keyspace(etcd: EtcdCluster) -> str:
    """Every key with its value, revisions and lease, and the store revision (as root)."""
    everything = base64.b64encode(b"\0").decode()
    answer = etcd.gateway("kv/range", {"key": everything, "range_end": everything},
                          etcd.root_token())  # fmt: skip
    header = answer.get("header")
    assert isinstance(header, dict)
    return json.dumps({"revision": header["revision"], "kvs": answer.get("kvs", [])},
                      sort_keys=True)  # fmt: skip


def refused(etcd: EtcdCluster, action: Callable[[], Any], error: type[Exception]) -> str:
    """Run ``action``: it must raise ``error`` and change nothing; the error text."""
    before = keyspace(etcd)
    with pytest.raises(error) as exc:
        action()
    assert keyspace(etcd) == before
    return str(exc.value)


def backend(etcd: EtcdCluster, **override: Any) -> EtcdBackend:
    kw: dict[str, Any] = {**etcd.client_kwargs(), **override}
    kw = {k: v for k, v in kw.items() if v is not None}
    return EtcdBackend(etcd.endpoints, cluster_name=CLUSTER, timeout=2.0, **kw)


def take_over(b: EtcdBackend) -> None:
    """What an attacker with write access would do: claim leadership, write a generation."""
    b.store.put(b.keys.leader, "attacker")
    b.store.put(b.keys.generation, '{"generation": 999}')


def raw_put(etcd: EtcdCluster, url: str, headers: dict[str, str]) -> int:
    """A raw gateway put of /prod/leader; the HTTP status (or 0: no answer)."""
    req = urllib.request.Request(
        f"{url}/v3/kv/put", method="POST", headers={"Content-Type": "application/json", **headers},
        data=json.dumps({"key": base64.b64encode(b"/prod/leader").decode(),
                         "value": base64.b64encode(b"attacker").decode()}).encode(),
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=5, context=etcd.ssl_context()) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def test_no_credentials_is_refused(etcd: EtcdCluster) -> None:
    b = backend(etcd, user=None, password=None)
    try:
        msg = refused(etcd, lambda: take_over(b), AccessDenied)
        assert f"etcd at {etcd.endpoints[0]} requires authentication" in msg
        refused(etcd, b.leader, AccessDenied)  # reading is refused too
    finally:
        b.close()
    assert raw_put(etcd, etcd.endpoints[0], {}) == 400
    attack("etcd write without credentials (client cert only)", "user name is empty")


def test_wrong_password_is_refused(etcd: EtcdCluster) -> None:
    b = backend(etcd, password="not-the-password")
    try:
        msg = refused(etcd, lambda: take_over(b), AccessDenied)
    finally:
        b.close()
    assert msg.startswith(f"etcd at {etcd.endpoints[0]} refused user 'ctrl-exec': ")
    assert "not-the-password" not in msg
    attack("etcd write with a wrong password", "authentication failed")


def test_a_forged_token_is_refused(etcd: EtcdCluster) -> None:
    before = keyspace(etcd)
    for token in ("forged.1", "", "root"):
        status = raw_put(etcd, etcd.endpoints[0], {"Authorization": token} if token else {})
        assert status in (400, 401), (token, status)
    assert keyspace(etcd) == before
    attack("etcd write with a forged auth token", "HTTP 401 invalid auth token")


def test_a_user_of_another_prefix_is_refused(etcd: EtcdCluster, tmp_path: Path) -> None:
    password = (etcd.root / "tenant.password").read_text().strip()
    b = backend(etcd, user="tenant", password=password)
    try:
        msg = refused(etcd, lambda: take_over(b), AccessDenied)
        assert "refused put by user 'tenant': etcdserver: permission denied" in msg
        refused(etcd, b.leader, AccessDenied)  # cannot read the cluster either
        lease = b.lease_grant(5)  # leases are no keys: granted, but bind nothing of /prod/
        refused(etcd, lambda: b.campaign(lease.id, "tenant"), AccessDenied)
        b.store.lease_revoke(lease.id)
        b.store.put("/other/x", "fine")  # its own prefix works: the refusal is the role's
    finally:
        b.close()
    attack("etcd write by a user whose role covers another prefix", "permission denied")


def test_the_cluster_user_cannot_write_outside_its_prefix(etcd: EtcdCluster) -> None:
    b = backend(etcd)
    try:
        msg = refused(etcd, lambda: b.store.put("/other/x", "from prod"), AccessDenied)
        refused(etcd, lambda: b.store.put("/prodx/leader", "edge"), AccessDenied)  # range end
        refused(etcd, lambda: b.store.delete_prefix("/"), AccessDenied)
    finally:
        b.close()
    assert "etcdserver: permission denied" in msg
    attack("etcd write outside /prod/ by the cluster's own user", "permission denied")


def test_plain_http_to_the_tls_etcd_is_refused(etcd: EtcdCluster) -> None:
    plain = etcd.endpoints[0].replace("https://", "http://")
    b = EtcdBackend([plain], cluster_name=CLUSTER, timeout=2.0, user="ctrl-exec",
                    password=etcd.auth.password if etcd.auth else "")  # fmt: skip
    try:
        msg = refused(etcd, lambda: take_over(b), BackendUnavailable)
    finally:
        b.close()
    req = urllib.request.Request(f"{plain}/v3/kv/range", data=b'{"key":"L3Byb2Qv"}')
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(req, timeout=5)
    assert "no member answered" in msg
    attack("plain http to the TLS etcd", "no answer: the TLS port drops plain HTTP")


def test_no_client_certificate_is_refused(etcd: EtcdCluster) -> None:
    assert etcd.tls is not None
    b = backend(etcd, cert=None, key=None)
    try:
        refused(etcd, lambda: take_over(b), BackendUnavailable)
    finally:
        b.close()
    ctx = ssl.create_default_context(cafile=str(etcd.tls.ca))  # the right CA, no cert
    req = urllib.request.Request(f"{etcd.endpoints[0]}/v3/kv/range", data=b'{"key":"L3Byb2Qv"}')
    with pytest.raises((urllib.error.URLError, OSError)):
        urllib.request.urlopen(req, timeout=5, context=ctx)
    attack("etcd with the right password but no client certificate", "TLS handshake")
