"""Evaluation inside the train loop, every `train.eval_every_epochs` epochs and at the end:
COCO AP (reported to Ray with the step's metrics, written to metrics.jsonl and
`eval/<step>/`), the validation loss, and the fixed val images drawn with their
predictions (TensorBoard and `eval/<step>/predictions.png`)."""
from __future__ import annotations

import logging

from ddetr_dist.atomic import atomic_open
from ddetr_dist import comm
from ddetr_dist.engine.evaluate import REPORTED, evaluate, ground_truth
from ddetr_dist.engine.pictures import PredictionPictures
from ddetr_dist.engine.train_state import average_batchnorm_statistics

log = logging.getLogger("ddetr_dist.train")
EVAL_DIR = "eval"


class EvalHook:
    def __init__(self, trainer):
        cfg = trainer.cfg
        self.enabled = bool(cfg.data.val_shards)
        # the ground truth lives on rank 0 only, which scores
        self.gt = ground_truth(cfg) if self.enabled and comm.get_rank() == 0 else None
        # every rank renders (a ZeRO-3 forward is collective); rank 0 draws and saves
        self.pictures = PredictionPictures(cfg, cfg.train.pictures, cfg.train.picture_threshold) \
            if self.enabled and cfg.train.pictures else None
        self.last_step: int | None = None

    def done_at(self, trainer, step: int) -> bool:
        """Evaluated at `step` already (in this process, or before a resume: rank 0 looks and
        tells the others, since the evaluation that follows is collective)."""
        if self.last_step == step:
            return True
        return comm.decided_by_rank_0(lambda: (trainer.run_dir / EVAL_DIR / f"{step:08d}" / "metrics.json").exists())

    def due(self, trainer, finished_epoch: int) -> bool:
        every = trainer.cfg.train.eval_every_epochs
        return self.enabled and bool(every) and (finished_epoch + 1) % every == 0

    def __call__(self, trainer) -> dict:
        """Collective. -> the metrics to report with the step."""
        p, cfg = trainer.progress, trainer.cfg
        out_dir = trainer.run_dir / EVAL_DIR / f"{p.step:08d}"
        module = trainer.engine.module
        average_batchnorm_statistics(module)
        result = evaluate(module, trainer.criterion, trainer.postprocess, cfg, trainer.device, out_dir, self.gt,
                          progress=trainer.rank == 0, lockstep=cfg.train.zero_stage == 3)
        picture = self.pictures.render(module, trainer.postprocess, trainer.device) if self.pictures else None
        module.train()
        self.last_step = p.step
        if trainer.rank != 0:
            return {k: result.metrics[k] for k in (*REPORTED, "val_loss")}
        if picture is not None:
            with atomic_open(out_dir / "predictions.png") as f:
                picture.save(f, format="PNG")
            if trainer.tensorboard is not None:
                trainer.tensorboard.add_image("predictions", picture, p.step)
        log.info("evaluation at step %d (epoch %d, %d images, %.0f s):\n%s\n  -> %s", p.step, p.epoch,
                 result.metrics["images"], result.metrics["eval_seconds"], result.table(), out_dir)
        trainer.metrics.emit({"event": "eval", "step": p.step, "epoch": p.epoch, **result.metrics,
                              **{f"AP_{name}": ap for name, ap in result.per_category.items()}})
        return {k: result.metrics[k] for k in (*REPORTED, "val_loss")}
