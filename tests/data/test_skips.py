"""SkipCounter: counts by reason, hands counts over, logs the first few of each reason."""
from __future__ import annotations

import logging

import pytest

from ddetr_dist.data.skips import REASONS, SkipCounter


def test_counts_take_update_and_summary():
    worker = SkipCounter()
    worker.record("corrupt_image", "a.jpg")
    worker.record("dropped_box", "b.jpg", n=3)
    assert worker.total == 4 and bool(worker)
    handed = worker.take()
    assert handed == {"corrupt_image": 1, "dropped_box": 3} and worker.total == 0 and not worker
    main = SkipCounter()
    main.update(handed)
    main.update({"corrupt_image": 2})
    assert main.counts["corrupt_image"] == 3
    assert main.summary() == "corrupt_image=3, dropped_box=3"
    assert SkipCounter().summary() == "nothing skipped"


def test_unknown_reason_is_a_bug():
    with pytest.raises(ValueError, match="unknown skip reason"):
        SkipCounter().record("because", "x")


def test_logs_each_skip_up_to_the_limit_then_only_counts(caplog):
    counter = SkipCounter(log_limit=3)
    with caplog.at_level(logging.WARNING, logger="ddetr_dist.data.skips"):
        for i in range(5):
            counter.record("missing_part", f"sample {i}")
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 3 and "sample 2" in logged[-1] and "not logged" in logged[-1]
    assert counter.counts["missing_part"] == 5


def test_every_reason_is_documented():
    assert all(isinstance(text, str) and text for text in REASONS.values())
