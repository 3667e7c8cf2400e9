"""A local lab on loopback: real etcd members, ``ctrl-exec-api`` instances, agents and a real
HAProxy, started as subprocesses.

Used by the demo (``ops/demo/cluster_demo.py``), the runbook lab, the benchmarks and the
integration tests (through ``tests/support``), so none of them keeps its own copy of these
helpers. Every process is started with its own data and config files under a directory
the caller owns, on free loopback ports, and is stopped by its PID.
"""
