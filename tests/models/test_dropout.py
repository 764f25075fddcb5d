"""The CPU dropout: torch's keep probability and scale, unbiased in every one of the four
elements that share a 64-bit draw, the same gradient mask as the forward, and the seed's
numbers (a resumed run draws the same masks)."""
import pytest
import torch

from ddetr_dist.models.dropout import Dropout, keep_mask


def test_every_element_of_a_draw_is_kept_with_probability_one_minus_p():
    torch.manual_seed(0)
    keep = keep_mask(torch.Size([400_000, 4]), 0.1).float()
    # each column is one of the four 16-bit lanes of a draw: a lane whose bits were not all
    # random (the sign bit) would be off by far more than the 0.002 allowed here
    torch.testing.assert_close(keep.mean(0), torch.full((4,), 0.9), rtol=0, atol=2e-3)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_forward_and_backward_drop_the_same_elements_and_scale_the_rest(p):
    torch.manual_seed(0)
    x = torch.randn(3, 1001, 7, requires_grad=True)  # not a multiple of 4 elements
    layer = Dropout(p).train()
    y = layer(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01


def test_evaluation_is_the_identity_and_the_seed_gives_the_same_mask():
    x = torch.randn(64, 64)
    assert torch.equal(Dropout(0.1).eval()(x), x)
    torch.manual_seed(3)
    first = Dropout(0.1).train()(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.1).train()(x), first)
    assert Dropout(0.1).state_dict() == {}
