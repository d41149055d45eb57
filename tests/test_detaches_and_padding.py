"""Documented gradient blocks (detaches) and padding handling of the image encoder.

Detaches, each checked by a loss of the downstream outputs only, whose gradient must be
exactly zero at the detached input while a control path still carries gradient:
- general region proposals (Uni-Perceiver v2, Eq. 9): box and mask enter the fusion
  detached, so the fusion cannot move the proposal network's localisation;
- proposal decoder (Mask DINO's two-stage query selection; DINO's "look forward twice"):
  the selected encoder features become the query content detached; the initial reference
  boxes and every layer's refined reference enter the next layer detached (the reported
  boxes still refine the undetached box, so a layer's box loss reaches the previous
  layer's refinement).

Padding: an image padded in a batch is NOT guaranteed to give the same proposals as the
image alone, by design. The backbone's convolutions read the padded area (which is not zero
after a BatchNorm's bias), GroupNorm statistics of the pixel encoder cover the whole padded
map, and every box of the proposal decoder (two-stage anchors of side 0.05 * 2**l, box
refinement in inverse-sigmoid space, sine box embeddings) is relative to the padded canvas,
as the training targets are. What does hold, and is checked here module by module, is what
the design states: padded tokens are masked out of deformable attention, never selected as
queries, excluded from the mask pooling of Eq. 9 and from the attention pools of Eq. 3, and
position encodings count valid pixels only; so garbage in the padded area changes nothing,
and the valid part equals the image's own (unpadded) computation.
"""
import pytest
import torch
from torch.nn import functional as F

import unip_v2  # noqa: F401  first: makes detectron2 importable

from unip_v2.modeling.image_encoder import (
    GeneralRegionProposals,
    GlobalTokens,
    PixelEncoderOutput,
    ProposalDecoder,
)
from unip_v2.modeling.image_encoder.deformable_transformer import DeformableEncoder
from unip_v2.modeling.image_encoder.pixel_encoder import downsample_padding_mask
from unip_v2.modeling.image_encoder.position_encoding import sine_position_encoding_2d


def _no_grad(g):
    return g is None or bool((g == 0).all())


def _has_grad(g):
    return g is not None and bool(g.abs().sum() > 0)


# ---------------------------------------------------------------- region proposals (Eq. 9)

def _proposal_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    q_sem = torch.randn(2, 5, 8, generator=g)
    boxes = torch.rand(2, 5, 4, generator=g) * 0.5 + 0.25
    masks = torch.randn(2, 5, 8, 12, generator=g) * 3
    valid_hw = torch.tensor([[8, 8], [4, 8]])
    return q_sem, boxes, masks, valid_hw


def _proposals():
    torch.manual_seed(0)
    return GeneralRegionProposals(hidden_dim=8, output_dim=6, mask_pool_size=4, topk=3)


def test_fusion_gives_no_gradient_to_box_and_mask():
    """A loss of the fused proposals (tokens and objectness) reaches q_sem and the fusion's
    own layers, but the box and mask inputs get exactly zero gradient, although the fused
    output does depend on them (control: perturbing either changes it)."""
    m = _proposals()
    q_sem, boxes, masks, valid_hw = _proposal_inputs()
    q_sem.requires_grad_(), boxes.requires_grad_(), masks.requires_grad_()
    tokens, index, logits = m(q_sem, boxes, masks, valid_hw)
    (tokens.square().sum() + logits.sum()).backward()
    assert _no_grad(boxes.grad) and _no_grad(masks.grad)
    assert _has_grad(q_sem.grad)
    assert _has_grad(m.box_proj.weight.grad) and _has_grad(m.mask_proj.weight.grad)
    with torch.no_grad():
        base = m.fuse(q_sem, boxes, masks, valid_hw)
        assert not torch.allclose(m.fuse(q_sem, boxes * 0.9, masks, valid_hw), base, atol=1e-4)
        assert not torch.allclose(m.fuse(q_sem, boxes, masks + 1, valid_hw), base, atol=1e-4)


