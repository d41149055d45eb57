"""Value-level oracles of the region proposal network's losses (Uni-Perceiver v2, Sec. 4.1
"Loss Function"; Mask DINO, Sec. 3 and its contrastive denoising, DINO Sec. 3.3):
sigmoid focal objectness (alpha = 0.25 on positives, gamma = 2), L1 and GIoU of matched
boxes, BCE and dice of matched masks at sampled points, each summed and divided by the
number of ground-truth boxes, times its weight, for every prediction set under its suffix.

The expected values are hand computations (literals with their arithmetic) or float64
formulas written here. The mask-loss points are controlled: uncertain_point_coords is
replaced by fixed pixel centres of the mask-feature map, where bilinear sampling reads the
pixel itself.
"""
import math

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.image_encoder import (
    HungarianMatcher,
    ProposalCriterion,
    build_contrastive_denoising_queries,
)
from unip_v2.modeling.image_encoder import criterion as criterion_module
from unip_v2.modeling.image_encoder.criterion import num_boxes_across_processes
from unip_v2.modeling.image_encoder import build_proposal_criterion

LN2, LN3, LN43 = math.log(2), math.log(3), math.log(4 / 3)
# loss weights all different, so that a loss multiplied by another's weight shows
WEIGHTS = {"ce": 1.25, "bbox": 3.5, "giou": 1.75, "mask": 4.5, "dice": 0.75, "proposal_ce": 2.25}
PIXELS = [(3, 0), (0, 2), (1, 1), (2, 3), (3, 3)]       # (x, y) of a 4 x 4 mask-feature map


def make_criterion(matcher=None, num_points=len(PIXELS)):
    matcher = matcher or HungarianMatcher(1.5, 4.0, 2.5, 3.0, 0.5, num_points=num_points)
    return ProposalCriterion(matcher, WEIGHTS, num_points=num_points, oversample_ratio=3.0,
                             importance_sample_ratio=0.75)


def fix_loss_points(monkeypatch, pixels=PIXELS, h=4, w=4):
    """Make the mask losses read the centres of the given pixels of the h x w map."""
    coords = torch.tensor([[(x + 0.5) / w, (y + 0.5) / h] for x, y in pixels])
    calls = []

    def fake(mask_logits, num_points, oversample_ratio, importance_sample_ratio,
             group_sizes=None):
        assert (num_points, oversample_ratio, importance_sample_ratio) == (len(pixels), 3.0, 0.75)
        calls.append(mask_logits.shape[0])
        return coords[None].expand(mask_logits.shape[0], -1, -1).clone()
    monkeypatch.setattr(criterion_module, "uncertain_point_coords", fake)
    return calls


# ---------------------------------------------------------------- float64 oracles

def focal64(logit, target):
    """Sigmoid focal loss (Focal loss, Lin et al., Eq. 5) of one logit: alpha = 0.25 on the
    positive term, 0.75 on the negative, gamma = 2."""
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        return 0.25 * (1 - p) ** 2 * -math.log(p)
    return 0.75 * p ** 2 * -math.log(1 - p)


