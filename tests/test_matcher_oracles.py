"""Value-level oracles of the Hungarian matcher of the region proposal network
(Uni-Perceiver v2, Sec. 4.1 "Loss Function"; the matching of Mask DINO, Sec. 3): every cost
term against a hand computation or a float64 formula written here, their weighted sum with
all-different weights, and an assignment that no sign flip of a single term reproduces.

The matcher's sampled mask points are controlled: torch.rand (its only random draw) is
replaced by a fixed set of pixel centres of the mask-feature map, where bilinear sampling
(align_corners=False) reads the pixel itself, so the oracle needs no interpolation.
"""
import itertools
import math

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from unip_v2.modeling.image_encoder import HungarianMatcher
from unip_v2.modeling.image_encoder.matcher import focal_cost, pairwise_mask_costs

LN2, LN3, LN4, LN43 = math.log(2), math.log(3), math.log(4), math.log(4 / 3)
# weights all different (and different from the defaults), so that exchanging two of them
# changes the cost
W_CLASS, W_BOX, W_GIOU, W_MASK, W_DICE = 1.5, 4.0, 2.5, 3.0, 0.5


# ---------------------------------------------------------------- float64 oracles

def focal_cost64(logits):
    """Focal loss of label 1 minus that of label 0, alpha = 0.25 on the positive term,
    gamma = 2 (Focal loss, Lin et al., Eq. 5)."""
    p = 1 / (1 + torch.exp(-logits.double()))
    return 0.25 * (1 - p) ** 2 * -torch.log(p) - 0.75 * p ** 2 * -torch.log(1 - p)


def l1_cost64(a, b):
    """Sum over (cx, cy, w, h) of |a - b|, every a against every b."""
    a, b = a.double(), b.double()
    return torch.stack([torch.stack([sum(abs(a[i, k] - b[j, k]) for k in range(4))
                                     for j in range(len(b))]) for i in range(len(a))])


def giou64(a, b):
    """Generalised IoU (GIoU paper, Alg. 1) of cxcywh boxes, every a against every b:
    IoU - (enclosing area - union) / enclosing area, corner by corner."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, j in itertools.product(range(len(a)), range(len(b))):
        cx, cy, w, h = a[i].double().tolist()
        ax0, ay0, ax1, ay1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        cx, cy, w, h = b[j].double().tolist()
        bx0, by0, bx1, by1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
        union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
        enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
        out[i, j] = inter / union - (enclosing - union) / enclosing
    return out


def mask_bce64(pm, gm):
    """Mean over points of -[t log s(x) + (1 - t) log(1 - s(x))]; pm (Q, P) logits,
    gm (T, P) 0/1 -> (Q, T)."""
    s = torch.sigmoid(pm.double())
    out = torch.zeros(len(pm), len(gm), dtype=torch.float64)
    for q, t in itertools.product(range(len(pm)), range(len(gm))):
        g = gm[t].double()
        out[q, t] = -(g * torch.log(s[q]) + (1 - g) * torch.log(1 - s[q])).mean()
    return out


def mask_dice64(pm, gm):
    """1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1) (dice with +1 smoothing, V-Net)."""
    s = torch.sigmoid(pm.double())
    out = torch.zeros(len(pm), len(gm), dtype=torch.float64)
    for q, t in itertools.product(range(len(pm)), range(len(gm))):
        g = gm[t].double()
        out[q, t] = 1 - (2 * (s[q] * g).sum() + 1) / (s[q].sum() + g.sum() + 1)
    return out


def pixel_centres(pixels, h, w):
    """(P, 2) normalised (x, y) of the centres of pixels [(x, y), ...] of an h x w map."""
    return torch.tensor([[(x + 0.5) / w, (y + 0.5) / h] for x, y in pixels])


def fix_points(monkeypatch, coords):
    """Make the matcher's uniform point draw (torch.rand(1, P, 2)) return coords."""
    def fake_rand(*size, **kwargs):
        assert tuple(size) == (1, coords.shape[0], 2), size
        return coords[None].clone()
    monkeypatch.setattr(torch, "rand", fake_rand)


def point_logits64(embed, features, pixels):
    """Mask logits (Eq. 8: mask embedding . mask feature) of every query at the given
    pixels, read pixel by pixel: (Q, P)."""
    return torch.tensor([[sum(embed[q, c].item() * features[c, y, x].item()
                              for c in range(features.shape[0])) for x, y in pixels]
                         for q in range(embed.shape[0])], dtype=torch.float64)


