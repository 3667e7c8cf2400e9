"""The ``ctrl-exec-api`` instance daemon: HTTP API (:mod:`.app`), health port (:mod:`.healthport`)."""
