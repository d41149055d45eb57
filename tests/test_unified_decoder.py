"""The unified decoder g and its attribute-routed conditional MoE FFN."""
import pytest
import torch
import torch.nn.functional as F

import unip_v2  # noqa: F401  (first: makes detectron2 importable)

from detectron2.config import get_cfg

from unip_v2 import add_unip_v2_config
from unip_v2.modeling.unified_decoder import (
    ATTRIBUTE_DIM, AttributeBit, ConditionalMoEFFN, Segment, SegmentKind, UnifiedDecoder,
    sequence_attributes,
)

W, FFN, E = 32, 64, 8


def _moe(enabled=True, seed=0):
    torch.manual_seed(seed)
    return ConditionalMoEFFN(W, FFN, num_experts=E, top_k=2, attribute_dim=ATTRIBUTE_DIM,
                             enabled=enabled)


def _all_attribute_rows():
    """All 256 binary attribute vectors (256, 8)."""
    bits = torch.arange(256)[:, None] >> torch.arange(ATTRIBUTE_DIM)
    return (bits & 1).float()


def _decoder(**kw):
    torch.manual_seed(0)
    args = dict(width=W, depth=2, heads=4, ffn_dim=FFN, drop_path=0.0, num_experts=E)
    args.update(kw)
    return UnifiedDecoder(**args)


# ------------------------------------------------------------------ attributes
def test_sequence_attributes_table():
    a = sequence_attributes([SegmentKind.IMAGE_GLOBAL, SegmentKind.IMAGE_REGION,
                             SegmentKind.TEXT], [False, False, True], is_target=False)
    rows = ["".join(str(int(v)) for v in row) for row in a]
    assert rows == ["00011100", "10011100", "01011100", "00111101"]
    t = sequence_attributes([SegmentKind.TEXT], [False], is_target=True)
    assert t[:, AttributeBit.TARGET].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="only TEXT segments can be causal"):
        sequence_attributes([SegmentKind.IMAGE_REGION], [True], is_target=False)


# ------------------------------------------------------------------ MoE
def test_routing_depends_only_on_attributes():
    """Uni-Perceiver-MoE's attribute routing: the gate sees a segment's attribute row, never
    its tokens. Segments 0 and 1 share a row, segment 2 has another: the same token content
    gives the same output in segments 0 and 1 (one decision, training noise included, drawn
    once per distinct row) and another in segment 2."""
    moe = _moe().train()
    attrs = torch.tensor([[1, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 1.]])
    table = torch.cat([attrs[:1], attrs[:1], attrs[1:]])
    token = torch.randn(W)
    x = torch.randn(1, 6, W)
    x[0, 1] = x[0, 3] = x[0, 5] = token
    ids = torch.tensor([[0, 0, 1, 1, 2, 2]])
    torch.manual_seed(4)
    out = moe(x, ids, table)
    torch.testing.assert_close(out[0, 1], out[0, 3])
    assert (out[0, 1] - out[0, 5]).abs().max() > 1e-3
    # Different attribute vectors can route to different experts (fixed seed).
    moe.eval()
    idx, _ = moe.gate(_all_attribute_rows())
    assert len({tuple(sorted(r)) for r in idx.tolist()}) > 1
    # Same attributes, different content: output equals the same merged FFN applied.
    x = torch.randn(2, 5, W)
    ids = torch.zeros(2, 5, dtype=torch.long)
    out_a = moe(x, ids, attrs[:1])
    out_b = moe(torch.randn(2, 5, W), ids, attrs[:1])
    w1, b1, w2, b2 = moe.merged_weights(*moe.gate(attrs[:1]))
    ref = F.linear(F.gelu(F.linear(x, w1[0], b1[0])), w2[0], b2[0])
    torch.testing.assert_close(out_a, ref)
    assert out_a.shape == out_b.shape == (2, 5, W)


def test_eval_deterministic_and_training_noisy():
    moe = _moe()
    rows = _all_attribute_rows()
    moe.eval()
    i1, w1 = moe.gate(rows)
    i2, w2 = moe.gate(rows)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)
    assert torch.allclose(w1.sum(-1), torch.ones(len(rows)))
    moe.train()
    torch.manual_seed(1)
    i3, w3 = moe.gate(rows)
    assert not torch.allclose(w3, w1)  # noise of std 1/E moved the weights
    assert moe.gate.noise_std == pytest.approx(1.0 / E)


