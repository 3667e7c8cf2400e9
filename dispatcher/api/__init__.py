"""The ``ctrl-exec-api`` instance daemon (:mod:`.daemon`).

HTTP API: :mod:`.app` assembles the routers of :mod:`.routes` with the pre-route gate
(:mod:`.gate`), the dependencies (:mod:`.deps`) and the error answers (:mod:`.errors`).
Plain-HTTP health port: :mod:`.healthport`.
"""
