"""The two proposal-path conventions in which Mask DINO and unip-v2's defaults differ, and
the switches that make a converted Mask DINO checkpoint follow Mask DINO
(MODEL.IMAGE_ENCODER.TWO_STAGE_INVALID_TOKENS, MASK_BOX_CONVENTION; the converter's config
turns them on):

1. two-stage selection: tokens whose anchor leaves (0.01, 0.99) are never selected
   ("exclude") or, as in Mask DINO, keep zeroed features and stay selectable with boxes
   saturated at 1 ("zero");
2. mask-to-box: a mask pixel is a unit square ("unit_square", detectron2's BitMasks) or an
   index ("pixel_index", DETR's / torchvision's masks_to_boxes, Mask DINO's "mask2box").

The oracles are hand counts and other libraries' implementations; no Mask DINO code runs.
"""
import pytest
import torch

import unip_v2  # noqa: F401  first: makes detectron2 importable

from detectron2.structures import BitMasks
from torchvision.ops import box_convert, masks_to_boxes

from unip_v2.checkpoint.maskdino import maskdino_conventions
from unip_v2.modeling.image_encoder.pixel_encoder import PixelEncoderOutput
from unip_v2.modeling.image_encoder.proposal_decoder import ProposalDecoder
from unip_v2.utils.box_ops import masks_to_boxes_normalized

D, MASK_DIM = 16, 8


# ---------------------------------------------------------------- mask-to-box

def test_mask_box_conventions_hand_case():
    m = torch.zeros(1, 8, 10, dtype=torch.bool)
    m[0, 1:3, 2:5] = True          # rows 1-2, columns 2-4
    m2 = torch.zeros(1, 8, 10, dtype=torch.bool)
    m2[0, 6, 7] = True             # one pixel
    masks = torch.cat((m, m2))
    square, ok = masks_to_boxes_normalized(masks, "unit_square")
    index, ok2 = masks_to_boxes_normalized(masks, "pixel_index")
    assert ok.tolist() == ok2.tolist() == [True, True]
    # unit squares: x in [2, 5), y in [1, 3); pixel indices: x in [2, 4], y in [1, 2]
    torch.testing.assert_close(square[0], torch.tensor([3.5 / 10, 2 / 8, 3 / 10, 2 / 8]))
    torch.testing.assert_close(index[0], torch.tensor([3 / 10, 1.5 / 8, 2 / 10, 1 / 8]))
    # one pixel: a unit square at (7, 6), or a point
    torch.testing.assert_close(square[1], torch.tensor([7.5 / 10, 6.5 / 8, 1 / 10, 1 / 8]))
    torch.testing.assert_close(index[1], torch.tensor([7 / 10, 6 / 8, 0.0, 0.0]))
    # the difference the converted model would see: exactly (0.5/w, 0.5/h, 1/w, 1/h)
    torch.testing.assert_close(square - index, torch.tensor([[0.05, 0.0625, 0.1, 0.125]] * 2))
    # at 256 px the stride-4 mask map is 64 x 64: the widths differ by 1/64 = 1.6e-2
    big = torch.zeros(1, 64, 64, dtype=torch.bool)
    big[0, 10:30, 5:41] = True
    w_square = masks_to_boxes_normalized(big, "unit_square")[0][0, 2]
    w_index = masks_to_boxes_normalized(big, "pixel_index")[0][0, 2]
    assert (w_square.item(), w_index.item()) == (36 / 64, 35 / 64)
    with pytest.raises(ValueError, match="convention must be one of"):
        masks_to_boxes_normalized(masks, "pixel_centre")


def test_mask_box_conventions_equal_detectron2_and_torchvision():
    g = torch.Generator().manual_seed(0)
    H, W = 13, 17
    masks = torch.rand(40, H, W, generator=g) > 0.97
    masks[0] = False
    keep = masks.flatten(1).any(1)
    square, ok = masks_to_boxes_normalized(masks, "unit_square")
    index, _ = masks_to_boxes_normalized(masks, "pixel_index")
    assert ok.tolist() == keep.tolist() and not square[0].any() and not index[0].any()
    scale = torch.tensor([W, H, W, H], dtype=torch.float32)
    d2 = box_convert(BitMasks(masks[keep]).get_bounding_boxes().tensor, "xyxy", "cxcywh") / scale
    tv = box_convert(masks_to_boxes(masks[keep]).float(), "xyxy", "cxcywh") / scale
    torch.testing.assert_close(square[keep], d2)
    torch.testing.assert_close(index[keep], tv)


# ---------------------------------------------------------------- two-stage selection