def test_training_noise_is_one_gaussian_draw_per_distinct_row():
    """Uni-Perceiver-MoE's "vmoe" noise, training only: logits + N(0, (1/E)^2), one draw per
    attribute row and call, softmax over all E experts, top 2 renormalised. The oracle
    computes the clean logits in float64 from the gate's parameters and adds the same
    torch.randn((U, E)) draw."""
    moe = _moe().double().train()
    rows = _all_attribute_rows().double()[torch.tensor([5, 77, 130, 255])]
    gate = moe.gate
    hidden = F.layer_norm(rows @ gate.tag_transform.weight.T + gate.tag_transform.bias, (W,),
                          gate.tag_norm.weight, gate.tag_norm.bias)
    clean = hidden @ gate.wg.weight.T                                     # (4, E)
    torch.manual_seed(9)
    idx, w = gate(rows)
    torch.manual_seed(9)
    probs = (clean + torch.randn(4, E, dtype=torch.float64) / E).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(w, top.values / top.values.sum(-1, keepdim=True))


def test_merged_weights_equal_explicit_per_token_mixture():
    """Key correctness test: merging expert weights per segment equals, token by token,
    mixing the two selected experts' outputs of each Linear (fc1 and fc2 share the
    decision; GELU between the mixed fc1 output and the mixed fc2)."""
    moe = _moe().double().eval()
    rows = _all_attribute_rows().double()
    attrs = rows[torch.tensor([3, 37, 200, 3, 129])]  # a repeated row on purpose
    torch.manual_seed(3)
    x = torch.randn(2, 7, W, dtype=torch.float64)
    ids = torch.randint(0, attrs.shape[0], (2, 7))
    out = moe(x, ids, attrs)

    indices, weights = moe.gate(attrs)
    ref = torch.empty_like(x)
    for b in range(2):
        for t in range(7):
            s = int(ids[b, t])
            h = sum(g * (moe.fc1_weight[e] @ x[b, t] + moe.fc1_bias[e])
                    for g, e in zip(weights[s], indices[s]))
            a = F.gelu(h)
            ref[b, t] = sum(g * (moe.fc2_weight[e] @ a + moe.fc2_bias[e])
                            for g, e in zip(weights[s], indices[s]))
    torch.testing.assert_close(out, ref)
    # ... which is the per-Linear merge, not a mixture of whole expert FFNs.
    s, (b, t) = int(ids[0, 0]), (0, 0)
    whole = sum(g * (moe.fc2_weight[e] @ F.gelu(moe.fc1_weight[e] @ x[b, t] + moe.fc1_bias[e])
                     + moe.fc2_bias[e]) for g, e in zip(weights[s], indices[s]))
    assert not torch.allclose(whole, out[b, t])


def test_dense_switch():
    moe = _moe(enabled=False)
    names = {n for n, _ in moe.named_parameters()}
    assert names == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert moe.fc1.weight.shape == (FFN, W) and moe.fc2.weight.shape == (W, FFN)
    x = torch.randn(2, 4, W)
    out = moe(x, torch.zeros(2, 4, dtype=torch.long), torch.zeros(1, ATTRIBUTE_DIM))
    torch.testing.assert_close(out, moe.fc2(F.gelu(moe.fc1(x))))
    dec = _decoder(moe_enabled=False)
    assert not any("gate" in n for n, _ in dec.named_parameters())


def test_all_experts_receive_gradient():
    moe = _moe().train()
    rows = _all_attribute_rows()
    grads = torch.zeros(E)
    for step in range(4):
        torch.manual_seed(step)
        attrs = rows[torch.randperm(256)[:16]]
        x = torch.randn(2, 16, W)
        ids = torch.arange(16).expand(2, 16)
        moe.zero_grad()
        moe(x, ids, attrs).pow(2).mean().backward()
        grads += moe.fc1_weight.grad.abs().sum((1, 2)) + moe.fc2_weight.grad.abs().sum((1, 2))
        grads += moe.fc1_bias.grad.abs().sum(1) + moe.fc2_bias.grad.abs().sum(1)
    assert (grads > 0).all(), grads
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.gate.parameters())


def test_moe_bad_shapes():
    moe = _moe()
    ids = torch.zeros(2, 4, dtype=torch.long)
    attrs = torch.zeros(1, ATTRIBUTE_DIM)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 32\), got \(2, 4, 31\)"):
        moe(torch.randn(2, 4, W - 1), ids, attrs)
    with pytest.raises(ValueError, match=r"segment_ids must have shape"):
        moe(torch.randn(2, 4, W), ids[:, :3], attrs)
    with pytest.raises(ValueError, match=r"attributes must have shape \(S, 8\), got \(1, 7\)"):
        moe(torch.randn(2, 4, W), ids, attrs[:, :7])
    with pytest.raises(ValueError, match=r"segment_ids must lie in \[0, S=1\)"):
        moe(torch.randn(2, 4, W), ids + 1, attrs)


