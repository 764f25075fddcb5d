"""One-process end-to-end run of the pipeline: shards -> train loader -> Deformable DETR ->
Hungarian matching + losses -> AdamW steps -> post-processing on validation images.

`make demo` runs it on the built-in demo dataset until the distributed trainer
(`ddetr train`, Ray + DeepSpeed) lands; it shows that every stage works together and
that the loss goes down, and prints the fraction of step time spent waiting for data.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch

from ddetr_dist.config import load_config
from ddetr_dist.data import build_eval_loader, build_train_loader
from ddetr_dist.models import build_model


def param_groups(model: torch.nn.Module, lr: float, lr_backbone: float, backbone_names: tuple[str, ...]):
    """The official recipe: the backbone at its own (lower) lr, sampling offsets and
    reference points at lr/10, everything else at lr."""
    slow = ("sampling_offsets", "reference_points")
    groups = {"backbone": [], "slow": [], "rest": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = ("backbone" if any(name.startswith(b) for b in backbone_names)
               else "slow" if any(s in name for s in slow) else "rest")
        groups[key].append(p)
    return [{"params": groups["rest"], "lr": lr},
            {"params": groups["backbone"], "lr": lr_backbone},
            {"params": groups["slow"], "lr": lr * 0.1}]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddetr_dist.engine.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(cfg.seed)
    model, criterion, postprocess = build_model(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters, {cfg.model.num_feature_levels} levels, "
          f"{cfg.model.enc_layers}+{cfg.model.dec_layers} layers, {cfg.model.num_queries} queries")
    optimizer = torch.optim.AdamW(param_groups(model, args.lr, args.lr * 0.1, cfg.model.lr_backbone_names),
                                  weight_decay=1e-4)
    loader = build_train_loader(cfg.data, seed=cfg.seed, rank=0, world_size=1)

    model.train()
    step, first_loss, wait, total = 0, None, 0.0, 0.0
    while step < args.steps:
        tick = time.perf_counter()
        for images, padding_mask, targets in loader:
            got_batch = time.perf_counter()
            losses = criterion(model(images, padding_mask), targets)
            loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            optimizer.step()
            done = time.perf_counter()
            wait, total = wait + (got_batch - tick), total + (done - tick)
            loss_value = loss.item()
            first_loss = loss_value if first_loss is None else first_loss
            step += 1
            if step % 5 == 0 or step in (1, args.steps):
                print(f"step {step:4d}  loss {loss_value:8.4f}  class {losses['loss_ce'].item():.4f}  "
                      f"l1 {losses['loss_bbox'].item():.4f}  giou {losses['loss_giou'].item():.4f}  "
                      f"{done - tick:.2f} s/step  data wait {wait / total:.0%}")
            if step >= args.steps:
                break
            tick = time.perf_counter()
    print(f"loss {first_loss:.3f} -> {loss_value:.3f} over {step} steps; "
          f"skipped samples: {loader.skips.summary()}")

    model.eval()
    images, padding_mask, targets = next(iter(build_eval_loader(cfg.data, rank=0, world_size=1)))
    with torch.no_grad():
        results = postprocess(model(images, padding_mask), torch.stack([t["orig_size"] for t in targets]))
    for target, result in zip(targets, results):
        keep = result["scores"] > 0.3
        print(f"val image {int(target['image_id'])}: {len(target['labels'])} objects, "
              f"{int(keep.sum())} detections with score > 0.3 (best {float(result['scores'].max()):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
