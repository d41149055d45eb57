#!/usr/bin/env python
r"""Check that a converted Mask DINO model computes what Mask DINO computes, against Mask
DINO's own code (IDEA-Research/MaskDINO, a checkout you provide; nothing of it is copied
here). CPU only, about 15 seconds.

    git clone https://github.com/IDEA-Research/MaskDINO /tmp/MaskDINO
    python tools/check_maskdino_parity.py --maskdino /tmp/MaskDINO

1. Builds Mask DINO from its R50 instance-segmentation config (``--maskdino-config``) with a
   one-class head (so that both models rank the two-stage tokens by one score), random
   weights perturbed so that no mapping hides behind zeros or ones; with
   ``--select-zeroed`` its score weight is turned towards the zeroed tokens' feature, so
   that two-stage selection picks every token without a valid anchor (252 at 512 px).
2. Converts it with ``unip_v2.checkpoint.maskdino`` into configs/proposal_network/R50_coco.yaml
   with all 9 decoder layers, and builds the config the converter writes (Mask DINO's
   conventions on), or unip-v2's defaults with ``--defaults``.
3. Runs both on the same random images (2 per batch, 256 and 512 px) and prints, per size:
   how many of the top-300 two-stage tokens agree (as a set and in order, ties between the
   identical zeroed tokens aside), the largest differences of the two-stage boxes, the
   final boxes, objectness and mask logits.

Mask DINO's compiled deformable attention is not needed: an empty stand-in module makes its
own pure-PyTorch fallback run.
"""
import argparse
import contextlib
import io
import os
import sys
import types

import torch

import unip_v2  # noqa: F401  (first: makes detectron2 importable)
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.projects.deeplab import add_deeplab_config

from unip_v2.checkpoint.maskdino import build_target_model, convert_maskdino, converted_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_CONFIG = os.path.join(REPO, "configs", "proposal_network", "R50_coco.yaml")
QUERIES = 300


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maskdino", required=True, help="a checkout of IDEA-Research/MaskDINO")
    p.add_argument("--maskdino-config", default="configs/coco/instance-segmentation/"
                   "maskdino_R50_bs16_50ep_3s_dowsample1_2048.yaml",
                   help="Mask DINO config, relative to --maskdino")
    p.add_argument("--select-zeroed", action="store_true",
                   help="make Mask DINO's two-stage selection pick the zeroed tokens")
    p.add_argument("--defaults", action="store_true",
                   help="run unip-v2 with its own defaults instead of Mask DINO's conventions")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    return p.parse_args(argv)


