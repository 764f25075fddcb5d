"""Errors a restart would meet again (issue 12, bug 5): the driver refuses what it can see
before Ray starts, and Ray Train ends the run at once on a deterministic worker error
instead of restarting the workers `ray.max_failures` times. No Ray started here (the run
itself: tests/distributed/test_ray_train.py)."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

from ddetr_dist.config import ConfigError, load_config
from ddetr_dist.train import main as train_main

from engine.engine_helpers import FROM_SCRATCH

from .ray_helpers import write_tiny_config


def worker_group_error(*exceptions: BaseException):
    """What Ray Train's controller hands its failure policy: each worker's exception
    wrapped with its traceback, as a worker's poll returns it."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    return WorkerGroupError("worker errors", {rank: UserExceptionWithTraceback(e, f"Traceback ...\n{e}")
                                              for rank, e in enumerate(exceptions)})


def decision(error, max_failures: int = 3) -> str:
    from ray.train import FailureConfig

    from ddetr_dist.on_ray.failures import FailFastPolicy

    return FailFastPolicy(FailureConfig(max_failures=max_failures)).make_decision(error).value


def nonfinite_loss_error():
    from ddetr_dist.engine.bad_steps import NonFiniteLossError

    return NonFiniteLossError("2 steps in a row had a non-finite loss or gradient (train.max_bad_steps=2)")


def test_deterministic_worker_errors_are_raised_at_once_others_retried():
    from ddetr_dist.errors import InputNotFoundError
    from ddetr_dist.models.checkpoint import CheckpointMismatchError
    from ddetr_dist.ops import BackendUnavailableError

    # any rank's deterministic error decides: the others' are often what it caused
    assert decision(worker_group_error(nonfinite_loss_error(), RuntimeError("gloo: connection closed"))) == "RAISE"
    assert decision(worker_group_error(ConfigError("config key 'x': bad"))) == "RAISE"
    assert decision(worker_group_error(InputNotFoundError("config key 'model.backbone_weights': no such file"))) \
        == "RAISE"
    assert decision(worker_group_error(CheckpointMismatchError("backbone weights do not fit"))) == "RAISE"
    assert decision(worker_group_error(BackendUnavailableError("ms_deform_attn: nvcc fatal"))) == "RAISE"
    # a lost peer, a file system's hiccup: what restarts are for, up to ray.max_failures
    assert decision(worker_group_error(RuntimeError("gloo: connection closed"))) == "RETRY"
    assert decision(worker_group_error(FileNotFoundError("checkpoint_000000004/meta.json"))) == "RETRY"
    assert decision(worker_group_error(RuntimeError("killed")), max_failures=0) == "RAISE"


def test_the_trainer_we_build_hands_ray_our_failure_policy():
    """The policy reaches Ray's controller through a private method of Ray Train V2 (no
    public hook: see ddetr_dist/on_ray/failures.py). A Ray that renames it fails here."""
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from ddetr_dist.on_ray.failures import FailFastTorchTrainer
    from ddetr_dist.on_ray.driver import build_torch_trainer

    assert "_initialize_and_run_controller" in vars(DataParallelTrainer)
    assert "failure_policy=" in inspect.getsource(DataParallelTrainer.fit)
    cfg = load_config(None, ["data.train_shards=x", *FROM_SCRATCH])
    assert isinstance(build_torch_trainer(cfg, Path("/nonexistent/run"), use_gpu=False), FailFastTorchTrainer)


