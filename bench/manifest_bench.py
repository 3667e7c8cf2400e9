"""Scale of a generation: scan, publish and follower catch-up with thousands of agents.

Usage: ``bench/manifest_bench.py [--agents 5000,20000]``

For each size, builds a leader's state under a temporary directory (the CA files and one
registry record per agent, about 300 bytes each), starts a real one-member etcd
(``ops/lab/etcd.py``) and measures, printing one line per size:

* scan: the leader's manifest of every synced file, cold (every file hashed) and warm
  (the sha256 cache by inode, size, mtime and ctime);
* publish: encoding the head and its chunks and writing them through fenced transactions
  (an elected leader), and the etcd bytes written: full (first generation) and after one
  agent's record changed (one chunk and the head);
* catch-up: a follower (a :class:`~dispatcher.ha.sync.Syncer` on its own directory,
  files fetched from the leader's directory instead of over mTLS, so the number is the
  store read, verification, staging, fsync and swap) from nothing to the full generation,
  then to the generation with one agent changed;
* the largest transaction against etcd's default request limit (1.5 MiB), and what the
  former one-value manifest would have weighed.

Every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.backend import EtcdBackend, MemberInfo  # noqa: E402
from cluster.election import Elector, EpochGuard  # noqa: E402
from cluster.session import Session  # noqa: E402
from cluster.signing import RecordSigner  # noqa: E402
from dispatcher.config import DispatcherConfig  # noqa: E402
from dispatcher.ha.manifest import (  # noqa: E402
    Entry,
    Generation,
    Layout,
    Scanner,
    encode_generation,
    manifest_hash,
)
from dispatcher.ha.records import Records  # noqa: E402
from dispatcher.ha.storehealth import ClusterHealth  # noqa: E402
from dispatcher.ha.sync import Syncer  # noqa: E402
from dispatcher.ha.sync.store import GenerationStore  # noqa: E402
from ops.lab.etcd import ETCD, EtcdCluster  # noqa: E402

RECORDS = Records(RecordSigner(os.urandom(32)), "bench")  # the cluster key


def make_cfg(root: Path) -> DispatcherConfig:
    cfg = DispatcherConfig(path=str(root / "etc" / "ctrl-exec.conf"), ca_dir=str(root / "etc"),
                           state_dir=str(root / "state"), registry_dir=str(root / "agents"),
                           instance_id=root.name, sync_mode="push")  # fmt: skip
    return cfg.finish()


def build(root: Path, agents: int) -> None:
    etc, reg = root / "etc", root / "agents"
    etc.mkdir(parents=True)
    reg.mkdir(parents=True)
    for name, size in (("ca.crt", 700), ("ca.key", 250), ("dispatcher.crt", 700),
                       ("dispatcher.key", 250)):  # fmt: skip
        (etc / name).write_bytes(os.urandom(size))
    for i in range(agents):
        host = f"host-{i:06d}.example.net"
        rec = {"hostname": host, "ip": f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
               "port": 7443, "paired": "2026-12-06T09:00:00Z", "serial": os.urandom(16).hex(),
               "expiry": "2027-12-06T09:00:00Z", "tags": ["bench"]}  # fmt: skip
        (reg / f"{host}.json").write_text(json.dumps(rec, indent=1) + "\n")


def ms(t: float) -> float:
    return round(t * 1000, 1)


def one_size(agents: int, tmp: Path) -> dict[str, Any]:
    leader_root, follower_root = tmp / f"leader-{agents}", tmp / f"follower-{agents}"
    build(leader_root, agents)
    cfg, fcfg = make_cfg(leader_root), make_cfg(follower_root)
    out: dict[str, Any] = {"agents": agents}
    scanner = Scanner(Layout(cfg))
    t0 = time.perf_counter()
    files = scanner.scan()
    out["scan_cold_ms"] = ms(time.perf_counter() - t0)
    t0 = time.perf_counter()
    files = scanner.scan()
    out["scan_warm_ms"] = ms(time.perf_counter() - t0)
    out["files"] = len(files)
    etcd = EtcdCluster(tmp / f"etcd-{agents}").start()
    backends: list[EtcdBackend] = []
    try:
        backend = EtcdBackend(etcd.endpoints, cluster_name="bench", timeout=10.0)
        backends.append(backend)
        elector = Elector(backend, "leader", ttl=10).start()
        deadline = time.monotonic() + 20
        while elector.epoch is None and time.monotonic() < deadline:
            time.sleep(0.02)
        epoch = elector.epoch
        if epoch is None:
            raise SystemExit("the bench leader was not elected")
        store = GenerationStore(backend, RECORDS)
        g1 = Generation(1, epoch, "leader", manifest_hash(files), files, time.time())
        out["one_value_manifest_bytes"] = len(g1.to_json())
        t0 = time.perf_counter()
        store.publish(elector, epoch, g1, None, {"generation": 1})
        out["publish_full_ms"] = ms(time.perf_counter() - t0)
        out["full"] = dict(store.last_write)
        _head, chunks = encode_generation(g1)
        out["largest_chunk_bytes"] = max(len(c) for c in chunks.values())

        # a follower catches up from nothing
        fbackend = EtcdBackend(etcd.endpoints, cluster_name="bench", timeout=10.0)
        backends.append(fbackend)
        syncer = follower(fcfg, fbackend, cfg)
        head = fbackend.get_value(fbackend.keys.generation)
        assert head is not None
        t0 = time.perf_counter()
        ok = syncer.follower.handle(fbackend.get_value(fbackend.keys.generation) or b"")
        out["catch_up_full_ms"] = ms(time.perf_counter() - t0)
        assert ok and syncer.generation == 1, "the follower did not apply generation 1"

        # one agent's record changes
        rec = cfg.registry_dir + "/host-000007.example.net.json"
        Path(rec).write_text(Path(rec).read_text().replace("bench", "changed"))
        t0 = time.perf_counter()
        files2 = scanner.scan()
        out["scan_after_change_ms"] = ms(time.perf_counter() - t0)
        g2 = Generation(2, epoch, "leader", manifest_hash(files2), files2, time.time())
        current = store.head(head)
        t0 = time.perf_counter()
        store.publish(elector, epoch, g2, current, {"generation": 2})
        out["publish_one_change_ms"] = ms(time.perf_counter() - t0)
        out["one_change"] = dict(store.last_write)
        t0 = time.perf_counter()
        ok = syncer.follower.handle(fbackend.get_value(fbackend.keys.generation) or b"")
        out["catch_up_one_change_ms"] = ms(time.perf_counter() - t0)
        assert ok and syncer.generation == 2, "the follower did not apply generation 2"
        elector.stop(resign=True)
    finally:
        for b in backends:
            b.close()
        etcd.close()
    return out


def follower(cfg: DispatcherConfig, backend: EtcdBackend, leader_cfg: DispatcherConfig) -> Syncer:
    health = ClusterHealth()
    health.mark_ok()
    s = Syncer(cfg, backend, Elector(backend, "follower", ttl=10),
               Session(backend, ttl=10, member=MemberInfo("follower")), EpochGuard(), health,
               lambda _fresh: [MemberInfo("leader", advertise_url="https://127.0.0.1:1")],
               RECORDS)  # fmt: skip
    leader_layout = Layout(leader_cfg)

    def fetch(sources: Any, conns: Any, e: Entry, number: int) -> tuple[bytes, str]:
        return leader_layout.local(e.path).read_bytes(), "leader"

    s.fetcher.fetch = fetch  # type: ignore[method-assign]
    return s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="5000,20000", help="comma-separated sizes")
    ns = ap.parse_args()
    if ETCD is None:
        print("etcd is not installed (apt-get install etcd-server)", file=sys.stderr)
        return 2
    limit = int(1.5 * 1024 * 1024)
    with tempfile.TemporaryDirectory(prefix="ctrl-exec-manifest-bench-") as tmp:
        for n in (int(x) for x in ns.agents.split(",")):
            r = one_size(n, Path(tmp))
            full, one = r["full"], r["one_change"]
            print(
                f"{r['agents']} agents ({r['files']} files): scan cold {r['scan_cold_ms']} ms, "
                f"warm {r['scan_warm_ms']} ms, after one change {r['scan_after_change_ms']} ms"
            )
            print(
                f"  publish full {r['publish_full_ms']} ms: {full['bytes']} B in "
                f"{full['chunks_written']} chunks, {full['transactions']} transaction(s) "
                f"(largest chunk {r['largest_chunk_bytes']} B; etcd request limit {limit} B; "
                f"the one-value manifest was {r['one_value_manifest_bytes']} B)"
            )
            print(
                f"  publish one agent changed {r['publish_one_change_ms']} ms: {one['bytes']} B, "
                f"{one['chunks_written']} chunk(s) of {one['chunks']}, "
                f"{one['transactions']} transaction(s)"
            )
            print(
                f"  follower catch-up (fetch, stage, fsync, swap, record): full "
                f"{r['catch_up_full_ms']} ms, one agent changed {r['catch_up_one_change_ms']} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
