"""``ctrl-exec.conf`` cannot silently change the topology (README "High availability").

Unknown keys, cluster keys without ``etcd_endpoints``, unparsable URLs and a loopback
advertise address while etcd is remote are errors naming ``file:line``, for ``ced`` and
``ctrl-exec-api`` alike; ``ctrl-exec-api --check-config`` reports every one and exits 78.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from dispatcher.config import CLUSTER_KEYS, check, instance_problems, load

ROOT = Path(__file__).resolve().parents[3]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
ETCD = "etcd_endpoints = http://127.0.0.1:2379\n"
REMOTE_ETCD = "etcd_endpoints = https://10.0.0.5:2379, https://etcd2.example.net:2379\n"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "ctrl-exec.conf"
    path.write_text(f"# ctrl-exec.conf\nstate_dir = {tmp_path}/state\n{text}")
    return str(path)


def error_of(path: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(path)
    return str(err.value)


# ----- unknown keys ------------------------------------------------------------------------


def test_unknown_key_is_an_error_naming_file_line_and_the_likely_key(tmp_path: Path) -> None:
    path = write(tmp_path, "api_port = 7445\netcd_endpoint = http://10.0.0.5:2379\n")
    msg = error_of(path)
    assert msg == f"{path}:4: unknown key 'etcd_endpoint' (did you mean 'etcd_endpoints'?)"


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    assert error_of(write(tmp_path, "zzzz = 1\n")).endswith(":3: unknown key 'zzzz'")


def test_upstream_keys_stay_accepted(tmp_path: Path) -> None:
    # ``timeout`` is upstream's alias of read_timeout; ``port`` is in old upstream examples
    cfg = load(write(tmp_path, "timeout = 12\nport = 7443\n"))
    assert cfg.read_timeout == 12.0
    assert cfg.warnings == [f"{tmp_path}/ctrl-exec.conf:4: key 'port' ignored: not used "
                            "(as upstream: give the agent port with --port)"]  # fmt: skip


def test_every_problem_is_reported_by_check(tmp_path: Path) -> None:
    path = write(tmp_path, "bogus = 1\napi_port = x\nsync_mode = shared\ncluster_name = c\n")
    problems = check(path)
    assert problems == [
        f"{path}:3: unknown key 'bogus'",
        f"{path}:4: api_port must be a number, got 'x'",
        f"{path}:5: sync_mode must be push or shared-fs",
        f"{path}:5: sync_mode is set but etcd_endpoints is not: without etcd this instance "
        "would run the embedded backend and lead alone beside any real cluster (set "
        "etcd_endpoints, or remove sync_mode)",
        f"{path}:6: cluster_name is set but etcd_endpoints is not: without etcd this "
        "instance would run the embedded backend and lead alone beside any real cluster (set "
        "etcd_endpoints, or remove cluster_name)",
    ]


# ----- cluster keys need etcd --------------------------------------------------------------


def test_the_cluster_keys() -> None:
    assert set(CLUSTER_KEYS) == {
        "cluster_name", "instance_id", "lease_ttl", "advertise_url", "sync_mode",
        "sync_ack", "sync_ack_timeout", "etcd_cacert", "etcd_cert", "etcd_key",
        "etcd_user", "etcd_password_file", "etcd_insecure",
    }  # fmt: skip


@pytest.mark.parametrize("key", CLUSTER_KEYS)
def test_cluster_key_without_etcd_endpoints_is_an_error(tmp_path: Path, key: str) -> None:
    value = {"lease_ttl": "5", "drain_wait": "2", "sync_mode": "push", "sync_ack": "one",
             "sync_ack_timeout": "5", "advertise_url": "https://10.0.0.7:7445"}.get(key, "x")  # fmt: skip
    path = write(tmp_path, f"{key} = {value}\n")
    assert error_of(path).startswith(f"{path}:3: {key} is set but etcd_endpoints is not")
    partner = {"etcd_user": "etcd_password_file = /x\n", "etcd_password_file": "etcd_user = u\n"}
    assert load(write(tmp_path, ETCD + f"{key} = {value}\n" + partner.get(key, ""))) is not None


def test_cluster_key_with_an_empty_etcd_endpoints_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "etcd_endpoints =\ninstance_id = d1\n")
    assert error_of(path).startswith(f"{path}:4: instance_id is set but etcd_endpoints is not")


def test_empty_cluster_key_is_not_set(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "advertise_url =\netcd_cacert =\n"))
    assert cfg.etcd_endpoints == [] and cfg.advertise_url == ""


# ----- URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["htp://10.0.0.5:2379", "http://10.0.0.5:notaport", "http://10.0.0.5:2379/v3",
            "http://", "http//10.0.0.5:2379", "https://u:p@10.0.0.5:2379", "http://h:0"],
)  # fmt: skip
def test_unparsable_etcd_endpoint_is_an_error(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, f"cluster_name = c\netcd_endpoints = http://127.0.0.1:2379, {url}\n")
    assert error_of(path) == (
        f"{path}:4: etcd_endpoints entry '{url}' is not a usable URL (http[s]://host[:port])"
    )


def test_etcd_endpoint_forms_accepted(tmp_path: Path) -> None:
    text = "etcd_endpoints = 127.0.0.1:2379, https://[::1]:2379, http://localhost\n"
    assert len(load(write(tmp_path, text)).etcd_endpoints) == 3


def test_unparsable_advertise_url_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, ETCD + "advertise_url = 10.0.0.7:7445\n")
    assert error_of(path).startswith(f"{path}:4: advertise_url '10.0.0.7:7445' is not a usable")


# ----- loopback advertise address ------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://127.0.0.1:7445", "http://localhost:7445",
                                 "https://[::1]:7445", "https://127.1.2.3"])  # fmt: skip
def test_loopback_advertise_url_with_remote_etcd_is_an_error(tmp_path: Path, url: str) -> None:
    path = write(tmp_path, REMOTE_ETCD + f"advertise_url = {url}\n")
    assert error_of(path) == (
        f"{path}:4: advertise_url {url} is a loopback address but etcd is not (10.0.0.5): "
        "peers on other hosts cannot reach this instance; advertise an address they reach"
    )


def test_derived_loopback_advertise_with_remote_etcd_is_an_instance_error(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path, REMOTE_ETCD + "api_bind = 127.0.0.1\napi_port = 7999\nsync_mode = shared-fs\n"
    )
    cfg = load(path)  # ced on an operator host: it advertises nothing, the file is fine
    assert [str(e) for e in instance_problems(cfg)] == [
        f"{path}:4: advertise_url is not set, so this instance would advertise its API "
        "address http://127.0.0.1:7999 (api_bind), a loopback address, while etcd is not "
        "(10.0.0.5): set advertise_url to an address peers reach"
    ]
    # the default api_bind is 127.0.0.1 too: the error names the etcd_endpoints line then
    path = write(tmp_path, REMOTE_ETCD + "sync_mode = shared-fs\n")
    assert [str(e).split(" advertise_url")[0] for e in instance_problems(load(path))] == [
        f"{path}:3:"
    ]
    assert (
        instance_problems(
            load(write(tmp_path, REMOTE_ETCD + "api_bind = ::\nsync_mode = shared-fs\n"))
        )
        == []
    )


def test_loopback_rule_allows_the_sane_setups(tmp_path: Path) -> None:
    # everything on one host
    load(write(tmp_path, ETCD + "advertise_url = https://127.0.0.1:7445\n"))
    load(write(tmp_path, "etcd_endpoints = http://localhost:2379\n"))
    # a remote etcd with a routable advertise address, or an API on every interface
    load(write(tmp_path, REMOTE_ETCD + "advertise_url = https://10.0.0.7:7445\n"))
    load(write(tmp_path, REMOTE_ETCD + "api_bind = 0.0.0.0\n"))


# ----- what only the daemon needs, and its exit status -----------------------------------------


def test_instance_problems(tmp_path: Path) -> None:
    path = write(tmp_path, ETCD + "sync_mode = push\napi_cert = /nope.crt\n")
    cfg = load(path)  # ced on an operator host loads it fine
    assert [str(e) for e in instance_problems(cfg)] == [
        f"{path}:5: api_cert /nope.crt does not exist",
        f"{path}:5: api_cert and api_key go together",
        f"{path}:4: sync_mode = push needs api_cert and api_key: followers fetch the "
        "generation files from the leader over mTLS (use sync_mode = shared-fs when the "
        "state paths are on a shared filesystem)",
    ]
    path = write(tmp_path, "api_port = 7500\nhealth_port = 7500\n")
    assert [str(e) for e in instance_problems(load(path))] == [
        f"{path}:4: health_port 7500 is also api_port"
    ]


def daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dispatcher.api.daemon", *args],
                          capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip


def test_check_config_exit_status(tmp_path: Path) -> None:
    path = write(tmp_path, "etcd_endpiont = http://10.0.0.5:2379\ninstance_id = d1\n")
    p = daemon("--check-config", "--config", path)
    assert p.returncode == 78 and p.stdout == ""
    assert p.stderr.splitlines() == [
        f"ctrl-exec-api: {path}:3: unknown key 'etcd_endpiont' (did you mean 'etcd_endpoints'?)",
        f"ctrl-exec-api: {path}:4: instance_id is set but etcd_endpoints is not: without etcd "
        "this instance would run the embedded backend and lead alone beside any real cluster "
        "(set etcd_endpoints, or remove instance_id)",
    ]
    good = write(tmp_path, "api_port = 7501\n")
    p = daemon("--check-config", "--config", good)
    assert (p.returncode, p.stdout, p.stderr) == (0, f"{good}: OK\n", "")
    p = daemon("--check-config", "--config", str(tmp_path / "missing.conf"))
    assert p.returncode == 78 and f"{tmp_path}/missing.conf: file not found" in p.stderr


def test_daemon_exits_78_on_a_config_error_without_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "log_target = stderr\ncluster_name = prod\n")
    p = daemon("--config", path)
    assert p.returncode == 78
    assert f"ctrl-exec-api: {path}:4: cluster_name is set but etcd_endpoints is not" in p.stderr
    assert "Traceback" not in p.stderr


def test_ced_on_an_operator_host(tmp_path: Path) -> None:
    """An operator host's config: remote etcd, the load balancer's ports, nothing to
    advertise: ``ced`` takes it (``list-agents`` answers from the state dir)."""
    path = write(tmp_path, REMOTE_ETCD + "cluster_name = prod\napi_port = 443\n")
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", "--config", path, "list-agents"],
                       capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr


def test_ced_refuses_the_same_typo(tmp_path: Path) -> None:
    """``ced`` reads the same file on an operator host: the rule applies (its exit 2)."""
    path = write(tmp_path, "etcd_endpoint = http://10.0.0.5:2379\n")
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", "--config", path, "list-agents"],
                       capture_output=True, text=True, env=ENV, timeout=60)  # fmt: skip
    assert p.returncode == 2
    assert f"{path}:3: unknown key 'etcd_endpoint' (did you mean 'etcd_endpoints'?)" in p.stderr


def test_readme_and_runbooks_state_the_same_rules() -> None:
    from dispatcher.api.daemon import EX_CONFIG

    assert EX_CONFIG == 78
    readme = (ROOT / "README.md").read_text()
    assert "`ctrl-exec-api` exits **78** (`EX_CONFIG`) on every\nconfiguration error" in readme
    para = readme.split("**A configuration cannot change the topology.**", 1)[1]
    para = para.split("\n\n", 1)[0]
    listed = [k for k in CLUSTER_KEYS if f"`{k}`" in para]
    assert listed == list(CLUSTER_KEYS), set(CLUSTER_KEYS) - set(listed)
    for name in ("add-remove-instance.md", "failover.md", "disaster-recovery.md"):
        text = (ROOT / "ops" / "runbooks" / name).read_text()
        assert "exit status 78 is a" in text and "`file:line: message`" in text, name


def test_listeners_bind_first_and_a_busy_port_is_a_config_error(tmp_path: Path) -> None:
    import socket

    from dispatcher.api.daemon import bind_listeners

    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    text = f"api_port = {ports[0]}\nhealth_port = {ports[1]}\napi_proxy_port = {ports[2]}\n"
    path = write(tmp_path, text)
    cfg = load(path)
    listeners = bind_listeners(cfg)
    try:
        socks = [listeners.api, listeners.health, listeners.proxy]
        # IPPROTO_TCP as uvicorn's own: asyncio then sets TCP_NODELAY on accepted sockets
        assert [s.proto if s else None for s in socks] == [socket.IPPROTO_TCP] * 3
        assert [s.getsockname()[1] if s else 0 for s in socks] == ports
        with pytest.raises(ConfigError) as err:
            bind_listeners(cfg)
        assert str(err.value) == (
            f"{path}:3: api_port {ports[0]}: cannot listen on 127.0.0.1:{ports[0]}: "
            "Address already in use"
        )
    finally:
        listeners.close()
    bind_listeners(cfg).close()  # every socket of the failed attempt was closed


def test_ced_check_config_exits_78_with_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("etcd_endpoint = http://127.0.0.1:2379\ninstance_id = a\n")
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", "check-config", "--config",
                        str(bad)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 78 and p.stdout == ""
    assert f"{bad}:1: unknown key 'etcd_endpoint' (did you mean 'etcd_endpoints'?)" in p.stderr
    assert f"{bad}:2: instance_id is set but etcd_endpoints is not" in p.stderr
    good = tmp_path / "good.conf"
    good.write_text(f"ca_dir = {tmp_path / 'etc'}\nstate_dir = {tmp_path / 'state'}\n")
    p = subprocess.run([sys.executable, "-m", "dispatcher.ced", "--json", "check-config",
                        "--config", str(good)], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"ok": 1, "config": str(good), "problems": []}


def test_connection_bound_keys(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ""))
    assert (cfg.api_header_timeout, cfg.api_max_conns_per_ip) == (10.0, 64)
    cfg = load(write(tmp_path, "api_header_timeout = 2.5\napi_max_conns_per_ip = 3\n"))
    assert (cfg.api_header_timeout, cfg.api_max_conns_per_ip) == (2.5, 3)
    msg = error_of(write(tmp_path, "api_header_timeout = 0\n"))
    assert msg.endswith(":3: api_header_timeout must be between 0 and 3600 seconds")
    msg = error_of(write(tmp_path, "api_max_conns_per_ip = 0\n"))
    assert msg.endswith(":3: api_max_conns_per_ip must be at least 1")


# ----- fan-out limits ----------------------------------------------------------------------


def test_fanout_limits(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, "max_hosts = 10000\nmax_result_output = 65536\n"))
    assert (cfg.max_hosts, cfg.max_result_output, cfg.max_parallel) == (10000, 65536, 256)
    assert load(write(tmp_path, "")).max_result_output == 0  # all output, as upstream
    for text, key in (("max_parallel = 0\n", "max_parallel"), ("max_hosts = -5\n", "max_hosts"),
                      ("max_result_output = -1\n", "max_result_output")):  # fmt: skip
        msg = error_of(write(tmp_path, text))
        assert key in msg and "ctrl-exec.conf:3" in msg, msg
