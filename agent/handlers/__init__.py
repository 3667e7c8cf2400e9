"""The agent's request handlers, one module per concern; :mod:`agent.server` routes to them.

* :mod:`~agent.handlers.base`: :class:`Peer`, the :class:`AgentState` the handlers read,
  the serial gate, JSON and reqid parsing, the auth hook call;
* :mod:`~agent.handlers.status`: ``POST /ping``, ``GET /capabilities``;
* :mod:`~agent.handlers.run`: ``POST /run`` (validation, allowlist, auth hook, the run);
* :mod:`~agent.handlers.asyncrun`: detached runs (``"async": true``) and ``GET /result/<reqid>``;
* :mod:`~agent.handlers.trust`: ``POST /rotate-serial``, ``/renew``, ``/renew-complete``.

Every handler is ``async def h(agent, peer, body, arg) -> (code, body)``: ``arg`` is the
rest of the path after a prefix route (the reqid of ``/result/<reqid>``), else ``""``.
"""
