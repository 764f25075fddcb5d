"""Counted skips: bad data never crashes a long run and is never dropped silently.

Each loader worker counts what it skips in a `SkipCounter` and logs the first few of each
reason. The counts since the previous batch ride along with every batch to the main
process (workers are separate processes), where `DetectionLoader.skips` sums them for the
train loop to report.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping

log = logging.getLogger(__name__)

# reason -> what it means; the unit is a sample unless the reason says otherwise
REASONS: dict[str, str] = {
    "unreadable_shard": "a shard could not be opened or read to its end (truncated tar): counted once per "
                        "shard; the samples after the break are lost",
    "missing_part": "a sample without its image or without its JSON",
    "bad_json": "a sample whose JSON does not parse or lacks a field",
    "corrupt_image": "image bytes that do not decode, or decode to a size other than the JSON says",
    "unknown_category": "a sample with an annotation whose category id is not in the manifest",
    "dropped_box": "a box (not a sample) of zero or negative size once clamped to the image",
}


class SkipCounter:
    """Counts of skipped data by reason (see `REASONS`)."""

    def __init__(self, log_limit: int = 10):
        self.counts: Counter[str] = Counter()
        self.log_limit = log_limit  # details logged per reason; later ones are only counted

    def record(self, reason: str, detail: str, n: int = 1) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {', '.join(REASONS)}")
        before = self.counts[reason]
        self.counts[reason] += n
        if before < self.log_limit:
            more = " (further ones are counted, not logged)" if self.counts[reason] >= self.log_limit else ""
            log.warning("skipped (%s): %s%s", reason, detail, more)

    def update(self, counts: Mapping[str, int]) -> None:
        """Add counts from elsewhere (a worker's batch, another rank)."""
        self.counts.update(counts)

    def take(self) -> dict[str, int]:
        """The counts so far, and start again from zero (what a worker sends with a batch)."""
        out = dict(self.counts)
        self.counts.clear()
        return out

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def summary(self) -> str:
        if not self:
            return "nothing skipped"
        return ", ".join(f"{reason}={n}" for reason, n in sorted(self.counts.items()) if n)