def test_a_worker_without_the_backbone_weights_fails_without_retries(tmp_path, monkeypatch):
    from ddetr_dist.on_ray.failures import is_deterministic
    from ddetr_dist.on_ray.worker import check_inputs

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.backbone_weights=weights/resnet18.pth"])
    with pytest.raises(FileNotFoundError) as error:
        check_inputs(cfg)
    assert is_deterministic(error.value) and "'weights/resnet18.pth': no such file on node" in str(error.value)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "resnet18.pth").write_bytes(b"")
    check_inputs(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_dim=48"], "model.hidden_dim must be a multiple of 32"),  # models.build.check_model_config
    (["model.num_queries=0"], "model.num_queries must be >= 1"),
    (["model.backbone_norm=frozen"], "model.backbone_norm must be one of frozen_bn, bn"),  # the constructors'
    (["model.backbone_depth=42"], "model.backbone_depth: ResNet depth must be one of"),
    (["model.two_stage=true", "model.with_box_refine=false"], "model.two_stage requires model.with_box_refine=true"),
    (["model.backbone_weights=weights/resnet18.pth"],
     "config key 'model.backbone_weights' = 'weights/resnet18.pth': no such file (relative to"),
])
def test_a_model_that_cannot_be_built_fails_before_ray_starts(tiny_data, tmp_path, monkeypatch, capsys, overrides,
                                                               message):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local Ray: the driver sees the workers' files
    monkeypatch.chdir(tmp_path)
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, tmp_path / "runs", "bad")
    assert train_main(["--config", str(config), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # no Ray, no run directory


def test_a_sweep_trial_whose_model_cannot_be_built_fails_before_its_workers(monkeypatch):
    """`ddetr tune` checks each trial's config in the trial, before its TorchTrainer."""
    from ddetr_dist.config import to_dict
    from ddetr_dist.on_ray import tune

    class Context:
        def get_trial_id(self):
            return "t_00000"

    monkeypatch.setattr("ray.tune.get_context", lambda: Context())
    monkeypatch.setattr(tune, "build_torch_trainer", lambda *a, **k: pytest.fail("the trial's workers started"))
    base = load_config(None, ["data.train_shards=x", *FROM_SCRATCH])
    with pytest.raises(ConfigError, match="model.hidden_dim must be a multiple of 32"):
        tune.run_trial({"model.hidden_dim": 48}, base=to_dict(base), sweep_dir="/nonexistent/sweep",
                       driver_cwd="/nonexistent", use_gpu=False)


def test_a_relative_output_dir_in_a_job_with_uploaded_code_is_refused(tiny_data, tmp_path, monkeypatch, capsys):
    """Under `ray job submit --working-dir`, the entrypoint runs in Ray's unpacked package (a
    cache): a relative output_dir would train into it, and a resubmission of changed code
    would not resume (issue 13, bug 6). Ray's job supervisor describes the job in this env var."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip"}, "metadata": {}}))
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_data, "runs", "job")
    assert train_main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config key 'output_dir' = 'runs' is relative" in err and "output_dir=/shared/runs" in err
    assert not (tmp_path / "runs").exists()


def test_a_worker_with_other_versions_than_the_driver_stops_the_run_naming_its_node():
    """Nodes installed at different times drift (issue 13, bug 3): every worker reports its
    ray/deepspeed/torch at the start and a difference ends the run, not retried."""
    from ddetr_dist.on_ray.worker import check_versions, versions
    from ddetr_dist.errors import NotRetryable

    driver = versions()
    assert set(driver) == {"ray", "deepspeed", "torch"} and "+" not in driver["torch"]
    same = {"rank": 0, "host": "a", "node_ip": "10.0.0.1", "versions": dict(driver)}
    check_versions(driver, [same])
    other = {"rank": 1, "host": "gpu-7", "node_ip": "10.0.0.7", "versions": {**driver, "ray": "2.61.0"}}
    with pytest.raises(NotRetryable, match=r"rank 1 on gpu-7 \(10.0.0.7\): ray 2.61.0.*constraints.txt"):
        check_versions(driver, [same, other])


@pytest.mark.parametrize("nodes, overrides, fits", [
    # 2 + 2 CPUs in all, but a worker of 3 CPUs fits on neither node (issue 13, bug 2)
    ([{"CPU": 2}, {"CPU": 2}], ["ray.num_workers=1", "ray.cpus_per_worker=3"], False),
    ([{"CPU": 2}, {"CPU": 2}], ["ray.num_workers=2", "ray.cpus_per_worker=2"], True),
    # a CPU head and one 8-GPU node: 8 GPU workers fit, 9 do not
    ([{"CPU": 4}, {"CPU": 96, "GPU": 8}], ["ray.num_workers=8", "ray.cpus_per_worker=8"], True),
    ([{"CPU": 4}, {"CPU": 96, "GPU": 8}], ["ray.num_workers=9", "ray.cpus_per_worker=8"], False),
    # GPUs on two nodes, too few CPUs beside them on one
    ([{"CPU": 8, "GPU": 4}, {"CPU": 2, "GPU": 4}], ["ray.num_workers=6", "ray.cpus_per_worker=2"], False),
])
def test_workers_are_placed_per_node(nodes, overrides, fits):
    from ddetr_dist.on_ray.placement import check_resources

    cfg = load_config(None, ["data.train_shards=x", *FROM_SCRATCH, *overrides])
    if fits:
        assert check_resources(cfg, nodes) == any("GPU" in n for n in nodes)
        return
    with pytest.raises(ConfigError, match=r"each worker needs \d+ CPU\(s\)( and 1 GPU)? on one node.*the largest has"):
        check_resources(cfg, nodes)
