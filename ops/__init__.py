"""Operations tooling of the repository (set-up, demo, local lab, runbooks); not installed."""
