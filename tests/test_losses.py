"""The dynamic-margin sub-centre ArcFace loss against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid_ray.errors import ConfigError
from reid_ray.train.losses import DynamicSubCenterArcFaceLoss, dynamic_margins


def unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def softmax_ce(target_logit: float, other_logits: list[float]) -> float:
    """-log softmax of the target among [target, *others], by hand."""
    den = math.exp(target_logit) + sum(math.exp(o) for o in other_logits)
    return -math.log(math.exp(target_logit) / den)


def make_loss(margins, centres_deg: list[list[float]], scale: float) -> DynamicSubCenterArcFaceLoss:
    """Loss over 2-d embeddings with the sub-centres of class c at ``centres_deg[c]``."""
    k = len(centres_deg[0])
    loss = DynamicSubCenterArcFaceLoss(
        num_classes=len(centres_deg), embedding_size=2, margins=margins, scale=scale, sub_centers=k
    )
    # PML lays W out as [D, C * k], the k sub-centres of class c in columns c*k .. c*k+k-1
    cols = [unit(d) for centres in centres_deg for d in centres]
    with torch.no_grad():
        loss.W.copy_(torch.tensor(cols, dtype=torch.float32).T)
    return loss


def test_dynamic_margins_by_hand():
    # n ** -1/4 = 1, 1/2, 1/3 -> rescaled into [0.1, 0.5]: 0.5, 0.1 + 0.4 * (1/6) / (2/3), 0.1
    m = dynamic_margins([1, 16, 81], margin=0.5, margin_min=0.1, margin_lambda=0.25)
    np.testing.assert_allclose(m, [0.5, 0.2, 0.1], rtol=0, atol=1e-12)
    # rarer class -> larger margin, whatever the order
    m = dynamic_margins([81, 1, 16], margin=0.5, margin_min=0.1)
    np.testing.assert_allclose(m, [0.1, 0.5, 0.2], atol=1e-12)


def test_dynamic_margins_degenerate_cases():
    np.testing.assert_allclose(dynamic_margins([5, 5, 5], margin=0.4, margin_min=0.1), [0.4] * 3)
    np.testing.assert_allclose(dynamic_margins([1, 100], 0.4, 0.1, margin_lambda=0.0), [0.4, 0.4])
    np.testing.assert_allclose(dynamic_margins([1, 100], 0.3, 0.3), [0.3, 0.3])
    assert dynamic_margins([]).shape == (0,)
    with pytest.raises(ConfigError, match="positive"):
        dynamic_margins([3, 0])
    with pytest.raises(ConfigError):
        dynamic_margins([3, 4], margin=0.1, margin_min=0.2)


def test_sub_center_loss_with_per_class_margins_by_hand():
    s, m0, m1 = 4.0, 0.5, 0.1
    # class 0: sub-centres at 0 and 90 degrees; class 1: at 180 and 270 degrees
    loss_fn = make_loss([m0, m1], [[0.0, 90.0], [180.0, 270.0]], scale=s)
    emb = torch.tensor([unit(30.0), unit(200.0)])
    labels = torch.tensor([0, 1])
    got = loss_fn(emb, labels).item()

    # sample 1 (30 deg, class 0): nearest class-0 centre 30 deg away, best class-1 cos -0.5
    l1 = softmax_ce(s * math.cos(math.radians(30) + m0), [s * -0.5])
    # sample 2 (200 deg, class 1): nearest class-1 centre 20 deg away; best class-0 cos(110)
    l2 = softmax_ce(s * math.cos(math.radians(20) + m1), [s * math.cos(math.radians(110))])
    assert got == pytest.approx((l1 + l2) / 2, rel=1e-4)

    # the margin is per class: swapping the margins changes each sample's term
    swapped = make_loss([m1, m0], [[0.0, 90.0], [180.0, 270.0]], scale=s)
    l1s = softmax_ce(s * math.cos(math.radians(30) + m1), [s * -0.5])
    l2s = softmax_ce(s * math.cos(math.radians(20) + m0), [s * math.cos(math.radians(110))])
    assert swapped(emb, labels).item() == pytest.approx((l1s + l2s) / 2, rel=1e-4)


def test_past_pi_minus_margin_uses_the_linear_fallback():
    s, m = 4.0, 0.5
    loss_fn = make_loss([m, 0.2], [[0.0], [180.0]], scale=s)
    # 170 degrees from its own centre: theta + m > pi -> cos(theta) - m sin(m)
    got = loss_fn(torch.tensor([unit(170.0)]), torch.tensor([0])).item()
    theta = math.radians(170)
    want = softmax_ce(s * (math.cos(theta) - m * math.sin(m)), [s * math.cos(math.radians(10))])
    assert got == pytest.approx(want, rel=1e-4)


def test_equal_margins_match_pml_sub_center_arcface():
    from pytorch_metric_learning.losses import SubCenterArcFaceLoss

    torch.manual_seed(0)
    ours = DynamicSubCenterArcFaceLoss(
        num_classes=3, embedding_size=8, margins=[0.4] * 3, scale=16, sub_centers=2
    )
    pml = SubCenterArcFaceLoss(
        num_classes=3, embedding_size=8, margin=math.degrees(0.4), scale=16, sub_centers=2
    )
    with torch.no_grad():
        pml.W.copy_(ours.W)
    emb = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert ours(emb, labels).item() == pytest.approx(pml(emb, labels).item(), rel=1e-5)


def test_weights_get_gradients_and_state_holds_margins():
    loss_fn = DynamicSubCenterArcFaceLoss(num_classes=2, embedding_size=4, margins=[0.3, 0.1])
    emb = torch.randn(4, 4, requires_grad=True)
    loss_fn(emb, torch.tensor([0, 1, 1, 0])).backward()
    assert loss_fn.W.grad is not None and torch.isfinite(loss_fn.W.grad).all()
    assert emb.grad is not None
    state = loss_fn.state_dict()
    assert torch.allclose(state["class_margins"], torch.tensor([0.3, 0.1]))


def test_margins_shape_is_checked():
    with pytest.raises(ConfigError, match="margins must have shape"):
        DynamicSubCenterArcFaceLoss(num_classes=3, embedding_size=4, margins=[0.3, 0.1])