def gt_at_pixel_centres(masks, pixels, h, w):
    """Targets at the centres of the h x w map's pixels, nearest pixel of the (T, H, W)
    masks: x' = floor((x + 0.5) W / w)."""
    H, W = masks.shape[-2:]
    return torch.tensor([[float(m[int((y + 0.5) * H / h), int((x + 0.5) * W / w)])
                          for x, y in pixels] for m in masks], dtype=torch.float64)


def brute_force(C):
    """Minimum-cost one-to-one assignment of a (Q, T) matrix, Q >= T, as {gt: query}."""
    Q, T = C.shape
    best = min(itertools.permutations(range(Q), T),
               key=lambda perm: sum(C[q, t].item() for t, q in enumerate(perm)))
    return dict(enumerate(best))


# ---------------------------------------------------------------- hand-computed terms

def test_focal_cost_hand_values():
    """alpha = 0.25 weights the positive term, gamma = 2 (Focal loss, Lin et al.):
    x = ln 3 (p = 3/4): 1/4 (1/4)^2 ln(4/3) - 3/4 (3/4)^2 ln 4 = (ln(4/3) - 27 ln 4) / 64;
    x = -ln 3 (p = 1/4): 1/4 (3/4)^2 ln 4 - 3/4 (1/4)^2 ln(4/3) = (9 ln 4 - 3 ln(4/3)) / 64;
    x = 0 (p = 1/2): 1/4 1/4 ln 2 - 3/4 1/4 ln 2 = -ln 2 / 8."""
    got = focal_cost(torch.tensor([LN3, -LN3, 0.0]), alpha=0.25, gamma=2.0)
    want = [(LN43 - 27 * LN4) / 64, (9 * LN4 - 3 * LN43) / 64, -LN2 / 8]
    assert got.tolist() == pytest.approx(want, rel=1e-6)


