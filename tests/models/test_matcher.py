"""The Hungarian matcher finds the cheapest assignment: checked against brute force."""
from __future__ import annotations

import itertools

import pytest
import torch

from ddetr_dist.models.matcher import HungarianMatcher


def random_case(generator, batch, queries, sizes, classes=4):
    outputs = {"pred_logits": torch.randn(batch, queries, classes, generator=generator),
               "pred_boxes": torch.rand(batch, queries, 2, generator=generator).mul(0.6).add(0.2)}
    outputs["pred_boxes"] = torch.cat([outputs["pred_boxes"],
                                       torch.rand(batch, queries, 2, generator=generator).mul(0.3).add(0.05)], -1)
    targets = []
    for k in sizes:
        centres = torch.rand(k, 2, generator=generator).mul(0.6).add(0.2)
        sizes_ = torch.rand(k, 2, generator=generator).mul(0.3).add(0.05)
        targets.append({"labels": torch.randint(0, classes, (k,), generator=generator),
                        "boxes": torch.cat([centres, sizes_], -1)})
    return outputs, targets


def brute_force_cost(cost: torch.Tensor) -> float:
    """min over all injective maps of targets to queries of the summed cost; cost [Q, K]."""
    queries, k = cost.shape
    return min(sum(cost[q, j].item() for j, q in enumerate(perm))
               for perm in itertools.permutations(range(queries), k))


@pytest.mark.parametrize("seed", range(8))
def test_matches_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    queries = 5
    sizes = [int(torch.randint(0, 5, (1,), generator=generator)) for _ in range(3)]
    outputs, targets = random_case(generator, 3, queries, sizes)
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    cost = matcher.cost_matrix(outputs, targets)
    indices = matcher(outputs, targets)
    for b, ((src, tgt), block) in enumerate(zip(indices, cost.split(sizes, -1))):
        k = sizes[b]
        assert len(src) == len(tgt) == k
        assert sorted(tgt.tolist()) == list(range(k))
        assert len(set(src.tolist())) == k  # one query per target
        found = sum(block[b, s, t].item() for s, t in zip(src.tolist(), tgt.tolist()))
        assert found == pytest.approx(brute_force_cost(block[b]), abs=1e-5)


def test_cost_matrix_terms_are_the_documented_ones():
    generator = torch.Generator().manual_seed(0)
    outputs, targets = random_case(generator, 1, 3, [2])
    only_l1 = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=0).cost_matrix(outputs, targets)
    expected = (outputs["pred_boxes"][0, :, None] - targets[0]["boxes"][None]).abs().sum(-1)
    torch.testing.assert_close(only_l1[0], expected)
    only_class = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0).cost_matrix(outputs, targets)
    # a query more confident in the target's class costs less
    prob = outputs["pred_logits"][0].sigmoid()[:, targets[0]["labels"]]
    assert (only_class[0].argsort(0) == prob.argsort(0, descending=True)).all()


def test_perfect_prediction_is_matched_to_its_target():
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]])
    outputs = {"pred_logits": torch.full((1, 4, 3), -5.0),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2],
                                            [0.1, 0.9, 0.1, 0.1], [0.2, 0.2, 0.1, 0.1]]])}
    outputs["pred_logits"][0, 1, 2] = outputs["pred_logits"][0, 3, 0] = 5.0
    targets = [{"labels": torch.tensor([0, 2]), "boxes": boxes}]
    (src, tgt), = HungarianMatcher()(outputs, targets)
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 3, 1: 1}


def test_empty_targets_and_diverged_predictions():
    outputs, targets = random_case(torch.Generator().manual_seed(0), 2, 4, [0, 0])
    assert [(len(s), len(t)) for s, t in HungarianMatcher()(outputs, targets)] == [(0, 0), (0, 0)]
    outputs, targets = random_case(torch.Generator().manual_seed(0), 1, 4, [2])
    outputs["pred_boxes"][0, 1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="set_cost"):
        HungarianMatcher(0, 0, 0)


def test_layers_matched_together_match_as_each_alone():
    generator = torch.Generator().manual_seed(0)
    layers, targets = [], None
    for _ in range(3):  # three decoder layers' outputs against one batch's targets
        outputs, new_targets = random_case(generator, 3, 6, [2, 0, 4])
        layers.append(outputs)
        targets = targets or new_targets
    matcher = HungarianMatcher()
    together = matcher.match_layers(layers, targets)
    assert len(together) == 3
    for outputs, indices in zip(layers, together):
        alone = matcher(outputs, targets)
        assert [(i.tolist(), j.tolist()) for i, j in indices] == [(i.tolist(), j.tolist()) for i, j in alone]
