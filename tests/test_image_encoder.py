"""The image encoder (f_image): shapes, padding, gradients, losses, denoising, matching."""
import itertools

import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.image_encoder import (
    HungarianMatcher,
    ImageEncoder,
    ProposalCriterion,
    build_contrastive_denoising_queries,
)
from unip_v2.modeling.image_encoder.position_encoding import sine_position_encoding_2d
from unip_v2.utils.box_ops import masks_to_boxes_normalized


def tiny_cfg(backbone="resnet"):
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    cfg.MODEL.META_ARCHITECTURE = "UniPerceiverV2ProposalNetwork"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    if backbone == "resnet":
        r = cfg.MODEL.RESNETS
        r.DEPTH, r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, r.WIDTH_PER_GROUP = 50, 16, 64, 16
        r.NORM = "BN"
        r.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    else:
        cfg.MODEL.BACKBONE.NAME = "build_swin_backbone"
        s = cfg.MODEL.SWIN
        s.EMBED_DIM, s.DEPTHS, s.NUM_HEADS, s.WINDOW_SIZE = 32, [1, 1, 1, 1], [1, 2, 4, 8], 4
        s.DROP_PATH_RATE = 0.0
    ie = cfg.MODEL.IMAGE_ENCODER
    ie.HIDDEN_DIM, ie.NHEADS, ie.ENC_LAYERS, ie.DEC_LAYERS, ie.DIM_FEEDFORWARD = 32, 2, 1, 2, 64
    ie.NUM_QUERIES, ie.TOPK_PROPOSALS, ie.MASK_DIM, ie.OUTPUT_DIM = 30, 12, 32, 64
    ie.NUM_GLOBAL_POOLS = 3
    ie.MASK_POOL_SIZE = 8
    ie.DN.NUM_QUERIES_BUDGET = 12
    ie.LOSS.TRAIN_NUM_POINTS = 256
    cfg.TEST.DETECTIONS_PER_IMAGE = 10
    return cfg


def make_sample(h, w, boxes, seed=0):
    """A random image with rectangular objects at `boxes` (xyxy pixels)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
    masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        masks[i, y0:y1, x0:x1] = True
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
    return {"image": img, "instances": inst, "height": h, "width": w}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


@pytest.mark.parametrize("backbone", ["resnet", "swin"])
def test_output_shapes_odd_sizes_with_padding(backbone):
    torch.manual_seed(0)
    cfg = tiny_cfg(backbone)
    enc = ImageEncoder(cfg).eval()
    sizes = [(97, 131), (120, 75)]
    H, W = 128, 160  # padded to a multiple of 32
    images = torch.zeros(2, 3, H, W)
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.randn(3, h, w)
    with torch.no_grad():
        out = enc(images, sizes)
    O, D = 12, 64
    assert out.regional_tokens.shape == (2, O, D)
    assert out.regional_boxes.shape == (2, O, 4)
    assert out.regional_mask_logits.shape == (2, O, H // 4, W // 4)
    assert out.regional_objectness.shape == (2, O) and out.regional_index.shape == (2, O)
    # objectness is sorted, highest first; indices point into the N=30 queries
    assert (out.regional_objectness[:, :-1] >= out.regional_objectness[:, 1:]).all()
    assert int(out.regional_index.max()) < 30
    G = 3 + (H // 32) * (W // 32)
    assert out.global_tokens.shape == (2, G, D) and out.global_padding_mask.shape == (2, G)
    # image 0 (97 x 131) covers 4 x 5 of the 4 x 5 stride-32 cells; image 1 (120 x 75) 4 x 3
    assert int(out.global_padding_mask[0].sum()) == 0
    assert int(out.global_padding_mask[1].sum()) == 4 * 2
    assert torch.isfinite(out.global_tokens).all() and torch.isfinite(out.regional_tokens).all()
    assert torch.isfinite(out.regional_boxes).all()
    # boxes are relative to each image's own extent
    assert (out.regional_boxes >= 0).all() and (out.regional_boxes[..., :2] <= 1).all()


def test_position_encoding_ignores_padding():
    """A map's position encoding counts valid pixels only: padding added by batching leaves
    the valid part's encoding unchanged."""
    pos_a = sine_position_encoding_2d(torch.zeros(1, 3, 4, dtype=torch.bool))
    mask_b = torch.zeros(1, 5, 6, dtype=torch.bool)
    mask_b[:, 3:, :] = True
    mask_b[:, :, 4:] = True
    pos_b = sine_position_encoding_2d(mask_b)
    assert pos_a.shape == (1, 256, 3, 4)
    assert torch.allclose(pos_a[0], pos_b[0, :, :3, :4], atol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, H, W\).*\(3, 4\)"):
        sine_position_encoding_2d(torch.zeros(3, 4, dtype=torch.bool))


