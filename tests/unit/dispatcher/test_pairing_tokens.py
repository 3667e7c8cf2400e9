"""The pairing-token store (:mod:`dispatcher.pairing.tokens`): hashes only, once, expiry,
revocation, the atomic claim, and what a damaged store does."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from dispatcher.pairing import tokens as tk


def make(ca: Path, n: int = 1, expires_in: int = 3600, now: float = 1000.0, **kw: object
         ) -> list[tuple[str, str]]:  # fmt: skip
    made = [tk.new_token() for _ in range(n)]
    tk.add(ca, {i: tk.token_hash(t) for i, t in made}, expires_in=expires_in, now=now,
           **kw)  # type: ignore[arg-type]  # fmt: skip
    return made


def claim(ca: Path, token: str, reqid: str = "r1", now: float = 1001.0, **kw: object) -> tk.Claim:
    return tk.claim(ca, token, reqid=reqid, hostname="a.example", source_ip="192.0.2.1",
                    now=now, **kw)  # type: ignore[arg-type]  # fmt: skip


def test_token_format_and_store_holds_hashes_only(tmp_path: Path) -> None:
    made = make(tmp_path, 3, tags={"env": "prod"})
    raw = tk.store_path(tmp_path).read_text()
    for tid, tok in made:
        assert tk.TOKEN_RE.fullmatch(tok) and tk.token_id_of(tok) == tid
        assert tok not in raw and tok.split(".")[2] not in raw
        assert tk.token_hash(tok) in raw
    assert tk.store_path(tmp_path).stat().st_mode & 0o777 == 0o640
    rows = tk.listing(tmp_path, now=1001.0)
    assert {r["id"] for r in rows} == {i for i, _ in made}
    assert all(r["state"] == "unused" and r["tags"] == {"env": "prod"} for r in rows)
    assert all("sha256" not in r for r in rows)


def test_claim_once(tmp_path: Path) -> None:
    [(tid, tok)] = make(tmp_path, tags={"role": "web"})
    got = claim(tmp_path, tok)
    assert got == tk.Claim(tid, {"role": "web"})
    with pytest.raises(tk.TokenRefused) as exc:
        claim(tmp_path, tok, reqid="r2")
    assert exc.value.reason == "used" and exc.value.token_id == tid
    [row] = tk.listing(tmp_path, now=1002.0)
    assert row["state"] == "used" and row["reqid"] == "r1" and row["used_by"] == "a.example"


@pytest.mark.parametrize(
    ("label", "mangle", "reason"),
    [
        ("wrong-secret", lambda t: t[:-4] + ("AAAA" if not t.endswith("AAAA") else "BBBB"),
         "forged"),
        ("unknown-id", lambda t: "cet1.0123456789." + t.split(".")[2], "unknown"),
        ("garbage", lambda t: "hello", "malformed"),
        ("not-a-string", lambda t: ["x"], "malformed"),
        ("hash-presented", lambda t: tk.token_hash(t), "malformed"),
    ],
)  # fmt: skip
def test_refusals_write_nothing(tmp_path: Path, label: str, mangle: object, reason: str) -> None:
    [(_, tok)] = make(tmp_path)
    before = tk.store_path(tmp_path).read_bytes()
    with pytest.raises(tk.TokenRefused) as exc:
        claim(tmp_path, mangle(tok))  # type: ignore[operator]
    assert exc.value.reason == reason, label
    assert tk.store_path(tmp_path).read_bytes() == before


def test_expiry_and_revocation(tmp_path: Path) -> None:
    (_, t1), (i2, t2), (i3, t3) = make(tmp_path, 3, expires_in=60)
    with pytest.raises(tk.TokenRefused, match="expired"):
        claim(tmp_path, t1, now=1060.0)
    assert tk.revoke(tmp_path, [i2], now=1001.0) == [i2]
    with pytest.raises(tk.TokenRefused, match="revoked"):
        claim(tmp_path, t2)
    with pytest.raises(tk.TokenError, match="no such token"):
        tk.revoke(tmp_path, ["ffffffffff", i3])
    assert claim(tmp_path, t3).token_id == i3  # the refused revoke changed nothing
    [(i4, _)] = make(tmp_path, now=1070.0)
    assert tk.revoke(tmp_path, None, now=1070.0) == [i4]  # --all: the unused ones only


def test_registered_name_needs_a_re_pair_token(tmp_path: Path) -> None:
    [(_, plain)] = make(tmp_path)
    [(rid, repair)] = make(tmp_path, re_pair=True)
    before = tk.store_path(tmp_path).read_bytes()
    with pytest.raises(tk.TokenRefused, match="name-registered"):
        claim(tmp_path, plain, registered=True)
    assert tk.store_path(tmp_path).read_bytes() == before  # still unused
    assert claim(tmp_path, repair, registered=True).token_id == rid


def test_release_undoes_only_its_own_claim(tmp_path: Path) -> None:
    [(tid, tok)] = make(tmp_path)
    claim(tmp_path, tok, reqid="r1")
    assert not tk.release(tmp_path, tid, "r2")
    assert tk.release(tmp_path, tid, "r1")
    assert claim(tmp_path, tok, reqid="r3").token_id == tid


def test_one_token_two_claimers_exactly_one_wins(tmp_path: Path) -> None:
    [(_, tok)] = make(tmp_path)
    wins: list[str] = []
    refusals: list[str] = []
    barrier = threading.Barrier(8)

    def go(n: int) -> None:
        barrier.wait(5)
        try:
            claim(tmp_path, tok, reqid=f"r{n}")
            wins.append(f"r{n}")
        except tk.TokenRefused as exc:
            refusals.append(exc.reason)

    threads = [threading.Thread(target=go, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(wins) == 1 and refusals == ["used"] * 7
    assert tk.listing(tmp_path)[0]["reqid"] == wins[0]


def test_add_validates_everything_before_writing(tmp_path: Path) -> None:
    [(tid, _)] = make(tmp_path)
    before = tk.store_path(tmp_path).read_bytes()
    good = {"0123456789": "a" * 64}
    for bad, msg in [
        ({**good, "XYZ": "a" * 64}, "malformed"),
        ({**good, "abcdefabcd": "short"}, "malformed"),
        ({**good, tid: "b" * 64}, "already exist"),
        ({}, "between 1 and"),
    ]:
        with pytest.raises(tk.TokenError, match=msg):
            tk.add(tmp_path, bad, expires_in=60, now=1000.0)
    for expires_in in (0, tk.MAX_EXPIRES + 1):
        with pytest.raises(tk.TokenError, match="expires"):
            tk.add(tmp_path, good, expires_in=expires_in)
    with pytest.raises(tk.TokenError, match="bad tag"):
        tk.add(tmp_path, good, expires_in=60, tags={"a b": "c"})
    assert tk.store_path(tmp_path).read_bytes() == before


def test_parsers() -> None:
    assert tk.parse_duration("90") == 90 and tk.parse_duration("2h") == 7200
    assert tk.parse_duration("7d") == 7 * 86400
    for bad in ("", "1w", "-5", "0s", "31d"):
        with pytest.raises(tk.TokenError):
            tk.parse_duration(bad)
    assert tk.parse_tags("role=web, env=prod,") == {"role": "web", "env": "prod"}
    for bad in ("role", "=x", "a=b=c", "a=b c"):
        with pytest.raises(tk.TokenError, match="bad tag"):
            tk.parse_tags(bad)


def test_damaged_store_approves_nothing_and_is_not_overwritten(tmp_path: Path) -> None:
    [(_, tok)] = make(tmp_path)
    tk.store_path(tmp_path).write_text("{not json")
    with pytest.raises(tk.TokenError, match="damaged"):
        claim(tmp_path, tok)
    with pytest.raises(tk.TokenError, match="damaged"):
        make(tmp_path)
    assert tk.store_path(tmp_path).read_text() == "{not json"
    tk.store_path(tmp_path).write_text(json.dumps({"version": 1}))
    with pytest.raises(tk.TokenError, match="damaged"):
        tk.listing(tmp_path)


def test_ended_tokens_are_pruned_after_keep(tmp_path: Path) -> None:
    [(_, tok)] = make(tmp_path, expires_in=60)
    claim(tmp_path, tok)
    [(fresh, _)] = make(tmp_path, now=1000.0 + tk.KEEP + 10)
    assert [r["id"] for r in tk.listing(tmp_path)] == [fresh]
