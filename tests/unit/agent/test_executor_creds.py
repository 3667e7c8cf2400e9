"""The credentials a plan hands to the spawner (worked out once per plan)."""

from __future__ import annotations

from agent.executor import creds
from agent.executor.sandbox import LAST_CAP, Plan
from agent.profiles import CAPABILITIES, Profile, RunAs


def test_plan_credentials_keep_exactly_the_profile_caps() -> None:
    user = RunAs("svc", 1001, 1002, (1002, 27), "/home/svc")
    plan = Plan(Profile("p", "svc", ("CAP_NET_BIND_SERVICE", "CAP_KILL")), user)
    c = plan.credentials
    assert plan.credentials is c  # once per plan
    assert (c.uid, c.gid, c.groups, c.no_new_privs) == (1001, 1002, (1002, 27), True)
    assert c.caps == (5, 10) and c.mask == (1 << 5) | (1 << 10)
    assert set(c.drop) | set(c.caps) == set(range(LAST_CAP + 1))
    assert not set(c.drop) & set(c.caps)
    assert c.astuple() == (1001, 1002, (1002, 27), (5, 10), c.drop, True)


def test_root_without_caps_drops_every_capability() -> None:
    c = Plan(Profile("q", no_new_privileges=False), RunAs("root", 0, 0)).credentials
    assert c.caps == () and c.mask == 0 and c.no_new_privs is False
    assert c.drop == tuple(range(LAST_CAP + 1))


def test_last_cap_reads_the_kernel_or_falls_back() -> None:
    assert creds.last_cap(7) >= len(CAPABILITIES) - 1 or creds.last_cap(7) == 7
