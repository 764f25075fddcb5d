"""`ddetr bench msda --quick` runs end to end and prints a row per backend and shape."""
from __future__ import annotations

import json

import pytest

from ddetr_dist.cli import main


def test_quick_benchmark_prints_every_backend(capsys):
    assert main(["bench", "msda", "--quick", "--repeats", "1", "--warmup", "0", "--backends", "torch,cpu"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "(quick)" in line]
    assert len(rows) == 4  # 2 shapes x (torch, cpu)
    assert sorted({row[5] for row in rows}) == ["cpu", "torch"]  # name(3 words) device dtype backend
    for row in rows:
        forward_ms, forward_backward_ms = float(row[6]), float(row[7])
        assert 0 < forward_ms and 0 < forward_backward_ms


def test_bench_rejects_unknown_backend():
    with pytest.raises(SystemExit, match="unknown backend"):
        main(["bench", "msda", "--quick", "--backends", "cpu,fast"])


def test_json_rows_of_one_device(tmp_path):
    out = tmp_path / "msda.json"
    assert main(["bench", "msda", "--quick", "--repeats", "1", "--warmup", "0", "--backends", "torch,cpu",
                 "--device", "cpu", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["backend"]) for r in rows] == [
        ("encoder N=1 (quick)", "torch"), ("encoder N=1 (quick)", "cpu"),
        ("decoder N=2 (quick)", "torch"), ("decoder N=2 (quick)", "cpu")]
    assert all(r["device"] == "cpu" and r["dtype"] == "float32" and r["fwd_bwd_ms"] > 0 for r in rows)
    assert rows[0]["fwd_bwd_speedup"] == 1.0
