"""Reading checkpoints: released official ones (`{'model': state_dict, ...}`), ours (the same
plus a 'ddetr_dist' entry with the model config), and torchvision ResNet weights for the
backbone. Our parameter names equal the official ones, so no key is renamed anywhere."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from ddetr_dist.config import ModelConfig

from .resnet import RESNET_LAYOUTS

log = logging.getLogger(__name__)
# Official training checkpoints pickle their argparse.Namespace of arguments; it is plain
# data, so the weights-only unpickler may build it (registered once: torch >= 2.4).
torch.serialization.add_safe_globals([argparse.Namespace])

# class heads: per decoder layer, and (two-stage) the same modules seen from the decoder
CLASS_HEAD_KEY = re.compile(r"^(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)$")
BACKBONE_PREFIX = "backbone.0.body."
MAX_KEYS_SHOWN = 20
MODEL_HINT = ("Build the model with the checkpoint's settings (variant, backbone_depth, hidden_dim, layers, "
              "num_feature_levels); `ddetr convert-checkpoint` infers them from the file.")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


def read_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a downloaded file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict):
        raise CheckpointMismatchError(f"{path}: expected a dict checkpoint, got {type(ckpt).__name__}")
    return ckpt


def model_state_dict(ckpt: dict, path: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint dict ({'model': sd, ...}), or the dict itself if it is one."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointMismatchError(f"{path}: no state dict found; expected {{'model': state_dict}} "
                                      f"(top-level keys: {sorted(ckpt)[:MAX_KEYS_SHOWN]})")
    return sd


def _listing(title: str, items: list[str]) -> str:
    shown = items[:MAX_KEYS_SHOWN]
    more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown) + more


class StateDictDiff(NamedTuple):
    missing: list[str]
    unexpected: list[str]
    misshaped: list[str]


def compare_state_dicts(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> StateDictDiff:
    """Keys of `expected` absent from `found`, keys of `found` not in `expected`, and common
    keys whose shapes differ."""
    return StateDictDiff(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        misshaped=[k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)])


def mismatch_error(where: str, expected: dict, found: dict, diff: StateDictDiff, hint: str) -> CheckpointMismatchError:
    parts = [f"{where} does not fit the model:"]
    if diff.missing:
        parts.append(_listing("missing keys", diff.missing))
    if diff.unexpected:
        parts.append(_listing("unexpected keys", diff.unexpected))
    if diff.misshaped:
        parts.append(_listing("mis-shaped keys (checkpoint vs model)",
                              [f"{k}: {tuple(found[k].shape)} vs {tuple(expected[k].shape)}" for k in diff.misshaped]))
    parts.append(hint)
    return CheckpointMismatchError("\n".join(parts))


def require_match(where: str, expected: dict, found: dict, hint: str = MODEL_HINT) -> None:
    diff = compare_state_dicts(expected, found)
    if any(diff):
        raise mismatch_error(where, expected, found, diff, hint)


def without_batchnorm_counters(sd: dict) -> dict:
    """BatchNorm's num_batches_tracked is a counter, not a weight: frozen BatchNorm has none,
    so a checkpoint trained with trainable BatchNorm still fits a frozen one and back."""
    return {k: v for k, v in sd.items() if not k.endswith(".num_batches_tracked")}


def class_heads_to_reinitialise(where: str, own: dict, sd: dict) -> list[str]:
    """How checkpoint state dict `sd` fits a model's `own` (shapes only: `own` may be a
    meta-device model's): -> [] when it loads as is, the keys of every class head when only
    their number of classes differs (fine-tuning on other classes); anything else raises
    CheckpointMismatchError naming the tensors."""
    own, sd = without_batchnorm_counters(own), without_batchnorm_counters(sd)
    diff = compare_state_dicts(own, sd)
    if not any(diff):
        return []
    if diff.misshaped and not diff.missing and not diff.unexpected and all(map(CLASS_HEAD_KEY.match, diff.misshaped)):
        return [k for k in own if CLASS_HEAD_KEY.match(k)]
    raise mismatch_error(where, own, sd, diff, MODEL_HINT)


def load_official_checkpoint(path: str | Path, model: nn.Module) -> list[str]:
    """Load a released checkpoint (or ours) into `model`, strictly. If only the class heads
    differ in shape (fine-tuning with another number of classes), they are re-initialised
    instead and their keys returned (and logged); otherwise the return is []."""
    sd = model_state_dict(read_checkpoint(path), path)
    own = model.state_dict()
    reinitialised = class_heads_to_reinitialise(f"checkpoint {path}", own, sd)
    if reinitialised:
        ckpt_classes, model_classes = sd[reinitialised[0]].shape[0], own[reinitialised[0]].shape[0]
        model.reset_class_heads()
        fresh = model.state_dict()
        sd = {**sd, **{k: fresh[k] for k in reinitialised}}
        log.warning("checkpoint %s has %d classes, the model %d: the class heads (class_embed.*) are "
                    "re-initialised, everything else is loaded", path, ckpt_classes, model_classes)
    # the model's own counters where the checkpoint has none (frozen BatchNorm's checkpoint)
    sd = {**{k: v for k, v in own.items() if k.endswith(".num_batches_tracked")}, **sd}
    model.load_state_dict(sd, strict=True)
    return reinitialised


def load_backbone_weights(path: str | Path, model: nn.Module) -> None:
    """Start the backbone from a torchvision ResNet checkpoint (e.g. ImageNet weights, as the
    official training does). Its classifier (fc.*) and BatchNorm counters are dropped."""
    sd = model_state_dict(read_checkpoint(path), path)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    body = model.backbone[0].body
    require_match(f"backbone weights {path} (model.backbone_weights)", body.state_dict(), sd,
                  hint="Set model.backbone_depth to the depth of the ResNet in the file.")
    body.load_state_dict(sd, strict=True)


def _count_indexed(sd: dict, prefix: str) -> int:
    """How many `prefix<N>.` modules the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


