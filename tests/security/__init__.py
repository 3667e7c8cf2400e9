"""Attack tests: each one must fail for the attacker and change nothing."""
