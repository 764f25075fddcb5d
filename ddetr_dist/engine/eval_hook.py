"""Evaluation inside the train loop, every `train.eval_every_epochs` epochs and at the end:
COCO AP (reported to Ray with the step's metrics, written to metrics.jsonl and the run's
`eval/<step>/`), the validation loss, and the fixed val images drawn with their
predictions (TensorBoard and `eval/<step>/predictions.png`)."""
from __future__ import annotations

import logging

import torch

from ddetr_dist.atomic import atomic_open
from ddetr_dist import comm
from ddetr_dist.config import Config
from ddetr_dist.engine.evaluate import REPORTED, evaluate, ground_truth
from ddetr_dist.engine.metrics import MetricsLog
from ddetr_dist.engine.pictures import PredictionPictures
from ddetr_dist.engine.run_dir import RunDir
from ddetr_dist.engine.tensorboard import TensorBoardSink
from ddetr_dist.engine.train_state import average_batchnorm_statistics

log = logging.getLogger("ddetr_dist.train")


class EvalHook:
    """Every rank builds one and calls it at the same steps (the evaluation is collective);
    rank 0 scores and writes. `module`: the model being trained (DeepSpeed's engine.module).
    `lockstep`: its parameters are partitioned (the engine runs ZeRO-3), so every forward
    gathers them collectively and the ranks evaluate batch for batch together."""

    def __init__(self, cfg: Config, run_dir: RunDir, module: torch.nn.Module | None, criterion, postprocess,
                 device: torch.device, metrics: MetricsLog, tensorboard: TensorBoardSink | None = None,
                 lockstep: bool = False):
        self.cfg, self.run_dir, self.lockstep = cfg, run_dir, lockstep
        self.module, self.criterion, self.postprocess, self.device = module, criterion, postprocess, device
        self.metrics, self.tensorboard = metrics, tensorboard
        self.enabled = bool(cfg.data.val_shards)
        # the ground truth lives on rank 0 only, which scores
        self.gt = ground_truth(cfg) if self.enabled and comm.get_rank() == 0 else None
        # every rank renders (a ZeRO-3 forward is collective); rank 0 draws and saves
        self.pictures = PredictionPictures(cfg, cfg.train.pictures, cfg.train.picture_threshold) \
            if self.enabled and cfg.train.pictures else None
        self.last_step: int | None = None

    def done_at(self, step: int) -> bool:
        """Evaluated at `step` already (in this process, or before a resume: rank 0 looks and
        tells the others, since the evaluation that follows is collective)."""
        if self.last_step == step:
            return True
        return comm.decided_by_rank_0(lambda: self.run_dir.eval_at(step).metrics.exists())

    def due(self, finished_epoch: int) -> bool:
        every = self.cfg.train.eval_every_epochs
        return self.enabled and bool(every) and (finished_epoch + 1) % every == 0

    def __call__(self, step: int, epoch: int) -> dict:
        """Collective. -> the metrics to report with the step."""
        cfg, module, out = self.cfg, self.module, self.run_dir.eval_at(step)
        average_batchnorm_statistics(module)
        # eagerly under train.compile (engine/compile.py): other sizes, too few images to repay a compile
        with torch.compiler.set_stance("force_eager"):
            result = evaluate(module, self.criterion, self.postprocess, cfg, self.device, out.path, self.gt,
                              progress=comm.get_rank() == 0,
                              lockstep=self.lockstep)
            picture = self.pictures.render(module, self.postprocess, self.device) if self.pictures else None
        module.train()
        self.last_step = step
        if comm.get_rank() != 0:
            return {k: result.metrics[k] for k in (*REPORTED, "val_loss")}
        if picture is not None:
            with atomic_open(out.predictions) as f:
                picture.save(f, format="PNG")
            if self.tensorboard is not None:
                self.tensorboard.add_image("predictions", picture, step)
        log.info("evaluation at step %d (epoch %d, %d images, %.0f s):\n%s\n  -> %s", step, epoch,
                 result.metrics["images"], result.metrics["eval_seconds"], result.table(), out.path)
        self.metrics.emit({"event": "eval", "step": step, "epoch": epoch, **result.metrics,
                           **{f"AP_{name}": ap for name, ap in result.per_category.items()}})
        return {k: result.metrics[k] for k in (*REPORTED, "val_loss")}
