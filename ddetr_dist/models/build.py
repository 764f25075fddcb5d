"""`build_model`: config -> (model, criterion, postprocess), and the official variants by name."""
from __future__ import annotations

import dataclasses

from ddetr_dist.config import AUTO, COCO_NUM_CLASSES, Config, LossConfig, ModelConfig

from .backbone import Backbone, Joiner
from .checkpoint import load_backbone_weights
from .criterion import SetCriterion, build_weight_dict
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess

# The four models of the paper's Table 1 / the official configs/ scripts.
VARIANTS: dict[str, dict] = {
    "base": {"with_box_refine": False, "two_stage": False, "num_feature_levels": 4},
    "box_refine": {"with_box_refine": True, "two_stage": False, "num_feature_levels": 4},
    "two_stage": {"with_box_refine": True, "two_stage": True, "num_feature_levels": 4},
    "single_scale": {"with_box_refine": False, "two_stage": False, "num_feature_levels": 1},
}


def apply_variant(cfg: ModelConfig, variant: str | None) -> ModelConfig:
    if variant is None:
        return cfg
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant '{variant}'; valid variants: {', '.join(VARIANTS)}")
    return dataclasses.replace(cfg, **VARIANTS[variant])


def variant_of(cfg: ModelConfig) -> str | None:
    """The name of the official variant `cfg` is an instance of, or None."""
    for name, preset in VARIANTS.items():
        if all(getattr(cfg, k) == v for k, v in preset.items()):
            return name
    return None


def check_model_config(cfg: ModelConfig) -> None:
    """Fail at build time, naming the key, rather than deep inside a forward pass."""
    if cfg.hidden_dim % 32 != 0:
        raise ValueError(f"model.hidden_dim must be a multiple of 32 (GroupNorm(32) in input_proj), "
                         f"got {cfg.hidden_dim}")
    if cfg.hidden_dim % cfg.nheads != 0:
        raise ValueError(f"model.hidden_dim ({cfg.hidden_dim}) must be divisible by model.nheads ({cfg.nheads})")
    if cfg.num_classes == AUTO:
        raise ValueError("model.num_classes is 'auto': `ddetr train` resolves it from the train data (max category "
                         "id + 1); give a number when building a model by hand (e.g. model.num_classes=91 for COCO)")
    for key in ("enc_layers", "dec_layers", "enc_n_points", "dec_n_points", "num_queries", "num_classes",
                "num_feature_levels", "dim_feedforward"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"model.{key} must be >= 1, got {getattr(cfg, key)}")


def build_model(cfg: Config | ModelConfig | None = None, variant: str | None = None):
    """-> (DeformableDETR, SetCriterion, PostProcess). `cfg` defaults to the official
    settings (COCO's 91 classes); `variant` ('base', 'box_refine', 'two_stage',
    'single_scale') sets box refinement, two-stage and the number of levels on top of it."""
    if isinstance(cfg, Config):
        model_cfg, loss_cfg = cfg.model, cfg.loss
    elif isinstance(cfg, ModelConfig) or cfg is None:
        model_cfg, loss_cfg = cfg or ModelConfig(num_classes=COCO_NUM_CLASSES), LossConfig()
    else:
        raise TypeError(f"build_model: cfg must be a Config, ModelConfig or None, got {type(cfg).__name__}")
    m = apply_variant(model_cfg, variant)
    check_model_config(m)

    backbone = Joiner(Backbone(m.backbone_depth, num_outputs=min(m.num_feature_levels, 3), dilation=m.dilation,
                               norm=m.backbone_norm, frozen_stages=m.backbone_frozen_stages),
                      PositionEmbeddingSine(m.hidden_dim // 2, scale=m.position_embedding_scale))
    transformer = DeformableTransformer(
        d_model=m.hidden_dim, nhead=m.nheads, num_encoder_layers=m.enc_layers, num_decoder_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward, dropout=m.dropout, num_feature_levels=m.num_feature_levels,
        dec_n_points=m.dec_n_points, enc_n_points=m.enc_n_points, two_stage=m.two_stage,
        two_stage_num_proposals=m.num_queries, activation_checkpointing=m.activation_checkpointing,
        msda_backend=m.msda_backend)
    model = DeformableDETR(backbone, transformer, num_classes=m.num_classes, num_queries=m.num_queries,
                           num_feature_levels=m.num_feature_levels, aux_loss=m.aux_loss,
                           with_box_refine=m.with_box_refine, two_stage=m.two_stage)
    if m.backbone_weights and not m.init_checkpoint:  # the init checkpoint's backbone would replace them
        load_backbone_weights(m.backbone_weights, model)

    matcher = HungarianMatcher(loss_cfg.set_cost_class, loss_cfg.set_cost_bbox, loss_cfg.set_cost_giou,
                               focal_alpha=loss_cfg.focal_alpha)
    weight_dict = build_weight_dict(loss_cfg.cls_loss_coef, loss_cfg.bbox_loss_coef, loss_cfg.giou_loss_coef,
                                    m.dec_layers, m.aux_loss, m.two_stage)
    criterion = SetCriterion(m.num_classes, matcher, weight_dict, focal_alpha=loss_cfg.focal_alpha)
    return model, criterion, PostProcess()
