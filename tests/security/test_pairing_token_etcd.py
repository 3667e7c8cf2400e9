"""An etcd writer cannot mint a pairing token: requests for the leader are sealed with the
cluster key, which etcd never sees, and the store holds only hashes.

One live cluster (real etcd over TLS, three ``ctrl-exec-api``). The attacker is an etcd
client without the cluster key who posts ``pairing-token-create`` requests carrying the
hash of a token it knows (unsealed, sealed with its own key, and a genuine seal moved from
another request key): every one is dropped, no instance's CA directory or registry
changes, and the attacker's token is unknown to the leader. The control: the same request
sealed with the cluster key (what ``ced`` posts) creates the token, and etcd then holds
no clear token anywhere.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.signing import RecordSigner
from dispatcher.ha import leader_requests
from dispatcher.pairing import tokens as tk
from ops.lab.etcd import ETCD, SKIP_REASON
from ops.lab.hacluster import Cluster, ClusterSpec, Inst, running_cluster, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(300),
    pytest.mark.skipif(ETCD is None, reason=SKIP_REASON),
]

FORGER = RecordSigner(b"\x77" * 32)


def snapshot(*dirs: Path) -> str:
    h = hashlib.sha256()
    for top in dirs:
        h.update(f"\0{top}\0".encode())
        for p in sorted(top.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(top)}\0{st.st_mode:o}\0{st.st_mtime_ns}\0".encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


def logged(inst: Inst, *parts: str) -> bool:
    return any(all(p in ln for p in parts) for ln in inst.logtext().splitlines())


@pytest.fixture(autouse=True)
def _show_attacks(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[attack]")]
    if lines:
        with capsys.disabled():
            print("", *lines, sep="\n")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={}, scripts={}, ttl=2, sync_mode="push", tls=True,
                       proxy_protocol=False)  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("tokenetcd"), spec) as c:
        c.one_leader()
        c.converged()
        yield c


def test_etcd_writer_cannot_mint_a_pairing_token(cluster: Cluster) -> None:
    leader = cluster.one_leader()
    tid, token = tk.new_token()
    args = {"hashes": json.dumps({tid: tk.token_hash(token)}), "expires_in": 3600,
            "tags": "", "re_pair": True}  # fmt: skip
    before = {i.name: snapshot(i.ca_dir, i.registry_dir) for i in cluster.insts.values()}
    b = cluster.backend(2.0)
    try:
        keys = []
        for n, how in enumerate(("unsealed", "forged-key", "moved")):
            rid = f"{int(time.time() * 1000):x}-tok{n}"
            key = b.keys.request(rid)
            doc = {"id": rid, "kind": "pairing-token-create", "at": time.time(),
                   "requested_by": "attacker", "args": args}  # fmt: skip
            if how == "unsealed":
                value = json.dumps(doc)
            elif how == "forged-key":
                value = FORGER.seal("request", key, doc)
            else:
                value = cluster.signer.seal("request", b.keys.request("elsewhere"), doc)
            b.put_value(key, value)
            keys.append(key)
        wait_until(lambda: all(b.get_value(k) is None for k in keys), 15, "forged requests dropped")
        assert not [kv.key for kv in b.get_prefix(b.keys.results)]
        for k in keys:
            assert logged(leader, "ACTION=request-drop", f"KEY={k} "), k
        assert {i.name: snapshot(i.ca_dir, i.registry_dir)
                for i in cluster.insts.values()} == before  # fmt: skip
        with pytest.raises(tk.TokenRefused, match="unknown"):
            tk.peek(leader.ca_dir, token)
        print(
            "[attack] pairing token minted by an etcd writer: refused (3 requests not "
            "sealed with the cluster key dropped; no token stored on any instance)"
        )

        # the control: the genuine, sealed request creates it
        rid = leader_requests.post(b, cluster.signer, "pairing-token-create", args, "test")
        doc = leader_requests.wait(b, cluster.signer, rid, 60)
        assert doc.get("ok"), doc
        assert tk.peek(leader.ca_dir, token).token_id == tid
        dump = "\n".join(f"{kv.key}={kv.value!r}" for kv in b.get_prefix(b.keys.prefix))
        assert token not in dump and token.split(".")[2] not in dump
    finally:
        b.close()