def _losses(model, batch):
    model.train()
    return model(batch)


@pytest.mark.parametrize("boxes_per_image", [[[], []], [[(10, 12, 40, 50)], []],
                                              [[(5, 5, 30, 30), (20, 25, 60, 70), (0, 0, 90, 60),
                                                (50, 40, 95, 95)], [(3, 4, 20, 30)] * 2]])
def test_losses_finite_zero_one_many_objects(model, boxes_per_image):
    torch.manual_seed(0)
    batch = [make_sample(100, 100, b, seed=i) for i, b in enumerate(boxes_per_image)]
    losses = _losses(model, batch)
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    n_layers = 2
    expected = {"loss_ce", "loss_ce_interm", "loss_proposal_ce"} | {
        f"loss_ce_{i}" for i in range(n_layers - 1)}
    assert expected <= set(losses)
    has_objects = any(len(b) for b in boxes_per_image)
    assert ("loss_mask" in losses and "loss_ce_dn" in losses) == has_objects or (
        "loss_mask" in losses and not has_objects)
    if has_objects:
        assert {"loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_ce_dn", "loss_bbox_dn",
                "loss_mask_dn", "loss_bbox_interm", "loss_mask_interm"} <= set(losses)
        assert losses["loss_bbox"] > 0
    sum(losses.values()).backward()


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    # zero-initialised layers (box refinement output, learned query embedding, offsets and
    # attention weights of deformable attention) block gradients to what lies before them at
    # step 0 by design; perturb them to check that every path is connected.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    model.train()
    batch = [make_sample(96, 128, [(5, 5, 40, 50), (30, 20, 90, 80)], 0),
             make_sample(96, 128, [(10, 10, 60, 40)], 1)]
    images, sizes = model.preprocess_image(batch)
    targets = model.prepare_targets(batch, images.tensor.shape[-2:])
    out = model.image_encoder(images.tensor, sizes, [t["boxes"] for t in targets])
    losses = model.criterion(out.rpn, targets, out.rpn["proposal_logits"])
    # global and regional tokens (Eq. 1's f_image output) feed the unified decoder: a
    # stand-in loss on both
    total = (sum(losses.values()) + out.global_tokens.square().mean()
             + out.regional_tokens.square().mean())
    total.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert missing == []


def test_inference_instances(model):
    """The proposal network's detections are its top 10 fused proposals: score =
    sigmoid(objectness) and the image-relative box scaled to the output size (twice the
    input here), checked against float64 formulas on the image encoder's own output."""
    model.eval()
    batch = [make_sample(90, 117, [(5, 5, 40, 50)], 0), make_sample(64, 64, [], 1)]
    batch[0]["height"], batch[0]["width"] = 180, 234  # output at twice the input size
    with torch.no_grad():
        out = model(batch)
        images, sizes = model.preprocess_image(batch)
        enc = model.image_encoder(images.tensor, sizes)
    inst = out[0]["instances"]
    assert inst.image_size == (180, 234)
    assert len(inst) == 10 and inst.pred_masks.shape == (10, 180, 234)
    assert inst.pred_masks.dtype == torch.bool and (inst.pred_classes == 0).all()
    obj = enc.regional_objectness[0, :10].double()          # sorted, highest first
    torch.testing.assert_close(inst.scores.double(), 1 / (1 + torch.exp(-obj)), rtol=1e-5,
                               atol=1e-7)
    cx, cy, w, h = enc.regional_boxes[0, :10].double().unbind(-1)
    want = torch.stack(((cx - w / 2) * 234, (cy - h / 2) * 180, (cx + w / 2) * 234,
                        (cy + h / 2) * 180), -1)
    want = torch.min(want.clamp(min=0), torch.tensor([234.0, 180, 234, 180], dtype=torch.float64))
    torch.testing.assert_close(inst.pred_boxes.tensor.double(), want, rtol=1e-5, atol=1e-4)
    assert out[1]["instances"].image_size == (64, 64)