# ------------------------------------------------------------------ decoder
def _segments(b=2):
    g = torch.randn(b, 3, W)
    r = torch.randn(b, 5, W)
    r_pad = torch.zeros(b, 5, dtype=torch.bool)
    r_pad[1, 3:] = True
    return [Segment(g, None, SegmentKind.IMAGE_GLOBAL), Segment(r, r_pad, SegmentKind.IMAGE_REGION)]


def test_decoder_shapes_and_spe():
    dec = _decoder().eval()
    segs = _segments()
    out = dec(segs)
    assert out.spe.shape == (2, W)
    assert out.tokens.shape == (2, 1 + 3 + 5, W) and out.padding_mask.shape == (2, 9)
    assert not out.padding_mask[:, 0].any() and out.padding_mask[1, 7:].all()
    torch.testing.assert_close(out.spe, out.tokens[:, 0])
    assert (out.tokens[1, 7:] == 0).all()


def test_padded_tokens_never_change_other_outputs():
    dec = _decoder().eval()
    torch.manual_seed(5)
    segs = _segments()
    text = torch.randn(2, 4, W)
    text_pad = torch.tensor([[False] * 4, [False, False, True, True]])
    ref = dec(segs + [Segment(text, text_pad, SegmentKind.TEXT)])
    # Append garbage (huge values, inf, nan) padded tokens to the region and text segments.
    garbage = torch.full((2, 3, W), 1e6)
    garbage[0, 0, 0], garbage[1, 1, 3] = float("nan"), float("inf")
    r = segs[1]
    segs2 = [segs[0],
             Segment(torch.cat([r.tokens, garbage], 1),
                     torch.cat([r.padding_mask, torch.ones(2, 3, dtype=torch.bool)], 1), r.kind),
             Segment(torch.cat([text, garbage], 1),
                     torch.cat([text_pad, torch.ones(2, 3, dtype=torch.bool)], 1),
                     SegmentKind.TEXT)]
    out = dec(segs2)
    assert torch.isfinite(out.tokens).all()
    keep = torch.cat([torch.arange(9), torch.arange(12, 16)])
    torch.testing.assert_close(out.tokens[:, keep], ref.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.spe, ref.spe, atol=1e-5, rtol=1e-5)


