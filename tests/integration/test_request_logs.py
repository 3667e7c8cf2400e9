"""One ``grep REQID`` follows a request across every process (issue 11, item 2).

Two real ``ctrl-exec-api`` instances on etcd (TLS API, operator certificate), one real
agent, and ``ced``: a leader-only request sent to the follower (forwarded to the leader),
a run through the follower's API, and a ``ced run``. Then every process's log is read:

* every line of every log is ``KEY=value`` (no free text);
* each request's reqid is on the lines of every process it touched (the follower, the
  leader it forwarded to, the agent), the ``auth`` line and the ``dispatch`` line share
  it, the leader's lines of leader-only work carry the epoch;
* every line logged for an operator (``IDENTITY=``) names a reqid, and no line of one
  request carries another's.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from agent.common import logfmt
from ops.lab.etcd import ETCD
from ops.lab.etcd import SKIP_REASON as ETCD_SKIP
from ops.lab.hacluster import ENV, Cluster, ClusterSpec, running_cluster, wait_until
from ops.lab.net import client_ssl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.skipif(ETCD is None, reason=ETCD_SKIP),
]

OPERATOR = "chaos-operator"  # the CN of the lab cluster's operator certificate
PREFIX = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (?P<ident>[\w.-]+)\[\d+\]: (?P<rest>.*)$"
)


@dataclass(frozen=True)
class Line:
    process: str
    action: str
    fields: dict[str, str]
    text: str


def parse_log(process: str, text: str, only_ident: str | None = None) -> list[Line]:
    """Every log line of ``text``; a line that is not ``ts ident[pid]: KEY=value...`` fails
    the test (``only_ident``: skip lines of other programs, such as ``ced``'s own output)."""
    lines = []
    for raw in text.splitlines():
        m = PREFIX.match(raw)
        if only_ident is not None and (m is None or m["ident"] != only_ident):
            continue
        assert m is not None, f"{process}: free-text line: {raw!r}"
        try:
            action, fields = logfmt.parse_line(m["rest"])
        except ValueError as exc:
            raise AssertionError(f"{process}: not KEY=value ({exc}): {raw!r}") from None
        lines.append(Line(process, action, fields, raw))
    return lines


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, script_dir: Path) -> Iterator[Cluster]:
    spec = ClusterSpec(agents={"node1": "127.0.0.2"},
                       scripts={"echo-args": str(script_dir / "echo-args.sh")}, ttl=2,
                       names=("a", "b"), tls=True)  # fmt: skip
    with running_cluster(tmp_path_factory.mktemp("reqlogs"), spec) as c:
        yield c


