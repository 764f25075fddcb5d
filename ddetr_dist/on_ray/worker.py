"""What each Ray Train worker runs: the engine's `Trainer` with Ray's checkpoints.

Ray made the process group (gloo on CPUs, NCCL on GPUs); DeepSpeed joins it. Checkpoints
go through `ray.train.report`: every rank writes its part into a local folder, Ray merges
the folders into one checkpoint directory of the run (named by `RunDir`) and keeps
`ray.keep_checkpoints`.
After a worker failure or a driver restart, `ray.train.get_checkpoint()` hands the newest
back and the trainer resumes from it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch

from ddetr_dist.config import Config, config_from_dict
from ddetr_dist import comm
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.run_store import RunStore
from ddetr_dist.errors import InputNotFoundError, VersionMismatchError


class RayCheckpointer:
    """The engine's `Checkpointer` on Ray Train (see engine/checkpointers.py)."""

    def __init__(self, run_id: str):
        self.run_id = run_id  # makes checkpoint folder names unique across restarts of the run

    @contextlib.contextmanager
    def latest(self) -> Iterator[Optional[Path]]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:  # the folder itself on a shared file system
            yield Path(folder)

    def folder(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"ddetr-ckpt-{step}-"))

    def register(self, folder: Path, step: int, metrics: dict) -> None:
        """`ray.train.report` copies this rank's finished files into the run's checkpoint of
        `step`, and the local folder goes. Ray registers the checkpoint once every rank has
        reported, so it never counts one whose parts are still being written. It runs in the
        checkpoint writer's thread (engine/checkpoint_writer.py), hence Ray's SYNC upload:
        that thread is already off the loop, and when it ends the checkpoint is uploaded
        and queued for registration; Ray's ASYNC mode would hand the same copy to yet another
        thread, whose failures Ray raises on its own and whose end the loop could not wait for."""
        import ray.train

        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
                             checkpoint_dir_name=RunDir.ray_checkpoint_name(step, self.run_id))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def report(self, metrics: dict) -> None:
        import ray.train

        ray.train.report(metrics)


def enter_driver_directory(cwd: str) -> None:
    """Relative paths in the config mean what they meant where the command ran: work in that
    directory when this node has it (one machine, or a file system shared at the same
    path); otherwise stay where Ray put us (e.g. a `ray job submit` working_dir)."""
    if Path(cwd).is_dir():
        os.chdir(cwd)


def check_shared_storage(run_dir: RunDir) -> None:
    """Rank 0 writes metrics, TensorBoard and model_final.pth into the run directory, and
    every rank writes its checkpoint shard there: each node must see the folder the driver
    made (an NFS/Lustre path, or a Kubernetes ReadWriteMany volume, at the same path), or
    reach the run in object storage with its own credentials."""
    import ray

    node = f"node {socket.gethostname()} ({ray.util.get_node_ip_address()})"
    if run_dir.store_uri:
        try:
            found = RunStore(run_dir).has(run_dir.config)
        except OSError as e:
            raise InputNotFoundError(
                f"{node} cannot read the run {run_dir.store_uri}: {e}. Every node needs the store's credentials and "
                "endpoint (for S3: an instance role or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL "
                "for a look-alike) in the environment its Ray was started with") from None
        if not found:
            raise InputNotFoundError(f"{node} finds no {run_dir.config.name} in {run_dir.store_uri}, which the driver "
                                     "wrote: do the driver and this node use the same endpoint (AWS_ENDPOINT_URL)?")
        return
    if not run_dir.config.is_file():
        raise RuntimeError(
            f"{node} cannot see the run directory {run_dir} "
            "that the driver created: on a multi-node cluster, output_dir must be a shared file system mounted at "
            "the same path on every node (NFS, Lustre, EFS, a ReadWriteMany volume), or object storage "
            "(output_dir=s3://bucket/prefix)")


