"""The world size a run (re)starts at, and what it means for the batch and the learning rate.

With `ray.num_workers` a range (docs/elastic.md), Ray restarts the workers at another world
size when a node is lost or comes back, and the run continues from its last checkpoint.
What stays: the batch of each worker (`data.batch_size` x `train.grad_accum`), hence the
memory each needs. What follows the world size: the global batch, and the optimizer steps
an epoch takes. The learning rate stays as configured (LR_RULE, "fixed"): AdamW divides each
update by the running size of the gradients, so the lr, not the batch, sets a step's size
(the linear scaling rule was made for SGD), and a rate that jumped at each resize would jolt
a run through every node it loses and regains. docs/elastic.md says the same to users.

Every start of the workers leaves one "world_size" record in metrics.jsonl (first start,
restart, resize) and its console line (engine/metrics.py), so a run's world sizes read in order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ddetr_dist import comm
from ddetr_dist.config import Config
from ddetr_dist.engine.deepspeed_config import save_deepspeed_config
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.train_state import Progress

if TYPE_CHECKING:  # metrics.py draws this module's console line
    from ddetr_dist.engine.metrics import MetricsLog

LR_RULE = "fixed"  # the learning rate does not follow the global batch (see above)


def record_world_size(metrics: MetricsLog, cfg: Config, world_size: int, progress: Progress, steps_per_epoch: int,
                      from_world_size: int | None, ds_config: dict, run_dir: RunDir) -> None:
    """(Every start of the workers.) Its record and console line, and, on rank 0, the
    DeepSpeed JSON it runs with (with a range of workers, its batch follows the world size)."""
    metrics.emit(world_size_record(cfg, world_size, progress.step, progress.epoch, from_world_size, steps_per_epoch))
    if comm.get_rank() == 0:
        save_deepspeed_config(ds_config, run_dir.deepspeed_config)


def world_size_record(cfg: Config, world_size: int, step: int, epoch: int, from_world_size: int | None,
                      steps_per_epoch: int) -> dict:
    """The metrics record of a start at `world_size` (`from_world_size`: the checkpoint's,
    None for a run that starts without one)."""
    per_worker = cfg.data.batch_size * cfg.train.grad_accum
    fewest, most = cfg.ray.worker_range()
    return {"event": "world_size", "step": step, "epoch": epoch, "world_size": world_size,
            "from_world_size": from_world_size,
            "resized": from_world_size is not None and from_world_size != world_size,
            "workers_range": [fewest, most], "batch_per_worker": per_worker, "global_batch": per_worker * world_size,
            "steps_per_epoch": steps_per_epoch, "lr_rule": LR_RULE, "lr": cfg.optim.lr,
            "lr_backbone": cfg.optim.lr_backbone}


def world_size_line(record: dict) -> str:
    """The console line of a `world_size_record`."""
    r = record
    was = r["from_world_size"]
    if r["resized"]:
        old_batch = r["batch_per_worker"] * was
        what = (f"resized from {was} to {r['world_size']} workers at step {r['step']}: global batch "
                f"{old_batch} -> {r['global_batch']}")
    else:
        what = f"{r['world_size']} worker(s) from step {r['step']}: global batch {r['global_batch']}"
    fewest, most = r["workers_range"]
    elastic = f" (elastic: {fewest}-{most} workers)" if fewest != most else ""
    return (f"{what} ({r['batch_per_worker']} per worker), {r['steps_per_epoch']} steps per epoch{elastic}; "
            f"lr {r['lr']:g} {r['lr_rule']} (not scaled with the global batch)")