def _encoder_output(padded_cols=0):
    """One 64 x 64 level (stride 8 of a 512 px image, as in the R50 encoder), batch 1, and a
    16 x 16 mask map. The anchors of the outer ring of tokens have a centre coordinate of
    0.5/64 < 0.01 or 63.5/64 > 0.99: 4 * 64 - 4 = 252 tokens without a valid anchor. The
    last `padded_cols` columns are padding."""
    g = torch.Generator().manual_seed(0)
    pad = torch.zeros(1, 64, 64, dtype=torch.bool)
    if padded_cols:
        pad[:, :, 64 - padded_cols:] = True
    mask_pad = torch.zeros(1, 16, 16, dtype=torch.bool)
    return PixelEncoderOutput(
        memory=torch.randn(1, 64 * 64, D, generator=g), memory_padding_mask=pad.flatten(1),
        spatial_shapes=torch.tensor([[64, 64]]), level_start_index=torch.tensor([0]), maps=[],
        mask_features=torch.randn(1, MASK_DIM, 16, 16, generator=g), mask_padding_mask=mask_pad)


def _ring(padded_cols=0):
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    ring = (rows == 0) | (rows == 63) | (cols == 0) | (cols == 63) | (cols >= 64 - padded_cols)
    return ring.flatten()


def _decoder(invalid_tokens, num_queries=300):
    torch.manual_seed(0)
    dec = ProposalDecoder(D, num_queries, num_levels=1, dec_layers=1, nheads=2,
                          dim_feedforward=32, dropout=0.0, dec_n_points=2, mask_dim=MASK_DIM,
                          initialize_box_type="none", dn_enabled=False,
                          invalid_tokens=invalid_tokens)
    with torch.no_grad():
        for p in dec._bbox_embed.parameters():
            p.normal_(0, 0.1)
        # A token with zeroed features normalises to u = LayerNorm(enc_output.bias). With
        # the score weight u, that token scores |u|^2 = D, and every other token (also a
        # LayerNorm output, of norm sqrt(D)) scores less (Cauchy-Schwarz): the zeroed
        # tokens rank first whenever they are selectable, as with random weights in the
        # issue's Mask DINO R50 at 512 px (all 252 selected).
        u = dec.enc_output_norm(dec.enc_output.bias[None])[0]
        dec.class_embed.weight.copy_(u[None])
    return dec.eval()


def _mask_dino_selection(dec, enc, invalid, selectable):
    """Two-stage selection written out as Mask DINO's gen_encoder_output_proposals and
    decoder do it (float64 would change tie order, so float32 as the model): features of
    invalid tokens zeroed, anchors (col + 0.5) / 64, (row + 0.5) / 64, side 0.05, +inf
    logits at invalid tokens; top 300 by score, invalid tokens masked out unless
    `selectable`. Returns the selected boxes (300, 4)."""
    rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    anchors = torch.stack(((cols.flatten() + 0.5) / 64, (rows.flatten() + 0.5) / 64,
                           torch.full((4096,), 0.05), torch.full((4096,), 0.05)), -1)
    logits = torch.log(anchors / (1 - anchors)).masked_fill(invalid[:, None], float("inf"))
    memory = dec.enc_output_norm(dec.enc_output(enc.memory[0].masked_fill(invalid[:, None], 0)))
    scores = dec.class_embed(memory)[:, 0]
    if not selectable:
        scores = scores.masked_fill(invalid, float("-inf"))
    chosen = scores.topk(300).indices
    return (dec._bbox_embed(memory) + logits).sigmoid()[chosen], chosen


@pytest.mark.parametrize("padded_cols", [0, 4])
def test_two_stage_zero_mode_selects_the_zeroed_tokens_like_mask_dino(padded_cols):
    enc = _encoder_output(padded_cols)
    invalid = _ring(padded_cols)
    n_invalid = int(invalid.sum())
    # 252 ring tokens; with 4 padded columns: + 4 * 64 padded - 70 already on the ring
    assert n_invalid == (252 if padded_cols == 0 else 252 + 256 - 70)
    for mode, selectable in (("zero", True), ("exclude", False)):
        dec = _decoder(mode)
        with torch.no_grad():
            out = dec(enc)
            want, chosen = _mask_dino_selection(dec, enc, invalid, selectable)
        boxes = out["interm"]["pred_boxes"][0]
        torch.testing.assert_close(boxes, want, rtol=0, atol=1e-6)
        picked_invalid = int(invalid[chosen].sum())
        saturated = (boxes == 1).all(-1)
        if mode == "zero":
            # the zeroed tokens rank first, all of them while 300 allow; their boxes are
            # exactly (1, 1, 1, 1) and they share one score
            assert picked_invalid == min(300, n_invalid)
            assert saturated[:picked_invalid].all() and int(saturated.sum()) == picked_invalid
            logits = out["interm"]["pred_logits"][0, :picked_invalid, 0]
            assert torch.equal(logits, logits[:1].expand_as(logits))
        else:
            assert picked_invalid == 0 and not saturated.any()
        assert torch.isfinite(out["layers"][-1]["pred_boxes"]).all()