def test_regional_outputs_are_the_chosen_proposals_relative_to_each_image():
    """The regional outputs are the final decoder layer's proposals at regional_index, in
    objectness order; boxes go from the padded canvas to each image's own extent
    (x * W / w, y * H / h, then cut at the image border), float64 oracle; the mask pooling
    of Eq. 9 gets each image's valid extent on the stride-4 mask map (hand-computed)."""
    # An untrained model's boxes are all the whole canvas (its random masks cover it and
    # the box refinement starts at zero), which would hide a missing conversion: start from
    # the anchors and give the refinement random weights, so that boxes differ.
    cfg = tiny_cfg()
    cfg.MODEL.IMAGE_ENCODER.INITIALIZE_BOX_TYPE = "none"
    torch.manual_seed(0)
    model = build_model(cfg).eval()   # fresh: BatchNorm statistics of no other test
    with torch.no_grad():
        model.image_encoder.proposal_decoder._bbox_embed.layers[-1].weight.normal_(0, 0.5)
    sizes = [(97, 131), (120, 75)]
    H, W = 128, 160
    g = torch.Generator().manual_seed(3)
    images = torch.zeros(2, 3, H, W)
    for b, (h, w) in enumerate(sizes):
        images[b, :, :h, :w] = torch.randn(3, h, w, generator=g)
    seen, masks = [], []
    hooks = [model.image_encoder.region_proposals.register_forward_pre_hook(
                 lambda mod, inp: seen.append(inp[3].clone())),
             model.image_encoder.pixel_encoder.register_forward_pre_hook(
                 lambda mod, inp: masks.append(inp[1].clone()))]
    try:
        with torch.no_grad():
            out = model.image_encoder(images, sizes)
    finally:
        for hook in hooks:
            hook.remove()
    # the pixel-level padding mask: True from row h and from column w on
    want_mask = torch.ones(2, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        want_mask[b, :h, :w] = False
    assert torch.equal(masks[0], want_mask)
    # mask map 32 x 40: ceil(97 * 32 / 128) = 25, ceil(131 * 40 / 160) = 33;
    # ceil(120 * 32 / 128) = 30, ceil(75 * 40 / 160) = 19
    assert seen[0].tolist() == [[25, 33], [30, 19]]
    final = out.rpn["layers"][-1]
    idx = out.regional_index
    for b, (h, w) in enumerate(sizes):
        torch.testing.assert_close(out.regional_objectness[b],
                                   out.rpn["proposal_logits"][b, idx[b]])
        torch.testing.assert_close(out.regional_mask_logits[b], final["pred_masks"][b, idx[b]])
        cx, cy, bw, bh = final["pred_boxes"][b, idx[b]].double().unbind(-1)
        x0 = ((cx - bw / 2) * W / w).clamp(0, 1)
        x1 = ((cx + bw / 2) * W / w).clamp(0, 1)
        y0 = ((cy - bh / 2) * H / h).clamp(0, 1)
        y1 = ((cy + bh / 2) * H / h).clamp(0, 1)
        want = torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), -1)
        torch.testing.assert_close(out.regional_boxes[b].double(), want, rtol=1e-5, atol=1e-6)
        # the cut at the image border is exercised: some box reaches into the padding
        assert ((cx + bw / 2) * W / w > 1.01).any()
        assert len({round(v, 4) for v in bw.tolist()}) > 5              # boxes differ


