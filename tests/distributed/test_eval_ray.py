"""`ddetr eval` on 2 Ray workers (issue 13, bug 5): rank 0 sends the metrics and the
detections back through Ray and the driver writes detections.json and metrics.json on its
own machine; the workers never touch the out dir (on a cluster they may not see it). The
numbers equal a 1-process evaluation of the same checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddetr_dist.eval import main as eval_main

from .ray_helpers import environment, write_tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
GUARD = Path(__file__).parent / "worker_guard"  # its sitecustomize.py: see there


@pytest.fixture(scope="module")
def checkpoint(tiny_data, tmp_path_factory):
    """An untrained tiny model in the official format (its shape then comes from the
    config's model section) and that config, with 2 Ray workers."""
    from ddetr_dist.config import load_config
    from ddetr_dist.models import build_model

    folder = tmp_path_factory.mktemp("eval_ray")
    config = write_tiny_config(folder / "tiny.yaml", tiny_data, folder / "runs", "eval")
    torch.manual_seed(0)
    model = build_model(load_config(config))[0]
    torch.save({"model": model.state_dict()}, folder / "untrained.pth")
    return folder / "untrained.pth", config


def run_eval_on_ray(weights: Path, config: Path, out: Path, guard_marks: Path) -> subprocess.CompletedProcess:
    """`ddetr eval` with its own local Ray, whose workers may not write under `out`."""
    python_path = os.pathsep.join(filter(None, [str(GUARD), os.environ.get("PYTHONPATH")]))
    env = environment(PYTHONPATH=python_path, DDETR_TEST_WORKERS_CANNOT_WRITE=str(out),
                      DDETR_TEST_GUARD_MARKS=str(guard_marks))
    return subprocess.run([sys.executable, "-m", "ddetr_dist.eval", "--checkpoint", str(weights), "--config",
                           str(config), "--out", str(out)], env=env, capture_output=True, text=True, timeout=400)


def test_two_workers_send_results_and_the_driver_writes_them(checkpoint, tmp_path, capsys):
    weights, config = checkpoint
    assert eval_main(["--checkpoint", str(weights), "--config", str(config), "--out", str(tmp_path / "one"),
                      "ray.num_workers=1"]) == 0, capsys.readouterr()
    done = run_eval_on_ray(weights, config, tmp_path / "two", tmp_path / "guards")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "AP50" in done.stdout and "8 images" in done.stdout
    # the guard was in the workers (the 2 Train workers, at least): none of them wrote the files
    assert len(list((tmp_path / "guards").iterdir())) >= 2
    one, two = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert two["metrics"].pop("val_loss") == pytest.approx(one["metrics"].pop("val_loss"), rel=1e-5)
    del one["metrics"]["eval_seconds"], two["metrics"]["eval_seconds"]
    assert two == one and two["metrics"]["images"] == 8
    key = lambda d: (d["image_id"], d["category_id"], d["score"], d["bbox"])  # noqa: E731
    detections = [json.loads((tmp_path / run / "detections.json").read_text()) for run in ("one", "two")]
    assert detections[1] and sorted(map(key, detections[1])) == sorted(map(key, detections[0]))


def test_a_worker_without_the_checkpoint_says_so(checkpoint, tmp_path):
    from ddetr_dist.config import load_config
    from ddetr_dist.on_ray.eval_workers import load_model
    from ddetr_dist.errors import InputNotFoundError

    cfg = load_config(checkpoint[1])
    with pytest.raises(InputNotFoundError, match="no such file on node .* shared file system"):
        load_model(cfg, str(tmp_path / "elsewhere.pth"))


def test_a_deterministic_worker_error_reaches_the_command_unwrapped():
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from ddetr_dist.on_ray.eval_workers import fit
    from ddetr_dist.errors import InputNotFoundError

    class Failing:
        def __init__(self, error):
            self.error = error

        def fit(self):
            raise WorkerGroupError("worker errors", {0: UserExceptionWithTraceback(self.error, "Traceback ...")})

    # `ddetr eval` prints a FileNotFoundError's message (exit 2) instead of Ray's traceback
    with pytest.raises(InputNotFoundError, match="checkpoint /x.pth"):
        fit(Failing(InputNotFoundError("checkpoint /x.pth: no such file on node n1")))
    with pytest.raises(WorkerGroupError):  # anything else: as Ray raised it
        fit(Failing(RuntimeError("gloo: connection closed")))
