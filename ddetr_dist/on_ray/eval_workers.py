"""`ddetr eval` on Ray workers, its results brought back to the driver through Ray.

The driver may run where the workers cannot see its files (a CPU head node runs it, the
workers are on GPU nodes). So the driver resolves what it can (the config tree, with the
checkpoint's model shape; the checkpoint's absolute path) and hands it over in the loop
config; what the workers still read, the checkpoint and the data, is shared storage the
user provides, as for training. Rank 0 writes nothing: it sends the metrics and the bytes
of detections.json to a `ResultSink` actor on the driver's node, and the driver writes
`out_dir` on its own machine.

Why an actor: Ray Train V2's `fit()` returns nothing a worker returned; `ray.train.report`
metrics travel through the controller into the run's Result, a channel for small numbers,
while COCO val's detections are tens of MB; an object a worker `ray.put`s is owned by that
worker and gone when it exits. An actor handle travels inside train_loop_config (Ray
serializes it with the train function; Train's state export shows it as a string).
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import torch

from ddetr_dist.storage import is_uri, staged_uri
from ddetr_dist.config import Config, config_from_dict, to_dict
from ddetr_dist.engine.evaluate import EvalResult, write_results
from ddetr_dist.errors import InputNotFoundError


class ResultSink:
    """Holds rank 0's result until the driver takes it (a Ray actor, see `result_sink`)."""

    def __init__(self):
        self.result: dict | None = None

    def put(self, result: dict) -> None:
        self.result = result

    def take(self) -> dict | None:
        result, self.result = self.result, None
        return result


def result_sink():
    """A `ResultSink` actor on this (the driver's) node, taking no CPU: the detections cross
    the network once, from rank 0 to here, and the actor always fits."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(ResultSink).options(num_cpus=0, scheduling_strategy=here).remote()


def load_model(cfg: Config, weights: str):
    """The trained model of `weights` (its shape is in `cfg.model`, read by the driver)."""
    from ddetr_dist.engine.run_store import local_copy
    from ddetr_dist.models import build_model, load_official_checkpoint

    if is_uri(weights):  # fetched from object storage by the driver: each node fetches its own copy
        weights = str(local_copy(weights))
    if not Path(weights).is_file():
        raise InputNotFoundError(
            f"checkpoint {weights}: no such file on node {socket.gethostname()}. Every worker reads the checkpoint at "
            "the driver's path: on a cluster, put it on a shared file system mounted at the same path on every node")
    model, criterion, postprocess = build_model(cfg)
    load_official_checkpoint(weights, model)
    return model.eval(), criterion, postprocess


def eval_loop_per_worker(loop_config: dict) -> None:
    import ray
    import ray.train.torch

    from ddetr_dist import comm
    from ddetr_dist.on_ray.worker import enter_driver_directory
    from ddetr_dist.engine.evaluate import evaluate

    cfg = config_from_dict(loop_config["config"])
    enter_driver_directory(loop_config["cwd"])  # relative data paths in the config, where this node has that folder
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    device = ray.train.torch.get_device()
    model, criterion, postprocess = load_model(cfg, loop_config["weights"])
    result = evaluate(model.to(device), criterion, postprocess, cfg, device, out_dir=None)
    if comm.get_rank() == 0:  # before returning: the driver reads the sink once every worker is done
        ray.get(loop_config["sink"].put.remote({"metrics": result.metrics, "per_category_AP": result.per_category,
                                                "detections_json": result.detections_json}))


def run_workers(cfg: Config, weights: Path) -> dict:
    """`cfg.ray.num_workers` Ray workers evaluate `weights`; -> what rank 0 sent."""
    import ray
    from ray.train import LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from ddetr_dist.console import ray_train_log_level

    from ddetr_dist.on_ray.driver import scaling_config, torch_config
    from ddetr_dist.on_ray.placement import check_resources

    use_gpu = check_resources(cfg)
    sink = result_sink()
    try:
        fit(TorchTrainer(eval_loop_per_worker,
                         train_loop_config={"config": to_dict(cfg), "weights": staged_uri(weights) or str(Path(weights).resolve()),
                                            "cwd": os.getcwd(), "sink": sink},
                         torch_config=torch_config(use_gpu), scaling_config=scaling_config(cfg, use_gpu),
                         # Ray's own run files (no checkpoints: the workers never touch it)
                         run_config=RunConfig(name="eval", storage_path=tempfile.mkdtemp(prefix="ddetr-eval-"),
                                              logging_config=LoggingConfig(log_level=ray_train_log_level()))))
        sent = ray.get(sink.take.remote())
    finally:
        ray.kill(sink)
    if sent is None:
        raise RuntimeError("the evaluation's workers finished, but rank 0 sent no result")
    return sent


def fit(trainer) -> None:
    """`trainer.fit()`; a worker's error a rerun would meet again (e.g. the checkpoint
    missing on its node) is raised as itself, without Ray's wrapping."""
    from ddetr_dist.on_ray.failures import deterministic_failures

    try:
        trainer.fit()
    except Exception as e:
        deterministic = deterministic_failures(e)
        if deterministic:
            raise deterministic[0] from e
        raise


def evaluate_on_ray(cfg: Config, weights: Path, out_dir: Path) -> EvalResult:
    """Evaluate on Ray workers; the driver writes `out_dir/detections.json` and
    `out_dir/metrics.json` here, on its own machine."""
    from ddetr_dist.on_ray.driver import connect_ray

    started = connect_ray(cfg)  # before anything imports ray: it sets Ray's environment
    try:
        sent = run_workers(cfg, weights)
        result = EvalResult(sent["metrics"], sent["per_category_AP"], out_dir)
        write_results(out_dir, result, sent["detections_json"])
    finally:
        if started:
            import ray

            ray.shutdown()
    return result
