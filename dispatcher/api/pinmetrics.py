"""``/metrics`` view of the agent certificate pin checks of this process
(:data:`dispatcher.client.pins.COUNTERS`).

* ``ctrl_exec_agent_pin_mismatches_total``: connections refused because the agent's
  certificate is not the one pinned for it (nothing was sent);
* ``ctrl_exec_agent_unpinned_total``: answers accepted from agents whose registry record
  has no pin yet (upstream records, until the leader pins them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from dispatcher.client.pins import COUNTERS, Counters


class PinCollector(Collector):
    def __init__(self, counters: Counters = COUNTERS) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "ctrl_exec_agent_pin_mismatches",
            "Agent connections refused: certificate not the one pinned in the registry",
            value=self.counters.mismatches,
        )
        yield CounterMetricFamily(
            "ctrl_exec_agent_unpinned",
            "Agent answers accepted from a registry record without a certificate pin",
            value=self.counters.unpinned,
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())
