"""The leader takes a switchover request from the store only once it can answer it: when
the store does not answer while the target is checked, the request stays for the next
look (it used to be deleted first, then lost unanswered, with no refusal logged)."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from cluster.backend import LocalBackend, MemberInfo
from cluster.errors import BackendUnavailable
from dispatcher.ha.node import HANode


class FakeNode:
    """What ``HANode._check_switchover`` uses, around a real local store."""

    def __init__(self, tmp: Path, members: list[MemberInfo]) -> None:
        self.data = LocalBackend(tmp / "store")
        self.instance_id = "a"
        self.elector = types.SimpleNamespace(epoch=7, resign=self._resign)
        self.records = types.SimpleNamespace(reject=lambda exc: None)
        self.sync = None
        self.fail = 1  # the store does not answer the first members() read
        self._members = members
        self.resigned: list[dict[str, Any]] = []
        self._switchover_problem = types.MethodType(HANode._switchover_problem, self)
        self._resign_for_switchover = types.MethodType(HANode._resign_for_switchover, self)

    def _signer(self) -> None:
        return None

    def members(self, fresh: bool = False) -> list[MemberInfo]:
        if self.fail:
            self.fail -= 1
            raise BackendUnavailable("etcd did not answer")
        return self._members

    def _resign(self, **kw: Any) -> None:
        self.resigned.append(kw)

    def check(self) -> None:
        HANode._check_switchover(self)  # type: ignore[arg-type]


def post(node: FakeNode, to: str) -> None:
    node.data.put_value(node.data.keys.switchover,
                        json.dumps({"epoch": 7, "to": to, "requested_by": "t"}))  # fmt: skip


@pytest.mark.parametrize("to,resigns", [("no-such-member", False), ("b", True)])
def test_a_request_survives_the_store_not_answering(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, to: str, resigns: bool
) -> None:
    node = FakeNode(tmp_path, [MemberInfo("a"), MemberInfo("b")])
    post(node, to)
    with pytest.raises(BackendUnavailable):
        node.check()
    assert node.data.get_value(node.data.keys.switchover) is not None  # kept for the next look
    assert not node.resigned
    node.check()  # the store answers: the request is taken and answered
    assert node.data.get_value(node.data.keys.switchover) is None
    if resigns:
        assert node.resigned == [{"reason": "switchover", "to": "b", "requested_by": "t"}]
    else:
        assert not node.resigned
        assert "ACTION=switchover-refused" in caplog.text
        assert "cannot switch over to no-such-member: no-such-member is not a live member" in (
            caplog.text
        )