def infer_model_config(sd: dict[str, torch.Tensor], base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig whose model has the state dict `sd`'s keys and shapes, as far as
    weights tell: variant, backbone depth, widths, layers, levels, points (given
    base.nheads), classes, queries. The rest (nheads, dropout, dilation, two-stage proposal
    count) comes from `base`."""
    base = base or ModelConfig()
    if "transformer.level_embed" not in sd or "class_embed.0.weight" not in sd:
        raise CheckpointMismatchError("not a Deformable DETR state dict (no transformer.level_embed / class_embed.0)")
    num_levels, hidden_dim = sd["transformer.level_embed"].shape
    blocks = tuple(_count_indexed(sd, f"{BACKBONE_PREFIX}layer{i}.") for i in range(1, 5))
    kind = "bottleneck" if f"{BACKBONE_PREFIX}layer1.0.conv3.weight" in sd else "basic"
    depths = [d for d, layout in RESNET_LAYOUTS.items() if layout == (kind, blocks)]
    if not depths:
        raise CheckpointMismatchError(f"backbone with {kind} blocks {blocks} is not ResNet-{sorted(RESNET_LAYOUTS)}")

    def points(attn: str) -> int:
        return sd[f"{attn}.attention_weights.weight"].shape[0] // (base.nheads * num_levels)

    inferred = {
        "backbone_depth": depths[0],
        "hidden_dim": int(hidden_dim),
        "num_feature_levels": int(num_levels),
        "enc_layers": _count_indexed(sd, "transformer.encoder.layers."),
        "dec_layers": _count_indexed(sd, "transformer.decoder.layers."),
        "dim_feedforward": sd["transformer.encoder.layers.0.linear1.weight"].shape[0],
        "enc_n_points": points("transformer.encoder.layers.0.self_attn"),
        "dec_n_points": points("transformer.decoder.layers.0.cross_attn"),
        "num_classes": sd["class_embed.0.weight"].shape[0],
        "with_box_refine": any(k.startswith("transformer.decoder.bbox_embed.") for k in sd),
        "two_stage": "transformer.enc_output.weight" in sd,
    }
    if "query_embed.weight" in sd:
        inferred["num_queries"] = sd["query_embed.weight"].shape[0]
    return dataclasses.replace(base, **inferred)
