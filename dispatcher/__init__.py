"""ctrl-exec dispatcher: CA, pairing, registry, fan-out and the HTTP API."""