def giou_loss64(a, b):
    """1 - GIoU of two cxcywh boxes: 1 - [IoU - (enclosing - union) / enclosing]."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    enclosing = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return 1 - (inter / union - (enclosing - union) / enclosing)


def mask_terms64(embed, features, gt_mask, pixels=PIXELS):
    """BCE (mean over points) and dice (+1 smoothing) of one predicted mask (Eq. 8: mask
    embedding . mask feature, read at pixel centres) against one target mask (nearest
    pixel: (x + 0.5) / w * W)."""
    C, h, w = features.shape
    H, W = gt_mask.shape
    bce, inter, psum, tsum = 0.0, 0.0, 0.0, 0.0
    for x, y in pixels:
        logit = sum(embed[c].item() * features[c, y, x].item() for c in range(C))
        t = float(gt_mask[int((y + 0.5) * H / h), int((x + 0.5) * W / w)])
        s = 1 / (1 + math.exp(-logit))
        bce += -(t * math.log(s) + (1 - t) * math.log(1 - s))
        inter, psum, tsum = inter + s * t, psum + s, tsum + t
    return bce / len(pixels), 1 - (2 * inter + 1) / (psum + tsum + 1)


def set_terms64(out, targets, matches, norm, object_target=None):
    """Unweighted losses of one prediction set under the assignment matches (per image a
    list of (query, gt)), every term summed and divided by norm."""
    B, Q = out["pred_logits"].shape[:2]
    if object_target is None:
        object_target = [[int(any(q == mq for mq, _ in matches[b])) for q in range(Q)]
                         for b in range(B)]
    terms = dict.fromkeys(("ce", "bbox", "giou", "mask", "dice"), 0.0)
    for b in range(B):
        for q in range(Q):
            terms["ce"] += focal64(out["pred_logits"][b, q, 0].item(), object_target[b][q])
        for q, g in matches[b]:
            pred, gt = out["pred_boxes"][b, q].tolist(), targets[b]["boxes"][g].tolist()
            terms["bbox"] += sum(abs(u - v) for u, v in zip(pred, gt))
            terms["giou"] += giou_loss64(pred, gt)
            bce, dice = mask_terms64(out["pred_mask_embed"][b, q], out["mask_features"][b],
                                     targets[b]["masks"][g])
            terms["mask"] += bce
            terms["dice"] += dice
    return {k: v / norm for k, v in terms.items()}


def assert_losses(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].item() == pytest.approx(want[k], rel=1e-5, abs=1e-5), k


# ---------------------------------------------------------------- hand-computed terms

def _hand_case():
    """Two images, 3 queries each, 1 and 2 targets (num_boxes 3); the assignment: image 0
    query 1 <- gt 0, image 1 query 1 <- gt 1 and query 2 <- gt 0. Boxes (xyxy in brackets):
    A: pred [0, 0, .5, .5] vs gt [.25, 0, .75, .5];  B: pred [0, 0, .25, .25] vs gt
    [.5, .5, 1, 1];  C: pred [0, 0, 1, .5] vs gt [.5, 0, 1, 1]."""
    logits = torch.tensor([[LN3, -LN3, 0.0], [-LN3, LN3, LN3]])[..., None]
    junk = [0.5, 0.5, 0.1, 0.1]                                     # unmatched queries
    boxes = torch.tensor([[junk, [0.25, 0.25, 0.5, 0.5], junk],                   # A
                          [junk, [0.125, 0.125, 0.25, 0.25], [0.5, 0.25, 1.0, 0.5]]])  # B, C
    targets = [{"boxes": torch.tensor([[0.5, 0.25, 0.5, 0.5]])},                  # A
               {"boxes": torch.tensor([[0.75, 0.5, 0.5, 1.0],                     # C
                                       [0.75, 0.75, 0.5, 0.5]])}]                 # B
    indices = [(torch.tensor([1]), torch.tensor([0])),
               (torch.tensor([1, 2]), torch.tensor([1, 0]))]
    return {"pred_logits": logits, "pred_boxes": boxes}, targets, indices


def test_focal_box_and_giou_losses_hand_values():
    """loss terms of the hand case, num_boxes = 3.
    Focal (alpha = 1/4 on positives, gamma 2), p = sigmoid: logits ln 3, -ln 3, 0 have p
    3/4, 1/4, 1/2; target 1: 1/4 (1-p)^2 (-ln p), target 0: 3/4 p^2 (-ln(1-p)):
      image 0, logits [ln 3, -ln 3, 0], targets [0, 1, 0]: 27/64 ln 4 + 9/64 ln 4 + 12/64 ln 2;
      image 1, logits [-ln 3, ln 3, ln 3], targets [0, 1, 1]: (3 + 1 + 1)/64 ln(4/3);
      sum = (84 ln 2 + 5 ln(4/3)) / 64, / 3. (With alpha on the negatives instead:
      (76 ln 2 + 7 ln(4/3)) / 64 / 3; the case is not symmetric under that exchange.)
    L1 (cxcywh): A .25, B .625 + .625 + .25 + .25 = 1.75, C .25 + .25 + .5 + .5 = 1.5;
      sum 3.5, / 3 = 7/6.
    1 - GIoU: A: inter 1/8, union 3/8 = enclosing: 1 - 1/3 = 2/3;
      B: disjoint, union 5/16, enclosing 1: 1 + 11/16 = 27/16;
      C: inter 1/4, union 3/4, enclosing 1: 1 - (1/3 - 1/4) = 11/12;
      sum 157/48, / 3 = 157/144."""
    outputs, targets, indices = _hand_case()
    losses = make_criterion().set_losses(outputs, targets, indices, num_boxes=3.0)
    assert set(losses) == {"ce", "bbox", "giou"}                  # no mask embedding: no mask loss
    assert losses["ce"].item() == pytest.approx((84 * LN2 + 5 * LN43) / 192, rel=1e-6)
    assert losses["bbox"].item() == pytest.approx(7 / 6, rel=1e-6)
    assert losses["giou"].item() == pytest.approx(157 / 144, rel=1e-6)


def test_objectness_targets_matched_one_unmatched_zero():
    """With every logit 0 (p = 1/2) a positive costs 1/4 1/4 ln 2 = ln 2 / 16 and a
    negative 3/4 1/4 ln 2 = 3 ln 2 / 16: 3 matched and 5 unmatched queries (a fourth query
    per image) give (3 + 15) ln 2 / 16, / num_boxes 3 = 3/8 ln 2. Calling the matched queries
    background would give 24/16/3 ln 2, every query an object 8/16/3 ln 2, alpha on the
    negatives (9 + 5)/16/3 ln 2."""
    outputs, targets, indices = _hand_case()
    outputs["pred_logits"] = torch.zeros(2, 4, 1)
    outputs["pred_boxes"] = torch.cat((outputs["pred_boxes"], outputs["pred_boxes"][:, :1]), 1)
    losses = make_criterion().set_losses(outputs, targets, indices, num_boxes=3.0)
    assert losses["ce"].item() == pytest.approx(3 / 8 * LN2, rel=1e-6)


def _mask_case(seed, sizes=(2, 1), Q=4, C=3):
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    out = {"pred_logits": torch.randn(B, Q, 1, generator=g),
           "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.4 + 0.3,
           "pred_mask_embed": torch.randn(B, Q, C, generator=g),
           "mask_features": torch.randn(B, C, 4, 4, generator=g)}
    targets = [{"boxes": torch.rand(T, 4, generator=g) * 0.4 + 0.3,
                "masks": torch.rand(T, 8, 8, generator=g) > 0.5} for T in sizes]
    return out, targets


def test_mask_bce_and_dice_at_known_points(monkeypatch):
    """BCE (mean over the points) and dice (+1 smoothing) of each matched query's mask
    against its own target, summed over the matched pairs and divided by num_boxes,
    against the float64 formula at the fixed points."""
    calls = fix_loss_points(monkeypatch)
    out, targets = _mask_case(0)
    matches = [[(3, 1), (0, 0)], [(2, 0)]]
    indices = [(torch.tensor([0, 3]), torch.tensor([0, 1])), (torch.tensor([2]), torch.tensor([0]))]
    losses = make_criterion().set_losses(out, targets, indices, num_boxes=3.0)
    assert calls == [3]                                          # the 3 matched masks
    want = set_terms64(out, targets, matches, 3.0)
    for k in ("mask", "dice"):
        assert losses[k].item() == pytest.approx(want[k], rel=1e-5), k
    # the targets matter: the other target of image 0 gives other losses
    swapped = make_criterion().set_losses(
        out, targets, [(torch.tensor([0, 3]), torch.tensor([1, 0])), indices[1]], num_boxes=3.0)
    assert abs(swapped["mask"].item() - want["mask"]) > 1e-3
    assert abs(swapped["dice"].item() - want["dice"]) > 1e-3


def test_importance_sampled_points_are_the_least_certain():
    """PointRend's importance sampling (as Mask2Former trains masks): of 3 x 40 uniform
    candidates the 30 with the smallest |logit| come first, then 10 fresh uniform points.
    Map 0 is 0 on its left half (|logit| 0 for x <= 3.5/8, the centre of column 3) and 10
    on its right half; map 1 is 0 on its bottom half (y >= 4.5/8) and 10 on its top: the
    30 least certain points of each lie in its zero region (about 50 of the 120 candidates
    do), the 10 others spread over the whole map."""
    from unip_v2.modeling.image_encoder.point_sampling import uncertain_point_coords

    maps = torch.full((2, 1, 8, 8), 10.0)
    maps[0, 0, :, :4] = 0.0
    maps[1, 0, 4:, :] = 0.0
    torch.manual_seed(0)
    coords = uncertain_point_coords(maps, 40, 3.0, 0.75, group_sizes=[1, 1])
    assert coords.shape == (2, 40, 2) and ((coords >= 0) & (coords <= 1)).all()
    assert (coords[0, :30, 0] <= 3.5 / 8).all() and (coords[1, :30, 1] >= 4.5 / 8).all()
    assert (coords[0, 30:, 0] > 0.6).any() and (coords[1, 30:, 1] < 0.4).any()


# ---------------------------------------------------------------- normalisation

def test_num_boxes_counts_the_batch_and_is_at_least_one():
    """The normalisation: ground-truth boxes of the whole batch (2 + 0 + 3), or 1 when
    there are none (no division by zero)."""
    boxes = [{"boxes": torch.zeros(n, 4)} for n in (2, 0, 3)]
    assert num_boxes_across_processes(boxes, "cpu") == 5.0
    assert num_boxes_across_processes([{"boxes": torch.zeros(0, 4)}] * 2, "cpu") == 1.0


def test_no_objects_every_query_is_background_and_the_norm_is_one():
    """A batch without objects: loss_ce is the negatives' focal loss summed, divided by 1
    (the clamp); box and mask losses are exact zeros that still reach the parameters."""
    out, _ = _mask_case(1, sizes=(0, 0), Q=3)
    out["pred_mask_embed"].requires_grad_(True)
    targets = [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}] * 2
    outputs = {"layers": [out], "interm": out, "dn": None}
    losses = make_criterion()(outputs, targets)
    want_ce = sum(focal64(x, 0) for x in out["pred_logits"].flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(WEIGHTS["ce"] * want_ce, rel=1e-5)
    for k in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice"):
        assert losses[k].item() == 0.0
    losses["loss_mask"].backward()                    # connected to the graph, zero gradient
    assert torch.equal(out["pred_mask_embed"].grad, torch.zeros_like(out["pred_mask_embed"]))


# ---------------------------------------------------------------- forward: every set

def _forward_case(seed=0):
    """Two images with 2 and 1 objects, Q = 4 queries, two decoder layers, the two-stage
    set, the fused proposals' logits and the contrastive denoising queries (2 groups).

    In each matching set the matched queries hold their target's box moved by a little
    noise and every other query a far corner box, so the assignment is known (box costs
    dominate) and differs between sets."""
    g = torch.Generator().manual_seed(seed)
    B, Q, C = 2, 4, 3
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.2]]),
                "masks": torch.rand(2, 8, 8, generator=g) > 0.5},
               {"boxes": torch.tensor([[0.5, 0.45, 0.4, 0.3]]),
                "masks": torch.rand(1, 8, 8, generator=g) > 0.5}]
    features = torch.randn(B, C, 4, 4, generator=g) * 0.5

    def prediction_set(matches):
        boxes = torch.tensor([0.95, 0.95, 0.04, 0.04]).repeat(B, Q, 1)
        for b, pairs in enumerate(matches):
            for q, t in pairs:
                boxes[b, q] = targets[b]["boxes"][t] + (torch.rand(4, generator=g) - 0.5) * 0.04
        return {"pred_logits": torch.randn(B, Q, 1, generator=g) * 0.8, "pred_boxes": boxes,
                "pred_mask_embed": torch.randn(B, Q, C, generator=g) * 0.5,
                "mask_features": features}

    matches = {"_0": [[(0, 1), (3, 0)], [(2, 0)]],
               "": [[(1, 0), (2, 1)], [(0, 0)]],
               "_interm": [[(0, 0), (3, 1)], [(3, 0)]]}
    sets = {k: prediction_set(m) for k, m in matches.items()}
    dn = build_contrastive_denoising_queries([t["boxes"] for t in targets], torch.ones(C), Q,
                                             budget=4, box_noise_scale=1.0,
                                             generator=torch.Generator().manual_seed(seed))
    P = dn.pad_size
    dn_layers = [{"pred_logits": torch.randn(B, P, 1, generator=g),
                  "pred_boxes": torch.rand(B, P, 4, generator=g) * 0.4 + 0.3,
                  "pred_mask_embed": torch.randn(B, P, C, generator=g) * 0.5,
                  "mask_features": features} for _ in range(2)]
    outputs = {"layers": [sets["_0"], sets[""]], "interm": sets["_interm"],
               "dn": {"queries": dn, "layers": dn_layers}}
    proposal_logits = torch.randn(B, Q, generator=g)
    return outputs, targets, matches, proposal_logits


def test_forward_every_loss_is_its_weight_times_its_set_term(monkeypatch):
    """Every returned loss against weight x the float64 term of its own prediction set:
    no suffix for the last decoder layer, "_0" for the first, "_interm" for the two-stage
    set, "loss_proposal_ce" for the fused proposals with the LAST layer's assignment as
    targets, "_dn" / "_dn_0" for the denoising queries of the last / first layer.

    Denoising (DINO, Sec. 3.3; layout of each group: [pos gt0, pos gt1, neg gt0, neg gt1],
    max_gt 2, 2 groups): the positives of image 0 are queries 0, 1, 4, 5 for gts 0, 1, 0, 1,
    of image 1 queries 0 and 4 for gt 0 (its gt-1 slots are unused); they alone are objects
    (negatives and unused slots: background); the norm is num_boxes x groups = 3 x 2."""
    fix_loss_points(monkeypatch)
    torch.manual_seed(0)                                         # the matcher's points
    outputs, targets, matches, proposal_logits = _forward_case()
    losses, final = make_criterion()(outputs, targets, proposal_logits, return_matches=True)
    assert [(q.tolist(), g.tolist()) for q, g in final] == [([1, 2], [0, 1]), ([0], [0])]

    want = {}
    sets = {"_0": outputs["layers"][0], "": outputs["layers"][1], "_interm": outputs["interm"]}
    for suffix, out in sets.items():
        for k, v in set_terms64(out, targets, matches[suffix], 3.0).items():
            want[f"loss_{k}{suffix}"] = WEIGHTS[k] * v
    target = [[0, 1, 1, 0], [1, 0, 0, 0]]                # the final layer's queries
    want["loss_proposal_ce"] = WEIGHTS["proposal_ce"] * sum(
        focal64(proposal_logits[b, q].item(), target[b][q]) for b in range(2) for q in range(4)) / 3
    dn_matches = [[(0, 0), (1, 1), (4, 0), (5, 1)], [(0, 0), (4, 0)]]
    dn_object = [[1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]]
    for suffix, out in zip(("_dn_0", "_dn"), outputs["dn"]["layers"]):
        for k, v in set_terms64(out, targets, dn_matches, 3.0 * 2, dn_object).items():
            want[f"loss_{k}{suffix}"] = WEIGHTS[k] * v
    assert_losses(losses, want)


def test_denoising_layout_that_the_losses_rely_on():
    """The fixed positive assignment and positive mask of the forward case, written out:
    group g, gt j -> query g * 2 * max_gt + j (DINO, Sec. 3.3)."""
    outputs, *_ = _forward_case()
    dn = outputs["dn"]["queries"]
    assert (dn.num_groups, dn.max_gt) == (2, 2)
    q, j = dn.positive_query_indices(2)
    assert (q.tolist(), j.tolist()) == ([0, 1, 4, 5], [0, 1, 0, 1])
    q, j = dn.positive_query_indices(1)
    assert (q.tolist(), j.tolist()) == ([0, 4], [0, 0])
    assert dn.positive_mask.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]]
    assert dn.negative_mask.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 1, 0, 0, 0, 1, 0]]


# ---------------------------------------------------------------- config

def test_config_costs_and_weights_reach_the_matcher_and_the_criterion():
    """Every MODEL.IMAGE_ENCODER.{MATCHER,LOSS} key set to its own value lands in its own
    place; the defaults are the config's Table 7 values (Uni-Perceiver v2, Table 7
    *_cost_coef / *_loss_coef; focal alpha 0.25, gamma 2; 112 x 112 points, Appendix B)."""
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    m, loss = cfg.MODEL.IMAGE_ENCODER.MATCHER, cfg.MODEL.IMAGE_ENCODER.LOSS
    assert (m.COST_CLASS, m.COST_BOX, m.COST_GIOU, m.COST_MASK, m.COST_DICE) == (2, 5, 2, 5, 5)
    assert (loss.CLASS_WEIGHT, loss.BOX_WEIGHT, loss.GIOU_WEIGHT, loss.MASK_WEIGHT,
            loss.DICE_WEIGHT, loss.PROPOSAL_CLASS_WEIGHT) == (2, 5, 2, 5, 5, 2)
    assert (loss.FOCAL_ALPHA, loss.FOCAL_GAMMA, loss.TRAIN_NUM_POINTS) == (0.25, 2.0, 112 * 112)
    m.COST_CLASS, m.COST_BOX, m.COST_GIOU, m.COST_MASK, m.COST_DICE = 1.1, 1.2, 1.3, 1.4, 1.5
    (loss.CLASS_WEIGHT, loss.BOX_WEIGHT, loss.GIOU_WEIGHT, loss.MASK_WEIGHT, loss.DICE_WEIGHT,
     loss.PROPOSAL_CLASS_WEIGHT) = 2.1, 2.2, 2.3, 2.4, 2.5, 2.6
    loss.FOCAL_ALPHA, loss.FOCAL_GAMMA, loss.TRAIN_NUM_POINTS = 0.3, 1.5, 77
    loss.OVERSAMPLE_RATIO, loss.IMPORTANCE_SAMPLE_RATIO = 2.5, 0.6
    crit = build_proposal_criterion(cfg)
    mt = crit.matcher
    assert (mt.cost_class, mt.cost_box, mt.cost_giou, mt.cost_mask, mt.cost_dice) == (
        1.1, 1.2, 1.3, 1.4, 1.5)
    assert (mt.focal_alpha, mt.focal_gamma, mt.num_points) == (0.3, 1.5, 77)
    assert crit.weights == {"ce": 2.1, "bbox": 2.2, "giou": 2.3, "mask": 2.4, "dice": 2.5,
                            "proposal_ce": 2.6}
    assert (crit.focal_alpha, crit.focal_gamma, crit.num_points) == (0.3, 1.5, 77)
    assert (crit.oversample_ratio, crit.importance_sample_ratio) == (2.5, 0.6)


# ---------------------------------------------------------------- inside the image encoder

def test_denoising_queries_leave_the_matching_sets_and_their_losses_unchanged():
    """In the real image encoder the P denoising queries are split off the decoder output
    before the losses, and the attention mask keeps the matching queries from seeing them
    (Mask DINO, Sec. 3; DINO, Sec. 3.3): with and without ground truth for denoising the
    matching sets, and every loss without a "_dn" suffix, are the same; the denoising sets
    hold G x 2 x max_gt queries."""
    from unip_v2.modeling.image_encoder import ImageEncoder

    cfg = get_cfg()
    add_unip_v2_config(cfg)
    r = cfg.MODEL.RESNETS
    r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 16, 64, 16
    r.NORM, r.OUT_FEATURES = "BN", ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    ie = cfg.MODEL.IMAGE_ENCODER
    ie.HIDDEN_DIM, ie.NHEADS, ie.ENC_LAYERS, ie.DEC_LAYERS, ie.DIM_FEEDFORWARD = 32, 2, 1, 2, 64
    ie.NUM_QUERIES, ie.TOPK_PROPOSALS, ie.MASK_DIM, ie.OUTPUT_DIM = 10, 5, 16, 32
    ie.NUM_GLOBAL_POOLS, ie.MASK_POOL_SIZE, ie.DN.NUM_QUERIES_BUDGET = 2, 4, 6
    ie.LOSS.TRAIN_NUM_POINTS = 64
    torch.manual_seed(0)
    encoder = ImageEncoder(cfg).train()
    criterion = build_proposal_criterion(cfg)
    images = torch.randn(2, 3, 64, 64)
    g = torch.Generator().manual_seed(1)
    targets = [{"boxes": torch.tensor([[0.3, 0.3, 0.2, 0.3], [0.6, 0.7, 0.4, 0.2]]),
                "masks": torch.rand(2, 64, 64, generator=g) > 0.5},
               {"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.4]]),
                "masks": torch.rand(1, 64, 64, generator=g) > 0.5}]
    with torch.no_grad():
        with_dn = encoder(images, [(64, 64)] * 2, [t["boxes"] for t in targets]).rpn
        plain = encoder(images, [(64, 64)] * 2, None).rpn
    assert plain["dn"] is None
    assert with_dn["dn"]["queries"].num_groups == 3               # budget 6 // max_gt 2
    for a, b, dn in zip(with_dn["layers"], plain["layers"], with_dn["dn"]["layers"]):
        for k in ("pred_logits", "pred_boxes", "pred_mask_embed"):
            assert a[k].shape[1] == 10 and dn[k].shape[1] == 3 * 2 * 2, k
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    torch.manual_seed(2)
    losses_dn = criterion(with_dn, targets, with_dn["proposal_logits"])
    torch.manual_seed(2)
    losses = criterion(plain, targets, plain["proposal_logits"])
    assert {k for k in losses_dn if "_dn" in k} == {
        f"loss_{t}{s}" for t in ("ce", "bbox", "giou", "mask", "dice") for s in ("_dn", "_dn_0")}
    assert set(losses) == {k for k in losses_dn if "_dn" not in k}
    for k in losses:
        assert losses_dn[k].item() == pytest.approx(losses[k].item(), rel=1e-4, abs=1e-6), k
