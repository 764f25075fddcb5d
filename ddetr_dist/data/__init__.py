"""Data: COCO -> webdataset shards, streaming loaders for training and evaluation,
transforms, collate, and the built-in demo data set.

    from ddetr_dist.data import build_train_loader, build_eval_loader
    loader = build_train_loader(cfg.data, seed=cfg.seed)        # rank/world from ddetr_dist.comm
    for images, padding_mask, targets in loader: ...
    loader.skips.summary()                                      # bad data, counted by reason
"""
from ddetr_dist.data.collate import collate
from ddetr_dist.data.manifest import ShardSet, load_shard_set
from ddetr_dist.data.skips import REASONS as SKIP_REASONS
from ddetr_dist.data.skips import SkipCounter
from ddetr_dist.data.streaming import DetectionLoader, build_eval_loader, build_train_loader
from ddetr_dist.data.transforms import build_train_transform, build_val_transform

__all__ = ["DetectionLoader", "SKIP_REASONS", "ShardSet", "SkipCounter", "build_eval_loader", "build_train_loader",
           "build_train_transform", "build_val_transform", "collate", "load_shard_set"]
