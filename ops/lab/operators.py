"""Operator client certificates as ``ced setup-operator-ca`` and ``ced issue-operator``
make them (:mod:`dispatcher.pki.operatorca`), for tests, benches and the demo.

The API trusts ``<ca_dir>/operator-ca.crt`` without configuration; an agent's or a
dispatcher's certificate is never an operator's (DESIGN.md section 3).
"""

from __future__ import annotations

from pathlib import Path

from dispatcher.pki import operatorca
from ops.lab.pki import Issued


class OperatorCA:
    """The operator CA of ``ca_dir`` (created if absent); certificates land in ``out``."""

    def __init__(self, ca_dir: Path, out: Path | None = None) -> None:
        self.ca_dir = ca_dir
        if not operatorca.cert_path(ca_dir).exists():
            operatorca.create_operator_ca(ca_dir)
        self.out = out or ca_dir.parent / "operators"
        self.out.mkdir(parents=True, exist_ok=True)
        self._issued: dict[str, Issued] = {}

    @property
    def cert_path(self) -> Path:
        return operatorca.cert_path(self.ca_dir)

    def issue(self, cn: str, days: int = 30) -> Issued:
        """The certificate of operator ``cn`` (issued once, then the same files)."""
        if cn not in self._issued:
            res = operatorca.issue_operator(self.ca_dir, cn, days, self.out)
            self._issued[cn] = Issued(res.cert, res.key, int(res.serial, 16))
        return self._issued[cn]
