"""The driver of `ddetr train`: check the config, connect to Ray (or start a local one on
127.0.0.1), and run a Ray Train `TorchTrainer` whose workers each run the DeepSpeed train
loop (`ddetr_dist.on_ray.worker`).

The run directory `<output_dir>/<name>/` (engine/run_dir.py names its files) is Ray's
storage for the run: it holds Ray's checkpoints and run snapshot, and ours: the config, the
DeepSpeed JSON, metrics, TensorBoard, evaluations, the final model. Running the same name
again resumes from the newest checkpoint (Ray reads its snapshot); a new name starts fresh.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from ddetr_dist.config import Config, ConfigError, check_training_config, save_config, to_dict
from ddetr_dist.console import RAY_QUIET_ENV, quiet_local_ray, ray_train_log_level, verbose
from ddetr_dist.engine.deepspeed_config import check_precision
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.run_store import RunStore
from ddetr_dist.storage import Store, StoreError, is_uri
from ddetr_dist.on_ray.preemption import saving_on_sigterm
from ddetr_dist.on_ray.placement import check_resources
from ddetr_dist.on_ray.run_inputs import check_backbone_weights, check_init_checkpoint, with_checked_num_classes

log = logging.getLogger("ddetr_dist.train")
# Ray phones home unless told otherwise
RAY_ENV_DEFAULTS = {"RAY_USAGE_STATS_ENABLED": "0"}
# for a Ray started here: keep it on this machine (Ray otherwise binds the external interface);
# not for a cluster we join, where it would refuse the other nodes
# no preemption watcher: nothing drains a Ray on this one machine, and the watcher's actor
# logs a core_worker error at every start (ray-project/ray#53727) that no user can act on
LOCAL_RAY_ENV_DEFAULTS = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
LOCAL_RAY_ADDRESS = "127.0.0.1"


class TrainingFailed(RuntimeError):
    """The run ended without finishing (its workers' error is in the message)."""


@dataclass
class RunResult:
    run_dir: RunDir
    model_final: str  # its path, or its URI in object storage
    metrics: dict  # the last training record of metrics.jsonl


def check_data(cfg: Config) -> None:
    """The shards exist and their manifests read, before any worker starts."""
    from ddetr_dist.data import load_shard_set

    for key, spec, manifest in (("data.train_shards", cfg.data.train_shards, cfg.data.train_manifest),
                                ("data.val_shards", cfg.data.val_shards, cfg.data.val_manifest)):
        if not spec:
            continue
        try:
            shards = load_shard_set(spec, cfg.data.allow_pipe_urls, manifest)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"config key '{key}' = {spec!r}: {e}") from None
        if shards.total == 0:
            raise ConfigError(f"config key '{key}' = {spec!r}: its manifest lists no samples")


def check_model(cfg: Config) -> None:
    """The model of `cfg` can be built, before any worker starts: the whole detector built on
    PyTorch's meta device (shapes only: no memory, no weights read, ~50 ms), so every check
    build_model and its constructors make (`check_model_config`, backbone depth and norm,
    frozen stages, two-stage without box refinement, ...) fails here, naming the key,
    instead of in every worker of every retry."""
    import torch

    from ddetr_dist.models.build import build_model

    model = dataclasses.replace(cfg.model, backbone_weights="")  # read by the workers
    try:
        with torch.device("meta"):
            build_model(dataclasses.replace(cfg, model=model))
    except ValueError as e:
        raise ConfigError(f"the model config cannot be built: {e}") from None