def test_attn_mask_blocks_attention():
    dec = _decoder().eval()
    segs = [Segment(torch.randn(1, 4, W), None, SegmentKind.TEXT, causal=True)]
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    a = dec(segs, attn_mask=causal).tokens
    segs[0].tokens = segs[0].tokens.clone()
    segs[0].tokens[0, 3] += 5.0  # the last token: earlier rows cannot see it
    b = dec(segs, attn_mask=causal).tokens
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_gradients_reach_every_decoder_parameter():
    dec = _decoder(drop_path=0.1).train()
    for is_target in (False, True):
        segs = _segments() + [Segment(torch.randn(2, 4, W), None, SegmentKind.TEXT)]
        out = dec(segs, is_target=is_target)
        (out.spe.sum() + out.tokens.pow(2).mean()).backward()
    missing = [n for n, p in dec.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Experts never selected by these few routings get no gradient by design; everything
    # else must.
    missing = [n for n in missing if ".ffn.fc" not in n]
    assert not missing, missing
    for layer in dec.layers:
        assert layer.ffn.fc1_weight.grad.abs().sum() > 0


def test_decoder_bad_inputs():
    dec = _decoder()
    with pytest.raises(ValueError, match="at least one segment"):
        dec([])
    with pytest.raises(ValueError, match=r"segment 1 tokens must have shape \(B=2, L_i, 32\), "
                                         r"got \(3, 4, 32\)"):
        dec([Segment(torch.randn(2, 4, W), None, SegmentKind.TEXT),
             Segment(torch.randn(3, 4, W), None, SegmentKind.TEXT)])
    with pytest.raises(ValueError, match=r"padding_mask must be bool of shape \(2, 4\)"):
        dec([Segment(torch.randn(2, 4, W), torch.zeros(2, 5, dtype=torch.bool),
                     SegmentKind.TEXT)])
    with pytest.raises(ValueError, match=r"attn_mask must be bool of shape \(L, L\) = \(5, 5\)"):
        dec([Segment(torch.randn(2, 4, W), None, SegmentKind.TEXT)],
            attn_mask=torch.zeros(4, 4, dtype=torch.bool))


def test_from_config():
    cfg = get_cfg()
    add_unip_v2_config(cfg)
    c = cfg.MODEL.UNIFIED_DECODER
    assert (c.WIDTH, c.DEPTH, c.NUM_HEADS, c.FFN_DIM) == (768, 6, 12, 3072)
    assert (c.DROP_PATH, c.DROPOUT) == (0.1, 0.0)
    assert (c.MOE.ENABLED, c.MOE.NUM_EXPERTS, c.MOE.TOP_K) == (True, 8, 2)
    c.WIDTH, c.DEPTH, c.NUM_HEADS, c.FFN_DIM, c.MOE.NUM_EXPERTS = W, 1, 4, FFN, 4
    dec = UnifiedDecoder(cfg)
    assert len(dec.layers) == 1 and dec.layers[0].ffn.fc1_weight.shape == (4, FFN, W)


# ------------------------------------------------------------------ routing plan
def test_routing_plan_of_a_hand_worked_sequence():
    """plan_routing groups tokens by their segment's distinct attribute row, on the host.
    Image input [<SPE>, global x 2, region x 3], B = 2, L = 6 (rows from the table of
    attributes.py): <SPE> 00011000, global 10011000, region 01011000. Sorted
    lexicographically (the order torch.unique(dim=0) gives, in which the gate draws its
    training noise): <SPE> < region < global, so groups <SPE> 0, region 1, global 2.
    Flattened token b * 6 + p: group 0 = {0, 6}, group 1 = {3, 4, 5, 9, 10, 11}, group 2 =
    {1, 2, 7, 8}; counts 2, 6, 4."""
    from unip_v2.modeling.unified_decoder.moe import plan_routing

    spe, glob, region = (tuple(float(c) for c in s) for s in ("00011000", "10011000", "01011000"))
    plan = plan_routing([spe, glob, region], [1, 2, 3], batch=2)
    assert plan.unique_rows.tolist() == [list(spe), list(region), list(glob)]
    assert plan.order.tolist() == [0, 6, 3, 4, 5, 9, 10, 11, 1, 2, 7, 8]
    assert plan.counts == [2, 6, 4]
    # two segments with one row share a group: [<SPE>, text, text] -> 2 groups
    text = tuple(float(c) for c in "00100100")
    plan = plan_routing([spe, text, text], [1, 2, 1], batch=1)
    assert plan.counts == [1, 3] and plan.order.tolist() == [0, 1, 2, 3]
    # torch.unique sorts the rows alike
    rows = sequence_attributes([SegmentKind.IMAGE_GLOBAL, SegmentKind.IMAGE_REGION],
                               [False, False], is_target=False)
    assert torch.equal(plan_routing(rows.tolist(), [1, 2, 3], 2).unique_rows,
                       torch.unique(rows, dim=0))


def test_routing_is_planned_once_per_decoder_call_and_never_reads_the_device(monkeypatch):
    """The decoder plans its MoE routing once per call, whatever its depth, and no layer
    regroups the tokens or reads a tensor back (torch.unique, bincount, .tolist(), .item(),
    int() or bool() of a tensor would each wait for a GPU)."""
    from unip_v2.modeling.unified_decoder import moe as moe_module
    from unip_v2.modeling.unified_decoder import unified_decoder as decoder_module

    decoders = {depth: _decoder(depth=depth, drop_path=0.1).train() for depth in (1, 4)}
    plans, reads = [], []
    real_plan = decoder_module.plan_routing

    def counted_plan(*args, **kwargs):
        plans.append(1)
        return real_plan(*args, **kwargs)

    def forbidden(name, real):
        def wrapper(*args, **kwargs):
            reads.append(name)
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(decoder_module, "plan_routing", counted_plan)
    monkeypatch.setattr(moe_module, "group_tokens", forbidden("group_tokens", moe_module.group_tokens))
    for name in ("unique", "bincount"):
        monkeypatch.setattr(torch, name, forbidden(name, getattr(torch, name)))
    for name in ("tolist", "item", "__int__", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name, getattr(torch.Tensor, name)))
    for depth, dec in decoders.items():
        for is_target in (False, True):
            plans.clear()
            segs = _segments() + [Segment(torch.randn(2, 4, W), None, SegmentKind.TEXT)]
            dec(segs, is_target=is_target)
            assert len(plans) == 1, (depth, len(plans))
    assert reads == []