def build_maskdino(root: str, config: str, select_zeroed: bool):
    # Mask DINO imports its compiled op at module level and falls back to its pure-PyTorch
    # deformable attention when calling it fails: an empty module gives that fallback.
    sys.modules.setdefault("MultiScaleDeformableAttention",
                           types.ModuleType("MultiScaleDeformableAttention"))
    sys.path.insert(0, os.path.abspath(root))
    from maskdino import add_maskdino_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskdino_config(cfg)
    cfg.merge_from_file(os.path.join(root, config))
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "1", "MODEL.DEVICE", "cpu",
                         "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # Mask DINO prints its loss weights
        model = build_model(cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and name not in ("pixel_mean", "pixel_std"):
                t.add_(0.02 * torch.randn_like(t))
                if name.endswith("running_var"):
                    t.copy_(t.abs() + 0.5)
        if select_zeroed:
            # a zeroed token's feature is u = enc_output_norm(enc_output(0)): a score
            # weight along u ranks those tokens first
            pr = model.sem_seg_head.predictor
            pr.class_embed.weight.copy_(0.05 * pr.enc_output_norm(pr.enc_output.bias[None]))
    return model, cfg


@contextlib.contextmanager
def first_topk_indices(owner, seen: dict):
    """While active, ``owner.topk`` (torch or torch.Tensor) also stores the indices of its
    first call with k = 300 (the two-stage selection) in seen["topk"]."""
    topk = owner.topk

    def recording_topk(x, k, *args, **kwargs):
        out = topk(x, k, *args, **kwargs)
        if k == QUERIES and "topk" not in seen:
            seen["topk"] = out[1]
        return out

    owner.topk = recording_topk
    try:
        yield
    finally:
        owner.topk = topk


def run_maskdino(model, images):
    """Mask DINO's final boxes, objectness, masks, two-stage boxes and chosen tokens."""
    from maskdino.modeling.transformer_decoder import maskdino_decoder

    seen = {}
    proposals = maskdino_decoder.gen_encoder_output_proposals

    def recording_proposals(memory, padding_mask, spatial_shapes):
        out = proposals(memory, padding_mask, spatial_shapes)
        seen["invalid"] = torch.isinf(out[1]).any(-1)
        seen["shapes"] = spatial_shapes.tolist()
        return out

    maskdino_decoder.gen_encoder_output_proposals = recording_proposals
    try:
        with torch.no_grad(), first_topk_indices(torch, seen):
            x = (images - model.pixel_mean) / model.pixel_std
            out, _ = model.sem_seg_head(model.backbone(x))
    finally:
        maskdino_decoder.gen_encoder_output_proposals = proposals
    return {"boxes": out["pred_boxes"], "logits": out["pred_logits"], "masks": out["pred_masks"],
            "interm_boxes": out["interm_outputs"]["pred_boxes"], **seen}


def run_unip_v2(model, images):
    seen = {}
    with torch.no_grad(), first_topk_indices(torch.Tensor, seen):
        pre = model.preprocessor
        x = (images - pre.pixel_mean) / pre.pixel_std
        rpn = model.image_encoder(x, [tuple(images.shape[-2:])] * len(images)).rpn
    last = rpn["layers"][-1]
    return {"boxes": last["pred_boxes"], "logits": last["pred_logits"], "masks": last["pred_masks"],
            "interm_boxes": rpn["interm"]["pred_boxes"], **seen}


def to_maskdino_tokens(index, maskdino_shapes):
    """unip-v2's token index (levels fine to coarse) -> Mask DINO's two-stage token index
    (its decoder's level order, given by maskdino_shapes)."""
    starts, total = {}, 0
    for h, w in maskdino_shapes:
        starts[(h, w)] = total
        total += h * w
    table = torch.cat([torch.arange(h * w) + starts[(h, w)]
                       for h, w in sorted(maskdino_shapes, key=lambda s: -s[0] * s[1])])
    return table[index]


def main(argv=None):
    args = parse_args(argv)
    md_model, md_cfg = build_maskdino(args.maskdino, args.maskdino_config, args.select_zeroed)
    print(f"Mask DINO: {args.maskdino_config}, one-class head, random perturbed weights; "
          f"INITIALIZE_BOX_TYPE {md_cfg.MODEL.MaskDINO.INITIALIZE_BOX_TYPE}, FEATURE_ORDER "
          f"{md_cfg.MODEL.SEM_SEG_HEAD.FEATURE_ORDER}, {md_cfg.MODEL.MaskDINO.DEC_LAYERS} "
          f"decoder layers")

    opts = ["MODEL.IMAGE_ENCODER.DEC_LAYERS", str(md_cfg.MODEL.MaskDINO.DEC_LAYERS),
            "MODEL.DEVICE", "cpu"]
    model = build_target_model(TARGET_CONFIG, opts)
    state, report = convert_maskdino(md_model.state_dict(), model)
    if args.defaults:
        print("unip-v2: its own defaults")
    else:
        cfg = converted_config(TARGET_CONFIG, opts, "", md_cfg.MODEL.MaskDINO.INITIALIZE_BOX_TYPE,
                               report["target"]["maskdino_anchor_sizes"])
        ie = cfg.MODEL.IMAGE_ENCODER
        print(f"unip-v2: the converter's config: TWO_STAGE_INVALID_TOKENS "
              f"{ie.TWO_STAGE_INVALID_TOKENS}, MASK_BOX_CONVENTION {ie.MASK_BOX_CONVENTION}, "
              f"TWO_STAGE_ANCHOR_SIZES {list(ie.TWO_STAGE_ANCHOR_SIZES)}")
        model = build_model(cfg).eval()
    missing = model.load_state_dict(state, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys

    for size in args.sizes:
        torch.manual_seed(2)
        images = torch.rand(2, 3, size, size) * 255
        ref, ours = run_maskdino(md_model, images), run_unip_v2(model, images)
        chosen = to_maskdino_tokens(ours["topk"], ref["shapes"])
        invalid = ref["invalid"]
        ours_zeroed = torch.stack([invalid[b][chosen[b]] for b in range(len(images))])
        ref_zeroed = torch.stack([invalid[b][ref["topk"][b]] for b in range(len(images))])
        same_set = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(chosen, ref["topk"])]
        same_order = bool(torch.equal(ours_zeroed, ref_zeroed)
                          and torch.equal(chosen[~ours_zeroed], ref["topk"][~ref_zeroed]))

        def diff(key):
            return (ours[key] - ref[key]).abs().max().item()

        print(f"{size} px: top-{QUERIES} tokens shared {same_set} (of {QUERIES} per image), same "
              f"order (ties between zeroed tokens aside) {same_order}; tokens without a valid "
              f"anchor: {invalid.sum(1).tolist()}, chosen by Mask DINO "
              f"{ref_zeroed.sum(1).tolist()}, by unip-v2 {ours_zeroed.sum(1).tolist()}")
        print(f"  max |difference|: two-stage boxes {diff('interm_boxes'):.2e}, final boxes "
              f"{diff('boxes'):.2e}, final objectness {diff('logits'):.2e}, final mask logits "
              f"{diff('masks'):.2e} (of magnitude up to {ref['masks'].abs().max().item():.1f})")


if __name__ == "__main__":
    main()
