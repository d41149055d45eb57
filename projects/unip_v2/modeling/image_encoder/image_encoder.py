"""f_image (Eq. 1): backbone -> pixel encoder -> proposal decoder -> general region
proposals (regional tokens) + global tokens."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchvision.ops import box_convert

from detectron2.config import configurable
from detectron2.modeling import Backbone, build_backbone

from .pixel_encoder import PixelEncoder, downsample_padding_mask
from .proposal_decoder import ProposalDecoder
from .region_proposals import GeneralRegionProposals, GlobalTokens

__all__ = ["ImageEncoder", "ImageEncoderOutput"]


@dataclass
class ImageEncoderOutput:
    """What the image encoder hands on (B images, O regional tokens, G global tokens, D the
    token width, h x w the stride-4 mask map of the padded batch). f_image's output in
    Uni-Perceiver v2, Eq. 1, is [global tokens ; regional tokens]: the unified decoder reads
    the two as separate segments (SegmentKind IMAGE_GLOBAL and IMAGE_REGION).

    regional_tokens: (B, O, D) general region proposals q_proposal (projected to D),
        sorted by objectness, highest first.
    regional_boxes: (B, O, 4) (cx, cy, w, h) normalised to each image's own (un-padded)
        extent; regional_mask_logits: (B, O, h, w) on the padded canvas;
        regional_objectness: (B, O) logits; regional_index: (B, O) the proposals' query
        indices in the proposal decoder.
    global_tokens: (B, G, D) with G = M' + (H/32 * W/32); global_padding_mask: (B, G) bool,
        True at tokens of padding.
    image_sizes: B (height, width) of the un-padded inputs.
    rpn: the proposal decoder's raw outputs plus "proposal_logits" (B, Q), for the
        region proposal network's losses.
    """
    regional_tokens: torch.Tensor
    regional_boxes: torch.Tensor
    regional_mask_logits: torch.Tensor
    regional_objectness: torch.Tensor
    regional_index: torch.Tensor
    global_tokens: torch.Tensor
    global_padding_mask: torch.Tensor
    image_sizes: List[Tuple[int, int]]
    rpn: Dict


class ImageEncoder(nn.Module):
    @configurable
    def __init__(self, *, backbone: Backbone, pixel_encoder: PixelEncoder,
                 proposal_decoder: ProposalDecoder, region_proposals: GeneralRegionProposals,
                 global_tokens: GlobalTokens, global_feature: str):
        super().__init__()
        self.backbone = backbone
        self.pixel_encoder = pixel_encoder
        self.proposal_decoder = proposal_decoder
        self.region_proposals = region_proposals
        self.global_tokens = global_tokens
        self.global_feature = global_feature

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        if cfg.MODEL.BACKBONE.PRETRAINED:
            from ..backbone.pretrained import load_backbone_pretrained

            load_backbone_pretrained(backbone, cfg.MODEL.BACKBONE.PRETRAINED)
        ie = cfg.MODEL.IMAGE_ENCODER
        shapes = backbone.output_shape()
        backend = cfg.MODEL.MS_DEFORM_ATTN.BACKEND
        pixel_encoder = PixelEncoder(
            shapes, list(ie.IN_FEATURES), ie.HIDDEN_DIM, ie.NUM_FEATURE_LEVELS, ie.ENC_LAYERS,
            ie.NHEADS, ie.DIM_FEEDFORWARD, ie.DROPOUT, ie.ENC_N_POINTS, ie.MASK_DIM, ie.NORM,
            backend=backend)
        proposal_decoder = ProposalDecoder(
            ie.HIDDEN_DIM, ie.NUM_QUERIES, ie.NUM_FEATURE_LEVELS, ie.DEC_LAYERS, ie.NHEADS,
            ie.DIM_FEEDFORWARD, ie.DROPOUT, ie.DEC_N_POINTS, ie.MASK_DIM,
            initialize_box_type=ie.INITIALIZE_BOX_TYPE, dn_enabled=ie.DN.ENABLED,
            dn_budget=ie.DN.NUM_QUERIES_BUDGET, dn_box_noise_scale=ie.DN.BOX_NOISE_SCALE,
            backend=backend, invalid_tokens=ie.TWO_STAGE_INVALID_TOKENS,
            mask_box_convention=ie.MASK_BOX_CONVENTION,
            anchor_sizes=list(ie.TWO_STAGE_ANCHOR_SIZES))
        global_feature = ie.IN_FEATURES[-1]
        return {
            "backbone": backbone,
            "pixel_encoder": pixel_encoder,
            "proposal_decoder": proposal_decoder,
            "region_proposals": GeneralRegionProposals(
                ie.HIDDEN_DIM, ie.OUTPUT_DIM, ie.MASK_POOL_SIZE, ie.TOPK_PROPOSALS),
            # one attention head per 64 channels, as in CLIP's attention pool
            "global_tokens": GlobalTokens(shapes[global_feature].channels, ie.OUTPUT_DIM,
                                          ie.NUM_GLOBAL_POOLS, max(ie.OUTPUT_DIM // 64, 1)),
            "global_feature": global_feature,
        }

    def forward(self, images: torch.Tensor, image_sizes: List[Tuple[int, int]],
                gt_boxes: Optional[List[torch.Tensor]] = None) -> ImageEncoderOutput:
        """
        Args:
            images: (B, 3, H, W) normalised, zero-padded bottom/right to a common size.
            image_sizes: B (height, width) of the un-padded images.
            gt_boxes: training only: per image (n, 4) (cx, cy, w, h) normalised to the
                padded canvas, for the denoising queries.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ImageEncoder: images must be (B, 3, H, W), got shape "
                             f"{tuple(images.shape)}")
        if len(image_sizes) != images.shape[0]:
            raise ValueError(f"ImageEncoder: {len(image_sizes)} image_sizes for a batch of "
                             f"{images.shape[0]} images (shape {tuple(images.shape)})")
        B, _, H, W = images.shape
        sizes = torch.as_tensor(image_sizes, device=images.device).view(B, 2)
        rows = torch.arange(H, device=images.device)
        cols = torch.arange(W, device=images.device)
        padding_mask = (rows[None, :, None] >= sizes[:, 0, None, None]) | (
            cols[None, None, :] >= sizes[:, 1, None, None])

        features = self.backbone(images)
        enc = self.pixel_encoder(features, padding_mask)
        rpn = self.proposal_decoder(enc, gt_boxes)

        final = rpn["layers"][-1]
        canvas = torch.tensor([W, H, W, H], device=images.device, dtype=torch.float32)
        valid = sizes.flip(-1).repeat(1, 2).float()  # (B, 4) as (w, h, w, h)
        # canvas-relative -> image-relative; a box reaching into the padding is cut at the
        # image border (nothing of the image lies there)
        boxes_img = box_convert(final["pred_boxes"] * (canvas / valid)[:, None, :], "cxcywh", "xyxy")
        boxes_img = box_convert(boxes_img.clamp(0.0, 1.0), "xyxy", "cxcywh")
        mask_h, mask_w = enc.mask_features.shape[-2:]
        valid_hw = torch.stack((torch.ceil(sizes[:, 0] * mask_h / H),
                                torch.ceil(sizes[:, 1] * mask_w / W)), -1).long()
        tokens, index, proposal_logits = self.region_proposals(
            rpn["hidden"], boxes_img, final["pred_masks"], valid_hw)
        rpn["proposal_logits"] = proposal_logits

        f3 = features[self.global_feature]
        g_tokens, g_mask = self.global_tokens(f3, downsample_padding_mask(padding_mask, f3.shape[-2:]))

        def take(x):
            return x.gather(1, index.view(B, -1, *([1] * (x.dim() - 2))).expand(
                -1, -1, *x.shape[2:]))

        return ImageEncoderOutput(
            regional_tokens=tokens, regional_boxes=take(boxes_img),
            regional_mask_logits=take(final["pred_masks"]),
            regional_objectness=proposal_logits.gather(1, index), regional_index=index,
            global_tokens=g_tokens, global_padding_mask=g_mask,
            image_sizes=[tuple(s) for s in sizes.tolist()], rpn=rpn)