# What Ray's job supervisor gives a `ray job submit` entrypoint: the job's config, with the
# runtime_env (and its working_dir, when code was uploaded)
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def check_output_dir(cfg: Config) -> None:
    """Object storage: writable from here (else ConfigError saying whether the bucket is
    missing or the credentials were refused). A path: in a Ray job that uploaded its code,
    the working directory is Ray's unpacked copy of that code: a relative `output_dir` would
    put the run into a cache Ray deletes, and the next submission of changed code (another
    package) would start over instead of resuming."""
    if is_uri(cfg.output_dir):  # object storage: this machine can write there (bucket, credentials)
        try:
            Store(cfg.output_dir).check_writable("config key 'output_dir'")
        except StoreError as e:
            raise ConfigError(str(e)) from None
        return
    job = json.loads(os.environ.get(RAY_JOB_CONFIG_ENV) or "{}")
    uploaded = (job.get("runtime_env") or {}).get("working_dir")
    if uploaded and not Path(cfg.output_dir).expanduser().is_absolute():
        raise ConfigError(
            f"config key 'output_dir' = {cfg.output_dir!r} is relative, and this Ray job runs in Ray's unpacked copy "
            f"of its working_dir ({uploaded}), which Ray deletes; a resubmitted job would not find the run to resume. "
            "Give an absolute path on storage every node mounts, e.g. output_dir=/shared/runs")


