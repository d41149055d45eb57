"""Proposal decoder: two-stage query selection + deformable decoder with box refinement.

One objectness logit replaces Mask DINO's class logits (Sec. 4.1: "only considers
foreground-background binary classification"). Every encoder token gets an objectness
logit and a box (a refinement of an anchor around the token); the top N tokens become the
decoder's queries: content = the selected features (detached) + a learned query embedding
(zero-initialised, so a converted Mask DINO checkpoint starts out behaving as Mask DINO),
position = the sine embedding of the current box. Each decoder layer refines the boxes;
objectness, box and mask are predicted on the two-stage output and after every layer.

Parameter names follow Mask DINO's predictor (enc_output, class_embed, _bbox_embed,
mask_embed, decoder_norm, decoder.layers, decoder.ref_point_head, label_enc), plus
query_embed.
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ...layers import MLP
from ...utils.box_ops import MASK_BOX_CONVENTIONS, inverse_sigmoid, masks_to_boxes_normalized
from .deformable_transformer import DeformableDecoderLayer
from .denoising import DenoisingQueries, build_contrastive_denoising_queries
from .pixel_encoder import PixelEncoderOutput
from .position_encoding import box_sine_embedding

__all__ = ["INVALID_TOKEN_MODES", "ProposalDecoder", "two_stage_anchors"]

# What two-stage selection does with tokens that have no valid anchor (see ProposalDecoder).
INVALID_TOKEN_MODES = ("exclude", "zero")
# A finite stand-in for Mask DINO's +inf anchor logit: sigmoid(x + 1e4) is exactly 1 in
# float32 for any box-head output x above -9980, and no inf enters the graph (or its
# gradients).
_SATURATED_LOGIT = 1e4


def two_stage_anchors(spatial_shapes: torch.Tensor, memory_padding_mask: torch.Tensor,
                      base_size: float = 0.05, sizes: Optional[Sequence[float]] = None):
    """One anchor box per encoder token: centred on it, side base_size * 2**l at level l
    (l = 0 at stride 8, DINO's convention), or sizes[l] when given (levels fine to coarse).

    Returns:
        anchor_logits: (B, S, 4) inverse-sigmoid (cx, cy, w, h) on the padded canvas; 0 at
            invalid tokens (kept finite so nothing downstream sees inf);
        valid: (B, S) bool: not padding and the anchor strictly inside (0.01, 0.99).
    """
    anchors = []
    device = memory_padding_mask.device
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ys, xs = torch.meshgrid((torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h,
                                (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w,
                                indexing="ij")
        wh = torch.full_like(xs, float(sizes[lvl]) if sizes else base_size * 2.0 ** lvl)
        anchors.append(torch.stack((xs, ys, wh, wh), -1).reshape(-1, 4))
    anchors = torch.cat(anchors, 0)[None].expand(memory_padding_mask.shape[0], -1, -1)
    valid = ((anchors > 0.01) & (anchors < 0.99)).all(-1) & ~memory_padding_mask
    logits = torch.log(anchors / (1 - anchors))
    return torch.where(valid[..., None], logits, torch.zeros_like(logits)), valid


def _slice_queries(prediction: Dict, start: int, stop: Optional[int]) -> Dict:
    """The queries [start:stop] of a prediction set (the mask map is shared, not sliced)."""
    return {k: (v if k == "mask_features" else v[:, start:stop]) for k, v in prediction.items()}


class ProposalDecoder(nn.Module):
    """
    Args:
        hidden_dim: d. num_queries: N. num_levels: L. dec_layers, nheads, dim_feedforward,
        dropout, dec_n_points: Table 7. mask_dim: channels of the Eq. 8 mask map.
        initialize_box_type: "mask2box" | "none" (see config.py).
        invalid_tokens: two-stage selection of the tokens whose anchor leaves (0.01, 0.99)
            or that lie on padding (their features are zeroed in both modes):
            "exclude": never selected. Such a token carries no image content, all of them
                share one score, and its anchor lies partly outside the image, so a query
                spent on it is a query lost; this is the default for models trained here.
            "zero": selectable, as in Mask DINO (its ``gen_encoder_output_proposals``
                gives them +inf anchor logits, so their two-stage boxes are exactly
                (1, 1, 1, 1)). A converted Mask DINO checkpoint was trained with this and
                selects them, so the converter's config turns it on.
        anchor_sizes: the side of the two-stage anchors of each level, fine to coarse
            (default 0.05 * 2**l); a converted Mask DINO checkpoint brings its own (its
            "low2high" models give the stride-8 level 0.4 and the stride-64 level 0.05).
        mask_box_convention: "unit_square" | "pixel_index", how "mask2box" reads a mask
            pixel (`masks_to_boxes_normalized`). "unit_square" is the image's geometry
            (a mask of columns x0..x1 covers [x0, x1 + 1)) and the default; "pixel_index" is
            Mask DINO's "mask2box" (DETR's ``masks_to_boxes``), whose boxes sit half a mask
            pixel up-left and one pixel smaller, and which a converted checkpoint's decoder
            learned to refine.
        dn_enabled, dn_budget, dn_box_noise_scale: contrastive denoising (training only).
    """

    def __init__(self, hidden_dim: int, num_queries: int, num_levels: int, dec_layers: int,
                 nheads: int, dim_feedforward: int, dropout: float, dec_n_points: int,
                 mask_dim: int, initialize_box_type: str = "mask2box", dn_enabled: bool = True,
                 dn_budget: int = 100, dn_box_noise_scale: float = 1.0, backend: str = "auto",
                 invalid_tokens: str = "exclude", mask_box_convention: str = "unit_square",
                 anchor_sizes: Optional[Sequence[float]] = None):
        super().__init__()
        if initialize_box_type not in ("mask2box", "none"):
            raise ValueError(f"ProposalDecoder: initialize_box_type must be 'mask2box' or "
                             f"'none', got {initialize_box_type!r}")
        if invalid_tokens not in INVALID_TOKEN_MODES:
            raise ValueError(f"ProposalDecoder: invalid_tokens must be one of "
                             f"{INVALID_TOKEN_MODES}, got {invalid_tokens!r}")
        if mask_box_convention not in MASK_BOX_CONVENTIONS:
            raise ValueError(f"ProposalDecoder: mask_box_convention must be one of "
                             f"{MASK_BOX_CONVENTIONS}, got {mask_box_convention!r}")
        if anchor_sizes and (len(anchor_sizes) != num_levels
                             or not all(0 < a < 1 for a in anchor_sizes)):
            raise ValueError(f"ProposalDecoder: anchor_sizes must hold one size in (0, 1) per "
                             f"level ({num_levels}), got {list(anchor_sizes)}")
        self.anchor_sizes = [float(a) for a in anchor_sizes] if anchor_sizes else None
        self.num_queries = num_queries
        self.initialize_box_type = initialize_box_type
        self.invalid_tokens = invalid_tokens
        self.mask_box_convention = mask_box_convention
        self.dn_enabled, self.dn_budget, self.dn_box_noise_scale = (
            dn_enabled, dn_budget, dn_box_noise_scale)
        d = hidden_dim

        self.enc_output = nn.Linear(d, d)
        self.enc_output_norm = nn.LayerNorm(d)
        self.class_embed = nn.Linear(d, 1)
        self._bbox_embed = MLP(d, d, 4, 3)
        self.mask_embed = MLP(d, d, mask_dim, 3)
        self.decoder_norm = nn.LayerNorm(d)
        self.label_enc = nn.Embedding(1, d)
        self.query_embed = nn.Embedding(num_queries, d)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(
            DeformableDecoderLayer(d, dim_feedforward, dropout, nheads, num_levels, dec_n_points,
                                   backend=backend) for _ in range(dec_layers))
        self.decoder.ref_point_head = MLP(2 * d, d, d, 2)
        self.hidden_dim = hidden_dim
        self._reset_parameters()

    def _reset_parameters(self):
        # Objectness prior 0.01 (RetinaNet/DETR): focal loss starts near its background
        # optimum instead of exploding on thousands of negatives.
        nn.init.constant_(self.class_embed.bias, -4.59511985013459)  # log(0.01 / 0.99)
        last = self._bbox_embed.layers[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        nn.init.zeros_(self.query_embed.weight)
        for layer in self.decoder.layers:
            for name, p in layer.named_parameters():
                if p.dim() > 1 and not name.startswith("cross_attn."):
                    nn.init.xavier_uniform_(p)

    # ---------------------------------------------------------------- heads
    def prediction_heads(self, hidden: torch.Tensor):
        """hidden: (B, Q, d) -> objectness logits (B, Q, 1) and mask embeddings (B, Q, C).

        decoder_norm runs here even on decoder outputs that the decoder already normalised
        with the same LayerNorm: Mask DINO does so, and a converted checkpoint relies on it.
        """
        x = self.decoder_norm(hidden)
        return self.class_embed(x), self.mask_embed(x)

    @staticmethod
    def masks_from_embed(mask_embed: torch.Tensor, mask_features: torch.Tensor) -> torch.Tensor:
        """Eq. 8 before upsampling: (B, Q, C) x (B, C, h, w) -> mask logits (B, Q, h, w)."""
        return torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

    # ---------------------------------------------------------------- forward
    def forward(self, enc: PixelEncoderOutput,
                gt_boxes: Optional[List[torch.Tensor]] = None) -> Dict:
        """
        Args:
            enc: the pixel encoder's output.
            gt_boxes: training only, per image (n_b, 4) normalised (cx, cy, w, h) on the
                padded canvas, for the denoising queries.
        Returns a dict (Q = min(N, S) matching queries, P denoising queries). A prediction
        set is {"pred_logits" (B, Q, 1), "pred_boxes" (B, Q, 4) normalised (cx, cy, w, h) on
        the canvas, "pred_mask_embed" (B, Q, C), "mask_features" (B, C, h, w)}; mask logits
        are pred_mask_embed . mask_features (built in full only where needed):
            "interm": the two-stage predictions;
            "layers": one set per decoder layer; the last (the final output) also carries
                "pred_masks" (B, Q, h, w), without gradient in training (the losses read
                masks at sampled points through pred_mask_embed);
            "hidden": (B, Q, d) the final layer's normalised hidden states, q_sem of Eq. 9;
            "dn": None, or {"queries": DenoisingQueries, "layers": per-layer sets for the P
                denoising queries}.
        """
        memory, mask_features = enc.memory, enc.mask_features
        B, S, _ = memory.shape
        anchor_logits, valid = two_stage_anchors(enc.spatial_shapes, enc.memory_padding_mask,
                                                 sizes=self.anchor_sizes)
        output_memory = self.enc_output_norm(
            self.enc_output(memory.masked_fill(~valid[..., None], 0.0)))
        scores = self.class_embed(output_memory)[..., 0]
        if self.invalid_tokens == "exclude":
            scores = scores.masked_fill(~valid, float("-inf"))
        else:
            anchor_logits = anchor_logits.masked_fill(~valid[..., None], _SATURATED_LOGIT)
        enc_box_logits = self._bbox_embed(output_memory) + anchor_logits

        Q = min(self.num_queries, S)
        topk = scores.topk(Q, dim=1).indices  # (B, Q)
        tgt_undetach = output_memory.gather(1, topk[..., None].expand(-1, -1, self.hidden_dim))
        box_logits_undetach = enc_box_logits.gather(1, topk[..., None].expand(-1, -1, 4))
        interm_logits, interm_embed = self.prediction_heads(tgt_undetach)
        interm = {"pred_logits": interm_logits, "pred_boxes": box_logits_undetach.sigmoid(),
                  "pred_mask_embed": interm_embed, "mask_features": mask_features}

        ref_logits = box_logits_undetach.detach()
        if self.initialize_box_type == "mask2box":
            # Mask DINO's mask-enhanced anchors: the tight box of each two-stage mask is a
            # better first guess than the anchor refinement; empty masks keep the latter.
            with torch.no_grad():
                interm_masks = self.masks_from_embed(interm_embed, mask_features)
                mask_boxes, nonempty = masks_to_boxes_normalized(
                    interm_masks > 0, self.mask_box_convention)
            ref_logits = torch.where(nonempty[..., None], inverse_sigmoid(mask_boxes), ref_logits)
        tgt = tgt_undetach.detach() + self.query_embed.weight[:Q]

        dn: Optional[DenoisingQueries] = None
        if self.training and self.dn_enabled and gt_boxes is not None:
            dn = build_contrastive_denoising_queries(
                gt_boxes, self.label_enc.weight[0], Q, self.dn_budget, self.dn_box_noise_scale)
        attn_mask = None
        if dn is not None:
            tgt = torch.cat((dn.content.to(tgt.dtype), tgt), 1)
            ref_logits = torch.cat((dn.anchor_logits.to(ref_logits.dtype), ref_logits), 1)
            attn_mask = dn.attn_mask

        hiddens, refs_in = self._decode(tgt, ref_logits.sigmoid(), enc, attn_mask)

        layers = []
        for h, ref_in in zip(hiddens, refs_in):
            logits, embed = self.prediction_heads(h)
            # boxes reported from the normalised output, refining the (undetached) box the
            # layer started from: gradients reach the previous layer's refinement too.
            boxes = (self._bbox_embed(h) + inverse_sigmoid(ref_in)).sigmoid()
            layers.append({"pred_logits": logits, "pred_boxes": boxes, "pred_mask_embed": embed,
                           "mask_features": mask_features})

        P = dn.pad_size if dn is not None else 0
        dn_out = None
        if dn is not None:
            dn_out = {"queries": dn, "layers": [_slice_queries(out, 0, P) for out in layers]}
            layers = [_slice_queries(out, P, None) for out in layers]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.training):
            layers[-1]["pred_masks"] = self.masks_from_embed(layers[-1]["pred_mask_embed"],
                                                             mask_features)
        hidden = self.decoder_norm(hiddens[-1][:, P:]) if hiddens else self.decoder_norm(tgt[:, P:])
        return {"interm": interm, "layers": layers, "hidden": hidden, "dn": dn_out}

    def _decode(self, tgt, ref_boxes, enc: PixelEncoderOutput, attn_mask):
        """Run the decoder layers with iterative box refinement.

        Returns the per-layer outputs after the decoder's LayerNorm (B, Q', d) and the
        reference boxes each layer started from (B, Q', 4): the initial boxes (detached) for
        layer 0, then the undetached refinement of the previous layer. The in-loop refinement
        reads the un-normalised output and each layer gets a detached reference (Mask DINO /
        DINO "look forward twice").
        """
        hiddens, refs_in = [], [ref_boxes]
        out, ref = tgt, ref_boxes
        for i, layer in enumerate(self.decoder.layers):
            query_pos = self.decoder.ref_point_head(
                box_sine_embedding(ref, self.hidden_dim // 2).to(out.dtype))
            out = layer(out, query_pos, ref, enc.memory, enc.spatial_shapes,
                        enc.level_start_index, enc.memory_padding_mask, attn_mask)
            new_ref = (self._bbox_embed(out) + inverse_sigmoid(ref)).sigmoid()
            hiddens.append(self.decoder_norm(out))
            if i + 1 < len(self.decoder.layers):
                refs_in.append(new_ref)
            ref = new_ref.detach()
        return hiddens, refs_in