def test_one_grep_follows_a_request_across_every_process(cluster: Cluster) -> None:
    c = cluster
    leader = c.one_leader()
    follower = next(i for i in c.insts.values() if i is not leader)
    epoch = str(leader.status()["epoch"])
    c.converged()  # else a leader-only request may get 503 "catching up" (retry shortly)
    with c.client(follower) as client:
        r = client.get("/pairing")  # leader-only: the follower forwards it
        assert r.status_code == 200, r.text
        assert r.headers["x-ctrl-exec-served-by"] == leader.id
        forwarded = r.headers["x-ctrl-exec-reqid"]
        r = client.post("/run", json={"hosts": ["node1"], "script": "echo-args",
                                      "args": ["via-api"]})  # fmt: skip
        assert r.status_code == 200, r.text
        api_run = r.json()["reqid"]
        assert r.headers["x-ctrl-exec-reqid"] == api_run
    got = subprocess.run(  # Cluster.ced puts --config last: after "--" it would be an arg
        [sys.executable, "-m", "dispatcher.ced", "--config", str(leader.config), "--json",
         "run", "node1", "echo-args", "--", "via-ced"],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    ced_lines = parse_log("ced", got.stderr, only_ident="ctrl-exec-dispatcher")
    ced_run = next(ln.fields["REQID"] for ln in ced_lines if ln.action == "dispatch")
    # a leader-only action from the follower's host: ced -> etcd -> the leader's loop
    got = subprocess.run(
        [sys.executable, "-m", "dispatcher.ced", "--config", str(follower.config), "--json",
         "list-requests"], capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr
    sent = parse_log("ced", got.stderr, only_ident="ctrl-exec-dispatcher")
    ced_action = next(ln.fields["REQID"] for ln in sent if ln.action == "leader-request-sent")
    ced_lines += sent
    assert len({forwarded, api_run, ced_run, ced_action}) == 4

    agent = c.agents["node1"]

    def logs() -> dict[str, list[Line]]:
        return {"leader": parse_log("leader", leader.log.read_text(errors="replace")),
                "follower": parse_log("follower", follower.log.read_text(errors="replace")),
                "agent": parse_log("agent", agent.logtext()), "ced": ced_lines}  # fmt: skip

    def has(process: str, action: str, reqid: str) -> bool:
        return any(ln.action == action and reqid in ln.text for ln in logs()[process])

    # the instances' and the agent's loggers write from a queue: wait for the last lines
    wait_until(lambda: has("agent", "run", ced_run) and has("follower", "dispatch", api_run)
               and has("leader", "leader-request", ced_action), 10, "the last log lines")  # fmt: skip
    every = logs()

    def carrying(reqid: str) -> dict[str, list[Line]]:
        return {p: [ln for ln in lines if reqid in ln.text] for p, lines in every.items()}

    # ced's leader-only action: carried out by the leader's loop under ced's reqid and epoch
    la = carrying(ced_action)
    assert any(ln.action == "leader-request" and ln.fields.get("EPOCH") == epoch
               for ln in la["leader"]), la  # fmt: skip
    assert not la["follower"] and not la["agent"]
    # the leader-only request: follower (auth, forward) and leader (auth, epoch) share it
    f = carrying(forwarded)
    assert {"api-request", "auth", "cluster-forward"} <= {ln.action for ln in f["follower"]}, f
    assert {"api-request", "forward-accepted", "auth"} <= {ln.action for ln in f["leader"]}, f
    assert any(ln.fields.get("EPOCH") == epoch for ln in f["leader"]), f["leader"]
    assert not f["agent"] and not f["ced"]
    # the API run: auth and dispatch on the follower, the run on the agent
    a = carrying(api_run)
    assert {"api-request", "auth", "dispatch"} <= {ln.action for ln in a["follower"]}, a
    assert any(ln.action == "run" for ln in a["agent"]), a["agent"]
    assert not a["leader"] and not a["ced"]
    # ced's run: auth and dispatch in ced, the run on the agent
    d = carrying(ced_run)
    assert {"auth", "dispatch"} <= {ln.action for ln in d["ced"]}, d["ced"]
    assert any(ln.action == "run" for ln in d["agent"]), d["agent"]
    assert not d["leader"] and not d["follower"]
    for reqid, lines in ((forwarded, f), (api_run, a), (ced_run, d)):
        for ln in (x for p in lines.values() for x in p):
            # the request's reqid is its REQID (or REQUEST, beside a pairing request's own)
            assert reqid in (ln.fields.get("REQID"), ln.fields.get("REQUEST")), ln.text
            others = {forwarded, api_run, ced_run, ced_action} - {reqid}
            assert not any(o in ln.text for o in others), ln.text
        for ln in lines["follower"] + lines["leader"]:
            if ln.process == "leader" and "IDENTITY" not in ln.fields:
                # the gate's lines, before the forwarding assertion is checked
                assert ln.fields.get("FORWARDED_BY") == follower.id, ln.text
                continue
            assert ln.fields.get("IDENTITY") == OPERATOR, ln.text
    # every line logged for the operator names a request
    for process in ("leader", "follower"):
        for ln in every[process]:
            if "IDENTITY" in ln.fields:
                assert ln.fields.get("REQID"), ln.text
    print(f"[logs] lines per request: forwarded {sum(map(len, f.values()))}, "
          f"ced leader action {sum(map(len, la.values()))}, "
          f"api run {sum(map(len, a.values()))}, ced run {sum(map(len, d.values()))}; "
          f"total lines read {sum(map(len, every.values()))}")  # fmt: skip


def test_a_forged_forwarding_claim_names_no_reqid_in_the_logs(cluster: Cluster) -> None:
    """A client that is no dispatcher peer (no certificate, or an operator's) sends the
    forwarding header with an unsealed assertion naming a reqid: refused (403), and the
    chosen reqid is on no line of the instance; the refusal is logged under the
    instance's own reqid (the one it answered)."""
    c = cluster
    leader = c.one_leader()
    chosen = "0123456789abcdef"
    enc = base64.urlsafe_b64encode(json.dumps({"reqid": chosen}).encode()).decode()
    headers = {"x-ctrl-exec-forwarded-by": "inst-b", "x-ctrl-exec-assertion": f"{enc}.00"}
    answered = []
    for who, verify in (("no certificate", client_ssl(c.ca_cert, None)),
                        ("operator certificate", c.verify())):  # fmt: skip
        with httpx.Client(base_url=leader.url, verify=verify, trust_env=False,
                          timeout=20) as client:  # fmt: skip
            r = client.get("/pairing", headers=headers)
        assert r.status_code == 403, (who, r.status_code, r.text)
        answered.append(r.headers["x-ctrl-exec-reqid"])
        assert answered[-1] != chosen
    wait_until(lambda: all(rid in leader.log.read_text() for rid in answered), 10,
               "the refusals logged")  # fmt: skip
    text = leader.log.read_text(errors="replace")
    assert chosen not in text
    refusals = [ln for ln in parse_log("leader", text) if ln.fields.get("REQID") in answered]
    assert refusals, answered
    print(
        f"[attack] forged forwarding reqid: refused (403; logged under {answered}, "
        f"{len(refusals)} lines, the chosen reqid on none)"
    )