def ray_address(cfg: Config) -> str:
    """The cluster to join ('' = a local Ray started for this run)."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS", "")


def connect_ray(cfg: Config) -> bool:
    """Connect to `ray.address` / RAY_ADDRESS, or start a local Ray bound to 127.0.0.1.
    -> True when this process started Ray (and should stop it)."""
    address = ray_address(cfg)
    # before Ray is imported: it reads these once
    quiet = {} if verbose() else RAY_QUIET_ENV
    for key, value in {**RAY_ENV_DEFAULTS, **quiet, **({} if address else LOCAL_RAY_ENV_DEFAULTS)}.items():
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return False
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
        return False
    log.info("starting a local Ray on %s for this run", LOCAL_RAY_ADDRESS)
    quiet_local_ray()
    # with its dashboard (on 127.0.0.1): Ray Train's state queries need it
    # address="local": a new Ray even when a `ray start` cluster runs on this machine (plain
    # ray.init() would join that one, which the user did not name)
    ray.init(address="local", _node_ip_address=LOCAL_RAY_ADDRESS, include_dashboard=True, dashboard_host=LOCAL_RAY_ADDRESS,
             log_to_driver=True)
    return True


def write_run_files(cfg: Config, run_dir: RunDir) -> None:
    run_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir.config)
    # deepspeed_config.json: written by the workers (rank 0) at each start, for the world size
    # they run at (with a range of workers, only they know it)
    RunStore(run_dir).push()  # object storage: the store has them before any worker starts


def check_before_start(cfg: Config) -> Config:
    """Everything about `cfg` that can be checked before Ray starts (`ddetr train`, and
    `ddetr tune` for its trials' base config): ConfigError naming the key. -> `cfg` with
    model.num_classes resolved from the train data (on_ray/run_inputs.py)."""
    check_training_config(cfg)
    check_precision(cfg)
    check_output_dir(cfg)
    check_data(cfg)
    cfg = with_checked_num_classes(cfg)
    check_model(cfg)
    joining_cluster = bool(ray_address(cfg))
    check_backbone_weights(cfg, joining_cluster)
    check_init_checkpoint(cfg, joining_cluster)
    return cfg


def train(cfg: Config) -> RunResult:
    """Run (or resume) `cfg` to the end on Ray. Raises ConfigError before any worker
    starts, TrainingFailed when the workers fail more than `ray.max_failures` times, or
    once with an error a restart would meet again (ddetr_dist.on_ray.failures)."""
    cfg = check_before_start(cfg)
    run_dir = RunDir.of(cfg)
    started_ray = connect_ray(cfg)
    try:
        use_gpu = check_resources(cfg)
        run_store = RunStore(run_dir)
        resuming = run_store.has(run_dir.metrics)
        run_store.start_empty()
        write_run_files(cfg, run_dir)
        log.info("%s run %s (%s workers, ZeRO-%d, %s); follow it with: tensorboard --logdir %s",
                 "resuming" if resuming else "starting", run_dir.where, cfg.ray.num_workers, cfg.train.zero_stage,
                 cfg.train.precision, run_dir.uri_of(run_dir.tensorboard))
        trainer = build_torch_trainer(cfg, run_dir, use_gpu)
        # SIGTERM (`ray job stop`, an evicted pod): the workers save, then TrainingStopped (outside
        # failures_as_training_failed, which would make it a failure)
        with saving_on_sigterm(trainer.train_loop_config["run_id"], cfg.ray.save_on_sigterm_s, run_dir.where), \
                failures_as_training_failed(run_dir):
            trainer.fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    from ddetr_dist.engine.metrics import read_metrics

    # object storage: what rank 0 wrote on its node, for the summary
    run_store.pull(run_dir.metrics, run_dir.final_metrics)
    run_store.pull_tree(run_dir.evaluations)
    records = [r for r in read_metrics(run_dir) if r.get("event") == "train"]
    return RunResult(run_dir, run_dir.uri_of(run_dir.final_model), records[-1] if records else {})


def scaling_config(cfg: Config, use_gpu: bool):
    from ray.train import ScalingConfig

    r = cfg.ray
    fewest, most = r.worker_range()
    # a range: Ray's elastic policy (starts with what fits, restarts smaller after a lost node,
    # looks for room to grow every resize_check_s; docs/elastic.md)
    return ScalingConfig(num_workers=(fewest, most) if fewest != most else most, use_gpu=use_gpu,
                         elastic_resize_monitor_interval_s=r.resize_check_s,
                         resources_per_worker={"CPU": r.cpus_per_worker, **({"GPU": 1} if use_gpu else {})})


def torch_config(use_gpu: bool):
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="nccl" if use_gpu else "gloo")


def build_torch_trainer(cfg: Config, run_dir: Path | RunDir, use_gpu: bool, callbacks: tuple = ()):
    """The Ray Train `TorchTrainer` of one run: `cfg.ray.num_workers` workers running the
    DeepSpeed loop, Ray's storage = the run directory. Tune trials build theirs here too.
    A worker error a restart would meet again ends the run at once; other failures restart
    the workers up to `ray.max_failures` times (ddetr_dist.on_ray.failures)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from ddetr_dist.on_ray.failures import FailFastTorchTrainer
    from ddetr_dist.on_ray.worker import train_loop_per_worker, versions

    r, run_dir = cfg.ray, RunDir(run_dir)
    return FailFastTorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": run_dir.where, "run_id": uuid.uuid4().hex[:8],
                           "cwd": os.getcwd(), "progress_bars": sys.stderr.isatty(), "versions": versions()},
        torch_config=torch_config(use_gpu),
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=RunConfig(name=run_dir.path.name, storage_path=storage_path(run_dir), callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
                             logging_config=LoggingConfig(log_level=ray_train_log_level())),
    )


def storage_path(run_dir: RunDir) -> str:
    """Ray's storage for the run (`RunConfig(storage_path=..., name=<run name>)`): the folder
    holding the run directory, or its URI in object storage (Ray uploads checkpoints there)."""
    return run_dir.store_uri.rsplit("/", 1)[0] if run_dir.store_uri else str(run_dir.path.parent)


@contextlib.contextmanager
def failures_as_training_failed(run_dir: RunDir):
    """Ray wraps the workers' error: raise TrainingFailed with its message, without Ray's
    frames (they are in the log above)."""
    from ddetr_dist.on_ray.failures import deterministic_failures

    try:
        yield
    except Exception as e:
        deterministic = deterministic_failures(e)
        if deterministic:  # the workers' own words
            first = deterministic[0]
            raise TrainingFailed(f"training run {run_dir.where} failed, not retried (a restart would fail the same "
                                 f"way): {type(first).__name__}: {first}") from e
        raise TrainingFailed(f"training run {run_dir.where} failed: {e}") from e