def _attention64(x, attn, allowed):
    """Multi-head self-attention written out: softmax(q k^T / sqrt(d_h)) v per head over
    the allowed keys, heads concatenated, output projection."""
    b, length, width = x.shape
    heads = attn.heads
    dh = width // heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :width], qkv[..., width:2 * width], qkv[..., 2 * width:]
    out = torch.empty_like(x)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / dh ** 0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., sl] = scores.softmax(-1) @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


def _moe_token64(ffn, row, x):
    """Uni-Perceiver-MoE's gate and the per-Linear mixture for one token: hidden =
    LN(W_tag row + b), p = softmax(W_g hidden) over E experts, the top 2 renormalised;
    fc1 and fc2 each mix the two experts' outputs with those weights, GELU between."""
    gate = ffn.gate
    hidden = F.layer_norm(gate.tag_transform.weight @ row + gate.tag_transform.bias,
                          (ffn.width,), gate.tag_norm.weight, gate.tag_norm.bias)
    probs = (gate.wg.weight @ hidden).softmax(-1)
    top = probs.argsort(descending=True)[:2]
    g = probs[top] / probs[top].sum()
    h = sum(g[i] * (ffn.fc1_weight[e] @ x + ffn.fc1_bias[e]) for i, e in enumerate(top))
    a = F.gelu(h)
    return sum(g[i] * (ffn.fc2_weight[e] @ a + ffn.fc2_bias[e]) for i, e in enumerate(top))


def test_decoder_equals_a_float64_per_token_oracle():
    """The whole decoder (eval) against a float64 oracle written here, token by token:
    [<SPE>, global (3), region (5, padded in image 1), causal text (2), text (2)] with the
    segment-type embeddings, pre-LN layers (Uni-Perceiver v2, Sec. 4.3) whose FFN mixes two
    experts per token from its segment's attribute row (rows written out from the table of
    attributes.py: b0-b2 this segment's kind, b3-b5 kinds in the sequence, b6 target, b7
    causal text), a final LayerNorm, padded outputs zeroed. Input and target sequences."""
    dec = _decoder(depth=2).double().eval()
    g = torch.Generator().manual_seed(11)
    kinds = [SegmentKind.IMAGE_GLOBAL, SegmentKind.IMAGE_REGION, SegmentKind.TEXT,
             SegmentKind.TEXT]
    lengths = [3, 5, 2, 2]
    toks = [torch.randn(2, n, W, generator=g, dtype=torch.float64) for n in lengths]
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[1, 3:] = True
    segs = [Segment(toks[0], None, kinds[0]), Segment(toks[1], pad, kinds[1]),
            Segment(toks[2], None, kinds[2], causal=True), Segment(toks[3], None, kinds[3])]
    for is_target in (False, True):
        t = "1" if is_target else "0"
        rows = [s.replace("t", t) for s in
                ("000111t0", "100111t0", "010111t0", "001111t1", "001111t0")]
        rows = torch.tensor([[float(c) for c in s] for s in rows], dtype=torch.float64)
        segment_of = [0] + [s + 1 for s, n in enumerate(lengths) for _ in range(n)]
        padding = torch.cat([torch.zeros(2, 4, dtype=torch.bool), pad,
                             torch.zeros(2, 4, dtype=torch.bool)], 1)
        x = torch.cat([dec.spe.expand(2, 1, W)] + [
            tok.masked_fill(p[..., None], 0.0) + dec.type_embed.weight[kind]
            for tok, p, kind in zip(toks, [torch.zeros(2, 3, dtype=torch.bool), pad,
                                          torch.zeros(2, 2, dtype=torch.bool),
                                          torch.zeros(2, 2, dtype=torch.bool)], kinds)], 1)
        allowed = (~padding)[:, None, :].expand(2, x.shape[1], -1)
        for layer in dec.layers:
            x = x + _attention64(F.layer_norm(x, (W,), layer.norm1.weight, layer.norm1.bias),
                                 layer.attn, allowed)
            h = F.layer_norm(x, (W,), layer.norm2.weight, layer.norm2.bias)
            x = x + torch.stack([torch.stack([
                _moe_token64(layer.ffn, rows[segment_of[p]], h[b, p])
                for p in range(x.shape[1])]) for b in range(2)])
        want = F.layer_norm(x, (W,), dec.norm.weight, dec.norm.bias).masked_fill(
            padding[..., None], 0.0)
        out = dec(segs, is_target=is_target)
        torch.testing.assert_close(out.tokens, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.spe, want[:, 0], rtol=1e-10, atol=1e-10)
        assert torch.equal(out.padding_mask, padding)
