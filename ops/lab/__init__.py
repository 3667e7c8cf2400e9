"""A local lab on loopback: real etcd members and a real HAProxy, started as subprocesses.

Used by the demo (``ops/demo/cluster_demo.py``) and by the integration tests (through
``tests/support``). Every process is started with its own data and config files under a
directory the caller owns, on free loopback ports, and is stopped by its PID.
"""