def test_pairwise_mask_costs_hand_values():
    """3 predictions x 2 targets at P = 2 points; logits ln 3, 0, -ln 3 have sigmoid 3/4,
    1/2, 1/4 and point BCE softplus(-x) (target 1) or softplus(x) (target 0), i.e. ln(4/3),
    ln 2 or ln 4. Dice: 1 - (2 sum(p t) + 1) / (sum p + sum t + 1)."""
    pred = torch.tensor([[LN3, -LN3], [0.0, LN3], [-LN3, -LN3]])
    gt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    bce, dice = pairwise_mask_costs(pred, gt)
    want_bce = [[LN43,                (LN43 + LN4) / 2],   # [ln(4/3) + ln(4/3)] / 2, ...
                [(LN2 + LN4) / 2,     (LN2 + LN43) / 2],
                [(LN4 + LN43) / 2,    LN4]]
    want_dice = [[1 - 2.5 / 3,        1 - 3 / 4],          # (2 * 3/4 + 1) / (1 + 1 + 1)
                 [1 - 2 / (13 / 4),   1 - 3.5 / (17 / 4)],  # (2 * 1/2 + 1) / (5/4 + 1 + 1)
                 [1 - 1.5 / 2.5,      1 - 2 / 3.5]]        # (2 * 1/4 + 1) / (1/2 + 1 + 1)
    assert bce.shape == dice.shape == (3, 2)
    assert torch.allclose(bce.double(), torch.tensor(want_bce, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(dice.double(), torch.tensor(want_dice, dtype=torch.float64), rtol=1e-6)
    # leading batch dimension: a second image with its targets in the other order gives
    # the same costs with the columns exchanged
    bce2, dice2 = pairwise_mask_costs(torch.stack([pred, pred]), torch.stack([gt, gt.flip(0)]))
    assert torch.allclose(bce2[0], bce) and torch.allclose(bce2[1], bce.flip(1))
    assert torch.allclose(dice2[0], dice) and torch.allclose(dice2[1], dice.flip(1))


# ---------------------------------------------------------------- full cost matrix

def _random_case(seed):
    """3 predictions, 2 targets; mask features 4 x 4, target masks 8 x 8; five pixel
    centres of the feature map, in no particular order, as the sampled points."""
    g = torch.Generator().manual_seed(seed)
    Q, T, C, h, w = 3, 2, 3, 4, 4
    logits = torch.randn(Q, 1, generator=g) * 1.5
    boxes = torch.rand(Q, 4, generator=g) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    gt_boxes = torch.rand(T, 4, generator=g) * 0.4 + torch.tensor([0.3, 0.3, 0.1, 0.1])
    embed = torch.randn(Q, C, generator=g)
    features = torch.randn(C, h, w, generator=g)
    gt_masks = torch.rand(T, 2 * h, 2 * w, generator=g) > 0.5
    pixels = [(3, 0), (0, 2), (1, 1), (2, 3), (3, 3)]                   # (x, y)
    return logits, boxes, gt_boxes, embed, features, gt_masks, pixels


@pytest.mark.parametrize("seed", range(2))
def test_each_cost_term_and_their_weighted_sum_equal_float64_formulas(monkeypatch, seed):
    """Each term alone (its weight 1, the others 0) against its float64 formula, then the
    sum with weights 1.5, 4, 2.5, 3, 0.5 (exchanging any two weights changes it):
    w_cls * focal + w_box * L1(cxcywh) - w_giou * GIoU + w_mask * BCE + w_dice * dice."""
    logits, boxes, gt_boxes, embed, features, gt_masks, pixels = _random_case(seed)
    h, w = features.shape[-2:]
    fix_points(monkeypatch, pixel_centres(pixels, h, w))
    pm = point_logits64(embed, features, pixels)                        # (Q, P)
    gm = gt_at_pixel_centres(gt_masks, pixels, h, w)                    # (T, P)
    terms = {"class": focal_cost64(logits[:, 0])[:, None].expand(-1, 2),
             "box": l1_cost64(boxes, gt_boxes),
             "giou": -giou64(boxes, gt_boxes),
             "mask": mask_bce64(pm, gm),
             "dice": mask_dice64(pm, gm)}
    # the case is not degenerate: the terms differ, and no column is a copy of another
    assert all(t.std() > 1e-2 for k, t in terms.items() if k != "class")

    def cost(*weights):
        return HungarianMatcher(*weights, num_points=len(pixels)).cost_matrix(
            logits, boxes, embed, features, gt_boxes, gt_masks).double()

    for i, name in enumerate(terms):
        one_hot = [0.0] * 5
        one_hot[i] = 1.0
        assert torch.allclose(cost(*one_hot), terms[name], rtol=1e-5, atol=1e-6), name
    weights = (W_CLASS, W_BOX, W_GIOU, W_MASK, W_DICE)
    want = sum(wt * terms[name] for wt, name in zip(weights, terms))
    assert torch.allclose(cost(*weights), want, rtol=1e-5, atol=1e-5)


def test_giou_and_l1_cost_on_simple_fractions():
    """Boxes whose costs are simple fractions (xyxy in brackets):
    a [0, 0, .5, .5] vs b [.25, 0, .75, .5]: intersection 1/8, union 3/8, enclosing 3/8:
        GIoU 1/3, L1 |.25 - .5| = 1/4;
    a vs c [.5, .5, 1, 1]: disjoint, union 1/2, enclosing 1: GIoU -1/2,
        L1 .5 + .5 + 0 + 0 = 1;
    d [0, 0, .25, .25] vs c: union 5/16, enclosing 1: GIoU -11/16, L1 .625 + .625 + .25 + .25;
    d vs b: union 1/16 + 1/4, enclosing [0, 0, .75, .5] = 3/8: GIoU -(3/8 - 5/16)/(3/8) = -1/6,
        L1 .375 + .125 + .25 + .25 = 1."""
    preds = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.125, 0.125, 0.25, 0.25]])   # a, d
    gts = torch.tensor([[0.5, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])          # b, c
    logits = torch.zeros(2, 1)
    giou = HungarianMatcher(0.0, 0.0, 1.0, 0.0, 0.0, num_points=4).cost_matrix(
        logits, preds, None, None, gts, None)
    l1 = HungarianMatcher(0.0, 1.0, 0.0, 0.0, 0.0, num_points=4).cost_matrix(
        logits, preds, None, None, gts, None)
    assert giou.flatten().tolist() == pytest.approx([-1 / 3, 1 / 2, 1 / 6, 11 / 16], abs=1e-6)
    assert l1.flatten().tolist() == pytest.approx([0.25, 1.0, 1.0, 1.75], abs=1e-6)


# ---------------------------------------------------------------- assignment

# A case (found by search, checked below) whose optimal assignment under the weights above
# is gt 0 <- prediction 2, gt 1 <- prediction 1 (prediction 0 unmatched), while flipping the
# sign of any single term gives a different one.
CASE_LOGITS = [-2.0, -2.0, -0.5]
CASE_BOXES = [[0.625, 0.5, 0.25, 0.25], [0.5, 0.625, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]]
CASE_GT_BOXES = [[0.375, 0.375, 0.5, 0.5], [0.625, 0.75, 0.25, 0.25]]
# points: centres of pixels (x, y) of the 2 x 2 mask-feature map, in this order
CASE_PIXELS = [(1, 0), (0, 1), (1, 1), (0, 0)]
# mask logits of each prediction at those points
CASE_POINT_LOGITS = [[-2.0, 0.0, -1.0, 2.0], [-2.0, 2.0, 1.0, 0.0], [2.0, -2.0, 2.0, 2.0]]


def _assignment_case():
    """Predictions and targets of the case. Mask features: channel c is 1 at pixel
    (x, y) = (c % 2, c // 2) and 0 elsewhere, so a prediction's logit at that pixel is its
    embedding's entry c. Targets: 4 x 4 masks, read at (2y + 1, 2x + 1) by the points:
    gt 0 the top-right quadrant ([1, 0, 0, 0] at the points), gt 1 the bottom half
    ([0, 1, 1, 0])."""
    features = torch.eye(4).view(4, 2, 2)
    embed = torch.zeros(3, 4)
    for k, (x, y) in enumerate(CASE_PIXELS):
        embed[:, 2 * y + x] = torch.tensor([row[k] for row in CASE_POINT_LOGITS])
    gt_masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt_masks[0, :2, 2:] = True
    gt_masks[1, 2:, :] = True
    return (torch.tensor(CASE_LOGITS)[:, None], torch.tensor(CASE_BOXES), embed, features,
            torch.tensor(CASE_GT_BOXES), gt_masks)


def test_assignment_is_not_what_a_sign_flip_of_any_term_gives(monkeypatch):
    """The oracle builds every term in float64, checks that the case tells the true sum
    from the sum with any one term's sign flipped (different optimal assignments), and
    the matcher must return the true one: gt 0 <- prediction 2, gt 1 <- prediction 1.
    A second image holds the predictions in the reverse query order and the targets in the
    other order: gt 0 <- query 1, gt 1 <- query 0 there."""
    logits, boxes, embed, features, gt_boxes, gt_masks = _assignment_case()
    fix_points(monkeypatch, pixel_centres(CASE_PIXELS, 2, 2))
    pm = point_logits64(embed, features, CASE_PIXELS)
    assert pm.tolist() == CASE_POINT_LOGITS
    gm = gt_at_pixel_centres(gt_masks, CASE_PIXELS, 2, 2)
    assert gm.tolist() == [[1, 0, 0, 0], [0, 1, 1, 0]]
    terms = {"class": W_CLASS * focal_cost64(logits[:, 0])[:, None].expand(-1, 2),
             "box": W_BOX * l1_cost64(boxes, gt_boxes),
             "giou": -W_GIOU * giou64(boxes, gt_boxes),
             "mask": W_MASK * mask_bce64(pm, gm),
             "dice": W_DICE * mask_dice64(pm, gm)}
    total = sum(terms.values())
    assert brute_force(total) == {0: 2, 1: 1}
    for name, term in terms.items():
        assert brute_force(total - 2 * term) != {0: 2, 1: 1}, name

    matcher = HungarianMatcher(W_CLASS, W_BOX, W_GIOU, W_MASK, W_DICE, num_points=4)
    outputs = {"pred_logits": torch.stack([logits, logits.flip(0)]),
               "pred_boxes": torch.stack([boxes, boxes.flip(0)]),
               "pred_mask_embed": torch.stack([embed, embed.flip(0)]),
               "mask_features": torch.stack([features, features])}
    targets = [{"boxes": gt_boxes, "masks": gt_masks},
               {"boxes": gt_boxes.flip(0), "masks": gt_masks.flip(0)}]
    (q0, g0), (q1, g1) = matcher(outputs, targets)
    assert (q0.tolist(), g0.tolist()) == ([1, 2], [1, 0])    # sorted by query
    assert (q1.tolist(), g1.tolist()) == ([0, 1], [1, 0])
    # the batched cost matrices: image 1's is image 0's with rows and columns reversed
    c0, c1 = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_boxes"],
                                   outputs["pred_mask_embed"], outputs["mask_features"],
                                   [t["boxes"] for t in targets], [t["masks"] for t in targets])
    assert torch.allclose(c0.double(), total, rtol=1e-5, atol=1e-5)
    assert torch.allclose(c1.double(), total.flip(0).flip(1), rtol=1e-5, atol=1e-5)