def test_mask_pooling_averages_probabilities_of_the_valid_region():
    """M's input is the 4 x 4 average of sigmoid(mask) over the image's valid region only
    (Eq. 9; probabilities, not logits): image 0 (valid 8 x 8 of an 8 x 12 map) pools 2 x 2
    blocks, image 1 (valid 4 x 8) 1 x 2 blocks; float64 oracle."""
    m = _proposals()
    q_sem, boxes, masks, valid_hw = _proposal_inputs()
    seen = []
    m.mask_proj.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    with torch.no_grad():
        m.fuse(q_sem, boxes, masks, valid_hw)
    p = masks.double().sigmoid()
    want0 = p[0, :, :8, :8].reshape(5, 4, 2, 4, 2).mean((2, 4))
    want1 = p[1, :, :4, :8].reshape(5, 4, 1, 4, 2).mean((2, 4))
    got = seen[0].double().reshape(2, 5, 4, 4)
    torch.testing.assert_close(got[0], want0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want1, rtol=1e-5, atol=1e-6)


def test_proposals_ignore_padded_mask_area_and_equal_the_unpadded_image():
    """Garbage mask logits in the padded area change no fused proposal, no objectness and
    no top-O choice; image 1 gives the same as when it is alone on its own 4 x 8 map."""
    m = _proposals().eval()
    q_sem, boxes, masks, valid_hw = _proposal_inputs()
    with torch.no_grad():
        ref = m(q_sem, boxes, masks, valid_hw)
        garbage = masks.clone()
        garbage[1, :, 4:, :] = 50.0
        garbage[1, :, :, 8:] = -50.0
        garbage[0, :, :, 8:] = 50.0
        out = m(q_sem, boxes, garbage, valid_hw)
        alone = m(q_sem[1:], boxes[1:], masks[1:, :, :4, :8].contiguous(), valid_hw[1:])
    for a, b in zip(ref, out):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(alone[0][0], ref[0][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone[2][0], ref[2][1], rtol=1e-5, atol=1e-6)
    assert torch.equal(alone[1][0], ref[1][1])


# ---------------------------------------------------------------- global tokens (Eq. 3)

def test_global_tokens_ignore_padding_and_equal_the_unpadded_image():
    """The attention pools and the flattened valid positions of an image padded into a
    3 x 4 map (garbage 1e3 in the padding) equal those of the image alone (2 x 3)."""
    torch.manual_seed(0)
    gt = GlobalTokens(in_channels=5, output_dim=8, num_pools=2, num_heads=2).eval()
    g = torch.Generator().manual_seed(1)
    f_alone = torch.randn(1, 5, 2, 3, generator=g)
    f_batch = torch.full((2, 5, 3, 4), 1e3)
    f_batch[0, :, :2, :3] = f_alone[0]
    f_batch[1] = torch.randn(5, 3, 4, generator=g)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[0, 2:, :] = True
    mask[0, :, 3:] = True
    with torch.no_grad():
        a, a_mask = gt(f_alone, torch.zeros(1, 2, 3, dtype=torch.bool))
        b, b_mask = gt(f_batch, mask)
        f_batch[0, :, 2:] = -7.0                           # other garbage: same result
        c, _ = gt(f_batch, mask)
    assert not a_mask.any() and b_mask[0].tolist() == [False] * 2 + mask[0].flatten().tolist()
    torch.testing.assert_close(b[0, :2], a[0, :2], rtol=1e-5, atol=1e-5)
    valid = b[0, 2:].reshape(3, 4, 8)[:2, :3].reshape(6, 8)
    torch.testing.assert_close(valid, a[0, 2:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c[0, :2], b[0, :2], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- deformable encoder

def test_deformable_encoder_valid_tokens_equal_the_unpadded_image():
    """Two levels (strides 8, 16) of a 32 x 48 image, alone (4 x 6, 2 x 3) and padded in a
    48 x 64 canvas (6 x 8, 3 x 4) next to another image, garbage (1e3) in its padding:
    padded values are masked out of the deformable attention, sampling offsets are in
    pixels, so every valid token's output equals the unpadded computation."""
    torch.manual_seed(0)
    d = 16
    enc = DeformableEncoder(2, d_model=d, dim_feedforward=32, dropout=0.0, n_heads=2,
                            n_levels=2, n_points=2).eval()
    level_embed = torch.randn(2, d)
    g = torch.Generator().manual_seed(2)
    alone_maps = [torch.randn(1, d, 4, 6, generator=g), torch.randn(1, d, 2, 3, generator=g)]
    pixel_mask = torch.zeros(2, 48, 64, dtype=torch.bool)
    pixel_mask[0, 32:, :] = True
    pixel_mask[0, :, 48:] = True

    def run(maps, pmask):
        src, pos, flat_mask, shapes = [], [], [], []
        for lvl, x in enumerate(maps):
            h, w = x.shape[-2:]
            mk = downsample_padding_mask(pmask, (h, w))
            src.append(x.flatten(2).transpose(1, 2))
            pos.append(sine_position_encoding_2d(mk, d // 2).flatten(2).transpose(1, 2)
                       + level_embed[lvl])
            flat_mask.append(mk.flatten(1))
            shapes.append((h, w))
        shapes = torch.tensor(shapes)
        start = torch.cat((shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]))
        with torch.no_grad():
            out = enc(torch.cat(src, 1), torch.cat(pos, 1), shapes, start, torch.cat(flat_mask, 1))
        return [o.transpose(1, 2).reshape(o.shape[0], d, h, w)
                for o, (h, w) in zip(out.split(shapes.prod(1).tolist(), 1), shapes.tolist())]

    batch_maps = []
    for x, (H, W) in zip(alone_maps, [(6, 8), (3, 4)]):
        y = torch.full((2, d, H, W), 1e3)
        y[0, :, :x.shape[2], :x.shape[3]] = x[0]
        y[1] = torch.randn(d, H, W, generator=g)
        batch_maps.append(y)
    alone = run(alone_maps, torch.zeros(1, 32, 48, dtype=torch.bool))
    batched = run(batch_maps, pixel_mask)
    for a, b in zip(alone, batched):
        h, w = a.shape[-2:]
        torch.testing.assert_close(b[0, :, :h, :w], a[0], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- proposal decoder

D, MASK_DIM, Q = 16, 8, 6
SHAPES = [(4, 4), (2, 2)]


def _encoder_output(seed=0, hw=(12, 8)):
    """A synthetic pixel-encoder output: 2 images, levels 4 x 4 and 2 x 2 (strides 4 and 8)
    of a 16 x 16 canvas; image 1 is hw pixels: for 12 x 8 the valid tokens are rows 0-2,
    cols 0-1 of level 0 and (0, 0), (1, 0) of level 1 (8 of 20)."""
    g = torch.Generator().manual_seed(seed)
    pixel_mask = torch.zeros(2, 16, 16, dtype=torch.bool)
    pixel_mask[1, hw[0]:, :] = True
    pixel_mask[1, :, hw[1]:] = True
    masks = [downsample_padding_mask(pixel_mask, s).flatten(1) for s in SHAPES]
    shapes = torch.tensor(SHAPES)
    return PixelEncoderOutput(
        memory=torch.randn(2, 20, D, generator=g), memory_padding_mask=torch.cat(masks, 1),
        spatial_shapes=shapes, level_start_index=torch.tensor([0, 16]), maps=[],
        mask_features=torch.randn(2, MASK_DIM, 8, 8, generator=g),
        mask_padding_mask=downsample_padding_mask(pixel_mask, (8, 8)))


def _decoder(initialize_box_type="none", perturb=True):
    torch.manual_seed(0)
    dec = ProposalDecoder(D, Q, num_levels=2, dec_layers=2, nheads=2, dim_feedforward=32,
                          dropout=0.0, dec_n_points=2, mask_dim=MASK_DIM,
                          initialize_box_type=initialize_box_type, dn_enabled=False)
    if perturb:
        # the zero-initialised layers (box refinement output, learned query embedding,
        # offset and attention weights) would block gradients at step 0 by design: give
        # them values so that every path carries gradient unless it is detached
        with torch.no_grad():
            for p in dec.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.1)
    return dec.eval()


def _decoder_loss(out, layers=(0, 1), boxes=True):
    loss = out["hidden"].square().sum()
    for i in layers:
        s = out["layers"][i]
        loss = loss + s["pred_logits"].sum() + s["pred_mask_embed"].square().sum()
        if boxes:
            loss = loss + s["pred_boxes"].sum()
    return loss


def _decoder_with_leaves(dec, enc):
    """Runs dec on enc and cuts the graph at two points, replacing each by a leaf whose
    gradient is then read: "content", the normalised encoder features every token's
    two-stage predictions and the selected queries come from; "enc_box", the two-stage box
    refinement _bbox_embed(content) (cut so that content's gradient flows only through the
    query-content path)."""
    leaves = {}

    def content_hook(mod, inp, out):
        leaves["content"] = out.detach().requires_grad_()
        return leaves["content"]

    def box_hook(mod, inp, out):
        if inp[0] is leaves.get("content"):
            leaves["enc_box"] = out.detach().requires_grad_()
            return leaves["enc_box"]

    h1 = dec.enc_output_norm.register_forward_hook(content_hook)
    h2 = dec._bbox_embed.register_forward_hook(box_hook)
    try:
        out = dec(enc)
    finally:
        h1.remove(), h2.remove()
    return out, leaves


@pytest.mark.parametrize("box_init", ["none", "mask2box"])
def test_decoder_query_content_is_detached(box_init):
    """The selected encoder features enter the decoder as query content detached: a loss
    of every decoder layer's outputs gives them zero gradient, while the two-stage
    predictions made from the same features (the control) do give them gradient."""
    dec, enc = _decoder(box_init), _encoder_output()
    out, leaves = _decoder_with_leaves(dec, enc)
    grad, = torch.autograd.grad(_decoder_loss(out), leaves["content"], allow_unused=True)
    assert _no_grad(grad)
    interm = out["interm"]["pred_logits"].sum() + out["interm"]["pred_mask_embed"].square().sum()
    grad, = torch.autograd.grad(interm, leaves["content"])
    assert _has_grad(grad)
    # the decoder layers themselves do learn from the loss (the memory as their value)
    enc.memory.requires_grad_()
    out = dec(enc)
    assert _has_grad(torch.autograd.grad(_decoder_loss(out), enc.memory)[0])


def test_decoder_initial_reference_boxes_are_detached():
    """The two-stage boxes become the first layer's reference detached: the decoder layers'
    losses (boxes included) give the two-stage box refinement zero gradient; the two-stage
    box output (the control) gives it gradient."""
    dec, enc = _decoder("none"), _encoder_output()
    out, leaves = _decoder_with_leaves(dec, enc)
    grad, = torch.autograd.grad(_decoder_loss(out), leaves["enc_box"], allow_unused=True)
    assert _no_grad(grad)
    grad, = torch.autograd.grad(out["interm"]["pred_boxes"].sum(), leaves["enc_box"])
    assert _has_grad(grad)


def test_decoder_layer_references_are_detached_but_reported_boxes_look_forward_twice():
    """Layer 0's refined box (its in-loop _bbox_embed output) enters layer 1 as a detached
    reference: layer 1's objectness, mask embeddings and hidden states give it zero
    gradient. Layer 1's reported boxes refine the undetached box, so their loss does reach
    it (DINO's "look forward twice")."""
    dec, enc = _decoder("none"), _encoder_output()
    leaves = {}

    def layer0_hook(mod, inp, out):
        leaves["out0"] = out

    def box_hook(mod, inp, out):
        if "out0" in leaves and inp[0] is leaves["out0"]:
            leaves["ref1"] = out.detach().requires_grad_()
            return leaves["ref1"]

    h1 = dec.decoder.layers[0].register_forward_hook(layer0_hook)
    h2 = dec._bbox_embed.register_forward_hook(box_hook)
    out = dec(enc)
    h1.remove(), h2.remove()
    grad, = torch.autograd.grad(_decoder_loss(out, layers=(1,), boxes=False), leaves["ref1"],
                                allow_unused=True)
    assert _no_grad(grad)
    grad, = torch.autograd.grad(out["layers"][1]["pred_boxes"].sum(), leaves["ref1"])
    assert _has_grad(grad)


def test_padded_tokens_are_never_selected_as_queries():
    """Two-stage query selection takes the top-Q valid tokens by objectness. The padded
    tokens are made the most attractive ones (their masked, constant feature LN(b) is the
    direction of the objectness weight), yet image 1 (8 valid tokens of 20) gets exactly its
    top 6 valid tokens, in order: the float64 oracle scores every token as
    class_embed(LayerNorm(enc_output(memory))) and reads which token each query is from
    its two-stage box (the anchor, as the box refinement starts at zero)."""
    dec, enc = _decoder("none", perturb=False), _encoder_output()
    with torch.no_grad():
        dec.enc_output.bias.copy_(3 * dec.class_embed.weight[0])
    with torch.no_grad():
        out = dec(enc)
    w, b = dec.enc_output.weight.double(), dec.enc_output.bias.double()
    x = enc.memory.double() @ w.T + b
    x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    x = x * dec.enc_output_norm.weight.double() + dec.enc_output_norm.bias.double()
    scores = x @ dec.class_embed.weight.double()[0] + dec.class_embed.bias.double()[0]
    anchors = []
    for lvl, (h, w_) in enumerate(SHAPES):
        for y in range(h):
            for xx in range(w_):
                anchors.append([(xx + 0.5) / w_, (y + 0.5) / h, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl])
    anchors = torch.tensor(anchors, dtype=torch.float64)
    for img in range(2):
        valid = ~enc.memory_padding_mask[img]
        order = [i for i in scores[img].argsort(descending=True).tolist() if valid[i]][:Q]
        torch.testing.assert_close(out["interm"]["pred_boxes"][img].double(), anchors[order],
                                   rtol=1e-5, atol=1e-6)
    # the test is meaningful: unmasked, a padded token would outscore every valid one
    pad_score = (dec.class_embed.weight.double()[0] @ F.layer_norm(
        dec.enc_output.bias.double(), (D,)) + dec.class_embed.bias.double()[0])
    assert pad_score > scores[1][~enc.memory_padding_mask[1]].max()


@pytest.mark.parametrize("box_init", ["none", "mask2box"])
def test_padded_memory_never_reaches_the_queries(box_init):
    """Image 1 is 12 x 4 pixels: 5 valid tokens for Q = 6 queries, so one query must sit on
    a padded token. Padded tokens enter the query selection as zeros, so changing the
    padded memory (to 1e4) changes no output of the decoder: not the two-stage predictions,
    nor any layer's, nor the hidden states."""
    dec, enc = _decoder(box_init), _encoder_output(hw=(12, 4))
    assert int((~enc.memory_padding_mask[1]).sum()) == 5
    with torch.no_grad():
        ref = dec(enc)
        enc.memory[enc.memory_padding_mask] = 1e4
        out = dec(enc)
    torch.testing.assert_close(out["hidden"], ref["hidden"])
    for key in ("pred_logits", "pred_boxes", "pred_mask_embed"):
        torch.testing.assert_close(out["interm"][key], ref["interm"][key])
        torch.testing.assert_close(out["layers"][-1][key], ref["layers"][-1][key])


def test_final_masks_carry_no_gradient_in_training():
    """The final layer's full mask logits (B, Q, h, w) are built without gradient in
    training (the losses read masks at sampled points through pred_mask_embed, and the
    fusion of Eq. 9 detaches them): they still equal pred_mask_embed . mask_features
    (Eq. 8, float64 oracle); in eval mode with gradients on they keep their graph."""
    dec, enc = _decoder("none"), _encoder_output()
    enc.memory.requires_grad_()
    enc.mask_features.requires_grad_()
    out = dec.train()(enc)
    final = out["layers"][-1]
    assert not final["pred_masks"].requires_grad
    want = torch.einsum("bqc,bchw->bqhw", final["pred_mask_embed"].detach().double(),
                        enc.mask_features.detach().double())
    torch.testing.assert_close(final["pred_masks"].double(), want, rtol=1e-5, atol=1e-5)
    assert final["pred_mask_embed"].requires_grad
    assert dec.eval()(enc)["layers"][-1]["pred_masks"].requires_grad