def test_two_stage_zero_mode_trains_without_nan():
    enc = _encoder_output(4)
    dec = _decoder("zero").train()
    out = dec(enc)
    loss = out["interm"]["pred_boxes"].sum() + sum(
        s["pred_boxes"].sum() + s["pred_logits"].sum() for s in out["layers"])
    loss.backward()
    grads = [p.grad for p in dec.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_mask2box_convention_moves_the_initial_boxes_by_half_and_one_mask_pixel():
    enc = _encoder_output()
    seen = {}
    for convention in ("unit_square", "pixel_index"):
        torch.manual_seed(0)
        dec = ProposalDecoder(D, 300, num_levels=1, dec_layers=1, nheads=2, dim_feedforward=32,
                              dropout=0.0, dec_n_points=2, mask_dim=MASK_DIM,
                              initialize_box_type="mask2box", dn_enabled=False,
                              mask_box_convention=convention).eval()
        original = dec._decode

        def record(tgt, ref_boxes, *args, _c=convention, _f=original):
            seen[_c] = ref_boxes
            return _f(tgt, ref_boxes, *args)

        dec._decode = record
        with torch.no_grad():
            out = dec(enc)
            masks = dec.masks_from_embed(out["interm"]["pred_mask_embed"], enc.mask_features) > 0
        seen[convention + "_masks"] = masks
    assert torch.equal(seen["unit_square_masks"], seen["pixel_index_masks"])
    nonempty = seen["unit_square_masks"].flatten(2).any(-1)[0]
    assert int(nonempty.sum()) > 0
    diff = seen["unit_square"][0] - seen["pixel_index"][0]
    # 16 x 16 mask map: (0.5/16, 0.5/16, 1/16, 1/16), after inverse sigmoid and sigmoid,
    # whose 1e-5 clamp moves a full-width box (w = 1) by 1e-5
    torch.testing.assert_close(diff[nonempty], torch.tensor([[1 / 32, 1 / 32, 1 / 16, 1 / 16]])
                               .expand(int(nonempty.sum()), 4), rtol=0, atol=2e-5)
    # an empty mask keeps its two-stage box in both (a remaining difference: Mask DINO's
    # mask2box gives such a query a degenerate box at the canvas corner)
    assert torch.equal(diff[~nonempty], torch.zeros_like(diff[~nonempty]))


def test_two_stage_anchor_sizes_per_level():
    from unip_v2.modeling.image_encoder.proposal_decoder import two_stage_anchors

    shapes = torch.tensor([[2, 2], [1, 1]])
    pad = torch.zeros(1, 5, dtype=torch.bool)
    default, _ = two_stage_anchors(shapes, pad)
    mask_dino, valid = two_stage_anchors(shapes, pad, sizes=[0.4, 0.05])
    boxes = mask_dino.sigmoid()[0]
    # level 0 (2 x 2): centres 0.25 / 0.75, side 0.4; level 1 (1 x 1): centre 0.5, side 0.05
    want = torch.tensor([[0.25, 0.25, 0.4, 0.4], [0.75, 0.25, 0.4, 0.4],
                         [0.25, 0.75, 0.4, 0.4], [0.75, 0.75, 0.4, 0.4], [0.5, 0.5, 0.05, 0.05]])
    torch.testing.assert_close(boxes, want)
    torch.testing.assert_close(default.sigmoid()[0, :, 2], torch.tensor([0.05] * 4 + [0.1]))
    assert valid.all()
    with pytest.raises(ValueError, match="anchor_sizes must hold one size"):
        ProposalDecoder(D, 4, 2, 1, 2, 32, 0.0, 2, MASK_DIM, anchor_sizes=[0.05])


def test_converter_conventions_and_bad_values():
    assert maskdino_conventions("mask2box") == [
        "MODEL.IMAGE_ENCODER.TWO_STAGE_INVALID_TOKENS", "zero",
        "MODEL.IMAGE_ENCODER.INITIALIZE_BOX_TYPE", "mask2box",
        "MODEL.IMAGE_ENCODER.MASK_BOX_CONVENTION", "pixel_index"]
    assert maskdino_conventions("bitmask")[-1] == "unit_square"
    assert maskdino_conventions("bitmask", [0.4, 0.2])[-2:] == [
        "MODEL.IMAGE_ENCODER.TWO_STAGE_ANCHOR_SIZES", [0.4, 0.2]]
    assert maskdino_conventions("no")[-2:] == ["MODEL.IMAGE_ENCODER.INITIALIZE_BOX_TYPE", "none"]
    with pytest.raises(ValueError, match="INITIALIZE_BOX_TYPE"):
        maskdino_conventions("boxes")
    with pytest.raises(ValueError, match="invalid_tokens must be one of"):
        ProposalDecoder(D, 4, 1, 1, 2, 32, 0.0, 2, MASK_DIM, invalid_tokens="keep")
    with pytest.raises(ValueError, match="mask_box_convention must be one of"):
        ProposalDecoder(D, 4, 1, 1, 2, 32, 0.0, 2, MASK_DIM, mask_box_convention="index")


def test_parity_tool_maps_token_indices_between_level_orders():
    from tools_loader import load_tool

    parity = load_tool("check_maskdino_parity")
    # Mask DINO's two-stage tokens: coarse level first (1 x 1, then 2 x 2); unip-v2's: fine
    # level first
    mapped = parity.to_maskdino_tokens(torch.arange(5), [(1, 1), (2, 2)])
    assert mapped.tolist() == [1, 2, 3, 4, 0]
