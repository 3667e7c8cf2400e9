"""The privileged executor (``ctrl-exec-executor``) and the agent's client for it.

The agent (unprivileged, ``ctrl-exec-agent``) does the network, TLS, allowlist and auth
hook work and hands each run to this small root process over a Unix socket; the executor
checks the peer's uid (``SO_PEERCRED``), looks the script and its profile up in its own
reading of the config, and runs it under the profile. Modules: :mod:`.protocol` (the
framing), :mod:`.server`, :mod:`.sandbox` (applying a profile), :mod:`.spawner` (forking
scripts), :mod:`.creds` (switching credentials), :mod:`.client` (the agent's side),
:mod:`.cli`.
"""
