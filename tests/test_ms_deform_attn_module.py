"""The MSDeformAttn layer: initialisation, reference points, padding, gradients, errors."""
import math
import re

import pytest
import torch

from unip_v2.layers import MSDeformAttn
from unip_v2.layers import ms_deform_attn_backend as backend_mod


def level_inputs(shapes, N=2, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    starts = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    S = int((ss[:, 0] * ss[:, 1]).sum())
    return torch.randn(N, S, C, generator=g), ss, starts


def test_initial_sampling_offsets_follow_head_directions():
    layer = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    bias = layer.sampling_offsets.bias.view(8, 3, 4, 2)
    # head 0 points along +x, head 2 along +y, head 1 along the diagonal; p-th point at p+1
    for p in range(4):
        torch.testing.assert_close(bias[0, :, p], torch.tensor([p + 1.0, 0.0]).expand(3, 2))
        torch.testing.assert_close(bias[1, :, p], torch.tensor([p + 1.0, p + 1.0]).expand(3, 2))
        torch.testing.assert_close(bias[2, :, p], torch.tensor([0.0, p + 1.0]).expand(3, 2),
                                   atol=1e-6, rtol=0)
    assert bias[4, 0, 0, 0].item() == pytest.approx(-1.0)  # head 4 along -x
    assert layer.sampling_offsets.weight.abs().sum() == 0
    assert layer.attention_weights.weight.abs().sum() == 0
    assert layer.attention_weights.bias.abs().sum() == 0


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_output_shape_and_backends_agree(ref_dim):
    shapes = ((9, 7), (5, 4), (3, 2))
    x, ss, starts = level_inputs(shapes)
    layer = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    torch.nn.init.normal_(layer.sampling_offsets.weight, std=0.5)  # leave the init pattern
    query = torch.randn(2, 11, 32)
    ref = torch.rand(2, 11, 3, ref_dim)
    outs = {}
    for backend in ["reference"] + [b for b in ("cpu",) if backend_mod._has_compiled(b)]:
        layer.backend = backend
        outs[backend] = layer(query, ref, x, ss, starts)
        assert outs[backend].shape == (2, 11, 32)
    for out in outs.values():
        torch.testing.assert_close(out, outs["reference"], atol=1e-5, rtol=0)


def test_box_reference_points_keep_samples_inside_the_box(monkeypatch):
    """With 4-d references, locations are centre + offset/P * size/2: an offset of P/2 * 2
    (the farthest initial point, scaled) lands on the box edge, not beyond it."""
    layer = MSDeformAttn(d_model=16, n_levels=1, n_heads=4, n_points=2)
    captured = {}

    def spy(value, ss, starts, locations, weights, backend=None):
        captured["loc"] = locations
        return value.new_zeros(value.shape[0], locations.shape[1], 16)

    import unip_v2.layers.ms_deform_attn_module as module
    monkeypatch.setattr(module, "ms_deform_attn", spy)
    x, ss, starts = level_inputs(((4, 4),), N=1, C=16)
    box = torch.tensor([0.5, 0.5, 0.2, 0.4]).view(1, 1, 1, 4)
    layer(torch.zeros(1, 1, 16), box, x, ss, starts)
    loc = captured["loc"].detach()[0, 0, :, 0]  # (M, P, 2)
    # initial offsets reach at most P = 2 along an axis -> half the box on that axis
    assert (loc[..., 0] - 0.5).abs().max() <= 0.1 + 1e-6
    assert (loc[..., 1] - 0.5).abs().max() <= 0.2 + 1e-6
    assert (loc[..., 0] - 0.5).abs().max() == pytest.approx(0.1)


def test_padding_mask_blocks_padded_positions():
    shapes = ((6, 5), (3, 3))
    x, ss, starts = level_inputs(shapes, N=1)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    mask = torch.zeros(1, x.shape[1], dtype=torch.bool)
    mask[0, 10:20] = True
    query, ref = torch.randn(1, 8, 32), torch.rand(1, 8, 2, 2)
    out = layer(query, ref, x, ss, starts, input_padding_mask=mask)
    x2 = x.clone()
    x2[0, 10:20] = 1e3 * torch.randn(10, 32)  # garbage in the padding
    out2 = layer(query, ref, x2, ss, starts, input_padding_mask=mask)
    torch.testing.assert_close(out, out2)
    out3 = layer(query, ref, x2, ss, starts)  # without the mask the garbage shows
    assert not torch.allclose(out, out3)


def test_gradients_reach_every_parameter():
    x, ss, starts = level_inputs(((6, 6), (3, 3)))
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    # At initialisation the offset and attention weights are zero, so the query has no
    # gradient path yet; move them as one optimiser step would.
    for lin in (layer.sampling_offsets, layer.attention_weights):
        torch.nn.init.normal_(lin.weight, std=0.1)
    query = torch.randn(2, 5, 32, requires_grad=True)
    layer(query, torch.rand(2, 5, 2, 2), x.requires_grad_(), ss, starts).square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert query.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_bad_shapes_raise_with_shape_in_message():
    x, ss, starts = level_inputs(((4, 4), (2, 2)))
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with pytest.raises(ValueError, match=r"\(2, 5, 16\)"):
        layer(torch.randn(2, 5, 16), torch.rand(2, 5, 2, 2), x, ss, starts)
    with pytest.raises(ValueError, match=r"\(2, 5, 3, 2\)"):
        layer(torch.randn(2, 5, 32), torch.rand(2, 5, 3, 2), x, ss, starts)
    with pytest.raises(ValueError, match=r"\(2, 5, 2, 3\)"):
        layer(torch.randn(2, 5, 32), torch.rand(2, 5, 2, 3), x, ss, starts)
    with pytest.raises(ValueError, match="input_padding_mask"):
        layer(torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), x, ss, starts,
              input_padding_mask=torch.zeros(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    assert math.isfinite(layer(torch.randn(2, 5, 32), torch.rand(2, 5, 2, 2), x, ss,
                               starts).sum().item())


@pytest.mark.parametrize("name", ["d_model", "n_levels", "n_heads", "n_points"])
@pytest.mark.parametrize("bad", [0, -2])
def test_non_positive_sizes_raise_naming_the_argument(name, bad):
    kwargs = dict(d_model=32, n_levels=2, n_heads=4, n_points=2)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=rf"{name} must be a positive int, got {bad}"):
        MSDeformAttn(**kwargs)


@pytest.mark.parametrize("shape", [(5, 32), (2, 1, 5, 32), (32,)])
def test_query_of_wrong_rank_raises_with_expected_shape(shape):
    x, ss, starts = level_inputs(((4, 4), (2, 2)))
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2)
    with pytest.raises(ValueError, match=r"query must be \(N, Lq, C=32\), got shape " +
                       re.escape(str(tuple(shape)))):
        layer(torch.randn(*shape), torch.rand(2, 5, 2, 2), x, ss, starts)
