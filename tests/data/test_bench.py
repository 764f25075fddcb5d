"""`ddetr bench data` runs end to end and prints all three measurements."""
from __future__ import annotations

import argparse
import re

from ddetr_dist.data import bench


def test_bench_prints_shards_files_and_loader_rates(capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    assert bench.run(parser.parse_args(["--count", "8", "--workers", "2"])) == 0
    out = capsys.readouterr().out
    for name in ("shards, 1 worker", "files + COCO JSON, 1 worker", "loader, 2 workers"):
        line = next(l for l in out.splitlines() if l.startswith(name))
        images, seconds, rate = re.findall(r"[\d.]+", line[len(name):])
        assert int(images) == 8 and float(rate) > 0
    assert "shards / files:" in out
