"""High availability of the dispatcher on :mod:`cluster` (DESIGN.md section 3).

* :mod:`dispatcher.ha.node`: :class:`HANode`, one instance's membership (backend,
  elector, session, monitor) and what it plugs into a :class:`Dispatcher`;
* :mod:`dispatcher.ha.role`: :class:`RoleSnapshot` and :class:`ClusterRole`, the health
  port's view (``/leader``, ``/status``);
* :mod:`dispatcher.ha.writer`: :class:`FencedWriter`, leader-only writes committed under
  the epoch first;
* :mod:`dispatcher.ha.runlocks`: cluster-wide run locks that never depend on etcd;
* :mod:`dispatcher.ha.runs`: async run metadata shared through the store;
* :mod:`dispatcher.pairing.supervisor`: the pairing listener on the leader only;
* :mod:`dispatcher.ha.switchover`, :mod:`dispatcher.ha.coordination`: light helpers the
  ``ced cluster`` verbs use too (this package imports nothing heavy on its own).
"""
