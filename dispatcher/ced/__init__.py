"""``ctrl-exec-dispatcher`` / ``ced``: the dispatcher's operator CLI (spec 1.2).

Output: results on stdout, diagnostics on stderr; with ``--json`` stdout holds exactly one
JSON document (upstream's ``"ok":1`` integers).

Exit codes (:class:`dispatcher.errors.ExitCode`): 0 success; 1 a host failed, the auth
hook denied, a lock conflict, or a failed operation; 2 invocation or configuration error
(including unknown agents, where upstream's ``die`` gives 255); ``wait`` gives 2 when it
timed out with hosts pending; 130 interrupted. The map from errors to exit codes is one
table, :func:`dispatcher.ced.main.error_table`.

Layout: :mod:`~dispatcher.ced.main` (argv, the verb table, errors to exit codes),
:mod:`~dispatcher.ced.invocation` (what every verb gets), :mod:`~dispatcher.ced.output`
(text and JSON), and one module per verb group: :mod:`~dispatcher.ced.run` (run, ping,
status, wait), :mod:`~dispatcher.ced.agents` (list-agents, edit-agent, unpair,
list-locks), :mod:`~dispatcher.ced.pki` (setup-ca, setup-ctrl-exec, rotate-cert,
serial-status, maintain), :mod:`~dispatcher.ced.pairing` (pairing-mode and its daemon,
list-requests, approve, deny), :mod:`~dispatcher.ced.cluster` (cluster status, switchover,
haproxy-config; leader-only verbs through the leader; convergence polling).

Only the chosen verb's module is imported, and each verb imports what it needs (never
FastAPI, uvicorn or the etcd client). ``run``, ``ping``, ``status`` and ``wait`` run the
shared operations over the blocking client: no asyncio, no ``cryptography`` (unless an
agent certificate is due for renewal), no ``dataclasses`` and no ``logging`` module, for
a fast start (``bench/ced_bench.py``).
Logs go to syslog (ident ``ctrl-exec-dispatcher``); without a syslog socket they go to
stderr, warnings and errors only unless ``log_target = stderr`` asks for everything.
Each line is written at once (``logfmt.setup(queued=False)``): no logging thread.
"""
