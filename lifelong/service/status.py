"""The daemon's health as one reading: what ``/healthz``, ``/readyz`` and the daemon's ``/metrics`` families
show, taken in one place without the processing lock (``Daemon.status``), so a scrape never waits for a batch
or a checkpoint and every endpoint reads the same fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STALL_S = 60.0  # /healthz fails when the processing or the poll loop made no progress for this long


@dataclass(frozen=True)
class Status:
    """One reading of the daemon (see the module docstring)."""

    processing_idle_s: float  # since the processing loop last went round
    poll_idle_s: float  # since the consumer last polled
    poll_failed: bool  # the poll loop stopped on an error
    assigned: int  # partitions this replica owns now
    broker_reachable: bool  # heartbeats answered recently
    stopping: bool
    checkpoint_error: str | None  # the last checkpoint could not be written (processing waits for a retry)
    checkpoint_age_s: float
    lag: dict[int, int]  # partition -> high watermark minus the next offset to process
    committed: dict[int, int]  # partition -> last committed offset
    dead_letter_failures: int

    @property
    def live(self) -> bool:
        """Both loops made progress within ``STALL_S`` and the poll loop did not fail."""
        return self.processing_idle_s < STALL_S and self.poll_idle_s < STALL_S and not self.poll_failed

    @property
    def ready(self) -> bool:
        """Assigned, restored (a daemon answers only once it is), checkpoints succeed, broker reachable, not
        stopping."""
        return self.assigned > 0 and self.broker_reachable and not self.stopping and self.checkpoint_error is None

    def liveness(self) -> dict[str, Any]:
        """The ``/healthz`` body."""
        return {"processing_idle_s": round(self.processing_idle_s, 3), "poll_idle_s": round(self.poll_idle_s, 3)}

    def readiness(self) -> dict[str, Any]:
        """The ``/readyz`` body."""
        return {
            "assigned": self.assigned,
            "restored": True,
            "broker_reachable": self.broker_reachable,
            "stopping": self.stopping,
            "checkpoint_error": self.checkpoint_error,
        }
