"""A local lab on loopback: real etcd members, ``ctrl-exec-api`` instances, agents and a real
HAProxy, started as subprocesses.

The one home of the fixtures: the demo (``ops/demo/cluster_demo.py``), the runbook tests,
the benchmarks and the tests import them from here, so none of them keeps its own copy
(``tests/support`` holds only pytest glue). Every process is started with its own data
and config files under a directory the caller owns, on free loopback ports, and is
stopped by its PID.

* :mod:`~ops.lab.net`, :mod:`~ops.lab.proc`: free ports, waits, TLS clients; processes
  started and stopped by PID, ``ctrl-exec-api`` processes (:class:`~ops.lab.proc.ApiProcess`);
* :mod:`~ops.lab.pki`: a throwaway CA (:class:`~ops.lab.pki.TestCA`) independent of ours;
* :mod:`~ops.lab.agentproc`: a real agent with pre-issued certificates, raw TLS calls;
  :mod:`~ops.lab.agent`: a real agent that pairs through the CLI;
* :mod:`~ops.lab.executorproc`: a real ``ctrl-exec-executor``, throwaway users, raw calls
  on its socket;
* :mod:`~ops.lab.dispatcherenv`: an in-process dispatcher (CA, registry) plus agents;
* :mod:`~ops.lab.apidaemon`: one ``ctrl-exec-api`` from its own config, and a CA it trusts;
* :mod:`~ops.lab.pairing`: the pairing protocol from the agent's side, raw;
* :mod:`~ops.lab.apicalls`: API calls several tests make the same way;
* :mod:`~ops.lab.etcd`, :mod:`~ops.lab.haproxy`: real etcd members (plain, or on TLS with
  auth and a role per cluster prefix: ``secure_etcd``, certificates from
  :mod:`~ops.lab.etcdpki`), a real HAProxy;
* :mod:`~ops.lab.hacluster`: a whole HA cluster (etcd, instances, agents, HAProxy);
* :mod:`~ops.lab.elector_proc`: one elector in its own process (election tests);
* :mod:`~ops.lab.hosts`, :mod:`~ops.lab.deployment`, :mod:`~ops.lab.guide_exec`: the
  multi-host lab (namespace hosts with the real default paths), ``docs/deploy.md``
  deployed on it, and the runner of the guide's and the runbooks' command blocks.
"""
