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

from ddetr_dist.atomic import atomic_write_bytes
from ddetr_dist.config import Config, ConfigError, check_training_config, save_config, to_dict
from ddetr_dist.console import RAY_QUIET_ENV, ray_train_log_level, verbose
from ddetr_dist.engine.deepspeed_config import check_precision
from ddetr_dist.engine.run_dir import RunDir
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
    run_dir: Path
    model_final: Path
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
    """In a Ray job that uploaded its code, the working directory is Ray's unpacked copy of
    that code: a relative `output_dir` would put the run into a cache Ray deletes, and the
    next submission of changed code (another package) would start over instead of resuming."""
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
    # with its dashboard (on 127.0.0.1): Ray Train's state queries need it
    # address="local": a new Ray even when a `ray start` cluster runs on this machine (plain
    # ray.init() would join that one, which the user did not name)
    ray.init(address="local", _node_ip_address=LOCAL_RAY_ADDRESS, include_dashboard=True, dashboard_host=LOCAL_RAY_ADDRESS,
             log_to_driver=True)
    return True


def cluster_nodes() -> list[dict]:
    """The resources of each node that can host workers: the live nodes and, on a cluster
    with an autoscaler, every node it may add (its node types at their max count, as Ray
    Train reads them), so that demand it would meet is never refused here."""
    import ray
    from ray._private.state import state

    nodes = [dict(node["Resources"]) for node in ray.nodes() if node["Alive"]]
    try:
        autoscaler = state.get_cluster_config()  # published by an autoscaler; None on a fixed cluster
    except Exception:  # noqa: BLE001 - a Ray Client (ray://) driver has no GCS connection: live nodes only
        autoscaler = None
    for group in autoscaler.node_group_configs if autoscaler is not None else ():
        nodes += [dict(group.resources)] * (group.max_count if group.max_count >= 0 else UNBOUNDED_NODES)
    return nodes


UNBOUNDED_NODES = 1000  # an autoscaler node type without a max count


def workers_that_fit(nodes: list[dict], cpus: int, gpus: int) -> int:
    """How many workers of `cpus` CPUs and `gpus` GPUs each the nodes hold (a worker's
    resources are on one node)."""
    return sum(min(int(n.get("CPU", 0) // cpus), int(n.get("GPU", 0) // gpus) if gpus else 10 ** 9) for n in nodes)


def check_resources(cfg: Config, nodes: list[dict] | None = None) -> bool:
    """-> whether the workers use GPUs. Fails (naming the keys) when the cluster cannot
    place the workers, each on one node: Ray Train would otherwise retry starting them
    forever."""
    nodes = cluster_nodes() if nodes is None else nodes
    use_gpu = cfg.ray.use_gpu if cfg.ray.use_gpu is not None else any(n.get("GPU", 0) >= 1 for n in nodes)
    r = cfg.ray
    gpus = 1 if use_gpu else 0
    fit = workers_that_fit(nodes, r.cpus_per_worker, gpus)
    if fit < r.num_workers:
        largest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
        asked = f"{r.cpus_per_worker} CPU(s)" + (" and 1 GPU" if use_gpu else "")
        raise ConfigError(
            f"config keys 'ray.num_workers' ({r.num_workers}) and 'ray.cpus_per_worker' ({r.cpus_per_worker}): each "
            f"worker needs {asked} on one node, but the cluster's {len(nodes)} node(s) hold {fit} such worker(s) "
            f"(the largest has {largest.get('CPU', 0):g} CPUs, {largest.get('GPU', 0):g} GPUs). Lower them"
            + (", set ray.use_gpu=false," if use_gpu else "") + " or add nodes.")
    if cfg.train.precision == "fp16" and not use_gpu:
        raise ConfigError("config key 'train.precision': fp16 needs GPUs; on CPUs use bf16 (or fp32)")
    return use_gpu


def write_run_files(cfg: Config, run_dir: RunDir) -> None:
    from ddetr_dist.engine.deepspeed_config import deepspeed_config

    run_dir.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir.config)
    ds = deepspeed_config(cfg, cfg.ray.num_workers)
    atomic_write_bytes(run_dir.deepspeed_config, json.dumps(ds, indent=1).encode())


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
        resuming = run_dir.metrics.exists()
        write_run_files(cfg, run_dir)
        log.info("%s run %s (%d workers, ZeRO-%d, %s); follow it with: tensorboard --logdir %s",
                 "resuming" if resuming else "starting", run_dir, cfg.ray.num_workers, cfg.train.zero_stage,
                 cfg.train.precision, run_dir.tensorboard)
        with failures_as_training_failed(run_dir):
            build_torch_trainer(cfg, run_dir, use_gpu).fit()
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    from ddetr_dist.engine.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if r.get("event") == "train"]
    return RunResult(run_dir.path, run_dir.final_model, records[-1] if records else {})


def scaling_config(cfg: Config, use_gpu: bool):
    from ray.train import ScalingConfig

    r = cfg.ray
    return ScalingConfig(num_workers=r.num_workers, use_gpu=use_gpu,
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
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "run_id": uuid.uuid4().hex[:8],
                           "cwd": os.getcwd(), "progress_bars": sys.stderr.isatty(), "versions": versions()},
        torch_config=torch_config(use_gpu),
        scaling_config=scaling_config(cfg, use_gpu),
        run_config=RunConfig(name=run_dir.path.name, storage_path=str(run_dir.path.parent), callbacks=list(callbacks),
                             failure_config=FailureConfig(max_failures=r.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=r.keep_checkpoints),
                             logging_config=LoggingConfig(log_level=ray_train_log_level())),
    )


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
            raise TrainingFailed(f"training run {run_dir} failed, not retried (a restart would fail the same "
                                 f"way): {type(first).__name__}: {first}") from e
        raise TrainingFailed(f"training run {run_dir} failed: {e}") from e