def test_bad_image_shape_names_it(model):
    model.eval()
    with pytest.raises(ValueError, match=r"\(3, H, W\).*\(64, 64\)"):
        model([{"image": torch.zeros(64, 64, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(1, 4, 32, 32\)"):
        model.image_encoder(torch.zeros(1, 4, 32, 32), [(32, 32)])


# ---------------------------------------------------------------- denoising

def test_contrastive_denoising_groups_and_attention_mask():
    gt = [torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4]]), torch.zeros(0, 4),
          torch.tensor([[0.6, 0.4, 0.3, 0.3]])]
    label = torch.arange(8, dtype=torch.float32)
    Q = 5
    dn = build_contrastive_denoising_queries(gt, label, Q, budget=7, box_noise_scale=1.0,
                                             generator=torch.Generator().manual_seed(0))
    max_gt, G = 2, 7 // 2
    assert (dn.max_gt, dn.num_groups, dn.pad_size) == (max_gt, G, G * 2 * max_gt)
    P = dn.pad_size
    assert dn.content.shape == (3, P, 8) and dn.anchor_logits.shape == (3, P, 4)
    # slots: per group [pos gt0, pos gt1, neg gt0, neg gt1]
    pos = dn.positive_mask.view(3, G, 2, max_gt)
    neg = dn.negative_mask.view(3, G, 2, max_gt)
    assert pos[0, :, 0].all() and not pos[0, :, 1].any() and neg[0, :, 1].all()
    assert not (pos[1].any() or neg[1].any())                      # no objects
    assert pos[2, :, 0, 0].all() and not pos[2, :, 0, 1].any()     # one object: slot 1 unused
    assert torch.equal(dn.content[1], torch.zeros(P, 8))
    assert torch.equal(dn.content[0, 0], label)
    # noise: positive corners move by at most lambda * half a side; negative corners by
    # [1, 2) x that, so a negative of an object far from the border overlaps it by IoU <= 1/3
    # (the most a box keeps when every corner moves by half a side: a shift by half)
    from torchvision.ops import box_convert, box_iou
    boxes = dn.anchor_logits.sigmoid().view(3, G, 2, max_gt, 4)
    xyxy = box_convert(boxes, "cxcywh", "xyxy")
    gt_xyxy = box_convert(gt[0], "cxcywh", "xyxy")
    half = torch.cat((gt[0][:, 2:], gt[0][:, 2:]), -1) / 2
    assert ((xyxy[0, :, 0] - gt_xyxy).abs() / half <= 1 + 1e-3).all()
    neg_iou = box_iou(xyxy[0, :, 1, 0], gt_xyxy[:1])  # gt 0 spans [0.4, 0.6]: never clamped
    assert (neg_iou <= 1 / 3 + 1e-4).all()
    pos_iou = box_iou(xyxy[0, :, 0, 0], gt_xyxy[:1])
    assert pos_iou.mean() > neg_iou.mean()
    # attention mask: matching queries see no denoising query; groups see only themselves
    m = dn.attn_mask
    assert m.shape == (P + Q, P + Q)
    assert m[P:, :P].all() and not m[P:, P:].any() and not m[:P, P:].any()
    for g, h in itertools.product(range(G), repeat=2):
        block = m[g * 4:(g + 1) * 4, h * 4:(h + 1) * 4]
        assert (block.all() if g != h else not block.any())
    # fixed assignment: query g * 2 * max_gt + j <-> gt j
    q, j = dn.positive_query_indices(2)
    assert q.tolist() == [0, 1, 4, 5, 8, 9] and j.tolist() == [0, 1] * 3


def test_no_objects_means_no_denoising():
    assert build_contrastive_denoising_queries([torch.zeros(0, 4)] * 2, torch.zeros(4), 5, 10,
                                               1.0) is None


# ---------------------------------------------------------------- matcher

@pytest.mark.parametrize("seed", range(4))
def test_matcher_agrees_with_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    Q, T = 5, 3
    matcher = HungarianMatcher(2.0, 5.0, 2.0, 5.0, 5.0, num_points=64)
    logits = torch.randn(1, Q, 1, generator=g)
    boxes = torch.rand(1, Q, 4, generator=g) * 0.5 + 0.25
    embed = torch.randn(1, Q, 6, generator=g)
    features = torch.randn(1, 6, 8, 8, generator=g)
    gt_boxes = torch.rand(T, 4, generator=g) * 0.5 + 0.25
    gt_masks = torch.rand(T, 32, 32, generator=g) > 0.5
    torch.manual_seed(seed)
    C = matcher.cost_matrix(logits[0], boxes[0], embed[0], features[0], gt_boxes, gt_masks)
    best = min(itertools.permutations(range(Q), T),
               key=lambda perm: sum(C[q, t].item() for t, q in enumerate(perm)))
    torch.manual_seed(seed)  # same sampled points as the cost matrix above
    (q, t), = matcher({"pred_logits": logits, "pred_boxes": boxes, "pred_mask_embed": embed,
                       "mask_features": features}, [{"boxes": gt_boxes, "masks": gt_masks}])
    assert sorted(zip(t.tolist(), q.tolist())) == sorted(enumerate(best))


def test_matcher_without_targets():
    matcher = HungarianMatcher(2.0, 5.0, 2.0, 5.0, 5.0, num_points=16)
    out = matcher({"pred_logits": torch.randn(2, 4, 1), "pred_boxes": torch.rand(2, 4, 4),
                   "pred_mask_embed": torch.randn(2, 4, 3), "mask_features": torch.randn(2, 3, 8, 8)},
                  [{"boxes": torch.zeros(0, 4), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}] * 2)
    assert all(len(q) == 0 and len(t) == 0 for q, t in out)


def _images_with_targets(seed, sizes, Q=6, C=5, h=8, w=8, H=16, W=16):
    """Random predictions of len(sizes) images and sizes[b] targets each."""
    g = torch.Generator().manual_seed(seed)
    B = len(sizes)
    outputs = {"pred_logits": torch.randn(B, Q, 1, generator=g),
               "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25,
               "pred_mask_embed": torch.randn(B, Q, C, generator=g),
               "mask_features": torch.randn(B, C, h, w, generator=g)}
    targets = [{"boxes": torch.rand(T, 4, generator=g) * 0.5 + 0.25,
                "masks": torch.rand(T, H, W, generator=g) > 0.5} for T in sizes]
    return outputs, targets


def _bilinear64(maps, xy):
    """Float64 oracle of grid_sample(align_corners=False, zeros): maps (K, h, w), xy (P, 2)
    in [0, 1] -> (K, P), written out corner by corner."""
    K, h, w = maps.shape
    x, y = xy[:, 0].double() * w - 0.5, xy[:, 1].double() * h - 0.5
    x0, y0 = x.floor().long(), y.floor().long()
    out = torch.zeros(K, xy.shape[0], dtype=torch.float64)
    for dx in (0, 1):
        for dy in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            wt = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
            ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
            out += torch.where(ok, maps.double()[:, yi.clamp(0, h - 1), xi.clamp(0, w - 1)], 0.0) * wt
    return out


@pytest.mark.parametrize("seed", range(3))
def test_batched_matcher_equals_a_float64_cost_per_image(seed):
    """The matcher batches images; the oracle builds each image's cost in float64 from the
    formulas (focal, L1, GIoU, BCE and dice at the image's points, drawn in image order and
    only for images with targets), then solves it with scipy."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_convert, generalized_box_iou

    sizes = [2, 0, 3, 1]
    outputs, targets = _images_with_targets(seed, sizes)
    matcher = HungarianMatcher(2.0, 5.0, 2.0, 5.0, 5.0, num_points=64)
    torch.manual_seed(100 + seed)
    got = matcher(outputs, targets)
    torch.manual_seed(100 + seed)
    for b, T in enumerate(sizes):
        if T == 0:
            assert len(got[b][0]) == 0 and len(got[b][1]) == 0
            continue
        coords = torch.rand(1, 64, 2)[0]                      # the matcher's draw for image b
        logit = outputs["pred_logits"][b, :, 0].double()
        p = logit.sigmoid()
        focal = (0.25 * (1 - p) ** 2 * -torch.log(p)) - (0.75 * p ** 2 * -torch.log(1 - p))
        boxes, gt = outputs["pred_boxes"][b].double(), targets[b]["boxes"].double()
        l1 = (boxes[:, None, :] - gt[None, :, :]).abs().sum(-1)
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"),
                                   box_convert(gt, "cxcywh", "xyxy"))
        masks = torch.einsum("qc,chw->qhw", outputs["pred_mask_embed"][b].double(),
                             outputs["mask_features"][b].double())
        pm = _bilinear64(masks, coords)                                        # (Q, P)
        Hm, Wm = targets[b]["masks"].shape[-2:]
        xi = (coords[:, 0] * Wm).long().clamp(0, Wm - 1)
        yi = (coords[:, 1] * Hm).long().clamp(0, Hm - 1)
        gm = targets[b]["masks"][:, yi, xi].double()                           # (T, P)
        bce = torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(
            pm, gm[t].expand_as(pm), reduction="none").mean(1) for t in range(T)], 1)
        prob = pm.sigmoid()
        dice = 1 - (2 * prob @ gm.T + 1) / (prob.sum(1)[:, None] + gm.sum(1)[None, :] + 1)
        cost = 2 * focal[:, None] + 5 * l1 - 2 * giou + 5 * bce + 5 * dice
        q, t = linear_sum_assignment(cost.numpy())
        assert got[b][0].tolist() == q.tolist() and got[b][1].tolist() == t.tolist()


def test_batched_mask_losses_equal_a_per_image_computation():
    """ProposalCriterion builds the matched masks, samples points and computes BCE and dice
    for all images at once; the oracle does it image by image (the unbatched algorithm:
    candidates, least certain 3/4, uniform fill, drawn per image in order) in float64."""
    from torch.nn import functional as F

    sizes = [2, 3, 0, 1]
    outputs, targets = _images_with_targets(7, sizes)
    indices = [(torch.tensor([4, 1]), torch.tensor([1, 0])),
               (torch.tensor([0, 2, 5]), torch.tensor([2, 0, 1])),
               (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
               (torch.tensor([3]), torch.tensor([0]))]
    crit = ProposalCriterion(HungarianMatcher(2.0, 5.0, 2.0, 5.0, 5.0, num_points=40),
                             {k: 1.0 for k in ("ce", "bbox", "giou", "mask", "dice",
                                               "proposal_ce")},
                             num_points=40, oversample_ratio=3.0, importance_sample_ratio=0.75)
    torch.manual_seed(3)
    bce, dice = crit._mask_losses(outputs["pred_mask_embed"], outputs["mask_features"],
                                  targets, indices, num_boxes=6.0)
    torch.manual_seed(3)
    want_bce = want_dice = 0.0
    for b, (q, g) in enumerate(indices):
        if len(q) == 0:
            continue
        masks = torch.einsum("mc,chw->mhw", outputs["pred_mask_embed"][b, q].double(),
                             outputs["mask_features"][b].double())
        cand = torch.rand(len(q), 120, 2)
        fill = torch.rand(len(q), 10, 2)
        for i in range(len(q)):
            certainty = _bilinear64(masks[i:i + 1], cand[i])[0].abs()
            keep = certainty.argsort()[:30]                         # the 30 least certain
            pts = torch.cat((cand[i][keep], fill[i]))
            logit = _bilinear64(masks[i:i + 1], pts)[0]
            m = targets[b]["masks"][g[i]]
            label = m[(pts[:, 1] * m.shape[0]).long().clamp(0, m.shape[0] - 1),
                      (pts[:, 0] * m.shape[1]).long().clamp(0, m.shape[1] - 1)].double()
            want_bce += F.binary_cross_entropy_with_logits(logit, label).item()
            prob = logit.sigmoid()
            want_dice += (1 - (2 * (prob * label).sum() + 1) / (prob.sum() + label.sum() + 1)).item()
    assert bce.item() == pytest.approx(want_bce / 6.0, rel=1e-5)
    assert dice.item() == pytest.approx(want_dice / 6.0, rel=1e-5)


def test_masks_to_boxes_normalized():
    m = torch.zeros(2, 10, 20, dtype=torch.bool)
    m[0, 2:5, 3:9] = True
    boxes, nonempty = masks_to_boxes_normalized(m)
    assert nonempty.tolist() == [True, False]
    # x in [3, 9), y in [2, 5) -> cx 6/20, cy 3.5/10, w 6/20, h 3/10
    assert torch.allclose(boxes[0], torch.tensor([0.3, 0.35, 0.3, 0.3]))
    assert torch.equal(boxes[1], torch.zeros(4))


def test_mask_logits_at_points_equal_sampling_the_full_masks():
    from unip_v2.modeling.image_encoder.point_sampling import (
        mask_logits_at_points, point_sample, sample_binary_masks)
    from unip_v2.modeling.image_encoder.proposal_decoder import ProposalDecoder

    g = torch.Generator().manual_seed(0)
    embed, feats = torch.randn(2, 5, 7, generator=g), torch.randn(2, 7, 9, 11, generator=g)
    coords = torch.rand(2, 40, 2, generator=g)
    full = ProposalDecoder.masks_from_embed(embed, feats)                  # (2, 5, 9, 11)
    assert torch.allclose(mask_logits_at_points(embed, feats, coords),
                          point_sample(full, coords, align_corners=False), atol=1e-5)
    masks = torch.zeros(3, 4, 8, dtype=torch.bool)
    masks[1, 1:3, 2:6] = True
    pts = torch.tensor([[[0.3, 0.4], [0.9, 0.4], [0.26, 0.26], [0.24, 0.5]]])  # (x, y)
    vals = sample_binary_masks(masks, torch.tensor([1]), pts)
    assert vals.tolist() == [[1.0, 0.0, 1.0, 0.0]]