def check_inputs(cfg: Config) -> None:
    """The input files this node reads at the start are here (the driver checked its own
    files; on a cluster, this node's may differ). A missing one ends the run at once: a
    restart would not find it either."""
    weights, init = cfg.model.backbone_weights, cfg.model.init_checkpoint
    if weights and not init and not Path(weights).is_file():  # an init checkpoint replaces them: not read
        raise InputNotFoundError(
            f"config key 'model.backbone_weights' = {weights!r}: no such file on node {socket.gethostname()} "
            f"(in {os.getcwd()}). On a cluster, every node needs it at that path (a shared file system), "
            "or '' trains the backbone from scratch")
    # model.init_checkpoint: read by a new run only, which checks it then (engine/init_weights.py)


def ray_progress_bar(total: int, initial: int, desc: str):
    """A bar that survives Ray's log streaming (drawn by the driver in its terminal)."""
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    bar = ray_tqdm(total=total, desc=desc, unit="batch")
    bar.update(initial)
    return bar


def versions() -> dict:
    """The versions every node must share with the driver (torch without its build suffix:
    a CPU head's +cpu build and the GPU nodes' +cu130 are the same torch)."""
    from importlib import metadata

    return {"ray": metadata.version("ray"), "deepspeed": metadata.version("deepspeed"),
            "torch": metadata.version("torch").split("+")[0]}


def worker_info() -> dict:
    import ray

    import ddetr_dist

    ctx = ray.get_runtime_context()
    # "package": where this worker's code came from (an installed copy, or a job's working_dir)
    return {"rank": comm.get_rank(), "pid": os.getpid(), "host": socket.gethostname(),
            "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "versions": versions(),
            "package": str(Path(ddetr_dist.__file__).parent)}


def check_versions(driver: dict, workers: list[dict]) -> None:
    """Every worker runs the driver's ray, deepspeed and torch (nodes installed at different
    times drift; DeepSpeed's checkpoints and Ray's protocol change between releases)."""
    differ = [w for w in workers if w["versions"] != driver]
    if differ:
        listed = "; ".join(f"rank {w['rank']} on {w['host']} ({w['node_ip']}): "
                           + ", ".join(f"{k} {v}" for k, v in w["versions"].items()) for w in differ)
        raise VersionMismatchError(
            f"the workers must run the driver's versions ({', '.join(f'{k} {v}' for k, v in driver.items())}), but "
            f"{listed}. Install every node from the same constraints.txt (tools/setup_env.sh) or the same image.")


def quiet_ray_train_reports() -> None:
    """Ray Train logs each rank's every report ("Reporting training result ...: TrainingReport(
    ...)") at INFO through a logger named by its file's path, outside `ray.train`, which
    RunConfig's LoggingConfig leaves alone."""
    from ddetr_dist.console import verbose

    if verbose():
        return
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ddetr_dist.console import quiet_libraries
    from ddetr_dist.engine.loop import Trainer
    from ddetr_dist.on_ray.preemption import WorkerNotices, fit_until_stopped
    from ddetr_dist.ops.build import use_our_ninja

    use_our_ninja()  # before DeepSpeed JIT-builds its comm op

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    quiet_ray_train_reports()
    cfg: Config = config_from_dict(loop_config["config"])
    run_dir = RunDir.at(loop_config["run_dir"])  # object storage: this node's working copy
    enter_driver_directory(loop_config["cwd"])
    check_shared_storage(run_dir)
    check_inputs(cfg)
    torch.set_num_threads(cfg.ray.cpus_per_worker)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run_id = comm.broadcast_object(loop_config["run_id"])
    workers = comm.all_gather_object(worker_info())
    check_versions(loop_config["versions"], workers)  # every rank raises alike: no one waits
    notices = WorkerNotices(run_id, comm.get_rank(), cfg.ray.save_on_sigterm_s)  # preemption, SIGTERM
    trainer = Trainer(cfg, run_dir, RayCheckpointer(run_id), device=device,
                      progress_bar=ray_progress_bar if loop_config["progress_bars"] else None, notices=notices)
    trainer.metrics.emit({"event": "workers", "step": trainer.progress.step, "epoch": trainer.progress.epoch,
                          "workers": workers})
    fit_until_stopped(trainer, notices)

